// attention_generic.cu: attention of a ragged batch of chunks for any head_dim <= 256 and either
// storage type: one warp per (query, head), an online softmax over the visible keys (cache before
// the sequence's start, the chunk's own keys after). The float32 engine's path and the fallback for
// head dims the tensor-core kernel does not take; the reference the fast kernels are tested against.
// seq.extent (multimodal prefill) lets a token see later keys of its chunk up to its extent.
#include "kernels.cuh"

namespace g3cuda {

template <typename T>
__global__ void attention_generic_kernel(T* out, const T* q, const T* knew, const T* vnew, const T* kcache,
                                         const T* vcache, TokMeta tok, SeqMeta seq, int NH, int KVH, int D, int cap,
                                         int window, float scale, float softcap) {
  G3_PDL_ENTRY();
  constexpr int E = 8;
  const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const int sq = tok.seq[t], p = tok.pos[t];
  const int start = seq.start[sq], t0 = seq.t0[sq];
  const int64_t slot = seq.slot[sq];
  const int kh = h / (NH / KVH);
  float qv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < D ? to_f(q[((int64_t)t * NH + h) * D + d]) : 0.f;
    acc[e] = 0.f;
  }
  const int jlo = window > 0 ? max(0, p - window + 1) : 0;
  const int hi = seq.extent ? min(max(p, seq.extent[t]), start + seq.len[sq] - 1) : p;
  float m = -INFINITY, l = 0.f;
  for (int j = jlo; j <= hi; ++j) {
    const int64_t off = j < start ? ((slot * KVH + kh) * cap + j % cap) * D : (((int64_t)t0 + j - start) * KVH + kh) * D;
    const T* kr = (j < start ? kcache : knew) + off;
    const T* vr = (j < start ? vcache : vnew) + off;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      if (d < D) s += qv[e] * to_f(kr[d]);
    }
    s = warp_sum(s) * scale;
    if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), pj = expf(s - mn);
    l = l * corr + pj;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      acc[e] = acc[e] * corr + (d < D ? pj * to_f(vr[d]) : 0.f);
    }
    m = mn;
  }
  const float inv = 1.f / l;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d < D) out[((int64_t)t * NH + h) * D + d] = from_f<T>(acc[e] * inv);
  }
}

template <typename T>
void attention_generic(T* out, const T* q, const T* knew, const T* vnew, const T* kcache, const T* vcache, TokMeta tok,
                       SeqMeta seq, int ntok, int NH, int KVH, int D, int cap, int window, float scale, float softcap,
                       cudaStream_t s) {
  if (ntok <= 0) return;
  if (D > 256) throw std::invalid_argument("attention: head_dim > 256 is not supported");
  launch_k(attention_generic_kernel<T>, dim3(ntok, NH), 32, 0, s, out, q, knew, vnew, kcache, vcache, tok, seq, NH, KVH, D,
                                                            cap, window, scale, softcap);
  CUDA_LAUNCH_CHECK();
}

template void attention_generic<float>(float*, const float*, const float*, const float*, const float*, const float*,
                                       TokMeta, SeqMeta, int, int, int, int, int, int, float, float, cudaStream_t);
template void attention_generic<bf16>(bf16*, const bf16*, const bf16*, const bf16*, const bf16*, const bf16*, TokMeta,
                                      SeqMeta, int, int, int, int, int, int, float, float, cudaStream_t);

}  // namespace g3cuda
