// engine.h: the CUDA engine: the CPU engine's interface (a KV cache of max_batch sequence slots, a
// forward pass over a ragged batch, forward + sampling) on one GPU. Weights live in a host
// WeightStore until the first forward (or finalize()) uploads them once; the KV cache (in the
// storage dtype: bf16, or float32 in the float32 engine) and all activations are preallocated; the
// decode step (every sequence bringing one token) of forward_sample is a CUDA graph per batch size
// and number of sampler searches (sample_searches(): 0 unless some row samples the wide way).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <map>
#include <vector>
#include "config.h"
#include "cuda/kernels.cuh"
#include "weights.h"

namespace g3 {

struct ForwardExtras;  // engine_cpu.h: image embeddings and bidirectional extents of multimodal prompts

class CudaEngine {
 public:
  CudaEngine(const ModelConfig& cfg, DType weight_dtype, int max_batch, int max_context);
  ~CudaEngine();
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  WeightStore& weights() { return weights_; }
  void set_weight(const std::string& name, const void* data, DType dt, const std::vector<int64_t>& shape);
  void finalize();  // uploads the weights now (else the first forward does)
  const ModelConfig& config() const { return cfg_; }
  int max_batch() const { return max_batch_; }
  int max_context() const { return max_context_; }
  size_t kv_cache_bytes() const;
  size_t device_bytes() const { return device_bytes_ + act_bytes_; }  // all cudaMalloc'd bytes
  int cache_capacity(int layer) const;
  int slot_length(int slot) const;
  void reset_slot(int slot);
  void reset_all();

  // extras (multimodal prompts, as CpuEngine::forward takes them): embeds replace the scaled token
  // embeddings of embed_rows; extent[t] lets token t see later keys of its chunk (image blocks).
  void forward(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens, bool all_logits,
               float* logits, const ForwardExtras* extras = nullptr);
  void forward_sample(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens,
                      const float* temperature, const int32_t* top_k, const float* top_p, const uint64_t* seed,
                      const uint64_t* counter, int32_t* ids_out);
  // Up to nsteps decode steps of B sequences in one call: step 0 brings tokens [B], step k > 0 the ids step k - 1
  // sampled, on the device (one graph of the n steps: one launch and one synchronisation, no host turnaround
  // between steps); step k samples with counter + k. ids_out [n][B]; returns n, which is nsteps but where the
  // steps would cross the cluster attention's key limit (decode_cluster_max_keys: then the steps up to it), and 1
  // without graphs or with the persistent kernel. nsteps <= kMaxDecodeSteps (batch.h).
  int decode_steps(const int32_t* slots, int B, const int32_t* tokens, const float* temperature, const int32_t* top_k,
                   const float* top_p, const uint64_t* seed, const uint64_t* counter, int nsteps, int32_t* ids_out);

