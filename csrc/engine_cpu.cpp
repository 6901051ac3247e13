// engine_cpu.cpp: see engine_cpu.h. The decoder block, for each layer:
//   xn = input_norm(x); q,k,v = xn.Wqkv; q,k = qk_norm; rope; a = attention; x += post_attn_norm(a.Wo)
//   xn = pre_ffw_norm(x); x += post_ffw_norm(down(geglu(xn.Wgate_up))); the norm after each add is fused.
#include "engine_cpu.h"
#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>
#include "batch.h"
#include "cpu/kernels.h"

namespace g3 {

CpuEngine::CpuEngine(const ModelConfig& cfg, DType weight_dtype, int max_batch, int max_context)
    : cfg_(cfg), weights_(cfg, weight_dtype), max_batch_(max_batch), max_context_(max_context) {
  if (max_batch < 1) throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(max_batch));
  if (max_context < 1) throw std::invalid_argument("max_context must be >= 1, got " + std::to_string(max_context));
  const int L = cfg.num_layers;
  caps_.resize(L);
  k_.resize(L);
  v_.resize(L);
  for (int l = 0; l < L; ++l) {
    caps_[l] = cfg.layer_types[l] == AttentionType::Local ? std::min(cfg.sliding_window, max_context) : max_context;
    const size_t n = (size_t)max_batch * cfg.num_kv_heads * caps_[l] * cfg.head_dim;
    k_[l].assign(n, 0.f);
    v_[l].assign(n, 0.f);
  }
  lengths_.assign(max_batch, 0);
  // sqrt(hidden) rounded to the weights' dtype, as transformers multiplies in that dtype.
  const float s = std::sqrt((float)cfg.hidden_size);
  embed_scale_ = weight_dtype == DType::BF16 ? bf16_to_f32(f32_to_bf16(s)) : s;
}

size_t CpuEngine::kv_cache_bytes() const {
  size_t b = 0;
  for (int l = 0; l < cfg_.num_layers; ++l) b += (k_[l].size() + v_[l].size()) * sizeof(float);
  return b;
}

int CpuEngine::slot_length(int slot) const {
  if (slot < 0 || slot >= max_batch_) throw std::out_of_range("slot " + std::to_string(slot) + " out of range");
  return lengths_[slot];
}
void CpuEngine::reset_slot(int slot) {
  if (slot < 0 || slot >= max_batch_) throw std::out_of_range("slot " + std::to_string(slot) + " out of range");
  lengths_[slot] = 0;
}
void CpuEngine::reset_all() { std::fill(lengths_.begin(), lengths_.end(), 0); }

static void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

