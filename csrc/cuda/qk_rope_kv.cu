// qk_rope_kv.cu: after the stacked qkv product: QK-norm (Gemma 3) and RoPE (rotate-half) on q and k,
// the cast to T, and the KV-cache write (ring slot pos % cap on local layers) where it is safe before
// attention (kv_direct_ok); one warp per (token, head), the head's pairs (i, i + D/2) in registers.
// RoPE angles as the CPU kernel: inv_freq computed on the host in float32, angle = pos * inv_freq in
// float32, cos/sin in double then rounded.
#include "kernels.cuh"

namespace g3cuda {

constexpr int kWarps = 4, kMaxPairs = 4;  // D <= 256

// pre: the position, the cache row (metadata), the norm weights and the RoPE angles (double cos/sin) are
// computed before the wait for the qkv product; only the product's row is read after it.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) qk_rope_kv_kernel(T* q, T* knew, T* vnew, T* kcache, T* vcache,
                                                                 const float* qkv, const float* q_w, const float* k_w,
                                                                 const float* inv_freq, TokMeta tok, SeqMeta seq,
                                                                 int NH, int KVH, int D, int cap, bool local,
                                                                 float eps, int pdl) {
  G3_PDL_TRIGGER_EARLY(pdl);
  const bool pre = pdl & kPdlPrologue;
  const int t = blockIdx.x;
  const int hs = blockIdx.y * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int half = D / 2;
  const int kind = hs < NH ? 0 : (hs < NH + KVH ? 1 : 2);  // q, k, v
  const float* w = kind == 0 ? q_w : k_w;
  const int kh = kind == 1 ? hs - NH : hs - NH - KVH;
  float wa[kMaxPairs], wb[kMaxPairs], cs[kMaxPairs], sn[kMaxPairs];
  int pos = 0;
  int64_t crow = -1;  // k, v: the cache row written now (kv_direct_ok), else -1
  auto prologue = [&] {
    pos = tok.pos[t];
    if (kind > 0) {  // the metadata chain (token -> sequence -> slot) is two round trips: not after the wait
      const int sq = tok.seq[t];
      if (kv_direct_ok(local, t - seq.t0[sq], pos, cap)) crow = ((int64_t)seq.slot[sq] * KVH + kh) * cap + pos % cap;
    }
    if (kind == 2) return;
#pragma unroll
    for (int e = 0; e < kMaxPairs; ++e) {
      const int i = lane + 32 * e;
      wa[e] = w && i < half ? w[i] : 0.f;
      wb[e] = w && i < half ? w[i + half] : 0.f;
      const float ang = i < half ? __fmul_rn((float)pos, inv_freq[i]) : 0.f;
      cs[e] = (float)cos((double)ang);
      sn[e] = (float)sin((double)ang);
    }
  };
  if (hs < NH + 2 * KVH && pre) prologue();
  G3_PDL_WAIT_FLAGS(pdl);
  if (hs >= NH + 2 * KVH) return;
  if (!pre) prologue();
  const int QKV = (NH + 2 * KVH) * D;
  const float* src = qkv + (int64_t)t * QKV + (int64_t)hs * D;
  float a[kMaxPairs], b[kMaxPairs];
#pragma unroll
  for (int e = 0; e < kMaxPairs; ++e) {
    const int i = lane + 32 * e;
    a[e] = i < half ? src[i] : 0.f;
    b[e] = i < half ? src[i + half] : 0.f;
  }
  if (kind < 2) {
    if (w) {
      double ss = 0.0;
#pragma unroll
      for (int e = 0; e < kMaxPairs; ++e) ss += (double)a[e] * a[e] + (double)b[e] * b[e];
      ss = warp_sum(ss);
      const float r = 1.f / sqrtf((float)(ss / D) + eps);
#pragma unroll
      for (int e = 0; e < kMaxPairs; ++e) {
        const int i = lane + 32 * e;
        if (i < half) {
          a[e] = (a[e] * r) * (1.f + wa[e]);
          b[e] = (b[e] * r) * (1.f + wb[e]);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < kMaxPairs; ++e) {
      const int i = lane + 32 * e;
      if (i < half) {
        const float x = a[e], y = b[e];
        a[e] = __fsub_rn(__fmul_rn(x, cs[e]), __fmul_rn(y, sn[e]));
        b[e] = __fadd_rn(__fmul_rn(y, cs[e]), __fmul_rn(x, sn[e]));
      }
    }
  }
  T* dst;
  T* cdst = nullptr;
  if (kind == 0) {
    dst = q + ((int64_t)t * NH + hs) * D;
  } else {
    dst = (kind == 1 ? knew : vnew) + ((int64_t)t * KVH + kh) * D;
    if (crow >= 0) cdst = (kind == 1 ? kcache : vcache) + crow * D;
  }
#pragma unroll
  for (int e = 0; e < kMaxPairs; ++e) {
    const int i = lane + 32 * e;
    if (i < half) {
      const T x = from_f<T>(a[e]), y = from_f<T>(b[e]);
      dst[i] = x;
      dst[i + half] = y;
      if (cdst) {
        cdst[i] = x;
        cdst[i + half] = y;
      }
    }
  }
}

template <typename T>
void qk_rope_kv(T* q, T* knew, T* vnew, T* kcache, T* vcache, const float* qkv, const float* q_w, const float* k_w,
                const float* inv_freq, TokMeta tok, SeqMeta seq, int ntok, int NH, int KVH, int D, int cap,
                bool local, float eps, cudaStream_t s) {
  if (ntok <= 0) return;
  if (D > 2 * 32 * kMaxPairs || D % 2) throw std::invalid_argument("qk_rope_kv: head_dim must be even and <= 256");
  dim3 grid(ntok, (NH + 2 * KVH + kWarps - 1) / kWarps);
  launch_k(qk_rope_kv_kernel<T>, grid, kWarps * 32, 0, s, q, knew, vnew, kcache, vcache, qkv, q_w, k_w, inv_freq, tok, seq,
           NH, KVH, D, cap, local, eps, pdl_flags());
  CUDA_LAUNCH_CHECK();
}

template void qk_rope_kv<float>(float*, float*, float*, float*, float*, const float*, const float*, const float*,
                                const float*, TokMeta, SeqMeta, int, int, int, int, int, bool, float, cudaStream_t);
template void qk_rope_kv<bf16>(bf16*, bf16*, bf16*, bf16*, bf16*, const float*, const float*, const float*,
                               const float*, TokMeta, SeqMeta, int, int, int, int, int, bool, float, cudaStream_t);

}  // namespace g3cuda
