// kernels.cuh: the CUDA backend's operations, one launcher each (one file per operation).
// Conventions: T is the storage type of matrices, the KV cache and product inputs (bf16, or float in
// the float32 engine); the residual stream, product outputs and norm weights are float32; norm
// statistics are accumulated in double. Every launcher runs on `stream` and checks its launch.
#pragma once
#include <cublas_v2.h>
#include "common.cuh"

namespace g3cuda {

// x[t] = table[ids[t]] * scale (float32); if norm_w: xn[t] = rmsnorm(x[t]) * (1 + norm_w) (the first
// layer's input norm, fused).
template <typename T>
void embedding_rmsnorm(float* x, T* xn, const T* table, const int32_t* ids, int n, int H, float scale,
                       const float* norm_w, float eps, cudaStream_t s);

// out = rmsnorm(x) * (1 + w), rows of dim.
template <typename T>
void rmsnorm(T* out, const float* x, const float* w, int rows, int dim, float eps, cudaStream_t s);

// resid += post_w ? rmsnorm(delta) * (1 + post_w) : delta;  out = rmsnorm(resid) * (1 + next_w).
template <typename T>
void residual_rmsnorm(float* resid, T* out, const float* delta, const float* post_w, const float* next_w, int rows,
                      int dim, float eps, cudaStream_t s);

// From the stacked product rows qkv [T, (NH + 2 KVH) * D] (float32): q and k get QK-norm (when
// q_w/k_w are given) and RoPE at tok.pos with inv_freq [D/2]; q -> q [T, NH, D], k/v -> knew/vnew
// [T, KVH, D], and k/v also straight into the cache where kv_direct_ok says it is safe.
template <typename T>
void qk_rope_kv(T* q, T* knew, T* vnew, T* kcache, T* vcache, const float* qkv, const float* q_w, const float* k_w,
                const float* inv_freq, TokMeta tok, SeqMeta seq, int ntok, int NH, int KVH, int D, int cap,
                bool local, float eps, cudaStream_t s);

// Cache write of a chunk's keys/values: mode 0 = those kv_direct_ok allows (before attention),
// mode 1 = the rest that survive in the ring (the last `cap` of each chunk), after attention.
template <typename T>
void kv_cache_write(T* kcache, T* vcache, const T* knew, const T* vnew, TokMeta tok, SeqMeta seq, int ntok, int KVH,
                    int D, int cap, bool local, int mode, cudaStream_t s);

// Prefill attention on tensor cores (bf16, D = 128 or 256): tiles[i] = (sequence, first query index
// in its chunk) of 64 queries; keys before a sequence's start from its cache, later ones from knew/vnew.
// window 0 = causal; else query i sees key j iff i - window < j <= i. softcap 0 = none.
void attention_prefill_tc(bf16* out, const bf16* q, const bf16* knew, const bf16* vnew, const bf16* kcache,
                          const bf16* vcache, SeqMeta seq, const int2* tiles, int ntiles, int NH, int KVH, int D,
                          int cap, int window, float scale, float softcap, cudaStream_t s);
bool attention_prefill_tc_supported(int D);

// Reference-shaped attention for any D <= 256 and either T: one warp per (query, head).
template <typename T>
void attention_generic(T* out, const T* q, const T* knew, const T* vnew, const T* kcache, const T* vcache, TokMeta tok,
                       SeqMeta seq, int ntok, int NH, int KVH, int D, int cap, int window, float scale, float softcap,
                       cudaStream_t s);

// Decode attention (every sequence brings one token, already in the cache): split-K flash-decoding.
// Grid (nsplit, KVH, B); one block reads its kv head's keys once for all NH/KVH query heads; the
// last block of each (sequence, kv head) to finish combines the partials (part, counters: workspace;
// counters start at 0 and are left at 0).
template <typename T>
void attention_decode(T* out, const T* q, const T* kcache, const T* vcache, SeqMeta seq, int B, int NH, int KVH, int D,
                      int cap, int window, float scale, float softcap, int nsplit, float* part, unsigned* counters,
                      cudaStream_t s);
size_t attention_decode_workspace_floats(int B, int NH, int D, int nsplit);
// 2 (default): the tensor-core kernel where it applies (bf16, D 128/256, <= 8 query heads per kv
// head); 1: the warp-per-key kernel; 0: lanes-over-keys for bf16 D 128/256. Else warp-per-key.
int& decode_kernel_mode();
constexpr int kDecodeMaxSplit = 128;  // the CUDA-core kernels use at most 32 of them
// The tensor-core decode kernel alone (attention_decode_tc.cu), same contract as attention_decode.
// cluster (sm_90, nsplit <= 8): the nsplit splits of a (sequence, kv head) as one thread-block cluster,
// combined through distributed shared memory (part and counters unused).
bool attention_decode_tc_supported(int NH, int KVH, int D);
bool attention_decode_cluster_supported();  // the device has thread-block clusters (compute capability >= 9)
// the cluster attention's split combine: 1 (default) sends each block's slices into their owners' shared
// memory with st.async onto the owners' mbarriers (no cluster barrier after the tiles), 0 has each block read
// its slice of the others' partials between two cluster barriers
int& decode_cluster_push();
void attention_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B, int NH,
                         int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                         unsigned* counters, cudaStream_t s, bool cluster = false);
