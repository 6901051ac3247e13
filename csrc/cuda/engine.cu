// engine.cu: see engine.h. One forward, per layer (T tokens of B sequences):
//   qkv = xn . Wqkv (GEMV or cuBLAS)      -> qk_rope_kv: QK-norm, RoPE, q/k/v in T, cache write where safe
//   (bf16 decode of 1-2 tokens on sm_90: both in one launch, gemv_qkv_rope, where its clusters fit at once)
//   attention: decode (split-K) | prefill (tensor cores, bf16 D 128/256) | generic
//   kv_cache_write (mode 1) for what could not be written before attention (local layers, chunks > 1)
//   proj = attn . Wo;  residual_rmsnorm (post-attn norm, add, pre-ffw norm)
//   gu = xn . Wgate_up; act = geglu(gu); proj = act . Wdown; residual_rmsnorm (post-ffw, add, next norm)
// then the LM head on the rows asked for (+ soft-cap) and, for forward_sample, the GPU sampler.
// Host -> device traffic per forward: one copy of a small metadata block (tokens, positions, slots,
// sampling parameters); device -> host: the ids (or the logits for forward()). In the decode graph
// both copies are nodes of the graph, from/to pinned buffers.
#include "engine.h"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <stdexcept>
#include <type_traits>
#include "batch.h"
#include "cpu/kernels.h"
#include "cuda/kernels.cuh"
#include "cuda/vision_kernels.cuh"
#include "engine_cpu.h"

namespace g3 {
using namespace g3cuda;

#define TD(p) static_cast<E*>(p)

CudaEngine::CudaEngine(const ModelConfig& cfg, DType weight_dtype, int max_batch, int max_context)
    : cfg_(cfg), dtype_(weight_dtype), weights_(cfg, weight_dtype), max_batch_(max_batch), max_context_(max_context) {
  if (max_batch < 1) throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(max_batch));
  if (max_context < 1) throw std::invalid_argument("max_context must be >= 1, got " + std::to_string(max_context));
  if (cfg.head_dim > 256) throw std::invalid_argument("CUDA engine: head_dim > 256 is not supported");
  if (cfg.num_heads / cfg.num_kv_heads > 8)
    throw std::invalid_argument("CUDA engine: more than 8 query heads per kv head is not supported");
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    throw std::runtime_error("CUDA engine: no CUDA device");
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  num_sms_ = prop.multiProcessorCount;
  const int L = cfg.num_layers;
  caps_.resize(L);
  for (int l = 0; l < L; ++l)
    caps_[l] = cfg.layer_types[l] == AttentionType::Local ? std::min(cfg.sliding_window, max_context) : max_context;
  lengths_.assign(max_batch, 0);
  const float s = std::sqrt((float)cfg.hidden_size);
  embed_scale_ = weight_dtype == DType::BF16 ? bf16_to_f32(f32_to_bf16(s)) : s;

  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("CUDA engine: cublasCreate failed");
  const size_t ws = 32u << 20;  // explicit workspace: no allocation inside graph capture
  cublas_ws_ = dalloc(ws);
  cublasSetWorkspace(cublas_, cublas_ws_, ws);
  cublasSetStream(cublas_, stream_);

