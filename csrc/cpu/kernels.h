// kernels.h: the CPU backend's operations, one launcher each (implemented one file per operation).
// These are the reference for the CUDA backend and the fallback when no GPU is present.
// All activations are float32, row-major; weights are WeightView (float32 or bfloat16 as stored).
#pragma once
#include <vector>
#include <cstdint>
#include "common.h"

namespace g3 {

// out[t, :] = table[ids[t], :] * scale   (scale = sqrt(hidden) rounded to the table's dtype by the caller)
void embedding_cpu(float* out, const WeightView& table, const int32_t* ids, int n, float scale);

// Gemma RMSNorm over `dim`: out = x * rsqrt(mean(x^2) + eps) * (1 + w); strided rows, out may alias x.
void rmsnorm_cpu(float* out, int64_t out_stride, const float* x, int64_t x_stride, const float* w,
                 int rows, int dim, float eps);

// QK-norm: RMSNorm of each of `heads` head vectors (head_dim wide) of each of `rows` rows, in place.
void qk_norm_cpu(float* x, int64_t row_stride, const float* w, int rows, int heads, int head_dim, float eps);

// Fused residual step: resid += post_w ? rmsnorm(delta, post_w) : delta;  out = rmsnorm(resid, next_w).
void residual_rmsnorm_cpu(float* resid, float* out, const float* delta, const float* post_w,
                          const float* next_w, int rows, int dim, float eps);

// RoPE's inverse frequencies [head_dim / 2]: (1 / theta^(2i/d)) / factor in float32 (factor = linear position
// interpolation, 1 = none), as transformers computes them: the one definition the CPU kernel, the CUDA engine and
// the kernel tests' references use.
std::vector<float> rope_inv_freq(int head_dim, float theta, float factor);

// RoPE (rotate-half layout) in place on `heads` heads of each row, at positions[row], with rope_inv_freq.
void rope_cpu(float* x, int64_t row_stride, const int32_t* positions, int rows, int heads, int head_dim,
              float theta, float factor);

// Attention of one sequence's chunk of n new queries at absolute positions start..start+n-1.
// Keys/values before `start` come from that sequence's cache ([kv_heads][cap][head_dim], position j
// in slot j % cap); keys of the chunk itself come from k_new/v_new (rows of kv_stride floats).
// window = 0: causal over everything; window > 0: query i sees key j iff i - window < j <= i.
// softcap = 0: none; else logits = tanh(logits / softcap) * softcap.  GQA: heads / kv_heads queries per kv head.
// extent (optional, per query): the last key position it sees, >= its own; later keys of the chunk are
// visible to it too (the tokens of one image attend to each other bidirectionally). nullptr = causal.
// scratch: attention_cpu_scratch(min(cap, start) + n, heads, kv_heads, head_dim) floats.
size_t attention_cpu_scratch(int max_keys, int heads, int kv_heads, int head_dim);
void attention_cpu(float* out, int64_t out_stride, const float* q, int64_t q_stride, const float* k_new,
                   const float* v_new, int64_t kv_stride, const float* k_cache, const float* v_cache, int cap,
                   int start, int n, int heads, int kv_heads, int head_dim, int window, float scale,
                   float softcap, const int32_t* extent, float* scratch);

// Writes the chunk's keys/values into the cache (only the last `cap` of them survive in a ring).
void kv_cache_write_cpu(float* k_cache, float* v_cache, const float* k_new, const float* v_new,
                        int64_t kv_stride, int cap, int start, int n, int kv_heads, int head_dim);

// GeGLU: out[t, i] = gelu_tanh(gu[t, i]) * gu[t, F + i]   (gate and up stacked in one row of 2F)
void geglu_cpu(float* out, const float* gate_up, int rows, int F);

// out[T, N] = x[T, K] . W[N, K]^T  (W as stored, float32 or bfloat16; float32 accumulation).
// Each output is the same sum in the same order whatever T is, so batching never changes a result.
void matmul_cpu(float* out, const float* x, const WeightView& w, int T, int K, int N);

// x = tanh(x / cap) * cap
void softcap_cpu(float* x, int64_t n, float cap);

// Sampling. argmax returns the first maximum. sample: temperature > 0, top_k (0 = all),
// top_p in (0, 1]; the uniform draw comes from a counter-based hash of (seed, counter) so a
// sequence's samples do not depend on what else is in the batch.
int argmax_cpu(const float* logits, int V);
double uniform_from(uint64_t seed, uint64_t counter);
int sample_cpu(const float* logits, int V, float temperature, int top_k, float top_p, uint64_t seed,
               uint64_t counter);

// ---- Vision encoder (SigLIP) and multimodal projector ----

// LayerNorm over `dim` (torch.nn.LayerNorm): out = (x - mean) / sqrt(var + eps) * w + b, biased variance;
// statistics in double. Rows are contiguous; out may alias x.
void layernorm_cpu(float* out, const float* x, const float* w, const float* b, int rows, int dim, float eps);

// x[r, :] += bias   (rows x cols, contiguous)
void bias_add_cpu(float* x, const float* bias, int rows, int cols);
// x[r, i] = gelu_tanh(x[r, i] + bias[i])   (the MLP's first product, its bias and activation)
void bias_gelu_tanh_cpu(float* x, const float* bias, int rows, int cols);
// resid[r, i] += delta[r, i] + bias[i]   (a projection's bias folded into the residual add)
void bias_residual_add_cpu(float* resid, const float* delta, const float* bias, int rows, int cols);

// im2col for a non-overlapping patch grid: image [C, H, W] (H, W multiples of `patch`) ->
// out [(H/patch) * (W/patch), C * patch * patch], patches row-major over the grid, each flattened (c, y, x)
// as a conv weight [out, C, patch, patch] is.
void unfold_patches_cpu(float* out, const float* image, int C, int H, int W, int patch);

// Patch embedding of one image: out [P, hidden] = unfold(image) . W[hidden, C*p*p]^T + bias + pos[P, hidden].
// scratch: P * C * patch * patch floats.
void patch_embed_cpu(float* out, const float* image, int C, int image_size, int patch, const WeightView& w,
                     const float* bias, const float* pos, float* scratch);

// Non-causal multi-head attention over n tokens (every query sees every key): q, k, v rows of `stride`
// floats holding heads * head_dim each; out [n, heads * head_dim]. One task per (head, block of queries):
// S = Q K^T by a register-blocked kernel, softmax, S V by matmul_cpu. scratch: attention_full_scratch(n, heads, head_dim) floats (sized for
// num_threads() threads).
size_t attention_full_scratch(int n, int heads, int head_dim);
void attention_full_cpu(float* out, const float* q, const float* k, const float* v, int64_t stride, int n,
                        int heads, int head_dim, float scale, float* scratch);

// k x k average pooling of a square grid of tokens: x [(g*g), dim] (row-major grid) -> out [(g/k)^2, dim].
void avg_pool_cpu(float* out, const float* x, int grid, int dim, int k);

// The Gemma 3 multimodal projector on one image's encoder output x [g*g, Hv]: k x k average pooling,
// RMSNorm (1 + norm_w), then out [(g/k)^2, Ht] = pooled . W[Ht, Hv]^T. scratch: 2 * (g/k)^2 * Hv floats.
void mm_projector_cpu(float* out, const float* x, int grid, int Hv, int k, const float* norm_w, float eps,
                      const WeightView& w, float* scratch);

}  // namespace g3
