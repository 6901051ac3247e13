// vision_layernorm.cu: SigLIP's LayerNorms (with bias), optionally fused with the residual add before
// them (x += delta + dbias: the biased output of the o or fc2 product), which saves a pass over the
// residual stream per norm. One warp per row: the row (4.6 KB at hidden 1152) stays in L1 across the
// three passes (add + sum, centred sum of squares, normalise); float32 statistics, two-pass variance.
#include "vision_kernels.cuh"

namespace g3cuda {

template <typename T>
__global__ void vision_layernorm_kernel(T* out, float* x, const bf16* delta, const float* dbias, const float* w,
                                        const float* b, int rows, int dim, float eps) {
  G3_PDL_ENTRY();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  float* xr = x + (int64_t)row * dim;
  float sum = 0.f;
  if (delta) {
    const bf16* dr = delta + (int64_t)row * dim;
    for (int i = lane; i < dim; i += 32) {
      const float v = xr[i] + (__bfloat162float(dr[i]) + dbias[i]);
      xr[i] = v;
      sum += v;
    }
  } else {
    for (int i = lane; i < dim; i += 32) sum += xr[i];
  }
  const float mean = warp_sum(sum) / (float)dim;
  float ss = 0.f;
  for (int i = lane; i < dim; i += 32) {
    const float d = xr[i] - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_sum(ss) / (float)dim + eps);
  T* o = out + (int64_t)row * dim;
  for (int i = lane; i < dim; i += 32) o[i] = from_f<T>((xr[i] - mean) * rstd * w[i] + b[i]);
}

template <typename T>
void vision_layernorm(T* out, float* x, const bf16* delta, const float* dbias, const float* w, const float* b,
                      int rows, int dim, float eps, cudaStream_t s) {
  if (rows <= 0) return;
  constexpr int kWarps = 8;
  launch_k(vision_layernorm_kernel<T>, (rows + kWarps - 1) / kWarps, kWarps * 32, 0, s, out, x, delta, dbias, w, b,
           rows, dim, eps);
  CUDA_LAUNCH_CHECK();
}

template void vision_layernorm<float>(float*, float*, const bf16*, const float*, const float*, const float*, int, int,
                                      float, cudaStream_t);
template void vision_layernorm<bf16>(bf16*, float*, const bf16*, const float*, const float*, const float*, int, int,
                                     float, cudaStream_t);

}  // namespace g3cuda