  // knobs for tests and benchmarks
  bool use_graphs = true;
  int attention_path = 0;  // 0 auto (tensor cores where supported), 1 generic kernel everywhere
  int decode_max_splits = 128;  // at most this many key-range splits in decode attention (1..128)
  // bf16 decode: QK-norm + RoPE + the cache write inside the tensor-core decode attention (one launch
  // less per layer, the same bits): 1 (default) where the attention runs on the split grid, 2 also where it
  // runs as a cluster (there it measured 1-3 % slower than qk_rope_kv then the attention at 270M and 4B,
  // the same at 1B; not profiled: bench/gpu/NOTES.md session 6), 0 never
  int fuse_qk_attention = 1;
  // bf16 decode on sm_90: the tensor-core decode attention's splits of a kv head as one thread-block
  // cluster of up to this many blocks, combined through distributed shared memory (0 or 1: off). Used on
  // local layers whose window is at most decode_cluster_max_keys, and on global layers while every
  // sequence of the step has at most that many keys (a decode graph per side of that line); longer key
  // ranges take the one-wave split grid.
  int decode_cluster = 8;
  int decode_cluster_max_keys = 1024;
  // bf16 batch <= 2 with hidden size <= 2560: the residual steps before the gate_up and the next layer's
  // qkv products done inside those GEMVs (gemv_residual; a launch less each, the same bits): 1 (default)
  // where the fused kernel's blocks fit in one wave (gemv_residual_one_wave), and for the gate_up product
  // also where its plain grid is more than one and at most four waves (gemv_few_waves: 1B's); 3 only the
  // first; 2 always, 0 never
  int fuse_residual_gemv = 1;
  // bf16 decode of 1-2 tokens on sm_90: the qkv product, QK-norm, RoPE and the cache write as one launch
  // (gemv_qkv_rope: a thread-block cluster per head) where all its clusters are resident at once and the
  // hidden size is at most qkv_rope_max_hidden: 1 with the residual step before it in its own launch, 2 with
  // that step inside it too (where fuse_residual_gemv is not 0), 0 (default) never (the qkv GEMV then
  // qk_rope_kv, or the fused attention above). Measured on an H100 (bench/gpu/NOTES.md): in session 10 1 was
  // 2-4 % faster at 270M (hidden 640), 0-1 % slower at 1B (1152) and slower at 4B (2560), hence the limit of
  // 768; since qk_rope_kv lets the attention launch at its entry (session 12) the two launches are faster at
  // 270M too (session 15: 0.467 against 0.481 ms a step, 6 alternations; 0.442 against 0.463 in bench_e2e).
  int fuse_qkv_rope = 0;
  int qkv_rope_max_hidden = 768;
  int qkv_rope_forwards = 0;  // forwards that launched (or captured) gemv_qkv_rope
  // decode forwards: the kernels of the stages whose bits are set (kEarly*) let the next kernel launch at their
  // entry rather than after their own wait (common.cuh, pdl_next_flags). After an early o or down product the
  // residual step reads the residual row after its wait. -1 (default): qk_rope_kv, and the residual step
  // before the gate_up product where that product's GEMV grid is at most four waves and takes no fused
  // residual step (measured on an H100, bench/gpu/NOTES.md session 12: those two gained at 270M / 1B / 4B;
  // the gate_up's and the residual step's early trigger at 4B, and every stage's at once, were slower).
  int pdl_early_trigger = -1;
  static constexpr int kEarlyQkv = 0,  // the qkv product (plain, fused residual, or with QK-norm + RoPE)
      kEarlyQkRope = 1,                // qk_rope_kv
      kEarlyAttention = 2,             // the decode attention
      kEarlyPreFfw = 3,                // the residual step before the gate_up product (when its own launch)
      kEarlyGateUp = 4,                // the gate_up product + GeGLU (plain or fused residual)
      kEarlyPostFfw = 5,               // the residual step after the down product (when its own launch)
      kEarlyO = 6,                     // the o product
      kEarlyDown = 7;                  // the down product
  // bf16 decode of one token on sm_90, where the gate_up product is the plain GEMV over more than one wave of
  // blocks (4B's, not 270M's or 1B's, whose residual step is inside it): the o product's blocks, at their end,
  // prefetch into L2 this many KB of the gate_up rows that its first wave does not load (the gate and up rows of
  // the outputs after it), so that HBM works through the residual step between the two products and a part of
  // gate_up's second wave reads from L2. 0: off. Measured on an H100 (bench/gpu/NOTES.md session 21), a 4B step:
  // 3.028-3.050 ms against 3.057-3.073 in four probes; 2 MB gained less, 6-16 MB less or nothing, issuing from
  // the qkv product as much, and 4 MB at 1B (its fused gate_up) was 3 % slower.
  int gate_up_l2_prefetch_kb = 4096;
  int l2_prefetch_forwards = 0;  // forwards whose o products were given a gate_up prefetch
  int gemm_path = 0;       // 0 auto, 2 cuBLAS everywhere
  int repeat_mask = 0;     // timing experiments (engine.cu); 0 in use
  int skip_mask = 0;       // timing experiments: stages left out (engine.cu; wrong results); 0 in use
  // decode steps of up to g3cuda::kPersistentMaxB sequences (bf16) as one persistent kernel
  // (decode_persistent.cu) where the configuration allows. Off by default: correct, but measured slower
  // than one launch per operation on an H100 (bench/gpu/NOTES.md, session 4)
  bool persistent_decode = false;
  int persistent_launches = 0;  // forwards that launched (or captured) the persistent kernel
  bool persistent_decode_ok(int B);
  // profiling: the next persistent launches record block 0's clock at every phase boundary (ungraphed
  // forwards only: the buffer is allocated on first use)
  bool trace_persistent = false;
  std::vector<long long> persistent_trace() const;  // 9 L + 2 stamps of the last traced launch
  int graphs_captured() const { return (int)graphs_.size(); }
  // Timing: ms per replay of the batch-B greedy decode graph (captured by an earlier forward_sample; its first
  // kind: no wide sampler rows, keys within the cluster limit), n replays queued back to back with one
  // synchronisation at the end: the GPU's step time without the host's turnaround between steps. The replays
  // repeat the last step's metadata (the same position: its cache rows are rewritten with the same values).
  double time_graph_replays(int B, int n);
  void clear_graphs();

