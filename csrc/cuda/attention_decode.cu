// attention_decode.cu: decode attention (one new query per sequence, its key/value already in the
// cache), split over the key range (flash-decoding). Block (split, kv head, sequence) of 8 warps (4
// when a kv head serves more than 4 query heads): the block reads each key/value row of its range once
// for all NH/KVH query heads of the kv head, each warp an online softmax over its keys with several
// rows in flight; the warps combine in shared memory. Short key ranges use few splits (one split:
// the block writes the output directly); otherwise each split writes a partial (max, sum,
// unnormalised output) and the last block of a (sequence, kv head) to finish (an atomic counter,
// reset after use, so graph replays find it at 0) combines the partials into the output.
// Local layers visit only the last `window` positions. Lanes own dims lane*EPL.. (D = 32*EPL, 16-byte
// loads for bf16 D=256) or, for other D, dims lane + 32e.
#include <type_traits>
#include "decode_split.cuh"
#include "kernels.cuh"

namespace g3cuda {

constexpr int kMaxG = 8, kMaxSplit = 32;  // the CUDA-core kernels: scratch for 2 * G * kMaxSplit weights

template <typename T, int EPL, bool CONTIG>
__device__ __forceinline__ void load_row(const T* row, int lane, int D, float (&v)[EPL]) {
  if constexpr (CONTIG) {
    if constexpr (std::is_same<T, bf16>::value && EPL % 8 == 0) {
#pragma unroll
      for (int c = 0; c < EPL / 8; ++c) {
        const uint4 u = *reinterpret_cast<const uint4*>(row + lane * EPL + c * 8);
        const bf16* pb = reinterpret_cast<const bf16*>(&u);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[c * 8 + e] = __bfloat162float(pb[e]);
      }
    } else if constexpr (std::is_same<T, bf16>::value && EPL == 4) {
      const uint2 u = *reinterpret_cast<const uint2*>(row + lane * 4);
      const bf16* pb = reinterpret_cast<const bf16*>(&u);
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = __bfloat162float(pb[e]);
    } else {
#pragma unroll
      for (int e = 0; e < EPL; ++e) v[e] = to_f(row[lane * EPL + e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const int d = lane + 32 * e;
      v[e] = d < D ? to_f(row[d]) : 0.f;
    }
  }
}

template <int EPL, bool CONTIG>
__device__ __forceinline__ int dim_of(int lane, int e) {
  return CONTIG ? lane * EPL + e : lane + 32 * e;
}

// GM: compile-time bound on the query heads per kv head (register arrays). NW warps per block, KB
// keys per warp step with their K and V rows all loaded before any arithmetic (2 * KB row loads in
// flight per warp). A split takes at least MinChunk = 2 steps of the block; with one split the block
// writes the output itself (no partials, no counter).
template <int GM> struct DecodeShape {
  static constexpr int NW = GM <= 4 ? 8 : 4;
  static constexpr int KB = GM <= 4 ? 4 : 2;
  static constexpr int MinChunk = 2 * NW * KB;
};

template <typename T, int EPL, bool CONTIG, int GM>
__global__ void __launch_bounds__(DecodeShape<GM>::NW * 32) attention_decode_kernel(
    T* out, const T* q, const T* kcache, const T* vcache, SeqMeta seq, int NH, int KVH, int D, int cap, int window,
    float scale, float softcap, int nsplit, float* part, unsigned* counters) {
  G3_PDL_ENTRY();
  constexpr int NW = DecodeShape<GM>::NW, KB = DecodeShape<GM>::KB, MinChunk = DecodeShape<GM>::MinChunk;
  constexpr int NT = NW * 32;
  __shared__ float sm_m[NW][GM], sm_l[NW][GM];
  __shared__ float sm_acc[NW][GM][256];
  __shared__ bool sm_last;
  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = NH / KVH;
  const int p = seq.start[b];
  const int64_t row = seq.t0[b];
  const int64_t slot = seq.slot[b];
  const int jlo = window > 0 ? max(0, p - window + 1) : 0;
  const int kvlen = p - jlo + 1;
  const int ns = max(1, min(nsplit, (kvlen + MinChunk - 1) / MinChunk));  // splits in use
  if (split >= ns) return;  // uniform per block: no barrier is skipped by part of a block
  const int chunk = (kvlen + ns - 1) / ns;
  const int js = jlo + split * chunk, je = min(js + chunk, p + 1);

  float qv[GM][EPL], acc[GM][EPL], m[GM], l[GM];
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
    if (g < G) load_row<T, EPL, CONTIG>(q + (row * NH + kh * G + g) * D, lane, D, qv[g]);
  }
  const T* kbase = kcache + (slot * KVH + kh) * cap * D;
  const T* vbase = vcache + (slot * KVH + kh) * cap * D;
  for (int j0 = js + warp * KB; j0 < je; j0 += NW * KB) {
    float kv[KB][EPL], vv[KB][EPL];
#pragma unroll
    for (int u = 0; u < KB; ++u) {
      const int j = j0 + u;
      if (j < je) {
        load_row<T, EPL, CONTIG>(kbase + (int64_t)(j % cap) * D, lane, D, kv[u]);
        load_row<T, EPL, CONTIG>(vbase + (int64_t)(j % cap) * D, lane, D, vv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) kv[u][e] = vv[u][e] = 0.f;
      }
    }
    // all KB x GM partial dot products first, then their warp reductions stage by stage (independent
    // shuffles in flight, a chain of 5), then one online-softmax update per head for the batch
    float sc[KB][GM];
#pragma unroll
    for (int u = 0; u < KB; ++u)
#pragma unroll
      for (int g = 0; g < GM; ++g) {
        float t = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) t = fmaf(qv[g][e], kv[u][e], t);
        sc[u][g] = t;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < KB; ++u)
#pragma unroll
        for (int g = 0; g < GM; ++g) sc[u][g] += __shfl_xor_sync(0xffffffffu, sc[u][g], o);
#pragma unroll
    for (int g = 0; g < GM; ++g) {
      if (g < G) {
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < KB; ++u) {
          float sv = sc[u][g] * scale;
          if (softcap > 0.f) sv = tanhf(sv / softcap) * softcap;
          sc[u][g] = sv;
          if (j0 + u < je) mx = fmaxf(mx, sv);
        }
        const float corr = __expf(m[g] - mx);  // 0 on the first batch (m = -inf)
        l[g] *= corr;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] *= corr;
#pragma unroll
        for (int u = 0; u < KB; ++u) {
          if (j0 + u < je) {
            const float pj = __expf(sc[u][g] - mx);
            l[g] += pj;
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(pj, vv[u][e], acc[g][e]);
          }
        }
        m[g] = mx;
      }
    }
  }
  // combine the warps
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    if (g < G) {
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = dim_of<EPL, CONTIG>(lane, e);
        if (d < D) sm_acc[warp][g][d] = acc[g][e];
      }
    }
  }
  __syncthreads();
  decode_split_finish<T, NW, NT, false>(out, &sm_m[0][0], &sm_l[0][0], GM, &sm_acc[0][0][0], 256, &sm_acc[0][0][0],
                                        &sm_last, G, D, ns, nsplit, split, b, gridDim.z, kh, NH, KVH, row, part, counters);
}

