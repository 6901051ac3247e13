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

// ---- Vision (multimodal Gemma 3: SigLIP encoder + projector) ----
// The defaults are Gemma 3's SigLIP So400m/14 at 896 px; python/gemma3_native/config.py fills every
// field from config.json (vision_config, mm_tokens_per_image, token ids), with transformers' defaults.
struct VisionConfig {
  int hidden_size = 1152;
  int intermediate_size = 4304;
  int num_layers = 27;
  int num_heads = 16;                 // head_dim = hidden_size / num_heads (72)
  int num_channels = 3;
  int image_size = 896;
  int patch_size = 14;
  float layer_norm_eps = 1e-6f;       // LayerNorms of the encoder and the projector's soft-embedding RMSNorm
  Activation activation = Activation::GeluTanh;
  int mm_tokens_per_image = 256;      // after pooling: (image_size / patch_size / pool)^2
  int text_hidden_size = 0;           // the projector's output width
  int boi_token_id = 255999;          // <start_of_image>
  int eoi_token_id = 256000;          // <end_of_image>
  int image_token_id = 262144;        // <image_soft_token>

  int head_dim() const { return num_heads > 0 ? hidden_size / num_heads : 0; }
  int patches_per_side() const { return patch_size > 0 ? image_size / patch_size : 0; }
  int num_patches() const { return patches_per_side() * patches_per_side(); }
  int patch_dim() const { return num_channels * patch_size * patch_size; }
  int tokens_per_side() const { return (int)std::lround(std::sqrt((double)mm_tokens_per_image)); }
  int pool_kernel() const { return tokens_per_side() > 0 ? patches_per_side() / tokens_per_side() : 0; }

  void validate() const {
    auto need = [](bool ok, const std::string& what) {
      if (!ok) throw std::invalid_argument("invalid vision config: " + what);
    };
    need(hidden_size > 0 && intermediate_size > 0 && num_layers > 0 && num_heads > 0,
         "hidden_size, intermediate_size, num_hidden_layers and num_attention_heads must be > 0");
    need(hidden_size % num_heads == 0, "hidden_size (" + std::to_string(hidden_size) +
                                           ") must be a multiple of num_attention_heads (" + std::to_string(num_heads) + ")");
    need(num_channels > 0, "num_channels must be > 0");
    need(patch_size > 0 && image_size > 0 && image_size % patch_size == 0,
         "image_size (" + std::to_string(image_size) + ") must be a positive multiple of patch_size (" +
             std::to_string(patch_size) + ")");
    need(layer_norm_eps > 0, "layer_norm_eps must be > 0");
    const int t = tokens_per_side();
    need(mm_tokens_per_image > 0 && t * t == mm_tokens_per_image,
         "mm_tokens_per_image (" + std::to_string(mm_tokens_per_image) + ") must be a perfect square");
    need(patches_per_side() % t == 0, "patches per side (" + std::to_string(patches_per_side()) +
                                          ") must be a multiple of sqrt(mm_tokens_per_image) (" + std::to_string(t) + ")");
    need(text_hidden_size > 0, "text_hidden_size must be > 0");
  }
};

}  // namespace g3