void CpuEngine::forward(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                        bool all_logits, float* logits, const ForwardExtras* extras) {
  weights_.require_complete();
  check_batch(cfg_, max_batch_, max_context_, lengths_, slots, lengths, B, tokens);
  const ModelConfig& c = cfg_;
  const int H = c.hidden_size, F = c.intermediate_size, D = c.head_dim, NH = c.num_heads, KVH = c.num_kv_heads;
  const int QD = c.q_dim(), KD = c.kv_dim(), QKV = c.qkv_dim();
  int T = 0;
  for (int b = 0; b < B; ++b) T += lengths[b];

  grow(x_, (size_t)T * H); grow(xn_, (size_t)T * H); grow(qkv_, (size_t)T * QKV); grow(attn_, (size_t)T * QD);
  grow(proj_, (size_t)T * H); grow(gu_, (size_t)T * 2 * F); grow(act_, (size_t)T * F);
  pos_.resize(T);
  int max_keys = 0;
  for (int b = 0, t = 0; b < B; ++b) {
    const int start = lengths_[slots[b]];
    for (int i = 0; i < lengths[b]; ++i) pos_[t++] = start + i;
    max_keys = std::max(max_keys, std::min(max_context_, start) + lengths[b]);
  }
  grow(scratch_, attention_cpu_scratch(max_keys, NH, KVH, D));

  const WeightView& E = weights_.embed();
  embedding_cpu(x_.data(), E, tokens, T, embed_scale_);
  if (extras && extras->n_embeds > 0) {
    for (int e = 0; e < extras->n_embeds; ++e) {
      const int r = extras->embed_rows[e];
      if (r < 0 || r >= T) throw std::out_of_range("embedding row " + std::to_string(r) + " outside the batch of " + std::to_string(T));
      std::copy_n(extras->embeds + (size_t)e * H, H, x_.data() + (size_t)r * H);
    }
  }
  const int32_t* extent = extras ? extras->extent : nullptr;
  rmsnorm_cpu(xn_.data(), H, x_.data(), H, weights_.layer(0).input_norm, T, H, c.rms_norm_eps);

  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = weights_.layer(l);
    matmul_cpu(qkv_.data(), xn_.data(), w.qkv, T, H, QKV);
    if (c.qk_norm == QKNorm::RMSNorm) {
      qk_norm_cpu(qkv_.data(), QKV, w.q_norm, T, NH, D, c.rms_norm_eps);
      qk_norm_cpu(qkv_.data() + QD, QKV, w.k_norm, T, KVH, D, c.rms_norm_eps);
    }
    const RopeConfig& rope = c.rope_for(l);
    const float factor = rope.scaling == RopeScaling::Linear ? rope.factor : 1.f;
    rope_cpu(qkv_.data(), QKV, pos_.data(), T, NH, D, rope.theta, factor);
    rope_cpu(qkv_.data() + QD, QKV, pos_.data(), T, KVH, D, rope.theta, factor);
    const int window = c.layer_types[l] == AttentionType::Local ? c.sliding_window : 0;
    for (int b = 0, t0 = 0; b < B; t0 += lengths[b], ++b) {
      const int start = lengths_[slots[b]];
      const float* rows = qkv_.data() + (size_t)t0 * QKV;
      attention_cpu(attn_.data() + (size_t)t0 * QD, QD, rows, QKV, rows + QD, rows + QD + KD, QKV,
                    kcache(l, slots[b]), vcache(l, slots[b]), caps_[l], start, lengths[b], NH, KVH, D, window,
                    c.attn_scale(), c.attn_logit_softcap, extent ? extent + t0 : nullptr, scratch_.data());
      kv_cache_write_cpu(kcache(l, slots[b]), vcache(l, slots[b]), rows + QD, rows + QD + KD, QKV, caps_[l], start,
                         lengths[b], KVH, D);
    }
    matmul_cpu(proj_.data(), attn_.data(), w.o, T, QD, H);
    residual_rmsnorm_cpu(x_.data(), xn_.data(), proj_.data(), w.post_attn_norm, w.pre_ffw_norm, T, H, c.rms_norm_eps);
    matmul_cpu(gu_.data(), xn_.data(), w.gate_up, T, H, 2 * F);
    geglu_cpu(act_.data(), gu_.data(), T, F);
    matmul_cpu(proj_.data(), act_.data(), w.down, T, F, H);
    const float* next = l + 1 < c.num_layers ? weights_.layer(l + 1).input_norm : weights_.final_norm();
    residual_rmsnorm_cpu(x_.data(), xn_.data(), proj_.data(), w.post_ffw_norm, next, T, H, c.rms_norm_eps);
  }
  for (int b = 0; b < B; ++b) lengths_[slots[b]] += lengths[b];

  // LM head on the rows asked for.
  const float* head_in = xn_.data();
  int rows = T;
  if (!all_logits) {
    grow(sel_, (size_t)B * H);
    for (int b = 0, t = 0; b < B; ++b) {
      t += lengths[b];
      std::copy_n(xn_.data() + (size_t)(t - 1) * H, H, sel_.data() + (size_t)b * H);
    }
    head_in = sel_.data();
    rows = B;
  }
  matmul_cpu(logits, head_in, weights_.lm_head(), rows, H, c.vocab_size);
  if (c.final_logit_softcap > 0.f) softcap_cpu(logits, (int64_t)rows * c.vocab_size, c.final_logit_softcap);
}

void CpuEngine::forward_sample(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                               const float* temperature, const int32_t* top_k, const float* top_p,
                               const uint64_t* seed, const uint64_t* counter, int32_t* ids_out) {
  const int V = cfg_.vocab_size;
  grow(last_logits_, (size_t)B * V);
  forward(slots, lengths, B, tokens, false, last_logits_.data());
  for (int b = 0; b < B; ++b) {
    const float* l = last_logits_.data() + (size_t)b * V;
    ids_out[b] = temperature[b] > 0.f ? sample_cpu(l, V, temperature[b], top_k[b], top_p[b], seed[b], counter[b])
                                      : argmax_cpu(l, V);
  }
}

int CpuEngine::decode_steps(const int32_t* slots, int B, const int32_t* tokens, const float* temperature,
                            const int32_t* top_k, const float* top_p, const uint64_t* seed, const uint64_t* counter,
                            int nsteps, int32_t* ids_out) {
  const std::vector<int32_t> ones(std::max(B, 0), 1);
  check_batch(cfg_, max_batch_, max_context_, lengths_, slots, ones.data(), B, tokens);
  check_decode_steps(max_context_, lengths_, slots, B, nsteps);
  std::vector<uint64_t> ctr(counter, counter + B);
  for (int k = 0; k < nsteps; ++k) {
    forward_sample(slots, ones.data(), B, k == 0 ? tokens : ids_out + (size_t)(k - 1) * B, temperature, top_k, top_p,
                   seed, ctr.data(), ids_out + (size_t)k * B);
    for (auto& c : ctr) ++c;
  }
  return nsteps;
}

}  // namespace g3
