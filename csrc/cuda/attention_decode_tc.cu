// attention_decode_tc.cu: decode attention on tensor cores (bf16, head_dim 128 or 256), split over the
// key range (flash-decoding). The NH/KVH query heads of one kv head are the rows of an m16n8k16 tile
// (zero rows pad them to 16), so every key/value row is read once for all of them, and a 16-key
// slice costs a short run of independent mma.sync instead of the per-key chain of dependent loads,
// shuffles and exp of the CUDA-core kernels (attention_decode.cu), which were latency-bound.
// Block (split, kv head, sequence) of 4 warps: 64-key tiles staged into shared memory with cp.async,
// STAGES deep (3 where shared memory allows: long key ranges are bound by the bytes in flight per SM,
// one block per SM at head_dim 256); warp w takes keys 16w..16w+15 of a
// tile with its own online softmax (base 2); the warps combine in shared memory; with several splits
// each writes a partial (max, sum, unnormalised output) and the last block of a (sequence, kv head)
// to finish (an atomic counter, left at 0 for the next graph replay) combines them.
// Local layers visit only the last `window` positions, in ring slots j % cap.
// With a QkPrep (attention_decode_tc_qk) the kernel also does qk_rope_kv's work for its kv head: each
// block QK-norms and RoPEs its query heads from the float32 qkv product (warps 0-3), and in the block whose
// range holds the new token two more warps compute its key and value, write them to the cache and leave
// them in shared memory: one launch (and one wait) less per layer, the same bits (qk_prep.cuh).
// PDL prologue (pre): the first tiles' copies of every key but the new token's, and with QkPrep the norm
// weights and the RoPE angles, come before the wait for the kernel before.
// CL (sm_90, nsplit <= 8): the splits of a (sequence, kv head) run as one thread-block cluster and combine
// through distributed shared memory instead of global partials, a fence, an atomic and a last block;
// splits can then be as short as 16 keys, so short contexts spread over the cluster's SMs. The default
// (kClPush, decode_cluster_push() = 1) sends each block's slices to their owners with st.async onto the
// owners' mbarriers, initialised at the kernel's start, and needs no cluster barrier after the tiles;
// decode_cluster_push() = 0 has each block read its slice of the others' partials between two barriers
// (kClPull; 3-5 % slower at 1B, 2 % at 4B: bench/gpu/NOTES.md session 19).
#include "attention_decode_tc.cuh"
#include "kernels.cuh"
#include "qk_prep.cuh"

