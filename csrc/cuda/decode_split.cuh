// decode_split.cuh: the end of a split-K decode attention block, shared by the CUDA-core kernels
// (attention_decode.cu) and the tensor-core kernel (attention_decode_tc.cu). Each of the block's NW
// warps has left, per query head g < G of its kv head, its running max, sum and unnormalised output
// in shared memory (sm_m / sm_l [w * ldg + g], sm_acc [(w * ldg + g) * ld_acc + d]) and the block has
// passed a barrier. The warps are combined; with one split in use the block writes the output, else
// its partial (max, sum, output), and the last block of the (sequence, kv head) to finish (an atomic
// counter, reset after use so graph replays find it at 0) combines the partials in split order.
// BASE2: the maxima are in log2 units (exp2), else natural (exp). sm_f: 2 * G * nsplit floats of
// scratch, which may alias sm_acc. NT threads (threadIdx.x < NT) take part and `sync` is their barrier
// (__syncthreads, or a named barrier when they are part of a larger block); nb sequences. A warp whose
// max is -inf (no keys) weighs 0 and its output row is not read (it need not store one).
// The cluster ends (decode_cluster_finish, decode_cluster_finish_push) combine the splits through
// distributed shared memory instead.
#pragma once
#include "common.cuh"
#include "tma.cuh"

namespace g3cuda {

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};
struct NamedSync128 {  // the barrier of warps 0-3 while the block's other warps do something else
  __device__ __forceinline__ void operator()() const { asm volatile("bar.sync 1, 128;" ::: "memory"); }
};

// The block's NW warps combined for query head g, dims d .. d + V - 1: the largest max M, the sum L and the
// unnormalised outputs A rescaled to M (warps without keys, max -inf, weigh 0); ex: exp or exp2. V = 4
// reads 16 bytes a warp (d % 4 == 0, ld_acc % 4 == 0).
template <int NW, int V, typename Ex>
__device__ __forceinline__ void decode_warps_combine(const float* sm_m, const float* sm_l, int ldg,
                                                     const float* sm_acc, int ld_acc, int g, int d, Ex ex, float& M,
                                                     float& L, float (&A)[V]) {
  M = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w * ldg + g]);
  L = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) A[v] = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float mw = sm_m[w * ldg + g];
    if (mw == -INFINITY) continue;  // no keys: its output row need not have been stored
    const float f = ex(mw - M);
    L += sm_l[w * ldg + g] * f;
    const float* a = sm_acc + (w * ldg + g) * ld_acc + d;
    if constexpr (V == 4) {
      const float4 a4 = *reinterpret_cast<const float4*>(a);
      A[0] += a4.x * f;
      A[1] += a4.y * f;
      A[2] += a4.z * f;
      A[3] += a4.w * f;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) A[v] += a[v] * f;
    }
  }
}
template <int NW, typename Ex>
__device__ __forceinline__ void decode_warps_combine(const float* sm_m, const float* sm_l, int ldg,
                                                     const float* sm_acc, int ld_acc, int g, int d, Ex ex, float& M,
                                                     float& L, float& A) {
  float a[1];
  decode_warps_combine<NW, 1>(sm_m, sm_l, ldg, sm_acc, ld_acc, g, d, ex, M, L, a);
  A = a[0];
}

// The ns split partials (max, sum, unnormalised output) of one output combined in split order: A / L.
template <int N, typename Ex>
__device__ __forceinline__ float decode_splits_combine(const float (&mv)[N], const float (&lv)[N], const float (&av)[N],
                                                       int ns, Ex ex) {
  float M = -INFINITY;
#pragma unroll
  for (int r = 0; r < N; ++r)
    if (r < ns) M = fmaxf(M, mv[r]);
  float L = 0.f, A = 0.f;
#pragma unroll
  for (int r = 0; r < N; ++r)
    if (r < ns) {
      const float f = mv[r] == -INFINITY ? 0.f : ex(mv[r] - M);
      L += lv[r] * f;
      A += av[r] * f;
    }
  return A / L;
}