// bf16, D = 32 * EPL (128, 256): "lanes over keys". A warp takes 32 keys at a time, lane j the key
// js + j: its score for every query head is a full dot product over its key row (16-byte loads, q from
// shared memory as a broadcast), so no shuffle per key; one max/sum reduction per head per 32 keys;
// then P.V with lanes over dims (coalesced value rows, the probability broadcast by shuffle).
template <int EPL, int GM>
__global__ void __launch_bounds__(128) attention_decode_lk_kernel(bf16* out, const bf16* q, const bf16* kcache,
                                                                  const bf16* vcache, SeqMeta seq, int NH, int KVH,
                                                                  int cap, int window, float scale, float softcap,
                                                                  int nsplit, float* part, unsigned* counters) {
  G3_PDL_ENTRY();
  constexpr int D = 32 * EPL, NW = 4, NT = NW * 32, C8 = D / 8, KPR = NW * 32;
  __shared__ __align__(16) float sq[GM][D];
  __shared__ float sm_m[NW][GM], sm_l[NW][GM];
  __shared__ float sm_acc[NW][GM][D];
  __shared__ bool sm_last;
  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = NH / KVH;
  const int p = seq.start[b];
  const int64_t row = seq.t0[b];
  const int64_t slot = seq.slot[b];
  const int jlo = window > 0 ? max(0, p - window + 1) : 0;
  const int kvlen = p - jlo + 1;
  const int ns = max(1, min(nsplit, (kvlen + KPR - 1) / KPR));  // splits in use, >= 128 keys each
  if (split >= ns) return;  // uniform per block
  const int chunk = (kvlen + ns - 1) / ns;
  const int js = jlo + split * chunk, je = min(js + chunk, p + 1);
  for (int i = threadIdx.x; i < G * D; i += NT) sq[i / D][i % D] = __bfloat162float(q[(row * NH + kh * G) * D + i]);
  __syncthreads();
  const bf16* kbase = kcache + (slot * KVH + kh) * cap * D;
  const bf16* vbase = vcache + (slot * KVH + kh) * cap * D;
  float acc[GM][EPL], m[GM], l[GM];
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }
  for (int j0 = js + warp * 32; j0 < je; j0 += KPR) {
    const int j = j0 + lane;
    const bool valid = j < je;
    const uint4* kr = reinterpret_cast<const uint4*>(kbase + (int64_t)((valid ? j : js) % cap) * D);
    float sc[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) sc[g] = 0.f;
#pragma unroll 1
    for (int c0 = 0; c0 < C8; c0 += 8) {
      uint4 kv[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) kv[u] = kr[c0 + u];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&kv[u]);
#pragma unroll
        for (int e2 = 0; e2 < 4; ++e2) {
          const float2 kf = __bfloat1622float2(h2[e2]);
#pragma unroll
          for (int g = 0; g < GM; ++g) {
            if (g < G) {
              const float2 qf = *reinterpret_cast<const float2*>(&sq[g][(c0 + u) * 8 + 2 * e2]);
              sc[g] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, sc[g]));
            }
          }
        }
      }
    }
    const int nk = min(32, je - j0);
    float pr[GM];