// The same with qk_rope_kv's decode work done inside (the decode step's default for bf16): q, k and v of
// each sequence's new token from the float32 qkv product [B, (NH + 2 KVH) D] (QK-norm with q_w / k_w where
// given, RoPE with inv_freq [D/2] at the token's position); the new key and value go to the cache.
struct QkPrep {
  const float* qkv = nullptr;
  const float* q_w = nullptr;
  const float* k_w = nullptr;
  const float* inv_freq = nullptr;
  float eps = 0.f;
};
void attention_decode_tc_qk(bf16* out, bf16* kcache, bf16* vcache, const QkPrep& qk, SeqMeta seq, int B, int NH,
                            int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                            unsigned* counters, cudaStream_t s, bool cluster = false);

// The layers of a decode step of B <= kPersistentMaxB sequences (bf16, tensor-core decode attention) as
// one persistent kernel with grid-wide barriers (decode_persistent.cu): embedding, every layer, and the
// final norm into xn_out [B, H] for the LM head. The engine fills the layer table once on the device.
struct PersistentLayer {
  const bf16 *qkv, *o, *gate_up, *down;
  const float *input_norm, *q_norm, *k_norm, *post_attn_norm, *pre_ffw_norm, *post_ffw_norm;
  const float* inv_freq;  // [D/2] of this layer's RoPE
  bf16 *kc, *vc;
  int cap, window;  // cache positions; window 0 = global
};
struct PersistentDecode {
  const PersistentLayer* layers;  // [L], device memory
  int L, B, H, F, NH, KVH, D;
  int max_k;  // max(H, NH * D, F): the widest product input
  const bf16* embed;
  float embed_scale;
  const float* final_norm;
  const int32_t* tokens;  // [B]
  SeqMeta seq;
  float eps, attn_scale, softcap;
  int nsplit;  // decode attention splits (as attention_decode_tc)
  float* part;
  unsigned* counters;
  unsigned* bar;  // 2 counters, zero before the first launch and left at zero
  // scratch: x [2][B][H], qkvp [B][QKV], hp [B][H] (float32), attn [B][NH*D], act [B][F] (bf16)
  float *x, *qkvp, *hp;
  bf16 *attn, *act, *xn_out;
  int region_bytes = 0, slot_bytes = 0, ns = 0;  // shared-memory layout: set by the launcher
  long long* trace = nullptr;  // profiling: block 0's clock64() at the start and after every grid barrier
};
constexpr int kPersistentMaxB = 2;
constexpr int kPersistentTracePerLayer = 9;  // trace stamps per layer (decode_persistent.cu's mark())
constexpr int kPersistentSlotTrace = 4 * 512;  // then 4 stamps per weight slot, the first 512 slots
bool persistent_decode_supported(const PersistentDecode& p);
void persistent_decode(const PersistentDecode& p, int num_sms, cudaStream_t s);

// out[t, i] = gelu_tanh(gu[t, i]) * gu[t, F + i]
template <typename T>
void geglu(T* out, const float* gu, int rows, int F, cudaStream_t s);

