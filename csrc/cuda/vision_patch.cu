// vision_patch.cu: im2col of the 14x14 stride-14 patch grid (the patch embedding is then one cuBLAS
// product against the conv weight seen as [hidden, C*14*14], followed by vision_bias_pos_add).
// One thread per output element; reads are coalesced along x within a patch row. DRAFT.
#include "vision_common.cuh"
#include "vision_kernels.cuh"

namespace g3cuda {
namespace vision {

template <typename T>
__global__ void unfold_kernel(T* patches, const float* pixels, int C, int S, int p, size_t total) {
  const int g = S / p, pd = C * p * p;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / pd;  // image * g*g + patch
    const int e = (int)(i % pd);
    const int c = e / (p * p), y = (e / p) % p, x = e % p;
    const size_t img = row / ((size_t)g * g);
    const int patch = (int)(row % ((size_t)g * g));
    const int py = patch / g, px = patch % g;
    patches[i] = vt<T>(pixels[((img * C + c) * S + (size_t)py * p + y) * S + (size_t)px * p + x]);
  }
}

template <typename T>
void vision_unfold(T* patches, const float* pixels, int n, int C, int S, int p, cudaStream_t s) {
  const size_t total = (size_t)n * (S / p) * (S / p) * C * p * p;
  if (!total) return;
  const size_t blocks = (total + 255) / 256;
  unfold_kernel<T><<<(int)(blocks < 262140 ? blocks : 262140), 256, 0, s>>>(patches, pixels, C, S, p, total);
  G3V_LAUNCH_CHECK("vision_unfold");
}

template void vision_unfold<float>(float*, const float*, int, int, int, int, cudaStream_t);
template void vision_unfold<bf16>(bf16*, const float*, int, int, int, int, cudaStream_t);

}  // namespace vision
}  // namespace g3cuda
