// residual_step.cuh: the arithmetic of the step between sub-blocks on one row held in registers, shared by
// residual_rmsnorm_kernel (residual_rmsnorm.cu) and the fused GEMV's prologue (gemv_residual, gemm.cu), so
// that both give the same bits: post-norm of the sub-block output d (when post), residual add, and the
// statistic of the next pre-norm. Thread layout: element i = threadIdx.x + NT k of the row (NT threads,
// the block), PER elements per thread; sums of squares in double (block_sum), so exact to float32 whatever
// the order, as in the CPU kernels.
#pragma once
#include "common.cuh"

namespace g3cuda {

// In: d = the sub-block's output, rs = the residual, pw = the post-norm weights (read when post). Out: d =
// the new residual row (also stored to resid_out where non-null); returns r, so that the next pre-norm of
// element k is (d[k] * r) * (1 + next_w[k]) (residual_step_normed).
template <int PER, int NT>
__device__ __forceinline__ float residual_step(float (&d)[PER], const float (&rs)[PER], const float (&pw)[PER],
                                               bool post, int dim, float eps, double* sh, float* resid_out) {
  double ss = 0.0;
#pragma unroll
  for (int k = 0; k < PER; ++k) ss += (double)d[k] * d[k];
  float r = 1.f;
  if (post) {
    ss = block_sum(ss, sh);
    r = 1.f / sqrtf((float)(ss / dim) + eps);
  }
  ss = 0.0;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * NT;
    if (i < dim) {
      const float add = post ? (d[k] * r) * (1.f + pw[k]) : d[k];
      const float x = rs[k] + add;
      if (resid_out) resid_out[i] = x;
      d[k] = x;
      ss += (double)x * x;
    }
  }
  ss = block_sum(ss, sh);
  return 1.f / sqrtf((float)(ss / dim) + eps);
}

__device__ __forceinline__ float residual_step_normed(float x, float r, float nw) { return (x * r) * (1.f + nw); }

}  // namespace g3cuda