// out[M, N] (float32) = x[M, K] . W[N, K]^T, T inputs, float32 accumulation. path: 0 auto (own
// GEMV for bf16 with M <= 2 and K % 8 == 0, else cuBLAS), 1 GEMV (M <= 8), 2 cuBLAS.
void gemm(cublasHandle_t h, float* out, const void* x, const void* w, bool is_bf16, int M, int K, int N, int path,
          cudaStream_t s);
bool gemv_supported(bool is_bf16, int M, int K);

// The residual step (residual_rmsnorm) fused ahead of a decode GEMV (gemm.cu): x = bf16(rmsnorm(resid_in +
// post_norm(delta)) (1 + next_w)), the bits residual_rmsnorm would give, made by every block of the
// product in shared memory (a launch less per residual step); block 0 writes resid_in + post_norm(delta)
// to resid_out, which must be another buffer (the other blocks still read resid_in). post_w may be null
// (no post-norm). bf16, M <= 2 rows, K <= 256 * kGemvResidualPer.
struct GemvResidual {
  const float* delta = nullptr;  // [M, K] the sub-block's output
  const float* resid_in = nullptr;
  float* resid_out = nullptr;
  const float* post_w = nullptr;
  const float* next_w = nullptr;
  float eps = 0.f;
};
constexpr int kGemvResidualPer = 10;  // hidden sizes up to 2560 (270M, 1B, 4B)
bool gemv_residual_supported(bool is_bf16, int M, int K);
// Whether the fused kernel's blocks for the product (N outputs; geglu: the fused gate_up of F = N), as many as
// the plain GEMV would launch with the same warps per row, would all be resident at once. The fused kernel
// runs at most one wave of blocks over the row groups; the engine's fuse_residual_gemv = 1 fuses only where
// this holds (measured: fusing 1B's ~3-wave gate_up as 3 waves of blocks, each redoing the residual step, ran
// slower than the separate launch).
bool gemv_residual_one_wave(int M, int K, int N, bool geglu);
// Whether the plain GEMV's grid for the product is more than one and at most four waves of its resident blocks.
bool gemv_few_waves(int M, int K, int N, bool geglu);
void gemv_residual(float* out, const GemvResidual& rn, const bf16* W, int M, int K, int N, cudaStream_t s);
void gemv_residual_geglu(bf16* act, const GemvResidual& rn, const bf16* W, int M, int K, int F, cudaStream_t s);
// The decode step's q/k/v product with qk_rope_kv's work fused in (gemv_qkv_rope.cu): bf16, M <= 2 tokens
// (token m of sequence tok.seq[m]), W [(NH + 2 KVH) D, K]; out q [M, NH, D], knew / vnew [M, KVH, D] in bf16
// and the new key / value in the cache slot pos % cap. x [M, K], or (rn) the residual step made by every
// block as in gemv_residual. One thread-block cluster of D / 16 blocks per head (sm_90).
struct QkvRope {
  bf16 *q, *knew, *vnew, *kcache, *vcache;
  const float *q_w, *k_w;  // QK-norm weights, or null (no QK-norm)
  const float* inv_freq;   // [D/2], or null (no RoPE)
  TokMeta tok;
  SeqMeta seq;
  int NH, KVH, D, K, cap;
  bool local;
  float eps;
};
bool gemv_qkv_rope_supported(int M, int K, int D);
int gemv_qkv_rope_max_clusters(int M, int K, int D, bool norm);  // clusters resident at once (0: unsupported)
void gemv_qkv_rope(const QkvRope& a, const bf16* x, const bf16* W, int M, const GemvResidual* rn, cudaStream_t s);
// The GEMV's launch for a product (fused: the residual step inside): warps per output row (the plain kernel's
// either way, so the fused product has its bits), blocks of row groups (the fused kernel runs at most
// `resident` of them, looping), and how many blocks of the kernel that runs are resident at once.
struct GemvShape {
  int wpr = 1, blocks = 0, resident = 0, rows_per_block = 0;  // rows_per_block: output rows a block takes
};
GemvShape gemv_shape(int M, int N, int K, bool geglu, bool fused);
// Up to two byte ranges that a GEMV launch's blocks prefetch into L2 at their end (cp.async.bulk.prefetch.L2,
// sm_90; a hint, so no bit changes), each block an even share. Set for the next GEMV launch, which takes and
// resets it, as pdl_next_flags() is for every launch: the engine has its decode o product fetch gate_up rows
// ahead (CudaEngine::gate_up_l2_prefetch_kb). Pointers and sizes 16-byte aligned.
struct L2Prefetch {
  const char* p[2] = {nullptr, nullptr};
  long long bytes[2] = {0, 0};
};
L2Prefetch& gemv_next_l2_prefetch();
// The GEMV's warps-per-row rule: 2 (default) 1's, then fewer warps per row where that turns a grid of one to four
// waves into one (measured 1-2 % faster a decode step at 1B / 4B); 1 the rule before (measured 0-4 % faster
// than 0); 0 one warp per row when N is large.
int& gemv_mode();

