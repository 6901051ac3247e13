// vision_kernels.cuh: CUDA kernels of the Gemma 3 vision encoder (SigLIP + multimodal projector), one
// launcher each, one file per operation (csrc/cuda/vision_*.cu). DRAFT written without a GPU: each file
// compiles (nvcc -std=c++17 -arch=sm_90 -c), none has run yet. They are not in any CMake target; the
// CUDA vision session wires them into the _cuda module next to the cuBLAS products, tests each against
// its CPU twin in csrc/cpu/ (tests/test_kernels_vision.py shows the references) and benchmarks them.
//
// Layout of one image's encoder pass (N = 4096 patches, H = 1152, 16 heads of 72, I = 4304):
//   patches = vision_unfold(pixels)                [N, 588]  T
//   x = patches . Wpatch^T (cuBLAS)                [N, H]    f32, then vision_bias_pos_add
//   per layer: xn = vision_layernorm(x)            [N, H]    T
//              qkv = xn . Wqkv^T (cuBLAS), vision_bias_cast -> [N, 3H] T
//              a = vision_attention_full(qkv)      [N, H]    T   (tensor cores, D = 72 padded to 80)
//              d = a . Wo^T (cuBLAS); vision_bias_residual_add(x, d, bo)
//              xn = vision_layernorm(x); h = xn . W1^T (cuBLAS) -> vision_bias_gelu -> T
//              d = h . W2^T (cuBLAS); vision_bias_residual_add(x, d, b2)
//   y = vision_layernorm(x, post);  p = vision_pool_rmsnorm(y) [256, H] T;  out = p . Wproj^T (cuBLAS)
// T is the storage type of product inputs (bf16, or float); the residual stream and product outputs are f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace g3cuda {
namespace vision {

using bf16 = __nv_bfloat16;

// pixels [n, C, S, S] f32 -> patches [n * (S/p)^2, C*p*p] T, each patch flattened (c, y, x) like a conv weight.
template <typename T>
void vision_unfold(T* patches, const float* pixels, int n, int C, int S, int p, cudaStream_t s);

// x[r, :] += bias + pos[r % P, :]   (r over n images x P patches; x f32 [n*P, H])
void vision_bias_pos_add(float* x, const float* bias, const float* pos, int rows, int P, int H, cudaStream_t s);

// out = LayerNorm(x) * w + b  (statistics in double), x f32 [rows, dim] -> out T.
template <typename T>
void vision_layernorm(T* out, const float* x, const float* w, const float* b, int rows, int dim, float eps,
                      cudaStream_t s);

// out[r, i] = T(x[r, i] + bias[i])            (the qkv product's bias, cast for attention)
template <typename T>
void vision_bias_cast(T* out, const float* x, const float* bias, int rows, int cols, cudaStream_t s);
// out[r, i] = T(gelu_tanh(x[r, i] + bias[i]))  (fc1's bias and activation, cast for fc2)
template <typename T>
void vision_bias_gelu(T* out, const float* x, const float* bias, int rows, int cols, cudaStream_t s);
// resid[r, i] += delta[r, i] + bias[i]
void vision_bias_residual_add(float* resid, const float* delta, const float* bias, int rows, int cols, cudaStream_t s);

// Non-causal attention on tensor cores (bf16 in, f32 accumulation): qkv [n_img * N, 3 * heads * D] rows
// (q | k | v, head-major within each), out [n_img * N, heads * D]. D <= 80 (SigLIP: 72, padded to 80
// with zeros in shared memory). Grid: (ceil(N / 64), heads, n_img).
void vision_attention_full(bf16* out, const bf16* qkv, int n_img, int N, int heads, int D, float scale,
                           cudaStream_t s);
bool vision_attention_full_supported(int D);

// k x k average pooling of each image's g x g grid, then RMSNorm with (1 + w):
// y f32 [n_img * g*g, H] -> out T [n_img * (g/k)^2, H].
template <typename T>
void vision_pool_rmsnorm(T* out, const float* y, const float* w, int n_img, int g, int k, int H, float eps,
                         cudaStream_t s);

}  // namespace vision
}  // namespace g3cuda
