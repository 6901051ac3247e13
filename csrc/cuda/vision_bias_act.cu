// vision_bias_act.cu: the elementwise steps around SigLIP's biased products (the products themselves
// are cuBLAS GEMMs with float32 output): bias + cast for attention, bias + gelu_tanh + cast for fc2,
// and a projection's bias folded into the residual add. Grid-stride loops over rows x cols. DRAFT.
#include "vision_common.cuh"
#include "vision_kernels.cuh"

namespace g3cuda {
namespace vision {

static int blocks_for(size_t n) { return (int)((n + 255) / 256 < 65535 * 4 ? (n + 255) / 256 : 65535 * 4); }

template <typename T>
__global__ void bias_cast_kernel(T* out, const float* x, const float* bias, size_t n, int cols) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = vt<T>(x[i] + bias[i % cols]);
}

template <typename T>
__global__ void bias_gelu_kernel(T* out, const float* x, const float* bias, size_t n, int cols) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = vt<T>(gelu_tanh(x[i] + bias[i % cols]));
}

__global__ void bias_residual_kernel(float* resid, const float* delta, const float* bias, size_t n, int cols) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    resid[i] += delta[i] + bias[i % cols];
}

__global__ void bias_pos_kernel(float* x, const float* bias, const float* pos, size_t n, int P, int H) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / H;
    const int c = (int)(i % H);
    x[i] += bias[c] + pos[(r % P) * H + c];
  }
}

template <typename T>
void vision_bias_cast(T* out, const float* x, const float* bias, int rows, int cols, cudaStream_t s) {
  const size_t n = (size_t)rows * cols;
  if (!n) return;
  bias_cast_kernel<T><<<blocks_for(n), 256, 0, s>>>(out, x, bias, n, cols);
  G3V_LAUNCH_CHECK("vision_bias_cast");
}

template <typename T>
void vision_bias_gelu(T* out, const float* x, const float* bias, int rows, int cols, cudaStream_t s) {
  const size_t n = (size_t)rows * cols;
  if (!n) return;
  bias_gelu_kernel<T><<<blocks_for(n), 256, 0, s>>>(out, x, bias, n, cols);
  G3V_LAUNCH_CHECK("vision_bias_gelu");
}

void vision_bias_residual_add(float* resid, const float* delta, const float* bias, int rows, int cols, cudaStream_t s) {
  const size_t n = (size_t)rows * cols;
  if (!n) return;
  bias_residual_kernel<<<blocks_for(n), 256, 0, s>>>(resid, delta, bias, n, cols);
  G3V_LAUNCH_CHECK("vision_bias_residual_add");
}

void vision_bias_pos_add(float* x, const float* bias, const float* pos, int rows, int P, int H, cudaStream_t s) {
  const size_t n = (size_t)rows * H;
  if (!n) return;
  bias_pos_kernel<<<blocks_for(n), 256, 0, s>>>(x, bias, pos, n, P, H);
  G3V_LAUNCH_CHECK("vision_bias_pos_add");
}

template void vision_bias_cast<float>(float*, const float*, const float*, int, int, cudaStream_t);
template void vision_bias_cast<bf16>(bf16*, const float*, const float*, int, int, cudaStream_t);
template void vision_bias_gelu<float>(float*, const float*, const float*, int, int, cudaStream_t);
template void vision_bias_gelu<bf16>(bf16*, const float*, const float*, int, int, cudaStream_t);

}  // namespace vision
}  // namespace g3cuda
