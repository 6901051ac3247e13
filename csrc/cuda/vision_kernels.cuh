// vision_kernels.cuh: CUDA kernels of the Gemma 3 vision encoder (SigLIP + multimodal projector) and of
// multimodal prompts, one launcher each, one file per operation (csrc/cuda/vision_*.cu, scatter_rows.cu).
// bf16 storage, float32 accumulation; every launcher runs on `stream` and checks its launch.
//
// One image batch through the tower (N patches per image, R = n_img * N rows, H hidden, I intermediate):
//   x = vision_patch_embed(pixels)                   [R, H]  residual stream, bf16 or f32 (+ bias + positions)
//   xn = vision_layernorm(x, ln1)                     [R, H]  bf16
//   per layer: qkv = vision_gemm(xn, Wqkv)           [R, 3H] bf16
//              qh = vision_qkv_bias_split(qkv, bqkv)  [3, heads, n_img, N, 80] bf16 (head dim padded)
//              a = vision_attention(qh)               [R, H]  bf16 (tensor cores, non-causal)
//              (on Hopper: qkv_t = vision_gemm_lt_t(xn, Wqkv) [3H, R]; a = vision_attention_wgmma_t(qkv_t, bq, bv):
//               no split pass)
//              d = vision_gemm(a, Wo); xn = vision_layernorm(x += d + bo, ln2)
//              h = vision_gemm(xn, W1); vision_bias_gelu(h, b1)          [R, I] bf16
//              d = vision_gemm(h, W2); xn = vision_layernorm(x += d + b2, next ln1 | post-LN in f32)
//              (or x += h.W2 + b2 in the product's epilogue: vision_gemm_residual_lt)
//   p = vision_pool_rmsnorm(y)  [n_img * 256, H] bf16;  out = vision_gemm(p, Wproj) f32.
#pragma once
#include <cublas_v2.h>
#include "common.cuh"