namespace g3cuda {

// QK: 6 warps; warps 4 and 5 make the new token's key and value (in the block whose range holds it)
// while warps 0-3 make the query heads, so the block's critical path holds one head each.
constexpr int kTcQkWarps = kTcWarps + 2;

template <int D, int STAGES, bool QK, int CL>
__global__ void __launch_bounds__((QK ? kTcQkWarps : kTcWarps) * 32) attention_decode_tc_kernel(
    bf16* out, const bf16* q, bf16* kcache, bf16* vcache, SeqMeta seq, int NH, int KVH, int cap, int window,
    float scale, float softcap, int nsplit, float* part, unsigned* counters, int pdl, QkPrep qk) {
  G3_PDL_TRIGGER_EARLY(pdl);
  __shared__ uint64_t cl_bar;  // kClPush: where the other blocks' slices complete
  if constexpr (CL == kClPush) {
    if (threadIdx.x == 0)
      decode_cluster_push_init(&cl_bar, NH / KVH, D,
                                decode_split_range(seq.start[blockIdx.z], window, nsplit, blockIdx.x, kTcClMinKeys).ns,
                                nsplit, blockIdx.x);
  }
  if constexpr (CL == kClPush) cluster_arrive_relaxed();  // waited for before the first remote store
  const bool pre = pdl & kPdlPrologue;
  if (!pre) G3_PDL_WAIT();
  auto wait = [pre, pdl] {
    if (pre) G3_PDL_WAIT();
    if (!(pdl & kPdlEarly)) G3_PDL_LAUNCH();
  };
  extern __shared__ uint4 smem_u4[];
  constexpr int C8 = D / 8, P = D / 64, NT = kTcWarps * 32;
  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int G = NH / KVH, tid = threadIdx.x, warp = tid >> 5;
  const int64_t row = seq.t0[b], slot = seq.slot[b];
  const int p = seq.start[b];
  const int64_t at = ((slot * KVH + kh) * cap + p % cap) * D;  // key p's cache row
  if constexpr (QK) {
    // the 192 threads meet once (named barrier 2): q, Kp and Vp are written; warps 4-5 only arrive
    const DecodeSplitRange rg = decode_split_range(p, window, nsplit, split, CL ? kTcClMinKeys : kTcBK);
    if (!CL && split >= rg.ns) return;  // uniform over the block, as in decode_tc_block
    float cs[P], sn[P];
    rope_angles<D>(cs, sn, qk.inv_freq, p);
    const float* src = qk.qkv + row * (int64_t)(NH + 2 * KVH) * D;
    if (warp >= kTcWarps) {
      const bool is_k = warp == kTcWarps;
      float wa[P], wb[P];
      if (is_k && qk.k_w) head_weights<D>(wa, wb, qk.k_w);
      wait();
      if (p >= rg.js && p < rg.je) {
        bf16* Kp = reinterpret_cast<bf16*>(smem_u4) + decode_tc_kp_offset<D, STAGES>();
        float a[P], c[P];
        head_load<D>(a, c, src + (int64_t)(NH + (is_k ? 0 : KVH) + kh) * D);
        if (is_k) {
          if (qk.k_w) head_norm<D>(a, c, wa, wb, qk.eps);
          head_rotate<D>(a, c, cs, sn);
        }
        head_store<D>(is_k ? Kp : Kp + D + 8, a, c);
        head_store<D>((is_k ? kcache : vcache) + at, a, c);
      }
      asm volatile("bar.arrive 2, 192;" ::: "memory");
      if constexpr (CL == kClPull) {  // the cluster combine's two barriers count every thread
        cluster_sync();
        cluster_sync();
      } else if constexpr (CL == kClPush) {  // the opening arrive's wait
        cluster_wait();
      }
      return;
    }
    float wa[P], wb[P];
    if (qk.q_w) head_weights<D>(wa, wb, qk.q_w);
    auto prep = [&](bf16* Qs, int LD, bf16*, bf16*, bool) {
      for (int c = G * C8 + tid; c < 16 * C8; c += NT)  // padding rows
        *reinterpret_cast<uint4*>(Qs + (c / C8) * LD + (c % C8) * 8) = make_uint4(0, 0, 0, 0);
      wait();
      for (int h = warp; h < G; h += kTcWarps) {
        float a[P], c[P];
        head_load<D>(a, c, src + (int64_t)(kh * G + h) * D);
        if (qk.q_w) head_norm<D>(a, c, wa, wb, qk.eps);
        head_rotate<D>(a, c, cs, sn);
        head_store<D>(Qs + h * LD, a, c);
      }
      asm volatile("bar.sync 2, 192;" ::: "memory");
    };
    decode_tc_block<D, STAGES, CL>(reinterpret_cast<bf16*>(smem_u4), NamedSync128(), prep, true, out, kcache, vcache, slot,
                               row, p, b, gridDim.z, split, kh, NH, KVH, cap, window, scale, softcap, nsplit, part,
                               counters, &cl_bar);
  } else {
    // the query heads of this kv head as rows 0..G-1 (zero rows up to 16) and key p's rows: every load
    // issued before the first store, so their round trips overlap
    auto prep = [&](bf16* Qs, int LD, bf16* Kp, bf16* Vp, bool has_p) {
      wait();
      constexpr int NQ = 16 * C8 / NT;
      uint4 qv[NQ], pv = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int k = 0; k < NQ; ++k) {
        const int c = tid + k * NT, r = c / C8;
        qv[k] = r < G ? __ldcg(reinterpret_cast<const uint4*>(q + (row * NH + kh * G + r) * D) + c % C8)
                      : make_uint4(0, 0, 0, 0);
      }
      const bool mine = has_p && tid < 2 * C8;
      if (mine) pv = __ldcg(reinterpret_cast<const uint4*>((tid < C8 ? kcache : vcache) + at) + tid % C8);
#pragma unroll
      for (int k = 0; k < NQ; ++k) {
        const int c = tid + k * NT;
        *reinterpret_cast<uint4*>(Qs + (c / C8) * LD + (c % C8) * 8) = qv[k];
      }
      if (mine) *reinterpret_cast<uint4*>((tid < C8 ? Kp : Vp) + (tid % C8) * 8) = pv;
    };
    decode_tc_block<D, STAGES, CL>(reinterpret_cast<bf16*>(smem_u4), BlockSync(), prep, pre, out, kcache, vcache, slot, row,
                               p, b, gridDim.z, split, kh, NH, KVH, cap, window, scale, softcap, nsplit, part, counters,
                               &cl_bar);
  }
}

bool attention_decode_tc_supported(int NH, int KVH, int D) {
  return (D == 128 || D == 256) && NH % KVH == 0 && NH / KVH <= kTcMaxG;
}

