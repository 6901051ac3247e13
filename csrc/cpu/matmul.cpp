// matmul.cpp: out[T, N] = x[T, K] . W[N, K]^T with W in float32 or bfloat16 (converted on load),
// float32 accumulation. One code path for decode (T = 1, a matrix-vector product limited by reading W)
// and prefill (T large): W is walked in groups of 4 rows that stay in L1 while a tile of x rows
// streams past, 1-2 x rows at a time (3 on a float32 copy of the group from 3 rows on). Every dot product
// uses 8 lanes over k then the same horizontal sum (dot8.h), so a row's result never depends on which other
// rows share the batch.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#include "dot8.h"
#include "kernels.h"

namespace g3 {

#ifdef G3_AVX2
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#endif
static inline float wval(const float* p, int64_t i) { return p[i]; }
static inline float wval(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

// The first pass over a weight group prefetches the lines 16 KB ahead of each of its rows (the stream is
// contiguous, so that is the next groups'): at T = 1 the loop alone kept too few lines in flight, and the
// products ran at 60-70 % of this 2-core machine's read bandwidth (the 270M decode step 1.6x faster with it,
// bench/README.md). 4-64 KB measured the same.
constexpr int kPrefetchBytes = 16384;

// NR weight rows (NR <= 4) times MR x rows (MR <= 3; 3 with float32 weights, converted or as stored).
template <typename WT, int MR, bool PF = false>
static inline void micro(float* out, int64_t ldo, const float* x, int64_t ldx, const WT* w, int64_t ldw, int NR,
                         int K) {
#ifdef G3_AVX2
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm256_setzero_ps();
  const int K8 = K & ~7;
  if (MR == 3 && NR == 4) {  // 12 accumulators + 3 x vectors + 1 weight vector: every ymm register
    for (int k = 0; k < K8; k += 8) {
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < 4; ++r) {
        const __m256 wr = load8(w + r * ldw + k);
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wr, acc[m][r]);
      }
    }
  } else if (NR == 4) {
    constexpr int EPL = 64 / sizeof(WT);  // elements a cache line
    for (int k = 0; k < K8; k += 8) {
      if (PF && k % EPL == 0)  // an address, not a pointer into W: x86 prefetches do not fault past its end
        for (int r = 0; r < 4; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(w + r * ldw + k) + kPrefetchBytes),
                       _MM_HINT_T0);
      const __m256 w0 = load8(w + k), w1 = load8(w + ldw + k), w2 = load8(w + 2 * ldw + k),
                   w3 = load8(w + 3 * ldw + k);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
        acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
        acc[m][2] = _mm256_fmadd_ps(xv, w2, acc[m][2]);
        acc[m][3] = _mm256_fmadd_ps(xv, w3, acc[m][3]);
      }
    }
  } else {
    for (int k = 0; k < K8; k += 8)
      for (int r = 0; r < NR; ++r) {
        const __m256 wr = load8(w + r * ldw + k);
        for (int m = 0; m < MR; ++m) acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wr, acc[m][r]);
      }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      float s = hsum8(acc[m][r]);
      for (int k = K8; k < K; ++k) s = std::fma(x[m * ldx + k], wval(w + r * ldw, k), s);  // dot8.h's tail
      out[m * ldo + r] = s;
    }
#else
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int K8 = K & ~7;
      for (int k = 0; k < K8; k += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += x[m * ldx + k + l] * wval(w + r * ldw, k + l);
      float s = hsum8(lanes);  // the AVX2 path's order (dot8.h)
      for (int k = K8; k < K; ++k) s = std::fma(x[m * ldx + k], wval(w + r * ldw, k), s);  // dot8.h's tail
      out[m * ldo + r] = s;
    }
#endif
}

// A bf16 weight group (contiguous) to float32, prefetching as the decode pass does: with a few rows (a batch of
// decode steps) this pass is the one that streams W from memory.
static void to_f32(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
#ifdef G3_AVX2
  for (; i + 8 <= n; i += 8) {
    if (i % 32 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src + i) + kPrefetchBytes), _MM_HINT_T0);
    _mm256_storeu_ps(dst + i, load8(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// Products of 3 or more x rows: each 4-row weight group of a tile goes through 3 x rows at a time, in float32
// (bf16 groups converted once into a per-thread buffer that stays in L1): without the conversion in the inner
// loop the FMA units are the limit, not the conversion's shuffles (the same bits: only the grouping changes).
static void group_rows3(float* out, int N, const float* x, int K, const float* wg, int NR, int t0, int t1, int n0) {
  int t = t0;
  for (; t + 3 <= t1; t += 3) micro<float, 3>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
  if (t + 2 <= t1) {
    micro<float, 2>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
    t += 2;
  }
  if (t < t1) micro<float, 1>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
}

template <typename WT>
static void matmul_impl(float* out, const float* x, const WT* w, int T, int K, int N) {
  const int groups = (N + 3) / 4;
  const int TT = 64;  // x rows per tile: 64 * K floats stay in L2 while the W group sits in L1
  if (T >= 3) {
    for (int t0 = 0; t0 < T; t0 += TT) {
      const int t1 = std::min(T, t0 + TT);
#pragma omp parallel
      {
        thread_local std::vector<float> wf;  // OpenMP's threads persist: one buffer each, grown once
        if (!std::is_same<WT, float>::value && wf.size() < (size_t)4 * K) wf.resize((size_t)4 * K);
#pragma omp for schedule(static)
        for (int gi = 0; gi < groups; ++gi) {
          const int n0 = gi * 4;
          const int NR = std::min(4, N - n0);
          const WT* wg = w + (int64_t)n0 * K;
          if constexpr (std::is_same<WT, float>::value) {
            group_rows3(out, N, x, K, wg, NR, t0, t1, n0);
          } else {
            to_f32(wf.data(), wg, (int64_t)NR * K);
            group_rows3(out, N, x, K, wf.data(), NR, t0, t1, n0);
          }
        }
      }
    }
    return;
  }
  for (int t0 = 0; t0 < T; t0 += TT) {
    const int t1 = std::min(T, t0 + TT);
#pragma omp parallel for schedule(static)
    for (int gi = 0; gi < groups; ++gi) {
      const int n0 = gi * 4;
      const int NR = std::min(4, N - n0);
      const WT* wg = w + (int64_t)n0 * K;
      int t = t0;  // the group's first call of the tile reads it from memory: it prefetches
      if (t + 2 <= t1) {
        micro<WT, 2, true>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
        t += 2;
      } else {
        micro<WT, 1, true>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
        t += 1;
      }
      for (; t + 2 <= t1; t += 2) micro<WT, 2>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
      if (t < t1) micro<WT, 1>(out + (int64_t)t * N + n0, N, x + (int64_t)t * K, K, wg, K, NR, K);
    }
  }
}

void matmul_cpu(float* out, const float* x, const WeightView& w, int T, int K, int N) {
  if (w.rows != N || w.cols != K)
    throw std::invalid_argument("matmul: weight is " + std::to_string(w.rows) + "x" + std::to_string(w.cols) +
                                ", expected " + std::to_string(N) + "x" + std::to_string(K));
  if (T <= 0) return;
  if (w.dtype == DType::F32)
    matmul_impl(out, x, (const float*)w.data, T, K, N);
  else
    matmul_impl(out, x, (const uint16_t*)w.data, T, K, N);
}

}  // namespace g3
