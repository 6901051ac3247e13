// qk_prep.cuh: one warp's QK-norm + RoPE of one head vector of a decode token, straight from the
// float32 qkv product, for the kernels that take it over from qk_rope_kv.cu in decode (the fused
// tensor-core decode attention, the persistent decode kernel): the arithmetic of qk_rope_kv.cu (the same
// sums, the same double cos/sin), so their q / k / v are the per-operation path's bits for the same qkv.
// Lane l holds the pairs (i, i + D/2), i = l + 32 e, e < D/64. The pieces are separate so that a kernel
// can load the weights and compute the angles before its PDL wait (they do not depend on the product).
#pragma once
#include "common.cuh"

namespace g3cuda {

template <int D>
__device__ __forceinline__ void head_load(float (&a)[D / 64], float (&b)[D / 64], const float* src) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    a[e] = __ldcg(src + lane + 32 * e);  // written by the previous kernel, or earlier in this one
    b[e] = __ldcg(src + lane + 32 * e + D / 2);
  }
}
// the norm weight w [D] as the lane's pairs
template <int D>
__device__ __forceinline__ void head_weights(float (&wa)[D / 64], float (&wb)[D / 64], const float* w) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    wa[e] = w[lane + 32 * e];
    wb[e] = w[lane + 32 * e + D / 2];
  }
}
template <int D>
__device__ __forceinline__ void head_norm(float (&a)[D / 64], float (&b)[D / 64], const float (&wa)[D / 64],
                                          const float (&wb)[D / 64], float eps) {
  double ss = 0.0;
#pragma unroll
  for (int e = 0; e < D / 64; ++e) ss += (double)a[e] * a[e] + (double)b[e] * b[e];
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf((float)(ss / D) + eps);
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    a[e] = (a[e] * r) * (1.f + wa[e]);
    b[e] = (b[e] * r) * (1.f + wb[e]);
  }
}
// cos / sin of the lane's RoPE angles at pos (inv_freq [D/2])
template <int D>
__device__ __forceinline__ void rope_angles(float (&c)[D / 64], float (&s)[D / 64], const float* inv_freq, int pos) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    const float ang = __fmul_rn((float)pos, inv_freq[lane + 32 * e]);
    c[e] = (float)cos((double)ang);
    s[e] = (float)sin((double)ang);
  }
}
template <int D>
__device__ __forceinline__ void head_rotate(float (&a)[D / 64], float (&b)[D / 64], const float (&c)[D / 64],
                                            const float (&s)[D / 64]) {
#pragma unroll
  for (int e = 0; e < D / 64; ++e) {
    const float x = a[e], y = b[e];
    a[e] = __fsub_rn(__fmul_rn(x, c[e]), __fmul_rn(y, s[e]));
    b[e] = __fadd_rn(__fmul_rn(y, c[e]), __fmul_rn(x, s[e]));
  }
}

// All of it: QK-norm with w (if given), RoPE at pos (if inv_freq).
template <int D>
__device__ __forceinline__ void head_prep(float (&a)[D / 64], float (&b)[D / 64], const float* src, const float* w,
                                          const float* inv_freq, int pos, float eps) {
  head_load<D>(a, b, src);
  if (w) {
    float wa[D / 64], wb[D / 64];
    head_weights<D>(wa, wb, w);
    head_norm<D>(a, b, wa, wb, eps);
  }
  if (inv_freq) {
    float c[D / 64], s[D / 64];
    rope_angles<D>(c, s, inv_freq, pos);
    head_rotate<D>(a, b, c, s);
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