template <int D, int STAGES, bool QK, int CL>
static void launch_decode_tc(bf16* out, const bf16* q, bf16* kcache, bf16* vcache, SeqMeta seq, int B, int NH,
                             int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                             unsigned* counters, const QkPrep& qk, size_t smem, cudaStream_t s) {
  auto kernel = attention_decode_tc_kernel<D, STAGES, QK, CL>;
  static size_t attr = 0;  // per instantiation: the attribute is per device function
  if (smem > attr) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)std::max<size_t>(smem, 48 * 1024)));
    attr = std::max<size_t>(smem, 48 * 1024);
  }
  const dim3 grid(nsplit, KVH, B), block((QK ? kTcQkWarps : kTcWarps) * 32);
  if constexpr (CL)
    launch_k_cluster(kernel, grid, block, smem, s, nsplit, out, q, kcache, vcache, seq, NH, KVH, cap, window, scale,
                     softcap, nsplit, part, counters, pdl_flags(), qk);
  else
    launch_k(kernel, grid, block, smem, s, out, q, kcache, vcache, seq, NH, KVH, cap, window, scale, softcap, nsplit,
             part, counters, pdl_flags(), qk);
  CUDA_LAUNCH_CHECK();
}

// Three stages where the device's per-block shared memory allows (H100: 206 KB at head_dim 256), else two.
// A cluster (at most 8 splits of a few tiles each) takes two: a smaller block that fits beside the kernel
// before it sooner.
template <int D, bool QK>
static void dispatch_decode_tc(bf16* out, const bf16* q, bf16* kcache, bf16* vcache, SeqMeta seq, int B, int NH,
                               int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                               unsigned* counters, const QkPrep& qk, bool cluster, cudaStream_t s) {
  static int optin = -1;
  if (optin < 0) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  }
  const size_t s3 = decode_tc_smem_bytes<D, 3>(nsplit);
  if (cluster && decode_cluster_push())
    launch_decode_tc<D, 2, QK, kClPush>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit,
                                        part, counters, qk, decode_tc_push_smem_bytes<D, 2>(nsplit), s);
  else if (cluster)
    launch_decode_tc<D, 2, QK, kClPull>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit,
                                        part, counters, qk, decode_tc_smem_bytes<D, 2>(nsplit), s);
  else if (s3 <= (size_t)optin)
    launch_decode_tc<D, 3, QK, kClNone>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit,
                                      part, counters, qk, s3, s);
  else
    launch_decode_tc<D, 2, QK, kClNone>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit,
                                        part, counters, qk, decode_tc_smem_bytes<D, 2>(nsplit), s);
}

bool attention_decode_cluster_supported() { return device_cc() >= 90; }
int& decode_cluster_push() {
  static int v = 1;
  return v;
}

template <bool QK>
static void decode_tc(bf16* out, const bf16* q, bf16* kcache, bf16* vcache, SeqMeta seq, int B, int NH, int KVH, int D,
                      int cap, int window, float scale, float softcap, int nsplit, float* part, unsigned* counters,
                      const QkPrep& qk, bool cluster, cudaStream_t s) {
  if (B <= 0) return;
  if (!attention_decode_tc_supported(NH, KVH, D))
    throw std::invalid_argument("attention_decode_tc: head_dim must be 128 or 256 and at most 8 query heads per kv head");
  if (nsplit < 1 || nsplit > kDecodeMaxSplit)
    throw std::invalid_argument("attention_decode_tc: nsplit must be 1.." + std::to_string(kDecodeMaxSplit));
  if (cluster && nsplit > kDecodeMaxCluster)
    throw std::invalid_argument("attention_decode_tc: a cluster takes at most " + std::to_string(kDecodeMaxCluster) +
                                " splits, got " + std::to_string(nsplit));
  if (cluster && !attention_decode_cluster_supported())
    throw std::invalid_argument("attention_decode_tc: thread-block clusters need compute capability 9.0");
  if (D == 256)
    dispatch_decode_tc<256, QK>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part,
                                counters, qk, cluster, s);
  else
    dispatch_decode_tc<128, QK>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part,
                                counters, qk, cluster, s);
}

void attention_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B, int NH,
                         int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                         unsigned* counters, cudaStream_t s, bool cluster) {
  // the kernel writes no cache row without a QkPrep
  decode_tc<false>(out, q, const_cast<bf16*>(kcache), const_cast<bf16*>(vcache), seq, B, NH, KVH, D, cap, window,
                   scale, softcap, nsplit, part, counters, QkPrep(), cluster, s);
}

void attention_decode_tc_qk(bf16* out, bf16* kcache, bf16* vcache, const QkPrep& qk, SeqMeta seq, int B, int NH,
                            int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                            unsigned* counters, cudaStream_t s, bool cluster) {
  if (!qk.qkv || !qk.inv_freq) throw std::invalid_argument("attention_decode_tc_qk: qkv and inv_freq are required");
  decode_tc<true>(out, nullptr, kcache, vcache, seq, B, NH, KVH, D, cap, window, scale, softcap, nsplit, part, counters,
                  qk, cluster, s);
}

}  // namespace g3cuda
