// vision_cpu.cpp: see vision_cpu.h. One SigLIP encoder layer:
//   xn = ln1(x); q,k,v = xn.Wqkv + b; a = attention(q, k, v) (all patches see all patches); x += a.Wo + bo
//   xn = ln2(x); h = gelu_tanh(xn.W1 + b1); x += h.W2 + b2
#include "vision_cpu.h"
#include "weights.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include "cpu/kernels.h"

namespace g3 {

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}
void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}
}  // namespace

void VisionEncoderCpu::alloc(Matrix& m, int64_t rows, int64_t cols) {
  m.bytes.assign((size_t)(rows * cols) * dtype_size(dtype_), 0);
  m.view = WeightView{m.bytes.data(), dtype_, rows, cols};
}

void VisionEncoderCpu::add(const std::string& name, std::vector<int64_t> shape, Dest d) {
  expected_[name] = std::move(shape);
  dest_[name] = d;
  set_[name] = false;
}

VisionEncoderCpu::VisionEncoderCpu(const VisionConfig& cfg, DType dtype) : cfg_(cfg), dtype_(dtype) {
  cfg.validate();
  const int64_t H = cfg.hidden_size, I = cfg.intermediate_size, C = cfg.num_channels, p = cfg.patch_size;
  const int64_t P = cfg.num_patches(), Ht = cfg.text_hidden_size;
  alloc(patch_w_, H, C * p * p);
  patch_b_.assign(H, 0.f);
  pos_.assign((size_t)(P * H), 0.f);
  post_w_.assign(H, 0.f);
  post_b_.assign(H, 0.f);
  soft_norm_w_.assign(H, 0.f);
  alloc(proj_w_, Ht, H);
  add("embeddings.patch_embedding.weight", {H, C, p, p}, {&patch_w_, nullptr, 0, false});
  add("embeddings.patch_embedding.bias", {H}, {nullptr, &patch_b_, 0, false});
  add("embeddings.position_embedding.weight", {P, H}, {nullptr, &pos_, 0, false});
  add("post_layernorm.weight", {H}, {nullptr, &post_w_, 0, false});
  add("post_layernorm.bias", {H}, {nullptr, &post_b_, 0, false});
  add("mm_soft_emb_norm.weight", {H}, {nullptr, &soft_norm_w_, 0, false});
  add("mm_input_projection_weight", {H, Ht}, {&proj_w_, nullptr, 0, true});
  layers_.resize(cfg.num_layers);
  for (int i = 0; i < cfg.num_layers; ++i) {
    Layer& L = layers_[i];
    alloc(L.qkv, 3 * H, H);
    alloc(L.o, H, H);
    alloc(L.fc1, I, H);
    alloc(L.fc2, H, I);
    for (auto* v : {&L.ln1_w, &L.ln1_b, &L.o_b, &L.ln2_w, &L.ln2_b, &L.fc2_b}) v->assign(H, 0.f);
    L.qkv_b.assign(3 * H, 0.f);
    L.fc1_b.assign(I, 0.f);
    const std::string pre = "encoder.layers." + std::to_string(i) + ".";
    add(pre + "layer_norm1.weight", {H}, {nullptr, &L.ln1_w, 0, false});
    add(pre + "layer_norm1.bias", {H}, {nullptr, &L.ln1_b, 0, false});
    add(pre + "layer_norm2.weight", {H}, {nullptr, &L.ln2_w, 0, false});
    add(pre + "layer_norm2.bias", {H}, {nullptr, &L.ln2_b, 0, false});
    const char* qkv[3] = {"q_proj", "k_proj", "v_proj"};
    for (int j = 0; j < 3; ++j) {
      add(pre + "self_attn." + qkv[j] + ".weight", {H, H}, {&L.qkv, nullptr, j * H * H, false});
      add(pre + "self_attn." + qkv[j] + ".bias", {H}, {nullptr, &L.qkv_b, j * H, false});
    }
    add(pre + "self_attn.out_proj.weight", {H, H}, {&L.o, nullptr, 0, false});
    add(pre + "self_attn.out_proj.bias", {H}, {nullptr, &L.o_b, 0, false});
    add(pre + "mlp.fc1.weight", {I, H}, {&L.fc1, nullptr, 0, false});
    add(pre + "mlp.fc1.bias", {I}, {nullptr, &L.fc1_b, 0, false});
    add(pre + "mlp.fc2.weight", {H, I}, {&L.fc2, nullptr, 0, false});
    add(pre + "mlp.fc2.bias", {H}, {nullptr, &L.fc2_b, 0, false});
  }
}

void VisionEncoderCpu::set(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape) {
  auto it = expected_.find(name);
  if (it == expected_.end()) throw std::invalid_argument("unexpected vision weight '" + name + "' for this config");
  if (it->second != shape)
    throw std::invalid_argument("vision weight '" + name + "' has shape " + shape_str(shape) + ", expected " +
                                shape_str(it->second));
  int64_t count = 1;
  for (auto d : shape) count *= d;
  const Dest& d = dest_.at(name);
  auto src = [&](int64_t i) -> float {
    return dt == DType::F32 ? ((const float*)data)[i] : bf16_to_f32(((const uint16_t*)data)[i]);
  };
  if (d.v) {
    float* dst = d.v->data() + d.offset;
    for (int64_t i = 0; i < count; ++i) dst[i] = src(i);
  } else {
    const int64_t R = shape[0], Cc = count / shape[0];
    uint8_t* base = d.m->bytes.data();
    // destination element index of source element (r, c)
    auto put = [&](int64_t di, int64_t si) {
      if (dtype_ == DType::F32) {
        ((float*)base)[di] = src(si);
      } else {
        ((uint16_t*)base)[di] = dt == DType::BF16 ? ((const uint16_t*)data)[si] : f32_to_bf16(((const float*)data)[si]);
      }
    };
    if (!d.transpose && dt == dtype_) {
      std::memcpy(base + (size_t)d.offset * dtype_size(dtype_), data, (size_t)count * dtype_size(dtype_));
    } else {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < Cc; ++c) put(d.offset + (d.transpose ? c * R + r : r * Cc + c), r * Cc + c);
    }
  }
  set_[name] = true;
}