#pragma unroll
    for (int g = 0; g < GM; ++g) pr[g] = 0.f;
#pragma unroll
    for (int g = 0; g < GM; ++g) {
      if (g < G) {
        float s = sc[g] * scale;
        if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
        s = valid ? s : -INFINITY;
        const float mn = fmaxf(m[g], warp_max(s));
        const float corr = __expf(m[g] - mn);
        pr[g] = valid ? __expf(s - mn) : 0.f;
        l[g] = l[g] * corr + warp_sum(pr[g]);
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] *= corr;
        m[g] = mn;
      }
    }
    // P.V: lanes over dims, 4 value rows in flight
    for (int k0 = 0; k0 < nk; k0 += 4) {
      float vf[4][EPL];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (k0 + u < nk) {
          const bf16* vr = vbase + (int64_t)((j0 + k0 + u) % cap) * D + lane * EPL;
          if constexpr (EPL == 8) {
            const uint4 w = *reinterpret_cast<const uint4*>(vr);
            const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
            for (int e2 = 0; e2 < 4; ++e2) {
              const float2 f = __bfloat1622float2(h2[e2]);
              vf[u][2 * e2] = f.x;
              vf[u][2 * e2 + 1] = f.y;
            }
          } else {
            const uint2 w = *reinterpret_cast<const uint2*>(vr);
            const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
              const float2 f = __bfloat1622float2(h2[e2]);
              vf[u][2 * e2] = f.x;
              vf[u][2 * e2 + 1] = f.y;
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int g = 0; g < GM; ++g) {
          const float pk = __shfl_sync(0xffffffffu, pr[g], (k0 + u) & 31);
          if (g < G && k0 + u < nk) {
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(pk, vf[u][e], acc[g][e]);
          }
        }
      }
    }
  }
  // combine the warps
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    if (g < G) {
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
#pragma unroll
      for (int e = 0; e < EPL; ++e) sm_acc[warp][g][lane * EPL + e] = acc[g][e];
    }
  }
  __syncthreads();
  decode_split_finish<bf16, NW, NT, false>(out, &sm_m[0][0], &sm_l[0][0], GM, &sm_acc[0][0][0], D, &sm_acc[0][0][0],
                                           &sm_last, G, D, ns, nsplit, split, b, gridDim.z, kh, NH, KVH, row, part, counters);
}

