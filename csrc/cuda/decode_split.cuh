// decode_split.cuh: the end of a split-K decode attention block, shared by the CUDA-core kernels
// (attention_decode.cu) and the tensor-core kernel (attention_decode_tc.cu). Each of the block's NW
// warps has left, per query head g < G of its kv head, its running max, sum and unnormalised output
// in shared memory (sm_m / sm_l [w * ldg + g], sm_acc [(w * ldg + g) * ld_acc + d]) and the block has
// passed a barrier. The warps are combined; with one split in use the block writes the output, else
// its partial (max, sum, output), and the last block of the (sequence, kv head) to finish (an atomic
// counter, reset after use so graph replays find it at 0) combines the partials in split order.
// BASE2: the maxima are in log2 units (exp2), else natural (exp). sm_f: 2 * G * nsplit floats of
// scratch, which may alias sm_acc. NT threads (threadIdx.x < NT) take part and `sync` is their barrier
// (__syncthreads, or a named barrier when they are part of a larger block); nb sequences.
#pragma once
#include "common.cuh"

namespace g3cuda {

struct BlockSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};
struct NamedSync128 {  // the barrier of warps 0-3 while the block's other warps do something else
  __device__ __forceinline__ void operator()() const { asm volatile("bar.sync 1, 128;" ::: "memory"); }
};

// The block's NW warps combined for query head g, dim d: the largest max M, the sum L and the
// unnormalised output A rescaled to M (warps without keys, max -inf, weigh 0); ex: exp or exp2.
template <int NW, typename Ex>
__device__ __forceinline__ void decode_warps_combine(const float* sm_m, const float* sm_l, int ldg,
                                                     const float* sm_acc, int ld_acc, int g, int d, Ex ex, float& M,
                                                     float& L, float& A) {
  M = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w * ldg + g]);
  L = 0.f;
  A = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float mw = sm_m[w * ldg + g];
    const float f = mw == -INFINITY ? 0.f : ex(mw - M);
    L += sm_l[w * ldg + g] * f;
    A += sm_acc[(w * ldg + g) * ld_acc + d] * f;
  }
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
    float M = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxNc; ++r)
      if (r < ns) M = fmaxf(M, mv[r]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxNc; ++r)
      if (r < ns) {
        const float f = mv[r] == -INFINITY ? 0.f : ex(mv[r] - M);
        L += lv[r] * f;
        A += av[r] * f;
      }
    out[(row * NH + kh * G) * D + i] = from_f<T>(A / L);
  }
  G3_TRACE_MARK(3);  // the combine done
  cluster_sync();
}

}  // namespace g3cuda