  // KV cache
  kc_.resize(L);
  vc_.resize(L);
  for (int l = 0; l < L; ++l) {
    const size_t bytes = (size_t)max_batch * cfg.num_kv_heads * caps_[l] * cfg.head_dim * esize();
    kc_[l] = dalloc(bytes);
    vc_[l] = dalloc(bytes);
    CUDA_CHECK(cudaMemset(kc_[l], 0, bytes));
    CUDA_CHECK(cudaMemset(vc_[l], 0, bytes));
  }
  // RoPE inverse frequencies, local then global (the CPU kernel's)
  const int half = cfg.head_dim / 2;
  std::vector<float> inv(2 * half);
  for (int which = 0; which < 2; ++which) {
    const RopeConfig& r = which == 0 ? cfg.rope_local : cfg.rope_global;
    const float factor = r.scaling == RopeScaling::Linear ? r.factor : 1.f;
    const std::vector<float> f = rope_inv_freq(cfg.head_dim, r.theta, factor);
    std::copy(f.begin(), f.end(), inv.begin() + which * half);
  }
  d_inv_freq_ = static_cast<float*>(dalloc(inv.size() * 4));
  CUDA_CHECK(cudaMemcpy(d_inv_freq_, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
  size_t part_floats = 0;  // the largest decode batch's partials (splits shrink as the batch grows)
  for (int b = 1; b <= max_batch; ++b)
    part_floats = std::max(part_floats, attention_decode_workspace_floats(b, cfg.num_heads, cfg.head_dim, decode_splits(b)));
  part_ = static_cast<float*>(dalloc(part_floats * 4));
  counters_ = static_cast<unsigned*>(dalloc((size_t)max_batch * cfg.num_kv_heads * sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(counters_, 0, (size_t)max_batch * cfg.num_kv_heads * sizeof(unsigned)));
  ids_ = static_cast<int32_t*>(dalloc((size_t)kMaxDecodeSteps * max_batch * 4));  // [step][B] of decode_steps
  pbar_ = static_cast<unsigned*>(dalloc(2 * sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(pbar_, 0, 2 * sizeof(unsigned)));
  const size_t sws = sample_workspace_bytes(max_batch, cfg.vocab_size);
  sample_ws_ = dalloc(sws);
  CUDA_CHECK(cudaMemset(sample_ws_, 0, sws));
  CUDA_CHECK(cudaMallocHost(&h_ids_, (size_t)kMaxDecodeSteps * max_batch * 4));
  ensure_capacity(std::max(max_batch, 256), max_batch);
}

CudaEngine::~CudaEngine() {
  if (stream_) cudaStreamSynchronize(stream_);
  clear_graphs();
  free_activations();
  for (void* p : allocs_) cudaFree(p);
  if (h_ids_) cudaFreeHost(h_ids_);
  if (ext_buf_) cudaFree(ext_buf_);
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

void* CudaEngine::dalloc(size_t bytes) {
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
  allocs_.push_back(p);
  device_bytes_ += bytes;
  return p;
}

PersistentDecode CudaEngine::persistent_params(const Meta* m, int B) const {
  const ModelConfig& c = cfg_;
  PersistentDecode p{};
  p.layers = static_cast<const PersistentLayer*>(d_players_);
  p.L = c.num_layers;
  p.B = B;
  p.H = c.hidden_size;
  p.F = c.intermediate_size;
  p.NH = c.num_heads;
  p.KVH = c.num_kv_heads;
  p.D = c.head_dim;
  p.max_k = std::max({c.hidden_size, c.q_dim(), c.intermediate_size});
  p.embed = static_cast<const bf16*>(d_embed_);
  p.embed_scale = embed_scale_;
  p.final_norm = d_final_norm_;
  p.eps = c.rms_norm_eps;
  p.attn_scale = c.attn_scale();
  p.softcap = c.attn_logit_softcap;
  p.nsplit = decode_splits(B);
  p.part = part_;
  p.counters = counters_;
  p.bar = pbar_;
  p.x = x_;
  p.qkvp = qkv_;
  p.hp = proj_;
  p.attn = static_cast<bf16*>(attn_);
  p.act = static_cast<bf16*>(act_);
  p.xn_out = static_cast<bf16*>(xn_);
  if (m) {
    auto P = [&](size_t off) { return reinterpret_cast<const int32_t*>(d_meta_ + off); };
    p.tokens = P(m->tokens);
    p.seq = SeqMeta{P(m->slot), P(m->start), P(m->len), P(m->t0), nullptr};
  }
  return p;
}

bool CudaEngine::persistent_decode_ok(int B) {
  if (!persistent_decode || dtype_ != DType::BF16 || B < 1 || B > kPersistentMaxB || attention_path != 0 ||
      gemm_path != 0 || repeat_mask != 0 || decode_kernel_mode() != 2 || ext_n_ > 0)
    return false;
  if (persistent_ok_[B] == 0) {
    // its scratch lives in the activation buffers (x_: 2 B rows)
    const bool room = cap_T_ >= 2 * B;
    persistent_ok_[B] = room && persistent_decode_supported(persistent_params(nullptr, B)) ? 1 : 2;
  }
  return persistent_ok_[B] == 1;
}

std::vector<long long> CudaEngine::persistent_trace() const {
  std::vector<long long> t;
  if (!ptrace_) return t;
  t.resize(kPersistentTracePerLayer * (size_t)cfg_.num_layers + 2 + kPersistentSlotTrace);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  CUDA_CHECK(cudaMemcpy(t.data(), ptrace_, t.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  return t;
}

int CudaEngine::decode_splits(int B) const {
  // about one wave of blocks (the tensor-core kernel holds one block per SM); each block still takes at
  // least a 64-key tile, so short contexts use few splits whatever this says
  const int want = (num_sms_ + B * cfg_.num_kv_heads - 1) / (B * cfg_.num_kv_heads);
  return std::max(1, std::min({g3cuda::kDecodeMaxSplit, std::max(1, decode_max_splits), want}));
}

int CudaEngine::decode_cluster_size(int B) const {
  if (decode_cluster < 2 || dtype_ != DType::BF16 || !g3cuda::attention_decode_cluster_supported()) return 0;
  const int c = std::min({decode_cluster, g3cuda::kDecodeMaxCluster, decode_splits(B)});
  return c >= 2 ? c : 0;
}

size_t CudaEngine::kv_cache_bytes() const {
  size_t b = 0;
  for (int l = 0; l < cfg_.num_layers; ++l) b += 2 * (size_t)max_batch_ * cfg_.num_kv_heads * caps_[l] * cfg_.head_dim * esize();
  return b;
}
int CudaEngine::cache_capacity(int layer) const {
  if (layer < 0 || layer >= cfg_.num_layers) throw std::out_of_range("layer " + std::to_string(layer) + " out of range");
  return caps_[layer];
}
int CudaEngine::slot_length(int slot) const {
  if (slot < 0 || slot >= max_batch_) throw std::out_of_range("slot " + std::to_string(slot) + " out of range");
  return lengths_[slot];
}
void CudaEngine::reset_slot(int slot) {
  if (slot < 0 || slot >= max_batch_) throw std::out_of_range("slot " + std::to_string(slot) + " out of range");
  lengths_[slot] = 0;
}
void CudaEngine::reset_all() { std::fill(lengths_.begin(), lengths_.end(), 0); }

void CudaEngine::set_weight(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape) {
  weights_.set(name, data, dt, shape);
  dirty_ = true;
}

void CudaEngine::finalize() {
  weights_.require_complete();
  if (dirty_) upload_weights();
}

void CudaEngine::upload_weights() {
  const int L = cfg_.num_layers;
  auto mat = [&](void*& dst, const WeightView& w) {
    const size_t bytes = (size_t)w.rows * w.cols * dtype_size(w.dtype);
    if (!dst) dst = dalloc(bytes);
    CUDA_CHECK(cudaMemcpy(dst, w.data, bytes, cudaMemcpyHostToDevice));
  };
  auto vec = [&](float*& dst, const float* src, int n) {
    if (!src) return;
    if (!dst) dst = static_cast<float*>(dalloc((size_t)n * 4));
    CUDA_CHECK(cudaMemcpy(dst, src, (size_t)n * 4, cudaMemcpyHostToDevice));
  };
  mat(d_embed_, weights_.embed());
  if (!cfg_.tie_word_embeddings) mat(d_lm_head_, weights_.lm_head());
  vec(d_final_norm_, weights_.final_norm(), cfg_.hidden_size);
  dl_.resize(L);
  const int H = cfg_.hidden_size, D = cfg_.head_dim;
  for (int l = 0; l < L; ++l) {
    const LayerWeights& w = weights_.layer(l);
    DevLayer& d = dl_[l];
    mat(d.qkv, w.qkv);
    mat(d.o, w.o);
    mat(d.gate_up, w.gate_up);
    mat(d.down, w.down);
    vec(d.input_norm, w.input_norm, H);
    vec(d.q_norm, w.q_norm, D);
    vec(d.k_norm, w.k_norm, D);
    vec(d.post_attn_norm, w.post_attn_norm, H);
    vec(d.pre_ffw_norm, w.pre_ffw_norm, H);
    vec(d.post_ffw_norm, w.post_ffw_norm, H);
  }
  if (dtype_ == DType::BF16) {  // the persistent decode kernel's view of the layers
    std::vector<PersistentLayer> pl(L);
    for (int l = 0; l < L; ++l) {
      const DevLayer& d = dl_[l];
      const bool local = cfg_.layer_types[l] == AttentionType::Local;
      pl[l] = PersistentLayer{static_cast<const bf16*>(d.qkv), static_cast<const bf16*>(d.o),
                              static_cast<const bf16*>(d.gate_up), static_cast<const bf16*>(d.down),
                              d.input_norm, d.q_norm, d.k_norm, d.post_attn_norm, d.pre_ffw_norm, d.post_ffw_norm,
                              d_inv_freq_ + (local ? 0 : D / 2), static_cast<bf16*>(kc_[l]), static_cast<bf16*>(vc_[l]),
                              caps_[l], local ? cfg_.sliding_window : 0};
    }
    if (!d_players_) d_players_ = dalloc(sizeof(PersistentLayer) * L);
    CUDA_CHECK(cudaMemcpy(d_players_, pl.data(), sizeof(PersistentLayer) * L, cudaMemcpyHostToDevice));
  }
  dirty_ = false;
  uploaded_ = true;
}

// The graph of n decode steps of B sequences (their metadata blocks in h_meta_, m.bytes apart), captured on first
// use, replayed, synchronised: one H2D copy of every block, the steps (step k > 0 embeds the ids step k - 1 sampled,
// each step's ids to ids_ + k B), one D2H copy of the n B ids to h_ids_. A graph per batch size, step count, sampler
// launch count and side of the cluster attention's key limit.
int CudaEngine::graph_key(int B, int n, int searches, bool long_side) { return ((B * 4 + searches) * 2 + long_side) * 64 + n; }

void CudaEngine::decode_graph(int B, int n, const Meta& m) {
  const bool long_side = long_keys_ && decode_cluster_size(B) > 0;
  const int key = graph_key(B, n, sample_searches_, long_side);
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    cudaGraph_t g;
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      CUDA_CHECK(cudaMemcpyAsync(d_meta_, h_meta_, (size_t)n * m.bytes, cudaMemcpyHostToDevice, stream_));
      for (int k = 0; k < n; ++k)
        run(m, B, B, true, 0, 1, false, true, (size_t)k * m.bytes, k > 0 ? ids_ + (size_t)(k - 1) * B : nullptr,
            ids_ + (size_t)k * B);
      CUDA_CHECK(cudaMemcpyAsync(h_ids_, ids_, (size_t)n * B * 4, cudaMemcpyDeviceToHost, stream_));
    } catch (...) {
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream_, &g));
    cudaGraphExec_t ge;
    CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    CUDA_CHECK(cudaGraphDestroy(g));
    it = graphs_.emplace(key, ge).first;
  }
  CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// wide rows (top_k 0 or > kSampleMaxK) take more sampler launches: a graph per count
void CudaEngine::set_sample_searches(int B, const float* temperature, const int32_t* top_k, const float* top_p) {
  sample_searches_ = 0;
  for (int b = 0; b < B; ++b)
    sample_searches_ = std::max(sample_searches_, sample_searches(temperature[b], top_k[b], top_p[b], cfg_.vocab_size));
}

int CudaEngine::decode_steps(const int32_t* slots, int B, const int32_t* tokens, const float* temperature,
                             const int32_t* top_k, const float* top_p, const uint64_t* seed, const uint64_t* counter,
                             int nsteps, int32_t* ids_out) {
  weights_.require_complete();
  const std::vector<int32_t> ones(std::max(B, 0), 1);
  check_batch(cfg_, max_batch_, max_context_, lengths_, slots, ones.data(), B, tokens);
  check_decode_steps(max_context_, lengths_, slots, B, nsteps);
  int maxlen = 0;
  for (int b = 0; b < B; ++b) maxlen = std::max(maxlen, lengths_[slots[b]]);
  if (dirty_) upload_weights();
  // the steps of one graph stay on one side of the cluster attention's key limit (a step sees its start + 1 keys)
  if (decode_cluster_size(B) > 0 && maxlen + 1 <= decode_cluster_max_keys)
    nsteps = std::min(nsteps, decode_cluster_max_keys - maxlen);
  if (persistent_decode || !use_graphs) nsteps = 1;  // the persistent kernel reads step 0's metadata only
  if (nsteps == 1) {
    forward_sample(slots, ones.data(), B, tokens, temperature, top_k, top_p, seed, counter, ids_out);
    return 1;
  }
  set_sample_searches(B, temperature, top_k, top_p);
  ensure_capacity(B, B);
  Meta m;
  const size_t block = layout(B, B, 0).bytes;  // a step's metadata (m.bytes)
  for (int k = 0; k < nsteps; ++k)
    build_meta(slots, ones.data(), B, tokens, temperature, top_k, top_p, seed, counter, m, k, (size_t)k * block);
  decode_graph(B, nsteps, m);
  std::memcpy(ids_out, h_ids_, (size_t)nsteps * B * 4);
  for (int b = 0; b < B; ++b) lengths_[slots[b]] += nsteps;
  return nsteps;
}

double CudaEngine::time_graph_replays(int B, int n) {
  const auto it = graphs_.find(graph_key(B, 1, 0, false));
  if (it == graphs_.end())
    throw std::invalid_argument("time_graph_replays: no decode graph for batch " + std::to_string(B) +
                                " (run a greedy decode step with graphs first)");
  if (n < 1) throw std::invalid_argument("time_graph_replays: n must be at least 1");
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  CUDA_CHECK(cudaGraphLaunch(it->second, stream_));  // warm
  CUDA_CHECK(cudaEventRecord(e0, stream_));
  for (int i = 0; i < n; ++i) CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  CUDA_CHECK(cudaEventRecord(e1, stream_));
  CUDA_CHECK(cudaEventSynchronize(e1));
  float ms = 0.f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ms / n;
}

void CudaEngine::clear_graphs() {
  for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
  graphs_.clear();
}

void CudaEngine::free_activations() {
  for (void* p : act_allocs_) cudaFree(p);
  act_allocs_.clear();
  if (h_meta_) cudaFreeHost(h_meta_);
  h_meta_ = nullptr;
}

CudaEngine::Meta CudaEngine::layout(int T, int B, int ntiles) const {
  Meta m{};
  size_t o = 0;
  auto take = [&](size_t bytes, size_t align) {
    o = (o + align - 1) / align * align;
    const size_t at = o;
    o += bytes;
    return at;
  };
  m.seed = take((size_t)B * 8, 8);
  m.counter = take((size_t)B * 8, 8);
  m.tiles = take((size_t)ntiles * 8, 8);
  m.tokens = take((size_t)T * 4, 4);
  m.pos = take((size_t)T * 4, 4);
  m.seq = take((size_t)T * 4, 4);
  m.slot = take((size_t)B * 4, 4);
  m.start = take((size_t)B * 4, 4);
  m.len = take((size_t)B * 4, 4);
  m.t0 = take((size_t)B * 4, 4);
  m.temp = take((size_t)B * 4, 4);
  m.topk = take((size_t)B * 4, 4);
  m.topp = take((size_t)B * 4, 4);
  m.bytes = (o + 15) / 16 * 16;
  return m;
}

void CudaEngine::ensure_capacity(int T, int logit_rows) {
  if (T <= cap_T_ && logit_rows <= cap_logits_) return;
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  clear_graphs();
  const int nT = std::max(T, cap_T_), nL = std::max(logit_rows, cap_logits_);
  free_activations();
  const ModelConfig& c = cfg_;
  size_t act_bytes = 0;
  auto a = [&](size_t bytes) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    act_allocs_.push_back(p);
    act_bytes += bytes;
    return p;
  };
  const size_t e = esize();
  x_ = static_cast<float*>(a((size_t)nT * c.hidden_size * 4));
  x2_ = static_cast<float*>(a((size_t)2 * c.hidden_size * 4));
  xn_ = a((size_t)nT * c.hidden_size * e);
  qkv_ = static_cast<float*>(a((size_t)nT * c.qkv_dim() * 4));
  q_ = a((size_t)nT * c.q_dim() * e);
  knew_ = a((size_t)nT * c.kv_dim() * e);
  vnew_ = a((size_t)nT * c.kv_dim() * e);
  attn_ = a((size_t)nT * c.q_dim() * e);
  proj_ = static_cast<float*>(a((size_t)nT * c.hidden_size * 4));
  gu_ = static_cast<float*>(a((size_t)nT * 2 * c.intermediate_size * 4));
  act_ = a((size_t)nT * c.intermediate_size * e);
  xlast_ = a((size_t)max_batch_ * c.hidden_size * e);
  logits_ = static_cast<float*>(a((size_t)nL * c.vocab_size * 4));
  const int max_tiles = nT / 64 + max_batch_ + 1;
  // a forward's metadata, or decode_steps' blocks of kMaxDecodeSteps steps
  meta_cap_ = std::max(layout(nT, max_batch_, max_tiles).bytes, kMaxDecodeSteps * layout(max_batch_, max_batch_, 0).bytes);
  d_meta_ = static_cast<char*>(a(meta_cap_));
  CUDA_CHECK(cudaMallocHost(&h_meta_, meta_cap_));
  cap_T_ = nT;
  cap_logits_ = nL;
  act_bytes_ = act_bytes;
}

}  // namespace g3

namespace g3 {

int CudaEngine::build_meta(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                           const float* temperature, const int32_t* top_k, const float* top_p, const uint64_t* seed,
                           const uint64_t* counter, Meta& m, int step, size_t hoff) {
  int T = 0, ntiles = 0;
  for (int b = 0; b < B; ++b) {
    T += lengths[b];
    ntiles += (lengths[b] + 63) / 64;
  }
  bool decode = true;
  for (int b = 0; b < B; ++b) decode = decode && lengths[b] == 1;
  if (decode) ntiles = 0;
  m = layout(T, B, ntiles);
  char* h = h_meta_ + hoff;
  auto I = [&](size_t off) { return reinterpret_cast<int32_t*>(h + off); };
  std::memcpy(h + m.tokens, tokens, (size_t)T * 4);
  int2* tiles = reinterpret_cast<int2*>(h + m.tiles);
  long_keys_ = false;
  for (int b = 0, t = 0, k = 0; b < B; ++b) {
    const int start = lengths_[slots[b]] + step;
    long_keys_ = long_keys_ || start + lengths[b] > decode_cluster_max_keys;
    I(m.slot)[b] = slots[b];
    I(m.start)[b] = start;
    I(m.len)[b] = lengths[b];
    I(m.t0)[b] = t;
    for (int i = 0; i < lengths[b]; ++i, ++t) {
      I(m.pos)[t] = start + i;
      I(m.seq)[t] = b;
    }
    if (!decode)
      for (int q0 = 0; q0 < lengths[b]; q0 += 64) tiles[k++] = make_int2(b, q0);
  }
  for (int b = 0; b < B; ++b) {
    reinterpret_cast<uint64_t*>(h + m.seed)[b] = seed ? seed[b] : 0;
    reinterpret_cast<uint64_t*>(h + m.counter)[b] = (counter ? counter[b] : 0) + (uint64_t)step;
    reinterpret_cast<float*>(h + m.temp)[b] = temperature ? temperature[b] : 0.f;
    I(m.topk)[b] = top_k ? top_k[b] : 0;
    reinterpret_cast<float*>(h + m.topp)[b] = top_p ? top_p[b] : 1.f;
  }
  return ntiles;
}

// All device work of one forward (metadata already in d_meta_ or copied by the caller's stream op).
void CudaEngine::run(const Meta& m, int B, int T, bool decode, int ntiles, int max_len, bool all_logits, bool sample,
                     size_t mbase, const int32_t* tokens_dev, int32_t* ids_dev) {
  const ModelConfig& c = cfg_;
  const int H = c.hidden_size, F = c.intermediate_size, D = c.head_dim, NH = c.num_heads, KVH = c.num_kv_heads;
  const int QD = c.q_dim(), QKV = c.qkv_dim();
  const float eps = c.rms_norm_eps;
  const bool bf = dtype_ == DType::BF16;
  cudaStream_t s = stream_;
  const char* mb = d_meta_ + mbase;  // this step's metadata block
  auto P = [&](size_t off) { return reinterpret_cast<const int32_t*>(mb + off); };
  SeqMeta seq{P(m.slot), P(m.start), P(m.len), P(m.t0), ext_extent_};
  TokMeta tok{P(m.pos), P(m.seq)};
  const int32_t* d_tokens = tokens_dev ? tokens_dev : P(m.tokens);
  const int2* tiles = reinterpret_cast<const int2*>(mb + m.tiles);
  const int nsplit = decode_splits(B), ncluster = decode ? decode_cluster_size(B) : 0;
  // timing experiments only: stage i launched twice when bit i of repeat_mask is set (0 qkv product,
  // 1 qk_rope_kv, 2 decode attention, 3 o product, 4 residual+norm, 5 gate_up+GeGLU, 6 down product,
  // 7 LM head, 8 sampling), or not at all when bit i of skip_mask is set (wrong results: what the step would
  // cost without the stage; the post-FFW residual step, when its own launch, goes with bit 4)
  auto R = [&](int i) { return ((skip_mask >> i) & 1) ? -1 : (repeat_mask >> i) & 1; };

  const bool persistent = decode && persistent_decode_ok(B);
  // PDL early trigger (common.cuh) in decode forwards, per stage (bits of pdl_early_trigger, engine.h). The
  // launch after an early o or down product (residual_rmsnorm or a fused residual GEMV) reads the residual
  // row after its wait (kPdlResidLate). Flags back to 0 when run() returns, for launches outside the engine.
  struct FlagsOff {
    ~FlagsOff() { g3cuda::pdl_next_flags() = 0; }
  } flags_off;
  int early_bits = 0;  // set with the fusions below
  auto bit = [&](int b) { return b >= 0 && ((early_bits >> b) & 1); };
  // the launches made next: stage `b`'s early trigger; resid_after: the stage whose early trigger (if set)
  // makes them read the residual row after their wait
  auto trigger_early = [&](int b, int resid_after = -1) {
    g3cuda::pdl_next_flags() = (bit(b) ? g3cuda::kPdlEarly : 0) | (bit(resid_after) ? g3cuda::kPdlResidLate : 0);
  };
  trigger_early(-1);
  auto layers = [&](auto tag) {
    using E = decltype(tag);
    if (persistent) {
      if constexpr (std::is_same<E, bf16>::value) {
        PersistentDecode pd = persistent_params(&m, B);
        if (trace_persistent) {
          if (!ptrace_) ptrace_ = static_cast<long long*>(dalloc((kPersistentTracePerLayer * (size_t)c.num_layers + 2 + kPersistentSlotTrace) * sizeof(long long)));
          pd.trace = ptrace_;
        }
        g3cuda::persistent_decode(pd, num_sms_, s);
        ++persistent_launches;
      }
    } else if (ext_n_ > 0) {  // image embeddings replace the soft tokens' rows before the first norm
      embedding_rmsnorm<E>(x_, TD(xn_), static_cast<const E*>(d_embed_), d_tokens, T, H, embed_scale_, nullptr, eps, s);
      scatter_rows(x_, ext_embeds_, ext_rows_, ext_n_, H, s);
      rmsnorm<E>(TD(xn_), x_, dl_[0].input_norm, T, H, eps, s);
    } else {
      embedding_rmsnorm<E>(x_, TD(xn_), static_cast<const E*>(d_embed_), d_tokens, T, H, embed_scale_,
                           dl_[0].input_norm, eps, s);
    }
    // Residual steps fused into the GEMV after them (gemv_residual) where its blocks fit in one wave: a
    // fused step writes the residual to the other of x_ / x2_ (`cur` holds it), an unfused one in place;
    // the last layer's final norm stays a kernel.
    const bool fuse_res = bf && fuse_residual_gemv > 0 && gemm_path != 2 && gemv_residual_supported(bf, T, H);
    // bf16 decode of 1-2 tokens on sm_90: the qkv product with QK-norm, RoPE and the cache write in one
    // launch (gemv_qkv_rope) where its clusters (one per head) are all resident at once (at 4B on an H100
    // 14 of 16 are: a second wave) and the hidden size is at most qkv_rope_max_hidden (engine.h). The
    // residual step before it stays its own launch unless fuse_qkv_rope is 2 (slower inside at 270M).
    const bool qkv_norm = fuse_res && fuse_qkv_rope == 2;
    const bool qkv_rope = bf && decode && fuse_qkv_rope > 0 && gemm_path != 2 && H <= qkv_rope_max_hidden &&
                          gemv_qkv_rope_supported(T, H, D) &&
                          gemv_qkv_rope_max_clusters(T, H, D, qkv_norm) >= NH + 2 * KVH;
    const bool fuse_qkv = fuse_res && (qkv_rope ? qkv_norm : (fuse_residual_gemv == 2 ||
                                                              gemv_residual_one_wave(T, H, QKV, false)));
    // the gate_up product's plain GEMV grid, in waves of its resident blocks: more than one and at most four
    // (1B's on an H100) also takes the fused residual step (fuse_residual_gemv 1), at most four takes the
    // early trigger of the residual step before it (pdl_early_trigger -1)
    const bool gu_few_waves = gemv_few_waves(T, H, F, true);
    const bool fuse_gu = fuse_res && (fuse_residual_gemv == 2 || gemv_residual_one_wave(T, H, F, true) ||
                                      (fuse_residual_gemv == 1 && gu_few_waves));
    if (decode) {
      early_bits = pdl_early_trigger;
      if (early_bits < 0) {
        const GemvShape gu = gemv_shape(T, F, H, true, false);
        early_bits = 1 << kEarlyQkRope;
        if (!fuse_gu && gu.blocks <= 4 * gu.resident) early_bits |= 1 << kEarlyPreFfw;
      }
    }
    if (qkv_rope) ++qkv_rope_forwards;
    // gate_up_l2_prefetch_kb (engine.h): the gate_up outputs [pf_n0, pf_n1) after its plain GEMV's first wave
    long long pf_n0 = 0, pf_n1 = 0;
    if (decode && bf && T == 1 && !fuse_gu && gemm_path != 2 && gate_up_l2_prefetch_kb > 0 &&
        g3cuda::device_cc() >= 90 && gemv_supported(bf, T, QD) && gemv_supported(bf, T, H)) {
      const GemvShape gu = gemv_shape(T, F, H, true, false);
      if (gu.blocks > gu.resident) {
        pf_n0 = std::min<long long>(F, (long long)gu.resident * gu.rows_per_block);
        pf_n1 = std::min<long long>(F, pf_n0 + (long long)gate_up_l2_prefetch_kb * 1024 / (4LL * H));
      }
    }
    if (pf_n1 > pf_n0) ++l2_prefetch_forwards;
    float* cur = x_;
    auto other = [&](float* p) { return p == x_ ? x2_ : x_; };
    for (int l = 0; l < (persistent ? 0 : c.num_layers); ++l) {
      const DevLayer& w = dl_[l];
      const bool local = c.layer_types[l] == AttentionType::Local;
      const int cap = caps_[l];
      const int window = local ? c.sliding_window : 0;
      // the decode attention's splits as one cluster (see engine.h), else the one-wave split grid
      const bool cl = ncluster > 0 && (local ? window <= decode_cluster_max_keys : !long_keys_);
      const int ns = cl ? ncluster : nsplit;
      E* kc = TD(kc_[l]);
      E* vc = TD(vc_[l]);
      const float* inv_freq = d_inv_freq_ + (local ? 0 : D / 2);
      // the previous layer's post-ffw residual step, then this layer's input norm, inside the product
      const GemvResidual rn{proj_, cur, other(cur), l > 0 ? dl_[l - 1].post_ffw_norm : nullptr, w.input_norm, eps};
      trigger_early(kEarlyQkv, l > 0 ? kEarlyDown : -1);
      if (qkv_rope) {
        if constexpr (std::is_same<E, bf16>::value) {
          const QkvRope a{TD(q_), TD(knew_), TD(vnew_), kc, vc, w.q_norm, w.k_norm, inv_freq, tok, seq,
                          NH, KVH, D, H, cap, local, eps};
          const bool res = fuse_qkv && l > 0;
          for (int r = 0; r <= R(0); ++r)
            gemv_qkv_rope(a, static_cast<const bf16*>(xn_), static_cast<const bf16*>(w.qkv), T, res ? &rn : nullptr, s);
          if (res) cur = other(cur);
        }
      } else if (fuse_qkv && l > 0) {
        for (int r = 0; r <= R(0); ++r) gemv_residual(qkv_, rn, static_cast<const bf16*>(w.qkv), T, H, QKV, s);
        cur = other(cur);
      } else {
        for (int r = 0; r <= R(0); ++r) gemm(cublas_, qkv_, xn_, w.qkv, bf, T, H, QKV, gemm_path, s);
      }
      bool fused_qk = false;  // QK-norm + RoPE + cache write inside the tensor-core decode attention
      if constexpr (std::is_same<E, bf16>::value)
        fused_qk = !qkv_rope && decode && attention_path == 0 &&
                   (fuse_qk_attention == 2 || (fuse_qk_attention == 1 && !cl)) && decode_kernel_mode() == 2 &&
                   attention_decode_tc_supported(NH, KVH, D);
      trigger_early(kEarlyQkRope);
      if (!fused_qk && !qkv_rope)
        for (int r = 0; r <= R(1); ++r)
          qk_rope_kv<E>(TD(q_), TD(knew_), TD(vnew_), kc, vc, qkv_, w.q_norm, w.k_norm, inv_freq, tok, seq, T, NH, KVH,
                        D, cap, local, eps, s);
      trigger_early(kEarlyAttention);
      if (fused_qk) {
        if constexpr (std::is_same<E, bf16>::value)
          for (int r = 0; r <= R(2); ++r)
            attention_decode_tc_qk(TD(attn_), kc, vc, QkPrep{qkv_, w.q_norm, w.k_norm, inv_freq, eps}, seq, B, NH, KVH,
                                   D, cap, window, c.attn_scale(), c.attn_logit_softcap, ns, part_, counters_, s, cl);
      } else if (decode && attention_path == 0) {
        bool done = false;
        if constexpr (std::is_same<E, bf16>::value)
          if (cl && decode_kernel_mode() == 2 && attention_decode_tc_supported(NH, KVH, D)) {
            for (int r = 0; r <= R(2); ++r)
              attention_decode_tc(TD(attn_), TD(q_), kc, vc, seq, B, NH, KVH, D, cap, window, c.attn_scale(),
                                  c.attn_logit_softcap, ns, part_, counters_, s, true);
            done = true;
          }
        if (!done)
          for (int r = 0; r <= R(2); ++r)
            attention_decode<E>(TD(attn_), TD(q_), kc, vc, seq, B, NH, KVH, D, cap, window, c.attn_scale(),
                                c.attn_logit_softcap, nsplit, part_, counters_, s);
      } else {
        bool done = false;
        if constexpr (std::is_same<E, bf16>::value) {
          if (attention_path == 0 && attention_prefill_tc_supported(D)) {
            attention_prefill_tc(TD(attn_), TD(q_), TD(knew_), TD(vnew_), kc, vc, seq, tiles, ntiles, NH, KVH, D, cap,
                                 window, c.attn_scale(), c.attn_logit_softcap, s);
            done = true;
          }
        }
        if (!done)
          attention_generic<E>(TD(attn_), TD(q_), TD(knew_), TD(vnew_), kc, vc, tok, seq, T, NH, KVH, D, cap, window,
                               c.attn_scale(), c.attn_logit_softcap, s);
        if (local && max_len > 1) kv_cache_write<E>(kc, vc, TD(knew_), TD(vnew_), tok, seq, T, KVH, D, cap, local, 1, s);
      }
      trigger_early(kEarlyO);
      for (int r = 0; r <= R(3); ++r) {
        if (pf_n1 > pf_n0) {  // rows of the [gate; up] weight [2F, H], bf16
          g3cuda::L2Prefetch& pf = g3cuda::gemv_next_l2_prefetch();
          const char* gu = static_cast<const char*>(w.gate_up);
          const long long row = 2LL * H;
          pf.p[0] = gu + pf_n0 * row;
          pf.p[1] = gu + (F + pf_n0) * row;
          pf.bytes[0] = pf.bytes[1] = (pf_n1 - pf_n0) * row;
        }
        gemm(cublas_, proj_, attn_, w.o, bf, T, QD, H, gemm_path, s);  // the GEMV here: it takes the prefetch
      }
      trigger_early(kEarlyGateUp, kEarlyO);
      if (fuse_gu) {
        const GemvResidual rn{proj_, cur, other(cur), w.post_attn_norm, w.pre_ffw_norm, eps};
        for (int r = 0; r <= R(5); ++r)
          gemv_residual_geglu(static_cast<bf16*>(act_), rn, static_cast<const bf16*>(w.gate_up), T, H, F, s);
        cur = other(cur);
      } else {
        trigger_early(kEarlyPreFfw, kEarlyO);
        for (int r = 0; r <= R(4); ++r)
        residual_rmsnorm<E>(cur, TD(xn_), proj_, w.post_attn_norm, w.pre_ffw_norm, T, H, eps, s);
        trigger_early(kEarlyGateUp);
        for (int r = 0; r <= R(5); ++r)
        gemm_geglu<E>(cublas_, TD(act_), gu_, TD(xn_), static_cast<const E*>(w.gate_up), T, H, F, gemm_path, s);
      }
      trigger_early(kEarlyDown);
      for (int r = 0; r <= R(6); ++r) gemm(cublas_, proj_, act_, w.down, bf, T, F, H, gemm_path, s);
      trigger_early(kEarlyPostFfw, kEarlyDown);
      if ((!fuse_qkv || l + 1 == c.num_layers) && R(4) >= 0)
        residual_rmsnorm<E>(cur, TD(xn_), proj_, w.post_ffw_norm, l + 1 < c.num_layers ? dl_[l + 1].input_norm : d_final_norm_,
                            T, H, eps, s);
    }
    const void* head_in = xn_;
    int rows = T;
    if (!all_logits) {
      rows = B;
      if (!decode) {
        gather_last_rows<E>(TD(xlast_), TD(xn_), seq, B, H, s);
        head_in = xlast_;
      }
    }
    const void* head = c.tie_word_embeddings ? d_embed_ : d_lm_head_;
    trigger_early(-1);
    for (int r = 0; r <= R(7); ++r) gemm(cublas_, logits_, head_in, head, bf, rows, H, c.vocab_size, gemm_path, s);
    if (c.final_logit_softcap > 0.f) softcap(logits_, (int64_t)rows * c.vocab_size, c.final_logit_softcap, s);
    if (sample)
      for (int r = 0; r <= R(8); ++r)
      g3cuda::sample(ids_dev ? ids_dev : ids_, logits_, B, c.vocab_size, reinterpret_cast<const float*>(mb + m.temp),
                     P(m.topk), reinterpret_cast<const float*>(mb + m.topp), reinterpret_cast<const uint64_t*>(mb + m.seed),
                     reinterpret_cast<const uint64_t*>(mb + m.counter), sample_ws_, max_batch_,
                     sample_searches_, s);
  };
  if (bf)
    layers(bf16{});
  else
    layers(float{});
}

// Copies a forward's multimodal extras to the device (after the stream's previous work: the buffer may
// still be read by it) and points run() at them.
void CudaEngine::upload_extras(const ForwardExtras& ex, int T) {
  for (int e = 0; e < ex.n_embeds; ++e)
    if (ex.embed_rows[e] < 0 || ex.embed_rows[e] >= T)
      throw std::out_of_range("embedding row " + std::to_string(ex.embed_rows[e]) + " outside the batch of " +
                              std::to_string(T));
  const size_t H = cfg_.hidden_size;
  const size_t emb = (size_t)ex.n_embeds * H * 4, rows = ((size_t)ex.n_embeds * 4 + 15) / 16 * 16;
  const size_t ext = ex.extent ? (size_t)T * 4 : 0;
  const size_t need = emb + rows + ext;
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (need > ext_cap_) {
    if (ext_buf_) cudaFree(ext_buf_);
    ext_buf_ = nullptr;
    CUDA_CHECK(cudaMalloc(&ext_buf_, need));
    ext_cap_ = need;
  }
  if (emb) {
    CUDA_CHECK(cudaMemcpy(ext_buf_, ex.embeds, emb, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(ext_buf_ + emb, ex.embed_rows, (size_t)ex.n_embeds * 4, cudaMemcpyHostToDevice));
  }
  if (ext) CUDA_CHECK(cudaMemcpy(ext_buf_ + emb + rows, ex.extent, ext, cudaMemcpyHostToDevice));
  ext_n_ = ex.n_embeds;
  ext_embeds_ = reinterpret_cast<const float*>(ext_buf_);
  ext_rows_ = reinterpret_cast<const int32_t*>(ext_buf_ + emb);
  ext_extent_ = ext ? reinterpret_cast<const int32_t*>(ext_buf_ + emb + rows) : nullptr;
}

void CudaEngine::forward(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens, bool all_logits,
                         float* logits, const ForwardExtras* extras) {
  weights_.require_complete();
  check_batch(cfg_, max_batch_, max_context_, lengths_, slots, lengths, B, tokens);
  if (dirty_) upload_weights();
  int T = 0, max_len = 0;
  for (int b = 0; b < B; ++b) {
    T += lengths[b];
    max_len = std::max(max_len, lengths[b]);
  }
  const bool decode = max_len == 1;
  const int rows = all_logits ? T : B;
  ensure_capacity(T, rows);
  Meta m;
  const int ntiles = build_meta(slots, lengths, B, tokens, nullptr, nullptr, nullptr, nullptr, nullptr, m);
  struct ClearExtras {  // run() sees the extras of this call only, whatever happens
    CudaEngine* e;
    ~ClearExtras() { e->ext_n_ = 0; e->ext_extent_ = nullptr; }
  } clear_extras{this};
  if (extras && (extras->n_embeds > 0 || extras->extent)) upload_extras(*extras, T);
  CUDA_CHECK(cudaMemcpyAsync(d_meta_, h_meta_, m.bytes, cudaMemcpyHostToDevice, stream_));
  run(m, B, T, decode, ntiles, max_len, all_logits, false);
  CUDA_CHECK(cudaMemcpyAsync(logits, logits_, (size_t)rows * cfg_.vocab_size * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (int b = 0; b < B; ++b) lengths_[slots[b]] += lengths[b];
}

void CudaEngine::forward_sample(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                                const float* temperature, const int32_t* top_k, const float* top_p,
                                const uint64_t* seed, const uint64_t* counter, int32_t* ids_out) {
  weights_.require_complete();
  check_batch(cfg_, max_batch_, max_context_, lengths_, slots, lengths, B, tokens);
  if (dirty_) upload_weights();
  int T = 0, max_len = 0;
  for (int b = 0; b < B; ++b) {
    T += lengths[b];
    max_len = std::max(max_len, lengths[b]);
  }
  const bool decode = max_len == 1;
  set_sample_searches(B, temperature, top_k, top_p);
  ensure_capacity(T, B);
  Meta m;
  const int ntiles = build_meta(slots, lengths, B, tokens, temperature, top_k, top_p, seed, counter, m);
  if (decode && use_graphs) {
    decode_graph(B, 1, m);
  } else {
    CUDA_CHECK(cudaMemcpyAsync(d_meta_, h_meta_, m.bytes, cudaMemcpyHostToDevice, stream_));
    run(m, B, T, decode, ntiles, max_len, false, true);
    CUDA_CHECK(cudaMemcpyAsync(h_ids_, ids_, (size_t)B * 4, cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  std::memcpy(ids_out, h_ids_, (size_t)B * 4);
  for (int b = 0; b < B; ++b) lengths_[slots[b]] += lengths[b];
}

}  // namespace g3
