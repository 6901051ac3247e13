// vision_patch.cu: SigLIP's patch embedding (a 14x14 stride-14 convolution) as a product over unfolded
// patches: im2col of the pixels into bf16 rows (the conv weight seen as [hidden, C*p*p] has the same
// (c, y, x) order), one cuBLAS product with a float32 output, then bias + position embeddings added. Rows are
// zero-padded to a multiple of 8 elements (588 -> 592), so that the product's rows start on 16 bytes (at 588 cuBLAS
// takes a slow unaligned kernel).
#include "vision_kernels.cuh"

namespace g3cuda {

// One thread per patch element; consecutive threads walk x within a patch row (coalesced reads).
__global__ void vision_unfold_kernel(bf16* patches, const float* pixels, int C, int S, int p, int64_t total) {
  G3_PDL_ENTRY();
  const int g = S / p, pd = C * p * p, ld = vision_patch_ld(C, p);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / ld;  // image * g*g + patch
    const int e = (int)(i % ld);
    if (e >= pd) {
      patches[i] = __float2bfloat16_rn(0.f);
      continue;
    }
    const int c = e / (p * p), y = (e / p) % p, xx = e % p;
    const int64_t img = row / ((int64_t)g * g);
    const int patch = (int)(row % ((int64_t)g * g));
    const int py = patch / g, px = patch % g;
    patches[i] = __float2bfloat16_rn(pixels[((img * C + c) * S + (int64_t)py * p + y) * S + (int64_t)px * p + xx]);
  }
}

// out[r, c] = x[r, c] + (bias[c] + pos[r % P, c]) (out: x itself, or the bf16 residual stream)
template <typename X>
__global__ void vision_bias_pos_kernel(X* out, const float* x, const float* bias, const float* pos, int64_t n, int P,
                                       int H) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / H;
    const int c = (int)(i % H);
    out[i] = from_f<X>(x[i] + (bias[c] + pos[(r % P) * H + c]));
  }
}

static int grid_for(int64_t n) { return (int)std::min<int64_t>((n + 255) / 256, 65536); }

void vision_patch_embed(cublasHandle_t h, float* x, bf16* patches, const float* pixels, const bf16* w,
                        const float* bias, const float* pos, int n, int C, int S, int p, int H, cudaStream_t s,
                        bf16* x16) {
  if (n <= 0) return;
  if (p <= 0 || S % p) throw std::invalid_argument("vision_patch_embed: image size must be a multiple of the patch size");
  const int P = (S / p) * (S / p), ld = vision_patch_ld(C, p);
  const int64_t total = (int64_t)n * P * ld;
  launch_k(vision_unfold_kernel, grid_for(total), 256, 0, s, patches, pixels, C, S, p, total);
  CUDA_LAUNCH_CHECK();
  vision_gemm(h, x, false, patches, w, n * P, ld, H, s);
  const int64_t nx = (int64_t)n * P * H;
  if (x16)
    launch_k(vision_bias_pos_kernel<bf16>, grid_for(nx), 256, 0, s, x16, x, bias, pos, nx, P, H);
  else
    launch_k(vision_bias_pos_kernel<float>, grid_for(nx), 256, 0, s, x, x, bias, pos, nx, P, H);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