namespace g3cuda {

constexpr int kVisionDP = 80;  // head dim of the padded q/k/v layout (SigLIP's 72 -> 80: five k-steps of 16)

// The padded q/k/v layout qh [3][heads][n_img][N][kVisionDP]: the slice (N rows) of q (which 0), k (1) or
// v (2) of one head and image. One (which, head)'s rows of all images are contiguous, [R, kVisionDP], so
// that a product batched over the 3 * heads stacked heads could write it directly (measured slower: NOTES).
__host__ __device__ __forceinline__ int64_t vision_qh_slice(int which, int head, int img, int heads, int n_img) {
  return ((int64_t)which * heads + head) * n_img + img;
}

// Tests only: true routes vision_layernorm, vision_qkv_bias_split and vision_bias_gelu to their scalar
// kernels (the fallbacks for shapes or pointers the vectorized kernels cannot take), so the tests can
// check that both paths give bitwise-identical results.
inline bool& vision_force_scalar() {
  static bool f = false;
  return f;
}

// out[M, N] = x[M, K] . W[N, K]^T (cuBLAS, bf16 inputs, float32 accumulation), out bf16 or float32.
void vision_gemm(cublasHandle_t h, void* out, bool out_bf16, const bf16* x, const bf16* w, int M, int K, int N,
                 cudaStream_t s);

// The same product through cuBLASLt with the bias (per output feature; in the output's type: bf16 or
// float32, as cuBLASLt requires) added in the product's epilogue, and for kGeluBias gelu_tanh after it
// (fc1): one pass over the output instead of two; kNone: the product alone (bias unused), so that it can take
// a timed algorithm too. Plans (descriptors and the algorithm) are kept per shape in the VisionLt.
enum class VisionEpilogue { kBias, kGeluBias, kNone };
struct VisionLt;
// autotune: each plan takes the fastest of the heuristic's 8 best algorithms, timed on first use (as
// cudnn.benchmark does: the choice, and so the last bits of the results, may differ between processes).
VisionLt* vision_lt_create(size_t workspace_bytes, bool autotune = false);
void vision_lt_destroy(VisionLt* lt);
void vision_gemm_lt(VisionLt* lt, void* out, bool out_bf16, const bf16* x, const bf16* w, const void* bias,
                    VisionEpilogue ep, int M, int K, int N, cudaStream_t s);

// The product transposed, out_t [N, M] = (x [M, K] . w [N, K]^T)^T in bf16 (feature-major: each output
// feature's M rows contiguous), through cuBLASLt (timed like the others). The q/k/v product's layout for
// vision_attention_wgmma_t, which then needs no split pass.
void vision_gemm_lt_t(VisionLt* lt, bf16* out_t, const bf16* x, const bf16* w, int M, int K, int N, cudaStream_t s);

// The residual stream's update in one product: x [M, N] += a [M, K] . w [N, K]^T + bias [N], all in float32
// in cuBLASLt's epilogue (x is the product's C and D). Replaces a bf16 product output d and the residual add
// of vision_layernorm (which then only normalises x): the fc2 product (the o product is too short to hide
// the epilogue's float32 traffic: bench/gpu/NOTES.md).
void vision_gemm_residual_lt(VisionLt* lt, float* x, const bf16* a, const bf16* w, const float* bias, int M, int K,
                             int N, cudaStream_t s);
// The same on a bf16 residual stream: x = bf16(x + a . w^T + bias) with the sum in float32, bias in bf16
// (cuBLASLt takes a bf16 output's bias in bf16).
void vision_gemm_residual_lt(VisionLt* lt, bf16* x, const bf16* a, const bf16* w, const bf16* bias, int M, int K,
                             int N, cudaStream_t s);

// Patch embedding of n images [n, C, S, S] (float32 pixels): im2col into patches [n * (S/p)^2, ld]
// (bf16 scratch, each patch flattened (c, y, x) as the conv weight is, zeros past C*p*p), then
// x = patches . W[H, ld]^T (float32) + bias + pos[(S/p)^2, H]. ld = vision_patch_ld(C, p): C*p*p rounded up to a
// multiple of 8 (16-byte rows for cuBLAS); W's columns past C*p*p must be zero. With x16 (a bf16 residual
// stream) the sum goes there, rounded once, and x holds only the product.
__host__ __device__ __forceinline__ int vision_patch_ld(int C, int p) { return (C * p * p + 7) / 8 * 8; }
void vision_patch_embed(cublasHandle_t h, float* x, bf16* patches, const float* pixels, const bf16* w,
                        const float* bias, const float* pos, int n, int C, int S, int p, int H, cudaStream_t s,
                        bf16* x16 = nullptr);

// LayerNorm with weight and bias; if delta: first x += delta + dbias (a biased projection added to the
// residual stream, written back). out = (x - mean) / sqrt(var + eps) * w + b in T (bf16, or float32 for
// the post-LayerNorm; out may alias a float32 x then). The residual stream X is float32 or bf16 (the sum
// rounded once, and the rounded value normalised). One warp per row; statistics in float32, two passes.
template <typename T, typename X>
void vision_layernorm(T* out, X* x, const bf16* delta, const float* dbias, const float* w, const float* b,
                      int rows, int dim, float eps, cudaStream_t s);

// qkv [n_img * N, 3 * heads * D] (the stacked product, no bias) -> qh [3][heads][n_img][N][kVisionDP]:
// bias added, each head's vector zero-padded to kVisionDP, so attention reads contiguous aligned rows.
void vision_qkv_bias_split(bf16* qh, const bf16* qkv, const float* bias, int n_img, int N, int heads, int D,
                           cudaStream_t s);

// h[r, i] = gelu_tanh(h[r, i] + bias[i]) in place (fc1's bias and activation after its product).
void vision_bias_gelu(bf16* h, const float* bias, int rows, int cols, cudaStream_t s);

// Non-causal multi-head attention on tensor cores (bf16, float32 accumulation, online softmax): qh as
// vision_qkv_bias_split writes it, out [n_img * N, heads * D] bf16. D even, <= kVisionDP. Runs the
// warpgroup-MMA kernel (vision_attention_wgmma.cu) where it is available, else the mma.sync m16n8k16 one
// (vision_attention.cu); vision_attention_mode() picks: 0 that choice, 1 mma.sync, 2 wgmma.
void vision_attention(bf16* out, const bf16* qh, int n_img, int N, int heads, int D, float scale, cudaStream_t s);
int& vision_attention_mode();
// The same on Hopper's wgmma (sm_90a code; compute capability 9.0): throws where it is not available.
void vision_attention_wgmma(bf16* out, const bf16* qh, int n_img, int N, int heads, int D, float scale,
                            cudaStream_t s);
bool vision_attention_wgmma_available();
// The wgmma kernel on the transposed stacked product, qkv_t [3 * heads * D][n_img * N] (vision_gemm_lt_t's
// output, no bias; feature-major, N % 8 == 0 so that an image's keys start on 16 bytes) instead of qh: no
// split pass. q's bias is added as its rows are loaded, v's to the output (softmax weights sum to 1), and k's
// is not needed (it adds q.b_k to every score of a query row, which the softmax cancels). The same attention as
// vision_attention up to rounding (k and v are not rounded to bf16 after their biases here).
void vision_attention_wgmma_t(bf16* out, const bf16* qkv_t, const float* q_bias, const float* v_bias, int n_img, int N,
                              int heads, int D, float scale, cudaStream_t s);
// The wgmma kernel's two consumer warpgroups take turns issuing their products (1, the default) or not (0).
int& vision_wgmma_pingpong();

// Per image: k x k average pooling of the g x g grid y [n_img * g*g, H] (float32), then RMSNorm with
// (1 + w) -> out [n_img * (g/k)^2, H] bf16, the projection's input.
void vision_pool_rmsnorm(bf16* out, const float* y, const float* w, int n_img, int g, int k, int H, float eps,
                         cudaStream_t s);

// Multimodal prompts in the text engine: x[rows[e], :] = src[e, :] for e < n (image embeddings replace
// the scaled token embeddings of the soft-token rows).
void scatter_rows(float* x, const float* src, const int32_t* rows, int n, int H, cudaStream_t s);

}  // namespace g3cuda
