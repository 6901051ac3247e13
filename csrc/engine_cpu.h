// engine_cpu.h: the CPU engine: a KV cache of max_batch sequence slots and a forward pass over a
// ragged batch (each sequence brings any number of new tokens: prefill and decode are the same call).
#pragma once
#include <memory>
#include <vector>
#include "config.h"
#include "weights.h"

namespace g3 {

// Optional inputs of a forward pass beyond token ids (multimodal prompts).
struct ForwardExtras {
  const float* embeds = nullptr;        // [n_embeds, hidden]: replace the scaled token embedding of...
  const int32_t* embed_rows = nullptr;  // ...these rows of the batch's tokens (image soft tokens)
  int n_embeds = 0;
  const int32_t* extent = nullptr;      // [T]: last key position each token sees (bidirectional image blocks)
};

class CpuEngine {
 public:
  CpuEngine(const ModelConfig& cfg, DType weight_dtype, int max_batch, int max_context);

  WeightStore& weights() { return weights_; }
  void set_weight(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape) {
    weights_.set(name, data, dt, shape);
  }
  const ModelConfig& config() const { return cfg_; }
  int max_batch() const { return max_batch_; }
  int max_context() const { return max_context_; }
  size_t kv_cache_bytes() const;
  int cache_capacity(int layer) const { return caps_[layer]; }

  // Positions already in a slot's cache.
  int slot_length(int slot) const;
  void reset_slot(int slot);
  void reset_all();

  // Runs B sequences: slot[b] receives lengths[b] new tokens (tokens concatenated in order).
  // Writes logits: all_logits ? [sum(lengths), V] : [B, V] (each sequence's last token).
  void forward(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens, bool all_logits,
               float* logits, const ForwardExtras* extras = nullptr);

  // forward() and then the next token of each sequence from its last logits: argmax where
  // temperature[b] <= 0, else sample_cpu with (seed[b], counter[b]). Only ids come back.
  void forward_sample(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                      const float* temperature, const int32_t* top_k, const float* top_p, const uint64_t* seed,
                      const uint64_t* counter, int32_t* ids_out);
  // decode_steps as the CUDA engine's (engine.h): nsteps forward_sample steps, step k > 0 bringing the id step k - 1
  // sampled and sampling with counter + k; ids_out [nsteps][B]; returns nsteps
  int decode_steps(const int32_t* slots, int B, const int32_t* tokens, const float* temperature, const int32_t* top_k,
                   const float* top_p, const uint64_t* seed, const uint64_t* counter, int nsteps, int32_t* ids_out);

 private:
  float* kcache(int layer, int slot) { return k_[layer].data() + (size_t)slot * cfg_.num_kv_heads * caps_[layer] * cfg_.head_dim; }
  float* vcache(int layer, int slot) { return v_[layer].data() + (size_t)slot * cfg_.num_kv_heads * caps_[layer] * cfg_.head_dim; }

  ModelConfig cfg_;
  WeightStore weights_;
  int max_batch_, max_context_;
  std::vector<int> caps_;                   // per layer: window (local) or max_context (global)
  std::vector<std::vector<float>> k_, v_;   // per layer: [max_batch][kv_heads][cap][head_dim]
  std::vector<int> lengths_;                // per slot
  float embed_scale_;
  // scratch, grown on demand
  std::vector<float> last_logits_, x_, xn_, qkv_, attn_, proj_, gu_, act_, sel_, scratch_;
  std::vector<int32_t> pos_;
};

}  // namespace g3
