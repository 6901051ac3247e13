// kv_cache_write.cu: copies a chunk's new keys/values into the KV cache. Mode 0 writes those that
// kv_direct_ok allows before attention (used by tests; the engine does it inside qk_rope_kv); mode 1,
// after attention, writes the rest that survive in the ring: the last `cap` positions of each chunk.
#include "kernels.cuh"

namespace g3cuda {

template <typename T>
__global__ void kv_cache_write_kernel(T* kcache, T* vcache, const T* knew, const T* vnew, TokMeta tok, SeqMeta seq,
                                      int KVH, int D, int cap, bool local, int mode) {
  G3_PDL_ENTRY();
  const int t = blockIdx.x;
  const int sq = tok.seq[t], pos = tok.pos[t];
  const int idx = t - seq.t0[sq];
  const bool direct = kv_direct_ok(local, idx, pos, cap);
  const bool write = mode == 0 ? direct : (!direct && pos >= seq.start[sq] + seq.len[sq] - cap);
  if (!write) return;
  const int64_t slot = seq.slot[sq];
  for (int i = threadIdx.x; i < KVH * D; i += blockDim.x) {
    const int kh = i / D, d = i % D;
    const int64_t c = ((slot * KVH + kh) * cap + pos % cap) * D + d;
    kcache[c] = knew[(int64_t)t * KVH * D + i];
    vcache[c] = vnew[(int64_t)t * KVH * D + i];
  }
}

template <typename T>
void kv_cache_write(T* kcache, T* vcache, const T* knew, const T* vnew, TokMeta tok, SeqMeta seq, int ntok, int KVH,
                    int D, int cap, bool local, int mode, cudaStream_t s) {
  if (ntok <= 0) return;
  launch_k(kv_cache_write_kernel<T>, ntok, 256, 0, s, kcache, vcache, knew, vnew, tok, seq, KVH, D, cap, local, mode);
  CUDA_LAUNCH_CHECK();
}

template void kv_cache_write<float>(float*, float*, const float*, const float*, TokMeta, SeqMeta, int, int, int, int,
                                    bool, int, cudaStream_t);
template void kv_cache_write<bf16>(bf16*, bf16*, const bf16*, const bf16*, TokMeta, SeqMeta, int, int, int, int, bool,
                                   int, cudaStream_t);

}  // namespace g3cuda
