// qk_prep.cuh: one warp's QK-norm + RoPE of one head vector of a decode token, straight from the
// float32 qkv product, for the persistent decode kernel: the arithmetic of qk_rope_kv.cu (the same sums,
// the same double cos/sin), so its q / k / v are the per-operation path's bits for the same qkv.
#pragma once
#include "common.cuh"

namespace g3cuda {

// a / b: the pairs (i, i + D/2), i = lane + 32 e, of src [D]; QK-norm with w (if given), RoPE at pos (if
// inv_freq [D/2]).
template <int D>
__device__ __forceinline__ void head_prep(float (&a)[D / 64], float (&b)[D / 64], const float* src, const float* w,
                                          const float* inv_freq, int pos, float eps) {
  constexpr int P = D / 64, half = D / 2;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < P; ++e) {
    a[e] = __ldcg(src + lane + 32 * e);  // written by the previous kernel, or earlier in this one
    b[e] = __ldcg(src + lane + 32 * e + half);
  }
  if (w) {
    double ss = 0.0;
#pragma unroll
    for (int e = 0; e < P; ++e) ss += (double)a[e] * a[e] + (double)b[e] * b[e];
    ss = warp_sum(ss);
    const float r = 1.f / sqrtf((float)(ss / D) + eps);
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const int i = lane + 32 * e;
      a[e] = (a[e] * r) * (1.f + w[i]);
      b[e] = (b[e] * r) * (1.f + w[i + half]);
    }
  }
  if (inv_freq) {
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const int i = lane + 32 * e;
      const float ang = __fmul_rn((float)pos, inv_freq[i]);
      const float c = (float)cos((double)ang), sn = (float)sin((double)ang);
      const float x = a[e], y = b[e];
      a[e] = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, sn));
      b[e] = __fadd_rn(__fmul_rn(y, c), __fmul_rn(x, sn));
    }
  }
}

template <int D>
__device__ __forceinline__ void head_store(bf16* dst, const float (&a)[D / 64], const float (&b)[D / 64]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    dst[lane + 32 * e] = __float2bfloat16_rn(a[e]);
    dst[lane + 32 * e + D / 2] = __float2bfloat16_rn(b[e]);
  }
}

}  // namespace g3cuda