 private:
  struct DevLayer {
    void *qkv = nullptr, *o = nullptr, *gate_up = nullptr, *down = nullptr;
    float *input_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr, *post_attn_norm = nullptr,
          *pre_ffw_norm = nullptr, *post_ffw_norm = nullptr;
  };
  struct Meta {  // offsets (bytes) into the per-forward metadata block
    size_t tokens, pos, seq, slot, start, len, t0, tiles, seed, counter, temp, topk, topp, bytes;
  };
  void* dalloc(size_t bytes);
  void upload_weights();
  void ensure_capacity(int T, int logit_rows);
  void free_activations();
  Meta layout(int T, int B, int ntiles) const;
  // step k > 0: the metadata of the k-th next decode step (positions + k, sampler counters + k) at h_meta_ + hoff
  int build_meta(const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens, const float* temperature,
                 const int32_t* top_k, const float* top_p, const uint64_t* seed, const uint64_t* counter,
                 Meta& m, int step = 0, size_t hoff = 0);
  // mbase: the metadata block's offset in d_meta_; tokens_dev / ids_dev: the tokens to embed / where the sampler
  // writes, in place of the metadata's tokens / ids_
  void run(const Meta& m, int B, int T, bool decode, int ntiles, int max_len, bool all_logits, bool sample,
           size_t mbase = 0, const int32_t* tokens_dev = nullptr, int32_t* ids_dev = nullptr);
  static int graph_key(int B, int n, int searches, bool long_side);
  void decode_graph(int B, int n, const Meta& m);
  int decode_splits(int B) const;
  int decode_cluster_size(int B) const;  // blocks per cluster at batch B, 0 where clusters are off
  bool long_keys_ = false;  // this step: some sequence has more than decode_cluster_max_keys keys
  size_t esize() const { return dtype_ == DType::BF16 ? 2 : 4; }

  ModelConfig cfg_;
  DType dtype_;
  WeightStore weights_;
  int max_batch_, max_context_;
  std::vector<int> caps_;
  std::vector<int> lengths_;
  float embed_scale_;
  bool dirty_ = true, uploaded_ = false;
  size_t device_bytes_ = 0, act_bytes_ = 0;
  int num_sms_ = 132;

  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  std::vector<void*> allocs_;       // weights, cache, constant buffers
  std::vector<void*> act_allocs_;   // activations (regrown)

  // device weights
  void *d_embed_ = nullptr, *d_lm_head_ = nullptr;
  float* d_final_norm_ = nullptr;
  float* d_inv_freq_ = nullptr;  // [2][D/2]: local, global
  std::vector<DevLayer> dl_;
  g3cuda::PersistentDecode persistent_params(const Meta* m, int B) const;
  int persistent_ok_[g3cuda::kPersistentMaxB + 1] = {};  // per batch size: 0 unknown, 1 supported, 2 not
  void* d_players_ = nullptr;  // the persistent kernel's layer table (g3cuda::PersistentLayer [L])
  unsigned* pbar_ = nullptr;   // its grid-barrier counters
  long long* ptrace_ = nullptr;
  std::vector<void*> kc_, vc_;
  // activations
  int cap_T_ = 0, cap_logits_ = 0;
  float *x_ = nullptr, *qkv_ = nullptr, *proj_ = nullptr, *gu_ = nullptr, *logits_ = nullptr, *part_ = nullptr;
  float* x2_ = nullptr;  // the residual's other buffer for residual steps fused into a GEMV (<= 2 rows)
  void *xn_ = nullptr, *q_ = nullptr, *knew_ = nullptr, *vnew_ = nullptr, *attn_ = nullptr, *act_ = nullptr,
       *xlast_ = nullptr;
  int32_t* ids_ = nullptr;
  unsigned* counters_ = nullptr;
  void* sample_ws_ = nullptr;  // sample()'s workspace (kept zeroed)
  int sample_searches_ = 0;    // of the forward_sample in flight: g3cuda::sample_searches(), batch maximum
  void set_sample_searches(int B, const float* temperature, const int32_t* top_k, const float* top_p);
  char* d_meta_ = nullptr;
  char* h_meta_ = nullptr;
  int32_t* h_ids_ = nullptr;
  size_t meta_cap_ = 0;
  std::map<int, cudaGraphExec_t> graphs_;
  // multimodal extras of the forward in flight (device copies; ext_n_ = 0 and ext_extent_ = nullptr otherwise)
  void upload_extras(const ForwardExtras& ex, int T);
  char* ext_buf_ = nullptr;
  size_t ext_cap_ = 0;
  const float* ext_embeds_ = nullptr;
  const int32_t* ext_rows_ = nullptr;
  const int32_t* ext_extent_ = nullptr;
  int ext_n_ = 0;
};

}  // namespace g3
