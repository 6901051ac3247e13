// config.h: the one description of a Gemma model that every backend reads.
// Variations between Gemma 1, 2 and 3 are explicit enums (as in gemma.cpp's configs.h), never
// scattered `if (gemma2)` tests. Built from a Hugging Face config.json by python/gemma3_native/config.py.
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace g3 {

enum class Family { Gemma1, Gemma2, Gemma3 };
enum class AttentionType { Global, Local };   // Local = sliding window with a ring-buffer KV cache
enum class QueryScale { InvSqrtHeadDim, InvSqrtQueryPreAttnScalar };
enum class PostNorm { None, AttnAndFfw };       // Gemma 2/3 normalise each block's output before the residual add
enum class QKNorm { None, RMSNorm };            // Gemma 3 normalises q and k per head before RoPE
enum class Activation { GeluTanh };             // GeGLU with the tanh approximation of GELU
enum class RopeScaling { None, Linear };        // linear = positions / factor

struct RopeConfig {
  float theta = 10000.f;
  RopeScaling scaling = RopeScaling::None;
  float factor = 1.f;
};

struct ModelConfig {
  Family family = Family::Gemma3;
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int sliding_window = 0;            // keys j visible to query i on local layers: i - window < j <= i
  int max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;
  QueryScale query_scale = QueryScale::InvSqrtQueryPreAttnScalar;
  float query_pre_attn_scalar = 256.f;
  float attn_logit_softcap = 0.f;    // 0 = none
  float final_logit_softcap = 0.f;   // 0 = none
  PostNorm post_norm = PostNorm::AttnAndFfw;
  QKNorm qk_norm = QKNorm::RMSNorm;
  Activation activation = Activation::GeluTanh;
  std::vector<AttentionType> layer_types;
  RopeConfig rope_local;             // used by Local layers
  RopeConfig rope_global;            // used by Global layers
  bool tie_word_embeddings = true;

  float attn_scale() const {
    return query_scale == QueryScale::InvSqrtHeadDim ? 1.f / std::sqrt((float)head_dim)
                                                     : 1.f / std::sqrt(query_pre_attn_scalar);
  }
  const RopeConfig& rope_for(int layer) const {
    return layer_types[layer] == AttentionType::Local ? rope_local : rope_global;
  }
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }

  // Throws std::invalid_argument (Python ValueError) naming the first inconsistent field.
  void validate() const {
    auto need = [](bool ok, const std::string& what) {
      if (!ok) throw std::invalid_argument("invalid model config: " + what);
    };
    need(vocab_size > 0, "vocab_size must be > 0");
    need(hidden_size > 0, "hidden_size must be > 0");
    need(intermediate_size > 0, "intermediate_size must be > 0");
    need(num_layers > 0, "num_hidden_layers must be > 0");
    need(num_heads > 0 && num_kv_heads > 0, "num_attention_heads and num_key_value_heads must be > 0");
    need(num_heads % num_kv_heads == 0, "num_attention_heads (" + std::to_string(num_heads) +
                                            ") must be a multiple of num_key_value_heads (" +
                                            std::to_string(num_kv_heads) + ")");
    need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even and > 0");
    need((int)layer_types.size() == num_layers, "layer_types has " + std::to_string(layer_types.size()) +
                                                   " entries for " + std::to_string(num_layers) + " layers");
    for (auto t : layer_types)
      if (t == AttentionType::Local) need(sliding_window > 0, "a sliding layer needs sliding_window > 0");
    need(rms_norm_eps > 0, "rms_norm_eps must be > 0");
    need(query_pre_attn_scalar > 0, "query_pre_attn_scalar must be > 0");
    need(rope_local.theta > 0 && rope_global.theta > 0, "rope theta must be > 0");
    need(rope_local.factor > 0 && rope_global.factor > 0, "rope scaling factor must be > 0");
  }
};

}  // namespace g3
