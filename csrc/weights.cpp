// weights.cpp: see weights.h.
#include "weights.h"
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <sstream>
#include <stdexcept>

namespace g3 {

namespace {
enum NormSlot { kInput = 0, kQ, kK, kPostAttn, kPreFfw, kPostFfw, kNumNorms };
std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}
}  // namespace

HostArena::HostArena(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  const size_t huge = (size_t)1 << 21;
  const size_t total = (bytes + huge - 1) / huge * huge;
  uint8_t* p = static_cast<uint8_t*>(std::aligned_alloc(huge, total));
  if (!p) throw std::bad_alloc();
#ifdef __linux__
  madvise(p, total, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
#endif
  std::memset(p, 0, total);  // first touch after the advice, so the kernel can back it with huge pages
  p_.reset(p);
}

void HostArena::Free::operator()(uint8_t* p) const { std::free(p); }

// Places a matrix in the arena (64-byte aligned); views are set once the arena exists.
void WeightStore::plan_matrix(Matrix& m, int64_t rows, int64_t cols) {
  m.offset = arena_bytes_;
  m.nbytes = (size_t)(rows * cols) * dtype_size(dtype_);
  arena_bytes_ += (m.nbytes + 63) / 64 * 64;
  m.view = WeightView{nullptr, dtype_, rows, cols};
}

WeightStore::WeightStore(const ModelConfig& cfg, DType dtype) : cfg_(cfg), dtype_(dtype) {
  cfg.validate();
  const int64_t V = cfg.vocab_size, H = cfg.hidden_size, F = cfg.intermediate_size, D = cfg.head_dim;
  const int64_t QD = cfg.q_dim(), KD = cfg.kv_dim();
  expected_["embed"] = {V, H};
  expected_["final_norm"] = {H};
  if (!cfg.tie_word_embeddings) expected_["lm_head"] = {V, H};
  const int L = cfg.num_layers;
  qkv_.resize(L); o_.resize(L); gate_up_.resize(L); down_.resize(L);
  norms_.assign((size_t)L * kNumNorms, {});
  layers_.resize(L);
  for (int i = 0; i < L; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    expected_[p + "input_norm"] = {H};
    expected_[p + "q_proj"] = {QD, H};
    expected_[p + "k_proj"] = {KD, H};
    expected_[p + "v_proj"] = {KD, H};
    expected_[p + "o_proj"] = {H, QD};
    expected_[p + "pre_ffw_norm"] = {H};
    expected_[p + "gate_proj"] = {F, H};
    expected_[p + "up_proj"] = {F, H};
    expected_[p + "down_proj"] = {H, F};
    if (cfg.qk_norm == QKNorm::RMSNorm) {
      expected_[p + "q_norm"] = {D};
      expected_[p + "k_norm"] = {D};
    }
    if (cfg.post_norm == PostNorm::AttnAndFfw) {
      expected_[p + "post_attn_norm"] = {H};
      expected_[p + "post_ffw_norm"] = {H};
    }
    plan_matrix(qkv_[i], QD + 2 * KD, H);
    plan_matrix(o_[i], H, QD);
    plan_matrix(gate_up_[i], 2 * F, H);
    plan_matrix(down_[i], H, F);
    LayerWeights& lw = layers_[i];
    auto norm = [&](int slot, int64_t n, const float** dst, bool used) {
      std::vector<float>& v = norms_[(size_t)i * kNumNorms + slot];
      if (used) { v.assign(n, 0.f); *dst = v.data(); }
    };
    norm(kInput, H, &lw.input_norm, true);
    norm(kQ, D, &lw.q_norm, cfg.qk_norm == QKNorm::RMSNorm);
    norm(kK, D, &lw.k_norm, cfg.qk_norm == QKNorm::RMSNorm);
    norm(kPostAttn, H, &lw.post_attn_norm, cfg.post_norm == PostNorm::AttnAndFfw);
    norm(kPreFfw, H, &lw.pre_ffw_norm, true);
    norm(kPostFfw, H, &lw.post_ffw_norm, cfg.post_norm == PostNorm::AttnAndFfw);
  }
  plan_matrix(embed_m_, V, H);
  if (!cfg.tie_word_embeddings) plan_matrix(lm_head_m_, V, H);
  arena_ = HostArena(arena_bytes_);
  for (Matrix* m : {&embed_m_, &lm_head_m_}) m->view.data = m->data(arena_);
  embed_ = embed_m_.view;
  if (!cfg.tie_word_embeddings) lm_head_ = lm_head_m_.view;
  for (int i = 0; i < L; ++i) {
    for (Matrix* m : {&qkv_[i], &o_[i], &gate_up_[i], &down_[i]}) m->view.data = m->data(arena_);
    LayerWeights& lw = layers_[i];
    lw.qkv = qkv_[i].view; lw.o = o_[i].view; lw.gate_up = gate_up_[i].view; lw.down = down_[i].view;
  }
  final_norm_.assign(H, 0.f);
  for (auto& kv : expected_) set_[kv.first] = false;
}

void WeightStore::set(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape) {
  auto it = expected_.find(name);
  if (it == expected_.end()) throw std::invalid_argument("unexpected weight '" + name + "' for this config");
  if (it->second != shape)
    throw std::invalid_argument("weight '" + name + "' has shape " + shape_str(shape) + ", expected " +
                                shape_str(it->second));
  int64_t count = 1;
  for (auto d : shape) count *= d;
  const bool vector = shape.size() == 1;
  if (vector) {
    float* dst = nullptr;
    if (name == "final_norm") {
      dst = final_norm_.data();
    } else {
      const size_t dot = name.find('.', 7);
      const int layer = std::stoi(name.substr(7, dot - 7));
      const std::string leaf = name.substr(dot + 1);
      static const std::map<std::string, int> slots = {{"input_norm", kInput},   {"q_norm", kQ},
                                                       {"k_norm", kK},           {"post_attn_norm", kPostAttn},
                                                       {"pre_ffw_norm", kPreFfw}, {"post_ffw_norm", kPostFfw}};
      dst = norms_[(size_t)layer * kNumNorms + slots.at(leaf)].data();
    }
    for (int64_t i = 0; i < count; ++i)
      dst[i] = dt == DType::F32 ? ((const float*)data)[i] : bf16_to_f32(((const uint16_t*)data)[i]);
  } else {
    if (dt != dtype_)
      throw std::invalid_argument("weight '" + name + "' arrives as " + dtype_name(dt) + " but the engine stores " +
                                  dtype_name(dtype_));
    const size_t es = dtype_size(dtype_);
    uint8_t* dst = nullptr;
    if (name == "embed") {
      dst = embed_m_.data(arena_);
    } else if (name == "lm_head") {
      dst = lm_head_m_.data(arena_);
    } else {
      const size_t dot = name.find('.', 7);
      const int l = std::stoi(name.substr(7, dot - 7));
      const std::string leaf = name.substr(dot + 1);
      const int64_t H = cfg_.hidden_size, QD = cfg_.q_dim(), KD = cfg_.kv_dim(), F = cfg_.intermediate_size;
      if (leaf == "q_proj") dst = qkv_[l].data(arena_);
      else if (leaf == "k_proj") dst = qkv_[l].data(arena_) + QD * H * es;
      else if (leaf == "v_proj") dst = qkv_[l].data(arena_) + (QD + KD) * H * es;
      else if (leaf == "o_proj") dst = o_[l].data(arena_);
      else if (leaf == "gate_proj") dst = gate_up_[l].data(arena_);
      else if (leaf == "up_proj") dst = gate_up_[l].data(arena_) + F * H * es;
      else if (leaf == "down_proj") dst = down_[l].data(arena_);
    }
    std::memcpy(dst, data, (size_t)count * es);
  }
  set_[name] = true;
}

std::vector<std::string> unset_names(const std::map<std::string, bool>& set) {
  std::vector<std::string> m;
  for (auto& kv : set)
    if (!kv.second) m.push_back(kv.first);
  return m;
}

void require_all_set(const std::map<std::string, bool>& set, const std::string& what) {
  const auto m = unset_names(set);
  if (m.empty()) return;
  std::string s = "missing " + what + ":";
  for (size_t i = 0; i < m.size() && i < 8; ++i) s += " " + m[i];
  if (m.size() > 8) s += " ... (" + std::to_string(m.size()) + " in all)";
  throw std::invalid_argument(s);
}

std::vector<std::string> WeightStore::missing() const { return unset_names(set_); }
void WeightStore::require_complete() const { require_all_set(set_, "weights"); }

size_t WeightStore::bytes() const {
  size_t b = embed_m_.nbytes + lm_head_m_.nbytes + final_norm_.size() * 4;
  for (int i = 0; i < cfg_.num_layers; ++i) b += qkv_[i].nbytes + o_[i].nbytes + gate_up_[i].nbytes + down_[i].nbytes;
  for (auto& n : norms_) b += n.size() * 4;
  return b;
}

}  // namespace g3
