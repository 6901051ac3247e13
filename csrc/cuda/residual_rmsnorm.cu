// residual_rmsnorm.cu: the step between sub-blocks in one pass over the row: post-norm of the
// sub-block output (Gemma 2/3), residual add (float32 stream), and the next pre-norm (or final norm).
// The row is held in registers between the passes (dim <= 256 * kRowMaxPer); statistics in double. The
// arithmetic: residual_step.cuh (shared with the GEMV that fuses this step).
#include "kernels.cuh"
#include "residual_step.cuh"

namespace g3cuda {

constexpr int kThreads = 256;  // dims up to 256 * kRowMaxPer = 6144 in registers

// kPdlPrologue: the norm weights and the residual row go to registers before the wait for the kernel that wrote
// delta (the residual was last written by the residual step before that kernel, long complete); with
// kPdlResidLate (that kernel triggered early, common.cuh) the row comes after the wait.
// PER: elements per thread, the smallest of 4, 8, 12, 16, 24 that holds the row (fewer registers, more
// blocks per SM; the same bits: the elements past dim only added 0.0 to the double sums).
template <typename T, int PER>
__global__ void __launch_bounds__(kThreads) residual_rmsnorm_kernel(float* resid, T* out, const float* delta,
                                                                     const float* post_w, const float* next_w,
                                                                     int dim, float eps, int pdl) {
  G3_PDL_TRIGGER_EARLY(pdl);
  __shared__ double sh[33];
  const int64_t base = (int64_t)blockIdx.x * dim;
  // the norm weights and this row's residual: FusedResidualStep's loads, before or after the wait as pdl says
  GemvResidual rn;
  rn.resid_in = resid + base;
  rn.post_w = post_w;
  rn.next_w = next_w;
  FusedResidualStep<1, PER, kThreads> res;
  res.load_before_wait(rn, dim, pdl);
  G3_PDL_WAIT_FLAGS(pdl);
  res.load_after_wait(rn, dim, pdl);
  float d[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kThreads;
    d[k] = i < dim ? delta[base + i] : 0.f;
  }
  const float r = residual_step<PER, kThreads>(d, res.rs[0], res.pw, post_w != nullptr, dim, eps, sh, resid + base);
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < dim) out[base + i] = from_f<T>(residual_step_normed(d[k], r, res.nw[k]));
  }
}

// Wider rows: the same in three passes over memory.
template <typename T>
__global__ void residual_rmsnorm_wide_kernel(float* resid, T* out, const float* delta, const float* post_w,
                                             const float* next_w, int dim, float eps) {
  G3_PDL_ENTRY();
  __shared__ double sh[33];
  const int64_t base = (int64_t)blockIdx.x * dim;
  float r = 1.f;
  if (post_w) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)delta[base + i] * delta[base + i];
    ss = block_sum(ss, sh);
    r = 1.f / sqrtf((float)(ss / dim) + eps);
  }
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float add = post_w ? (delta[base + i] * r) * (1.f + post_w[i]) : delta[base + i];
    const float x = resid[base + i] + add;
    resid[base + i] = x;
    ss += (double)x * x;
  }
  ss = block_sum(ss, sh);
  r = 1.f / sqrtf((float)(ss / dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[base + i] = from_f<T>((resid[base + i] * r) * (1.f + next_w[i]));
}

template <typename T>
void residual_rmsnorm(float* resid, T* out, const float* delta, const float* post_w, const float* next_w, int rows,
                      int dim, float eps, cudaStream_t s) {
  if (rows <= 0) return;
  const bool in_regs = with_row_per(dim, kThreads, [&](auto per) {
    launch_k(residual_rmsnorm_kernel<T, decltype(per)::value>, rows, kThreads, 0, s, resid, out, delta, post_w, next_w,
             dim, eps, pdl_flags());
  });
  if (!in_regs)
    launch_k(residual_rmsnorm_wide_kernel<T>, rows, kThreads, 0, s, resid, out, delta, post_w, next_w, dim, eps);
  CUDA_LAUNCH_CHECK();
}

template void residual_rmsnorm<float>(float*, float*, const float*, const float*, const float*, int, int, float,
                                      cudaStream_t);
template void residual_rmsnorm<bf16>(float*, bf16*, const float*, const float*, const float*, int, int, float,
                                     cudaStream_t);

}  // namespace g3cuda
