// sampling.cu: next-token choice on the GPU so that only ids come back. One block of 1024 threads
// per row. temperature <= 0: argmax (first maximum; with argmax_ws, a many-block first pass). Otherwise the CPU sampler's algorithm
// (csrc/cpu/sampling.cpp) exactly: the top k candidates (k = top_k, found by a 4-pass radix select
// on order-preserving keys, ties by lower id), ordered by (logit desc, id asc) with a bitonic sort,
// weights exp((l - max) / temperature) in double, top-p cut on the running sum, and the uniform draw
// from the same counter-based hash (splitmix64) of (seed, counter), the sums taken sequentially in
// the CPU's order. Rows that would need more than kSampleMaxK candidates get -1 (host fallback).
#include "kernels.cuh"

namespace g3cuda {

constexpr int kST = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ double uniform_from(uint64_t seed, uint64_t counter) {
  const uint64_t h = splitmix64(splitmix64(seed) ^ (counter * 0xd1b54a32d192ed03ull));
  return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}
// larger float -> larger key; -0 and +0 equal (they compare equal on the CPU)
__device__ __forceinline__ uint32_t fkey(float f) {
  if (f == 0.f) f = 0.f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Greedy rows, first pass: blocks over the row, each folds (key(value), ~index) into one 64-bit
// atomicMax per block, so the maximum with the lowest index wins (the CPU's first maximum).
__global__ void argmax_partial_kernel(unsigned long long* best, const float* logits, int V, const float* temperature) {
  G3_PDL_ENTRY();
  __shared__ unsigned long long sh[32];
  const int b = blockIdx.y;
  if (temperature[b] > 0.f) return;
  const float* L = logits + (int64_t)b * V;
  const int per = (V + gridDim.x - 1) / gridDim.x;
  const int lo = blockIdx.x * per, hi = min(V, lo + per);
  unsigned long long m = 0;
#pragma unroll 4
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const unsigned long long k = ((unsigned long long)fkey(L[i]) << 32) | (0xffffffffu - (uint32_t)i);
    m = k > m ? k : m;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long v = __shfl_xor_sync(0xffffffffu, m, o);
    m = v > m ? v : m;
  }
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = sh[w] > m ? sh[w] : m;
    atomicMax(&best[b], m);
  }
}