// act[M, F] = gelu_tanh(x . Wgate^T) * (x . Wup^T), W = [gate; up] stacked [2F, K]. bf16 decode sizes:
// one fused GEMV (the 2F-wide product never reaches memory); else the product into gu [M, 2F]
// (float32 scratch) and the geglu kernel. path as gemm.
template <typename T>
void gemm_geglu(cublasHandle_t h, T* act, float* gu, const T* x, const T* w, int M, int K, int F, int path,
                cudaStream_t s);

// x = tanh(x / cap) * cap
void softcap(float* x, int64_t n, float cap, cudaStream_t s);

// out[b] = in[seq.t0[b] + seq.len[b] - 1]: each sequence's last row.
template <typename T>
void gather_last_rows(T* out, const T* in, SeqMeta seq, int B, int dim, cudaStream_t s);

// Next token per row of logits [B, V]: argmax (first maximum) where temperature <= 0, else the CPU
// sampler's algorithm (top-k, top-p, the same counter-based uniform; sampling.cu says how). Rows of
// at most kSampleMaxK candidates: one block, bit-exact sums. Wider rows (top_k 0 or > kSampleMaxK):
// radix searches over many blocks per row, 1 + 2 * sample_searches() launches.
constexpr int kSampleMaxK = 1024;
// Vocabularies above this take the wide path whatever top_k: the one-block-per-row kernel scans the
// row five times on one SM (235-240 us at 262144 logits with top_k 64 on an H100, against ~90 us for
// the many-block search with its top-k cut).
constexpr int kSampleNarrowMaxV = 32768;
// Whether a row samples on the wide path (many blocks, fixed-point masses) rather than the exact
// one-block kernel.
inline bool sample_is_wide(float temperature, int top_k, int V) {
  const int k = (top_k > 0 && top_k < V) ? top_k : V;
  return temperature > 0.f && (k > kSampleMaxK || V > kSampleNarrowMaxV);
}
// Searches a row needs on the wide path (0: not on it): the draw, + the top-k boundary (k < V),
// + the top-p boundary (0 < top_p < 1).
inline int sample_searches(float temperature, int top_k, float top_p, int V) {
  const int k = (top_k > 0 && top_k < V) ? top_k : V;
  if (!sample_is_wide(temperature, top_k, V)) return 0;
  return 1 + (k < V ? 1 : 0) + (top_p > 0.f && top_p < 1.f ? 1 : 0);
}
// Workspace of sample() for up to `rows` rows of V: zeroed once by the owner; its first
// sample_workspace_zeroed_bytes(rows) bytes are left zeroed by every call (the rest is scratch).
size_t sample_workspace_bytes(int rows, int V);
size_t sample_workspace_zeroed_bytes(int rows);
// ws: a workspace for ws_rows >= B rows, or nullptr (only when searches == 0: one block per row then
// does the argmax too). searches: at least the largest sample_searches() of the batch's rows (it sets
// how many launches there are; the engine's decode graphs are per batch size and this number).
void sample(int32_t* ids, const float* logits, int B, int V, const float* temperature, const int32_t* top_k,
            const float* top_p, const uint64_t* seed, const uint64_t* counter, void* ws, int ws_rows, int searches,
            cudaStream_t s);

}  // namespace g3cuda