template <typename T, int NW, int NT, bool BASE2, typename Sync = BlockSync>
__device__ __forceinline__ void decode_split_finish(T* out, const float* sm_m, const float* sm_l, int ldg,
                                                    const float* sm_acc, int ld_acc, float* sm_f, bool* sm_last,
                                                    int G, int D, int ns, int nsplit, int split, int b, int nb, int kh,
                                                    int NH, int KVH, int64_t row, float* part, unsigned* counters,
                                                    Sync sync = Sync()) {
  auto ex = [](float x) { return BASE2 ? exp2f(x) : __expf(x); };
  const int tid = threadIdx.x;
  const int64_t pbase = ((int64_t)b * NH + kh * G) * nsplit;  // partial index of (b, head kh*G, split 0)
  const int64_t nparts = (int64_t)nb * NH * nsplit;
  float* part_m = part;
  float* part_l = part + nparts;
  float* part_acc = part + 2 * nparts;
  for (int i = tid; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    float M, L, A;
    decode_warps_combine<NW>(sm_m, sm_l, ldg, sm_acc, ld_acc, g, d, ex, M, L, A);
    if (ns == 1) {
      out[(row * NH + kh * G + g) * D + d] = from_f<T>(A / L);
      continue;
    }
    const int64_t pi = pbase + (int64_t)g * nsplit + split;
    part_acc[pi * D + d] = A;
    if (d == 0) {
      part_m[pi] = M;
      part_l[pi] = L;
    }
  }
  if (ns == 1) return;
  __threadfence();
  sync();
  if (tid == 0) *sm_last = atomicAdd(&counters[b * KVH + kh], 1u) == (unsigned)ns - 1;
  sync();
  if (!*sm_last) return;
  __threadfence();
  // the last block: weights ex(m_s - M) / L per (head, split), then the partial outputs summed in split order
  for (int i = tid; i < G * ns; i += NT) {
    const int g = i / ns, sp = i % ns;
    sm_f[g * nsplit + sp] = __ldcg(part_m + pbase + (int64_t)g * nsplit + sp);
    sm_f[(G + g) * nsplit + sp] = __ldcg(part_l + pbase + (int64_t)g * nsplit + sp);
  }
  sync();
  if (tid < G) {
    const int g = tid;
    float M = -INFINITY, L = 0.f;
    for (int sp = 0; sp < ns; ++sp) M = fmaxf(M, sm_f[g * nsplit + sp]);
    for (int sp = 0; sp < ns; ++sp) {
      const float ms = sm_f[g * nsplit + sp];
      const float f = ms == -INFINITY ? 0.f : ex(ms - M);
      sm_f[g * nsplit + sp] = f;
      L += sm_f[(G + g) * nsplit + sp] * f;
    }
    for (int sp = 0; sp < ns; ++sp) sm_f[g * nsplit + sp] /= L;
  }
  sync();
  for (int i = tid; i < G * D; i += NT) {
    const int g = i / D, d = i % D;
    const float* pa = part_acc + (pbase + (int64_t)g * nsplit) * D + d;
    float A = 0.f;
    for (int sp = 0; sp < ns; ++sp) A += __ldcg(pa + (int64_t)sp * D) * sm_f[g * nsplit + sp];
    out[(row * NH + kh * G + g) * D + d] = from_f<T>(A);
  }
  if (tid == 0) counters[b * KVH + kh] = 0u;
}

// The same end when the nc split blocks of a (sequence, kv head) form a thread-block cluster (cluster rank
// = split; ns <= nc of them hold keys, the others a partial with max -inf): each block leaves its
// partial (max, sum, unnormalised output) in its own shared memory sm_p [2 * ldg + G * D floats], and
// after a cluster barrier block r combines outputs r * ceil(G D / nc) .. of all ns partials in split
// order through distributed shared memory: no global partials, fence or atomic, and no block waits for
// a last one. The second barrier keeps every block's partial alive until the others have read it. Every
// thread of every block in the cluster must reach both barriers (cluster_sync).
template <typename T, int NW, int NT, bool BASE2>
__device__ __forceinline__ void decode_cluster_finish(T* out, const float* sm_m, const float* sm_l, int ldg,
                                                      const float* sm_acc, int ld_acc, float* sm_p, int G, int D,
                                                      int ns, int nc, int rank, int kh, int NH, int64_t row) {
  constexpr int kMaxNc = kDecodeMaxCluster;
  auto ex = [](float x) { return BASE2 ? exp2f(x) : __expf(x); };
  const int tid = threadIdx.x, GD = G * D;
  for (int i = tid; i < GD; i += NT) {
    const int g = i / D, d = i % D;
    float M, L, A;
    decode_warps_combine<NW>(sm_m, sm_l, ldg, sm_acc, ld_acc, g, d, ex, M, L, A);
    sm_p[2 * ldg + i] = A;
    if (d == 0) {
      sm_p[g] = M;
      sm_p[ldg + g] = L;
    }
  }
  cluster_sync();
  G3_TRACE_MARK(2);  // past the first cluster barrier (trace.cuh)
  const int per = (GD + nc - 1) / nc, hi = min(GD, (rank + 1) * per);
  for (int i = rank * per + tid; i < hi; i += NT) {
    const int g = i / D;
    float mv[kMaxNc], lv[kMaxNc], av[kMaxNc];
#pragma unroll
    for (int r = 0; r < kMaxNc; ++r)  // every load first: one round trip
      if (r < ns) {
        const float* rp = cluster_map(sm_p, r);
        mv[r] = rp[g];
        lv[r] = rp[ldg + g];
        av[r] = rp[2 * ldg + i];
      }
    out[(row * NH + kh * G) * D + i] = from_f<T>(decode_splits_combine(mv, lv, av, ns, ex));
  }
  G3_TRACE_MARK(3);  // the combine done
  cluster_sync();
}

