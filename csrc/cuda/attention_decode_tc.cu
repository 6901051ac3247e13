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
#include "attention_decode_tc.cuh"
#include "kernels.cuh"

namespace g3cuda {

// PDL prologue (pre): the first tiles' copies of every key but the new token's are issued before the
// wait for QK-norm + RoPE, which writes q and key p.
template <int D, int STAGES>
__global__ void __launch_bounds__(kTcWarps * 32) attention_decode_tc_kernel(
    bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int NH, int KVH, int cap, int window,
    float scale, float softcap, int nsplit, float* part, unsigned* counters, bool pre) {
  if (!pre) G3_PDL_WAIT();
  auto wait = [pre] {
    if (pre) G3_PDL_WAIT();
    G3_PDL_LAUNCH();
  };
  extern __shared__ uint4 smem_u4[];
  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
  const int G = NH / KVH;
  const int64_t row = seq.t0[b];
  // the query heads of this kv head as rows 0..G-1, zero rows up to 16
  auto fill_q = [&](bf16* Qs, int LD) {
    for (int c = threadIdx.x; c < 16 * (D / 8); c += kTcWarps * 32) {
      const int r = c / (D / 8), cc = c % (D / 8);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < G) v = *reinterpret_cast<const uint4*>(q + (row * NH + kh * G + r) * D + cc * 8);
      *reinterpret_cast<uint4*>(Qs + r * LD + cc * 8) = v;
    }
  };
  decode_tc_block<D, STAGES>(reinterpret_cast<bf16*>(smem_u4), BlockSync(), fill_q, wait, pre, out, kcache, vcache, seq.slot[b],
                             row, seq.start[b], b, gridDim.z, split, kh, NH, KVH, cap, window, scale, softcap, nsplit,
                             part, counters);
}

bool attention_decode_tc_supported(int NH, int KVH, int D) {
  return (D == 128 || D == 256) && NH % KVH == 0 && NH / KVH <= kTcMaxG;
}


template <int D, int STAGES>
static void launch_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B,
                             int NH, int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                             unsigned* counters, size_t smem, cudaStream_t s) {
  static size_t attr = 0;  // per instantiation: the attribute is per device function
  if (smem > attr) {
    CUDA_CHECK(cudaFuncSetAttribute(attention_decode_tc_kernel<D, STAGES>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)std::max<size_t>(smem, 48 * 1024)));
    attr = std::max<size_t>(smem, 48 * 1024);
  }
  launch_k(attention_decode_tc_kernel<D, STAGES>, dim3(nsplit, KVH, B), kTcWarps * 32, smem, s, out, q, kcache, vcache,
           seq, NH, KVH, cap, window, scale, softcap, nsplit, part, counters, pdl_prologue());
  CUDA_LAUNCH_CHECK();
}

// Three stages where the device's per-block shared memory allows (H100: 206 KB at head_dim 256), else two.
template <int D>
static void dispatch_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B,
                               int NH, int KVH, int cap, int window, float scale, float softcap, int nsplit, float* part,
                               unsigned* counters, cudaStream_t s) {
  static int optin = -1;
  if (optin < 0) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  }
  const size_t s3 = decode_tc_smem_bytes<D, 3>(nsplit);
  if (s3 <= (size_t)optin)
    launch_decode_tc<D, 3>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters,
                           s3, s);
  else
    launch_decode_tc<D, 2>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters,
                           decode_tc_smem_bytes<D, 2>(nsplit), s);
}

void attention_decode_tc(bf16* out, const bf16* q, const bf16* kcache, const bf16* vcache, SeqMeta seq, int B, int NH,
                         int KVH, int D, int cap, int window, float scale, float softcap, int nsplit, float* part,
                         unsigned* counters, cudaStream_t s) {
  if (B <= 0) return;
  if (!attention_decode_tc_supported(NH, KVH, D))
    throw std::invalid_argument("attention_decode_tc: head_dim must be 128 or 256 and at most 8 query heads per kv head");
  if (nsplit < 1 || nsplit > kDecodeMaxSplit)
    throw std::invalid_argument("attention_decode_tc: nsplit must be 1.." + std::to_string(kDecodeMaxSplit));
  if (D == 256)
    dispatch_decode_tc<256>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters, s);
  else
    dispatch_decode_tc<128>(out, q, kcache, vcache, seq, B, NH, KVH, cap, window, scale, softcap, nsplit, part, counters, s);
}

}  // namespace g3cuda
