// vision_cpu.h: the Gemma 3 vision encoder on the CPU: SigLIP (patch embedding + position embedding,
// pre-LayerNorm encoder layers with non-causal attention and a gelu_tanh MLP, post LayerNorm) and the
// multimodal projector (average pooling, soft-embedding RMSNorm, projection to the text width).
// pixel_values [n, C, S, S] -> image embeddings [n, mm_tokens_per_image, text_hidden], ready to replace
// the <image_soft_token> rows of a prompt (CpuEngine ForwardExtras).
//
// Weights are held under their Hugging Face names relative to the vision model / projector
// ("encoder.layers.3.self_attn.q_proj.weight", "mm_input_projection_weight", ...). Matrices are kept in
// the store's dtype (float32 or bfloat16), vectors and the position table in float32; q/k/v are
// stacked into one product, the conv weight is seen as [hidden, C*p*p] and the projection is transposed
// to [text_hidden, hidden] on arrival. Images are encoded one at a time to bound activation memory.
#pragma once
#include <map>
#include <string>
#include <vector>
#include "config.h"
#include "cpu/common.h"

namespace g3 {

class VisionEncoderCpu {
 public:
  VisionEncoderCpu(const VisionConfig& cfg, DType dtype);

  const VisionConfig& config() const { return cfg_; }
  DType dtype() const { return dtype_; }
  // Every tensor the config needs: name -> shape as stored in a checkpoint.
  const std::map<std::string, std::vector<int64_t>>& expected() const { return expected_; }
  // Copies one tensor in (float32 or bfloat16 data; converted to the store's dtype as needed).
  void set(const std::string& name, const void* data, DType dtype, const std::vector<int64_t>& shape);
  std::vector<std::string> missing() const;
  void require_complete() const;
  size_t bytes() const;

  // Read access to the stored weights: the CUDA encoder (csrc/cuda/vision_engine.h) keeps its host copy
  // in a VisionEncoderCpu and uploads from these views.
  struct LayerView {
    WeightView qkv, o, fc1, fc2;
    const float *ln1_w, *ln1_b, *qkv_b, *o_b, *ln2_w, *ln2_b, *fc1_b, *fc2_b;
  };
  struct GlobalView {
    WeightView patch_w, proj_w;  // [hidden, C*p*p], [text_hidden, hidden]
    const float *patch_b, *pos, *post_w, *post_b, *soft_norm_w;
  };
  LayerView layer_view(int i) const {
    const Layer& L = layers_.at(i);
    return {L.qkv.view, L.o.view, L.fc1.view, L.fc2.view, L.ln1_w.data(), L.ln1_b.data(), L.qkv_b.data(),
            L.o_b.data(), L.ln2_w.data(), L.ln2_b.data(), L.fc1_b.data(), L.fc2_b.data()};
  }
  GlobalView global_view() const {
    return {patch_w_.view, proj_w_.view, patch_b_.data(), pos_.data(), post_w_.data(), post_b_.data(),
            soft_norm_w_.data()};
  }

  // The SigLIP tower: pixels [n, C, S, S] -> post-LayerNorm hidden states [n, num_patches, hidden].
  void encode(const float* pixels, int n, float* out);
  // Tower + projector: pixels [n, C, S, S] -> [n, mm_tokens_per_image, text_hidden].
  void forward(const float* pixels, int n, float* out);

 private:
  struct Matrix {
    std::vector<uint8_t> bytes;
    WeightView view;
  };
  struct Layer {
    Matrix qkv, o, fc1, fc2;
    std::vector<float> ln1_w, ln1_b, qkv_b, o_b, ln2_w, ln2_b, fc1_b, fc2_b;
  };
  struct Dest {
    Matrix* m = nullptr;         // a matrix (store dtype) ...
    std::vector<float>* v = nullptr;  // ... or a float32 vector/table
    int64_t offset = 0;          // elements into the destination
    bool transpose = false;      // a [R, C] source lands as [C, R]
  };
  void alloc(Matrix& m, int64_t rows, int64_t cols);
  void add(const std::string& name, std::vector<int64_t> shape, Dest d);
  void tower_one(const float* image, float* out);

  VisionConfig cfg_;
  DType dtype_;
  std::map<std::string, std::vector<int64_t>> expected_;
  std::map<std::string, Dest> dest_;
  std::map<std::string, bool> set_;
  Matrix patch_w_, proj_w_;
  std::vector<float> patch_b_, pos_, post_w_, post_b_, soft_norm_w_;
  std::vector<Layer> layers_;
  // scratch, grown on demand
  std::vector<float> x_, xn_, qkv_, attn_, proj_, h_, scratch_, hidden_;
};

}  // namespace g3
