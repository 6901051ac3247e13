// kernels.h: the CPU backend's operations, one launcher each (implemented one file per operation).
// These are the reference for the CUDA backend and the fallback when no GPU is present.
// All activations are float32, row-major; weights are WeightView (float32 or bfloat16 as stored).
#pragma once
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

// RoPE (rotate-half layout) in place on `heads` heads of each row, at positions[row];
// inverse frequencies theta^(-2i/d) / factor (factor = linear position interpolation, 1 = none).
void rope_cpu(float* x, int64_t row_stride, const int32_t* positions, int rows, int heads, int head_dim,
              float theta, float factor);

// Attention of one sequence's chunk of n new queries at absolute positions start..start+n-1.
// Keys/values before `start` come from that sequence's cache ([kv_heads][cap][head_dim], position j
// in slot j % cap); keys of the chunk itself come from k_new/v_new (rows of kv_stride floats).
// window = 0: causal over everything; window > 0: query i sees key j iff i - window < j <= i.
// softcap = 0: none; else logits = tanh(logits / softcap) * softcap.  GQA: heads / kv_heads queries per kv head.
// extent (optional, per query): the last key position it sees, >= its own; later keys of the chunk are
// visible to it too (the tokens of one image attend to each other bidirectionally). nullptr = causal.
// scratch: at least num_threads() * (min(cap, start) + n) floats.
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

}  // namespace g3