// The cluster combine's slices: block q owns outputs q * per .. of the G * D (per a multiple of 4, for
// 16-byte stores); its receive buffer holds, per source block r, [(M, L) of each head (2 * ldg floats), A (per)].
__host__ __device__ constexpr int decode_cluster_slice(int GD, int nc) { return ((GD + nc - 1) / nc + 3) / 4 * 4; }
__host__ __device__ constexpr int decode_cluster_recv_floats(int ldg, int GD, int nc) {
  return nc * (2 * ldg + decode_cluster_slice(GD, nc));
}
// decode_cluster_finish with the exchange pushed instead of pulled: each block combines its warps and sends
// slice q of its partial straight into block q's receive buffer sm_r (decode_cluster_recv_floats floats,
// 16-byte aligned, in shared memory no block uses for anything else) with st.async, whose bytes complete on
// block q's mbarrier `bar`; that expects all of them (decode_cluster_push_init, at the kernel's start,
// before its cluster_arrive_relaxed). A block then waits on its own mbarrier only and combines its slice
// of the ns partials from its own shared memory in split order. No cluster barrier after the tiles (the
// pull's two, and a barrier's release of the remote stores, cost 1.5-2 us; NOTES session 19), and no
// block reads another's memory, so none waits for the others before exiting. Same values, same order:
// the same bits as decode_cluster_finish.
__device__ __forceinline__ int decode_cluster_slice_len(int GD, int nc, int rank) {
  const int per = decode_cluster_slice(GD, nc);
  return max(0, min(GD, (rank + 1) * per) - rank * per);
}
__device__ __forceinline__ void decode_cluster_push_init(uint64_t* bar, int G, int D, int ns, int nc, int rank) {
  mbar_init(bar, 1);
  mbar_init_fence();
  mbar_expect_tx(bar, (unsigned)(ns * (decode_cluster_slice_len(G * D, nc, rank) + 2 * G) * 4));
}
template <typename T, int NW, int NT, bool BASE2>
__device__ __forceinline__ void decode_cluster_finish_push(T* out, const float* sm_m, const float* sm_l, int ldg,
                                                            const float* sm_acc, int ld_acc, float* sm_r,
                                                            uint64_t* bar, int G, int D, int ns, int nc, int rank,
                                                            int kh, int NH, int64_t row) {
  constexpr int kMaxNc = kDecodeMaxCluster;
  auto ex = [](float x) { return BASE2 ? exp2f(x) : __expf(x); };
  const int tid = threadIdx.x, GD = G * D, per = decode_cluster_slice(GD, nc), stride = 2 * ldg + per;
  cluster_wait();  // the kernel's opening arrive: every block has started and initialised its mbarrier
  if (rank < ns) {
    for (int i = 4 * tid; i < GD; i += 4 * NT) {
      const int q = i / per;
      float M, L, A[4];
      decode_warps_combine<NW, 4>(sm_m, sm_l, ldg, sm_acc, ld_acc, i / D, i % D, ex, M, L, A);
      st_async_v4(cluster_map_u32(sm_r + rank * stride + 2 * ldg + i % per, q), make_float4(A[0], A[1], A[2], A[3]),
                  cluster_map_u32(bar, q));
    }
    for (int t = tid; t < G * nc; t += NT) {  // each head's max and sum to every block
      const int g = t % G, q = t / G;
      float M, L, A;
      decode_warps_combine<NW>(sm_m, sm_l, ldg, sm_acc, ld_acc, g, 0, ex, M, L, A);
      st_async_v2(cluster_map_u32(sm_r + rank * stride + 2 * g, q), M, L, cluster_map_u32(bar, q));
    }
  }
  G3_TRACE_MARK(1);  // the slices sent (trace.cuh)
  mbar_wait<true>(bar, 0);
  G3_TRACE_MARK(2);  // every slice received
  const int lo = rank * per, hi = min(GD, lo + per);
  for (int i = lo + tid; i < hi; i += NT) {
    const int g = i / D;
    float mv[kMaxNc], lv[kMaxNc], av[kMaxNc];
#pragma unroll
    for (int r = 0; r < kMaxNc; ++r)
      if (r < ns) {
        const float* rp = sm_r + r * stride;
        mv[r] = rp[2 * g];
        lv[r] = rp[2 * g + 1];
        av[r] = rp[2 * ldg + i - lo];
      }
    out[(row * NH + kh * G) * D + i] = from_f<T>(decode_splits_combine(mv, lv, av, ns, ex));
  }
  G3_TRACE_MARK(3);  // the combine done
}

}  // namespace g3cuda
