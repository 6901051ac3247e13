// weights.h: the model's weights in host memory, under canonical names, in the engine's storage
// dtype (matrices) or float32 (norm vectors). q/k/v and gate/up are stacked on arrival so that each
// becomes one product. Names, shapes and which tensors exist all follow from ModelConfig.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>
#include "config.h"
#include "cpu/common.h"

namespace g3 {

struct LayerWeights {
  WeightView qkv, o, gate_up, down;  // matrices [out, in]
  const float *input_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr, *post_attn_norm = nullptr,
              *pre_ffw_norm = nullptr, *post_ffw_norm = nullptr;
};

// Which of a store's expected tensors have not arrived, and the error naming them (at most 8).
std::vector<std::string> unset_names(const std::map<std::string, bool>& set);
void require_all_set(const std::map<std::string, bool>& set, const std::string& what);

// Host memory for the weight matrices: one zeroed block, 2 MiB aligned and advised for transparent
// huge pages on Linux. Decode streams every weight byte per token; with 4 KiB pages the 335 MB LM head
// of the 270M took 19.6 ms against 17.5 ms on huge pages (2 cores, 2026-11-22, interleaved runs).
class HostArena {
 public:
  HostArena() = default;
  explicit HostArena(size_t bytes);
  uint8_t* data() const { return p_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const;
  };
  std::unique_ptr<uint8_t, Free> p_;
  size_t size_ = 0;
};

class WeightStore {
 public:
  WeightStore(const ModelConfig& cfg, DType dtype);

  // Every tensor the config needs: canonical name -> shape.
  const std::map<std::string, std::vector<int64_t>>& expected() const { return expected_; }
  // Copies one tensor in. Matrices must arrive in the store's dtype; vectors may be either.
  void set(const std::string& name, const void* data, DType dtype, const std::vector<int64_t>& shape);
  std::vector<std::string> missing() const;
  void require_complete() const;  // throws naming the missing tensors

  DType dtype() const { return dtype_; }
  size_t bytes() const;
  const WeightView& embed() const { return embed_; }
  const WeightView& lm_head() const { return cfg_.tie_word_embeddings ? embed_ : lm_head_; }
  const float* final_norm() const { return final_norm_.data(); }
  const LayerWeights& layer(int i) const { return layers_[i]; }

 private:
  struct Matrix {
    size_t offset = 0, nbytes = 0;  // within arena_
    WeightView view;
    uint8_t* data(const HostArena& a) const { return a.data() + offset; }
  };
  void plan_matrix(Matrix& m, int64_t rows, int64_t cols);

  HostArena arena_;
  size_t arena_bytes_ = 0;
  ModelConfig cfg_;
  DType dtype_;
  std::map<std::string, std::vector<int64_t>> expected_;
  std::map<std::string, bool> set_;
  Matrix embed_m_, lm_head_m_;
  WeightView embed_, lm_head_;
  std::vector<float> final_norm_;
  std::vector<Matrix> qkv_, o_, gate_up_, down_;
  std::vector<std::vector<float>> norms_;  // 6 per layer
  std::vector<LayerWeights> layers_;
};

}  // namespace g3
