// vision_layernorm.cu: LayerNorm with weight and bias (SigLIP's pre-norms and post-norm): one block per
// row, mean and variance accumulated in double over the float32 residual stream, output in T. DRAFT.
#include "vision_common.cuh"
#include "vision_kernels.cuh"

namespace g3cuda {
namespace vision {

template <typename T>
__global__ void layernorm_kernel(T* out, const float* x, const float* w, const float* b, int dim, float eps) {
  const float* xr = x + (size_t)blockIdx.x * dim;
  double s = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
  const double mean = block_sum(s) / dim;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const double d = xr[i] - mean;
    ss += d * d;
  }
  const float rstd = (float)(1.0 / sqrt(block_sum(ss) / dim + (double)eps));
  const float m = (float)mean;
  T* o = out + (size_t)blockIdx.x * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = vt<T>((xr[i] - m) * rstd * w[i] + b[i]);
}

template <typename T>
void vision_layernorm(T* out, const float* x, const float* w, const float* b, int rows, int dim, float eps,
                      cudaStream_t s) {
  if (rows <= 0) return;
  layernorm_kernel<T><<<rows, 256, 0, s>>>(out, x, w, b, dim, eps);
  G3V_LAUNCH_CHECK("vision_layernorm");
}

template void vision_layernorm<float>(float*, const float*, const float*, const float*, int, int, float, cudaStream_t);
template void vision_layernorm<bf16>(bf16*, const float*, const float*, const float*, int, int, float, cudaStream_t);

}  // namespace vision
}  // namespace g3cuda
