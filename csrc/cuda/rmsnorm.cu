// rmsnorm.cu: Gemma RMSNorm, x * rsqrt(mean(x^2) + eps) * (1 + w), float32 in, statistic in double,
// output in the product input type T. One block per row.
#include "kernels.cuh"

namespace g3cuda {

template <typename T>
__global__ void rmsnorm_kernel(T* out, const float* x, const float* w, int dim, float eps) {
  G3_PDL_ENTRY();
  __shared__ double sh[33];
  const float* xr = x + (int64_t)blockIdx.x * dim;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
  ss = block_sum(ss, sh);
  const float r = 1.f / sqrtf((float)(ss / dim) + eps);
  T* o = out + (int64_t)blockIdx.x * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_f<T>((xr[i] * r) * (1.f + w[i]));
}

template <typename T>
void rmsnorm(T* out, const float* x, const float* w, int rows, int dim, float eps, cudaStream_t s) {
  if (rows <= 0) return;
  launch_k(rmsnorm_kernel<T>, rows, 256, 0, s, out, x, w, dim, eps);
  CUDA_LAUNCH_CHECK();
}

template void rmsnorm<float>(float*, const float*, const float*, int, int, float, cudaStream_t);
template void rmsnorm<bf16>(bf16*, const float*, const float*, int, int, float, cudaStream_t);

}  // namespace g3cuda