std::vector<std::string> VisionEncoderCpu::missing() const { return unset_names(set_); }
void VisionEncoderCpu::require_complete() const { require_all_set(set_, "vision weights"); }

size_t VisionEncoderCpu::bytes() const {
  size_t b = patch_w_.bytes.size() + proj_w_.bytes.size() +
             4 * (patch_b_.size() + pos_.size() + post_w_.size() + post_b_.size() + soft_norm_w_.size());
  for (auto& L : layers_) {
    b += L.qkv.bytes.size() + L.o.bytes.size() + L.fc1.bytes.size() + L.fc2.bytes.size();
    b += 4 * (L.ln1_w.size() + L.ln1_b.size() + L.qkv_b.size() + L.o_b.size() + L.ln2_w.size() + L.ln2_b.size() +
              L.fc1_b.size() + L.fc2_b.size());
  }
  return b;
}

void VisionEncoderCpu::tower_one(const float* image, float* out) {
  const VisionConfig& c = cfg_;
  const int H = c.hidden_size, I = c.intermediate_size, N = c.num_patches(), NH = c.num_heads, D = c.head_dim();
  grow(x_, (size_t)N * H); grow(xn_, (size_t)N * H); grow(qkv_, (size_t)N * 3 * H); grow(attn_, (size_t)N * H);
  grow(proj_, (size_t)N * H); grow(h_, (size_t)N * I);
  grow(scratch_, std::max((size_t)N * c.patch_dim(), attention_full_scratch(N, NH, D)));
  patch_embed_cpu(x_.data(), image, c.num_channels, c.image_size, c.patch_size, patch_w_.view, patch_b_.data(),
                  pos_.data(), scratch_.data());
  const float scale = 1.f / std::sqrt((float)D);
  for (int l = 0; l < c.num_layers; ++l) {
    const Layer& L = layers_[l];
    layernorm_cpu(xn_.data(), x_.data(), L.ln1_w.data(), L.ln1_b.data(), N, H, c.layer_norm_eps);
    matmul_cpu(qkv_.data(), xn_.data(), L.qkv.view, N, H, 3 * H);
    bias_add_cpu(qkv_.data(), L.qkv_b.data(), N, 3 * H);
    attention_full_cpu(attn_.data(), qkv_.data(), qkv_.data() + H, qkv_.data() + 2 * H, 3 * H, N, NH, D, scale,
                       scratch_.data());
    matmul_cpu(proj_.data(), attn_.data(), L.o.view, N, H, H);
    bias_residual_add_cpu(x_.data(), proj_.data(), L.o_b.data(), N, H);
    layernorm_cpu(xn_.data(), x_.data(), L.ln2_w.data(), L.ln2_b.data(), N, H, c.layer_norm_eps);
    matmul_cpu(h_.data(), xn_.data(), L.fc1.view, N, H, I);
    bias_gelu_tanh_cpu(h_.data(), L.fc1_b.data(), N, I);
    matmul_cpu(proj_.data(), h_.data(), L.fc2.view, N, I, H);
    bias_residual_add_cpu(x_.data(), proj_.data(), L.fc2_b.data(), N, H);
  }
  layernorm_cpu(out, x_.data(), post_w_.data(), post_b_.data(), N, H, c.layer_norm_eps);
}

void VisionEncoderCpu::encode(const float* pixels, int n, float* out) {
  require_complete();
  if (n < 0) throw std::invalid_argument("negative image count");
  const int64_t per_image = (int64_t)cfg_.num_channels * cfg_.image_size * cfg_.image_size;
  const int64_t per_out = (int64_t)cfg_.num_patches() * cfg_.hidden_size;
  for (int i = 0; i < n; ++i) tower_one(pixels + i * per_image, out + i * per_out);
}

void VisionEncoderCpu::forward(const float* pixels, int n, float* out) {
  require_complete();
  if (n < 0) throw std::invalid_argument("negative image count");
  const VisionConfig& c = cfg_;
  const int64_t per_image = (int64_t)c.num_channels * c.image_size * c.image_size;
  const int64_t per_out = (int64_t)c.mm_tokens_per_image * c.text_hidden_size;
  grow(hidden_, (size_t)c.num_patches() * c.hidden_size);
  std::vector<float> proj_scratch(2 * (size_t)c.mm_tokens_per_image * c.hidden_size);
  for (int i = 0; i < n; ++i) {
    tower_one(pixels + i * per_image, hidden_.data());
    mm_projector_cpu(out + i * per_out, hidden_.data(), c.patches_per_side(), c.hidden_size, c.pool_kernel(),
                     soft_norm_w_.data(), c.layer_norm_eps, proj_w_.view, proj_scratch.data());
  }
}

}  // namespace g3
