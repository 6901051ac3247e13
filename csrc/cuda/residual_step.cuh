// residual_step.cuh: the arithmetic of the step between sub-blocks on one row held in registers, shared by
// residual_rmsnorm_kernel (residual_rmsnorm.cu) and the fused products' prologue (FusedResidualStep below), so
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
  G3_TRACE_MARK(0);  // the post-norm statistic (trace.cuh; nothing without GEMMA3_TRACE)
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
  G3_TRACE_MARK(1);  // the next pre-norm's statistic
  return 1.f / sqrtf((float)(ss / dim) + eps);
}

__device__ __forceinline__ float residual_step_normed(float x, float r, float nw) { return (x * r) * (1.f + nw); }

// The residual step as the fused products make it in every block (gemv_residual in gemm.cu, gemv_qkv_rope),
// from a GemvResidual (kernels.cuh) of M rows of K: load() reads what the kernel before does not write (the
// norm weights and the old residual rows: may come before the PDL wait), make_x() reads the sub-block's
// output, writes the next pre-norm's bf16 rows xs [M][K] to shared memory (block 0 also the new residual
// rows), and syncs the block.
template <int M, int P, int NT>
struct FusedResidualStep {
  float pw[P], nw[P], rs[M][P];
  // the norm weights (constant), then the residual row (written by an earlier kernel of the step)
  template <typename Res>
  __device__ __forceinline__ void load_weights(const Res& rn, int K) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * NT;
      pw[k] = rn.post_w && i < K ? rn.post_w[i] : 0.f;
      nw[k] = i < K ? rn.next_w[i] : 0.f;
    }
  }
  template <typename Res>
  __device__ __forceinline__ void load_resid(const Res& rn, int K) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int i = threadIdx.x + k * NT;
#pragma unroll
      for (int m = 0; m < M; ++m) rs[m][k] = i < K ? rn.resid_in[(int64_t)m * K + i] : 0.f;
    }
  }
  // before the wait (pre, common.cuh's pdl flags): the weights, and the residual row unless kPdlResidLate
  template <typename Res>
  __device__ __forceinline__ void load_before_wait(const Res& rn, int K, int pdl) {
    if (!(pdl & kPdlPrologue)) return;
    load_weights(rn, K);
    if (!(pdl & kPdlResidLate)) load_resid(rn, K);
  }
  template <typename Res>
  __device__ __forceinline__ void load_after_wait(const Res& rn, int K, int pdl) {
    if (!(pdl & kPdlPrologue)) load_weights(rn, K);
    if (!(pdl & kPdlPrologue) || (pdl & kPdlResidLate)) load_resid(rn, K);
  }
  template <typename Res>
  __device__ __forceinline__ void make_x(bf16* xs, const Res& rn, int K, double* sh) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float d[P];
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const int i = threadIdx.x + k * NT;
        d[k] = i < K ? rn.delta[(int64_t)m * K + i] : 0.f;
      }
      const float r = residual_step<P, NT>(d, rs[m], pw, rn.post_w != nullptr, K, rn.eps, sh,
                                           blockIdx.x == 0 ? rn.resid_out + (int64_t)m * K : nullptr);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const int i = threadIdx.x + k * NT;
        if (i < K) xs[m * K + i] = __float2bfloat16_rn(residual_step_normed(d[k], r, nw[k]));
      }
    }
    __syncthreads();
  }
};

}  // namespace g3cuda