// 2 (default): the tensor-core kernel (attention_decode_tc.cu) where it applies; 1: the warp-per-key
// kernel (faster than lanes-over-keys at short contexts on an H100, 17 vs 21 us at 131 keys); 0: the
// lanes-over-keys kernel for bf16 D 128/256 (faster at long ones: 29 vs 55 us at 2001 keys). Both
// CUDA-core kernels are latency-bound; see bench/gpu/NOTES.md.
int& decode_kernel_mode() {
  static int m = 2;
  return m;
}

size_t attention_decode_workspace_floats(int B, int NH, int D, int nsplit) {
  return (size_t)B * NH * nsplit * (D + 2);
}

template <typename T>
void attention_decode(T* out, const T* q, const T* kcache, const T* vcache, SeqMeta seq, int B, int NH, int KVH, int D,
                      int cap, int window, float scale, float softcap, int nsplit, float* part, unsigned* counters,
                      cudaStream_t s) {
  if (B <= 0) return;
  if (D > 256) throw std::invalid_argument("attention_decode: head_dim > 256 is not supported");
  if (NH / KVH > kMaxG) throw std::invalid_argument("attention_decode: more than 8 query heads per kv head");
  if (nsplit < 1 || nsplit > kDecodeMaxSplit)
    throw std::invalid_argument("attention_decode: nsplit must be 1.." + std::to_string(kDecodeMaxSplit));
  if constexpr (std::is_same<T, bf16>::value) {
    if (decode_kernel_mode() == 2 && attention_decode_tc_supported(NH, KVH, D)) {
      attention_decode_tc(out, q, kcache, vcache, seq, B, NH, KVH, D, cap, window, scale, softcap, nsplit, part,
                          counters, s);
      return;
    }
  }
  // the CUDA-core kernels: at most kMaxSplit splits (the partial layout follows the nsplit passed here)
  nsplit = std::min(nsplit, kMaxSplit);
  dim3 grid(nsplit, KVH, B);
#define G3_DECODE(EPL, CONTIG, GM)                                                                      \
  launch_k(attention_decode_kernel<T, EPL, CONTIG, GM>, grid, DecodeShape<GM>::NW * 32, 0, s, out, q, kcache, vcache, seq, NH, KVH, D, \
                                                                       cap, window, scale, softcap, nsplit, part, \
                                                                       counters)
  const int G = NH / KVH;
  if constexpr (std::is_same<T, bf16>::value) {
    if (decode_kernel_mode() == 0 && (D == 256 || D == 128)) {
#define G3_LK(EPL, GM)                                                                                          \
  launch_k(attention_decode_lk_kernel<EPL, GM>, grid, 128, 0, s, out, q, kcache, vcache, seq, NH, KVH, cap, window, \
           scale, softcap, nsplit, part, counters)
      if (D == 256 && G <= 2) G3_LK(8, 2);
      else if (D == 256 && G <= 4) G3_LK(8, 4);
      else if (D == 256) G3_LK(8, 8);
      else if (G <= 2) G3_LK(4, 2);
      else if (G <= 4) G3_LK(4, 4);
      else G3_LK(4, 8);
#undef G3_LK
      CUDA_LAUNCH_CHECK();
      return;
    }
  }
  if (D == 256 && G <= 2)
    G3_DECODE(8, true, 2);
  else if (D == 256 && G <= 4)
    G3_DECODE(8, true, 4);
  else if (D == 256)
    G3_DECODE(8, true, 8);
  else if (D == 128 && G <= 2)
    G3_DECODE(4, true, 2);
  else if (D == 128 && G <= 4)
    G3_DECODE(4, true, 4);
  else if (D == 128)
    G3_DECODE(4, true, 8);
  else
    G3_DECODE(8, false, 8);
#undef G3_DECODE
  CUDA_LAUNCH_CHECK();
}

template void attention_decode<float>(float*, const float*, const float*, const float*, SeqMeta, int, int, int, int,
                                      int, int, float, float, int, float*, unsigned*, cudaStream_t);
template void attention_decode<bf16>(bf16*, const bf16*, const bf16*, const bf16*, SeqMeta, int, int, int, int, int,
                                     int, float, float, int, float*, unsigned*, cudaStream_t);

}  // namespace g3cuda