__global__ void __launch_bounds__(kST) sample_kernel(int32_t* ids, const float* logits, int V, const float* temperature,
                                                     const int32_t* top_k, const float* top_p, const uint64_t* seed,
                                                     const uint64_t* counter, unsigned long long* best) {
  G3_PDL_ENTRY();
  __shared__ float cv[kST];
  __shared__ int ci[kST];
  __shared__ double pw[kST];
  __shared__ unsigned hist[256];
  __shared__ unsigned wcnt[33];
  __shared__ unsigned s_prefix, s_rem, s_n;
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* L = logits + (int64_t)b * V;
  const float temp = temperature[b];
  if (!(temp > 0.f) && best) {
    if (tid == 0) {
      ids[b] = (int32_t)(0xffffffffu - (uint32_t)(best[b] & 0xffffffffu));
      best[b] = 0;  // ready for the next launch (graph replays)
    }
    return;
  }
  if (!(temp > 0.f)) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = tid; i < V; i += kST)
      if (bi == 0x7fffffff || L[i] > bv) { bv = L[i]; bi = i; }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != 0x7fffffff && (bi == 0x7fffffff || before(ov, oi, bv, bi))) { bv = ov; bi = oi; }
    }
    if (lane == 0) { cv[warp] = bv; ci[warp] = bi; }
    __syncthreads();
    if (tid == 0) {
      float v = cv[0];
      int i0 = ci[0];
      for (int w = 1; w < kST / 32; ++w)
        if (ci[w] != 0x7fffffff && (i0 == 0x7fffffff || before(cv[w], ci[w], v, i0))) { v = cv[w]; i0 = ci[w]; }
      ids[b] = i0;
    }
    return;
  }
  const int k = (top_k[b] > 0 && top_k[b] < V) ? top_k[b] : V;
  if (k > kSampleMaxK) {
    if (tid == 0) ids[b] = -1;
    return;
  }
  // radix select: the k-th largest key
  uint32_t prefix = 0, rem = k;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t hi_mask = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int i = tid; i < 256; i += kST) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < V; i += kST) {
      const uint32_t key = fkey(L[i]);
      if ((key & hi_mask) == (prefix & hi_mask)) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t cum = 0;
      for (int d = 255; d >= 0; --d) {
        if (cum + hist[d] >= rem) {
          s_prefix = prefix | ((uint32_t)d << shift);
          s_rem = rem - cum;
          break;
        }
        cum += hist[d];
      }
    }
    __syncthreads();
    prefix = s_prefix;
    rem = s_rem;
  }
  // candidates: every key above the k-th, then the `rem` lowest ids equal to it
  if (tid == 0) s_n = 0;
  cv[tid] = -INFINITY;
  ci[tid] = 0x7fffffff;
  __syncthreads();
  for (int i = tid; i < V; i += kST)
    if (fkey(L[i]) > prefix) {
      const unsigned p = atomicAdd(&s_n, 1u);
      cv[p] = L[i];
      ci[p] = i;
    }
  __syncthreads();
  const unsigned greater = s_n;  // == k - rem
  unsigned taken = 0;
  for (int base = 0; base < V && taken < rem; base += kST) {
    const int i = base + tid;
    const bool f = i < V && fkey(L[i]) == prefix;
    const unsigned bal = __ballot_sync(0xffffffffu, f);
    if (lane == 0) wcnt[warp] = __popc(bal);
    __syncthreads();
    if (tid == 0) {
      unsigned acc = 0;
      for (int w = 0; w < kST / 32; ++w) { const unsigned c = wcnt[w]; wcnt[w] = acc; acc += c; }
      wcnt[32] = acc;
    }
    __syncthreads();
    const unsigned rank = taken + wcnt[warp] + __popc(bal & ((1u << lane) - 1u));
    if (f && rank < rem) {
      cv[greater + rank] = L[i];
      ci[greater + rank] = i;
    }
    taken += wcnt[32];
    __syncthreads();
  }
  // bitonic sort of kST entries by (value desc, id asc); padding (-inf, INT_MAX) goes last
  for (int size = 2; size <= kST; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const int j = tid ^ stride;
      if (j > tid) {
        const bool up = (tid & size) == 0;
        const float va = cv[tid], vb = cv[j];
        const int ia = ci[tid], ib = ci[j];
        const bool swap = up ? before(vb, ib, va, ia) : before(va, ia, vb, ib);
        if (swap) { cv[tid] = vb; cv[j] = va; ci[tid] = ib; ci[j] = ia; }
      }
      __syncthreads();
    }
  }
  const double mx = cv[0];
  if (tid < k) pw[tid] = exp(((double)cv[tid] - mx) / (double)temp);
  __syncthreads();
  if (tid == 0) {
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += pw[i];
    int keep = k;
    const float tp = top_p[b];
    if (tp > 0.f && tp < 1.f) {
      double c = 0.0;
      for (int i = 0; i < k; ++i) {
        c += pw[i] / sum;
        if (c >= tp) { keep = i + 1; break; }
      }
    }
    double kept = 0.0;
    for (int i = 0; i < keep; ++i) kept += pw[i];
    const double u = uniform_from(seed[b], counter[b]) * kept;
    double c = 0.0;
    int pick = ci[keep - 1];
    for (int i = 0; i < keep; ++i) {
      c += pw[i];
      if (u < c) { pick = ci[i]; break; }
    }
    ids[b] = pick;
  }
}

void sample(int32_t* ids, const float* logits, int B, int V, const float* temperature, const int32_t* top_k,
            const float* top_p, const uint64_t* seed, const uint64_t* counter, unsigned long long* argmax_ws,
            cudaStream_t s) {
  if (B <= 0) return;
  if (argmax_ws) {
    const int blocks = std::max(1, std::min(512, V / 1024));  // ~4 loads per thread
    launch_k(argmax_partial_kernel, dim3(blocks, B), 256, 0, s, argmax_ws, logits, V, temperature);
    CUDA_LAUNCH_CHECK();
  }
  launch_k(sample_kernel, B, kST, 0, s, ids, logits, V, temperature, top_k, top_p, seed, counter, argmax_ws);
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
