// geglu.cu: GeGLU after the stacked gate_up product: out = gelu_tanh(gate) * up, float32 in, T out.
#include "kernels.cuh"

namespace g3cuda {

template <typename T>
__global__ void geglu_kernel(T* out, const float* gu, int F, int64_t n) {
  G3_PDL_ENTRY();
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = k / F, i = k % F;
    const float g = gu[r * 2 * F + i], u = gu[r * 2 * F + F + i];
    out[k] = from_f<T>(gelu_tanh(g) * u);
  }
}

template <typename T>
void geglu(T* out, const float* gu, int rows, int F, cudaStream_t s) {
  const int64_t n = (int64_t)rows * F;
  if (n <= 0) return;
  const int blocks = (int)std::min<int64_t>((n + 255) / 256, 132 * 16);
  launch_k(geglu_kernel<T>, blocks, 256, 0, s, out, gu, F, n);
  CUDA_LAUNCH_CHECK();
}

template void geglu<float>(float*, const float*, int, int, cudaStream_t);
template void geglu<bf16>(bf16*, const float*, int, int, cudaStream_t);

}  // namespace g3cuda
