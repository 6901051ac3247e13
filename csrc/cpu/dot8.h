// dot8.h: the CPU backend's one summation order for float32 dot products: 8 lanes over k (lane l takes
// k = l, l + 8, ...), then one fixed horizontal sum, then the k % 8 tail in order with fused multiply-adds
// (written out: whether the compiler fuses a plain a * b + s differed between instantiations), so that a
// result never depends on what else is computed beside it. The scalar fallback (builds without AVX2) keeps
// the order; whether its lanes' products fuse is the compiler's, so its last bits may differ from AVX2's.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define G3_AVX2 1
#endif

namespace g3 {

// ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)): what hsum8 of a register computes
inline float hsum8(const float (&l)[8]) {
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

#ifdef G3_AVX2
inline float hsum8(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l_i + l_{i+4}
  __m128 sh = _mm_movehdup_ps(lo);
  const __m128 s = _mm_add_ps(lo, sh);  // s0 = lo0 + lo1, s2 = lo2 + lo3
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}
#endif

// out[i][j] = sum_k a[i][k] b[j][k] in the order above, for NA x NB vector pairs at once (NA = NB = 1: one
// dot product): NA * NB independent accumulator chains (one chain alone waits on its FMA's latency) sharing
// their loads; the bits of each do not depend on NA or NB.
template <int NA, int NB>
inline void dot8_tile(const float* const* a, const float* const* b, int n, float (&out)[NA][NB]) {
  const int n8 = n & ~7;
#ifdef G3_AVX2
  __m256 acc[NA][NB];
  for (int i = 0; i < NA; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int k = 0; k < n8; k += 8) {
    __m256 va[NA], vb[NB];
    for (int i = 0; i < NA; ++i) va[i] = _mm256_loadu_ps(a[i] + k);
    for (int j = 0; j < NB; ++j) vb[j] = _mm256_loadu_ps(b[j] + k);
    for (int i = 0; i < NA; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(va[i], vb[j], acc[i][j]);
  }
  for (int i = 0; i < NA; ++i)
    for (int j = 0; j < NB; ++j) out[i][j] = hsum8(acc[i][j]);
#else
  for (int i = 0; i < NA; ++i)
    for (int j = 0; j < NB; ++j) {
      float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < n8; k += 8)
        for (int e = 0; e < 8; ++e) l[e] += a[i][k + e] * b[j][k + e];
      out[i][j] = hsum8(l);
    }
#endif
  for (int i = 0; i < NA; ++i)
    for (int j = 0; j < NB; ++j)
      for (int k = n8; k < n; ++k) out[i][j] = std::fma(a[i][k], b[j][k], out[i][j]);
}

}  // namespace g3
