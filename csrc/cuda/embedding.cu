// embedding.cu: token embedding gather with Gemma's sqrt(hidden) scale, fused with the first
// layer's input RMSNorm; and the gather of each sequence's last row (for the LM head).
#include "kernels.cuh"

namespace g3cuda {

constexpr int kEmbThreads = 256;

// PER elements per thread (with_row_per, common.cuh: hidden sizes up to 6144): the row's loads are all issued
// before the first is used, one round trip after the id's, and the norm weights come before the PDL wait
// (constant). In the decode step the loop kernel below (a load and its use per 256 elements) ended 11.4 us
// (4B) / 6.3 us (1B) after the step's start, under the first product's prologue loads; this one 4.2 / 1.8
// (H100, bench/gpu/NOTES.md session 20). The same sums in the same order as the loop kernel: the same bits.
template <typename T, int PER>
__global__ void __launch_bounds__(kEmbThreads) embedding_rmsnorm_kernel(float* x, T* xn, const T* table,
                                                                         const int32_t* ids, int H, float scale,
                                                                         const float* w, float eps, int pdl) {
  G3_PDL_TRIGGER_EARLY(pdl);
  __shared__ double sh[33];
  float wv[PER];
  auto load_w = [&] {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int i = threadIdx.x + k * kEmbThreads;
      wv[k] = w && i < H ? w[i] : 0.f;
    }
  };
  if (pdl & kPdlPrologue) load_w();
  G3_PDL_WAIT_FLAGS(pdl);
  if (!(pdl & kPdlPrologue)) load_w();
  const int t = blockIdx.x;
  const T* row = table + (int64_t)ids[t] * H;
  float v[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kEmbThreads;
    v[k] = i < H ? to_f(row[i]) * scale : 0.f;
  }
  float* xr = x + (int64_t)t * H;
  double ss = 0.0;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kEmbThreads;
    if (i < H) {
      xr[i] = v[k];
      ss += (double)v[k] * v[k];
    }
  }
  if (!w) return;
  ss = block_sum(ss, sh);
  const float r = 1.f / sqrtf((float)(ss / H) + eps);
  T* o = xn + (int64_t)t * H;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kEmbThreads;
    if (i < H) o[i] = from_f<T>((v[k] * r) * (1.f + wv[k]));
  }
}

// Wider rows: a loop over the row.
template <typename T>
__global__ void embedding_rmsnorm_wide_kernel(float* x, T* xn, const T* table, const int32_t* ids, int H, float scale,
                                              const float* w, float eps) {
  G3_PDL_ENTRY();
  __shared__ double sh[33];
  const int t = blockIdx.x;
  const T* row = table + (int64_t)ids[t] * H;
  float* xr = x + (int64_t)t * H;
  double ss = 0.0;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = to_f(row[i]) * scale;
    xr[i] = v;
    ss += (double)v * v;
  }
  if (!w) return;
  ss = block_sum(ss, sh);
  const float r = 1.f / sqrtf((float)(ss / H) + eps);
  T* o = xn + (int64_t)t * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = from_f<T>((xr[i] * r) * (1.f + w[i]));
}

template <typename T>
void embedding_rmsnorm(float* x, T* xn, const T* table, const int32_t* ids, int n, int H, float scale,
                       const float* norm_w, float eps, cudaStream_t s) {
  if (n <= 0) return;
  const bool in_regs = with_row_per(H, kEmbThreads, [&](auto per) {
    launch_k(embedding_rmsnorm_kernel<T, decltype(per)::value>, n, kEmbThreads, 0, s, x, xn, table, ids, H, scale,
             norm_w, eps, pdl_flags());
  });
  if (!in_regs)
    launch_k(embedding_rmsnorm_wide_kernel<T>, n, kEmbThreads, 0, s, x, xn, table, ids, H, scale, norm_w, eps);
  CUDA_LAUNCH_CHECK();
}

template <typename T>
__global__ void gather_last_rows_kernel(T* out, const T* in, SeqMeta seq, int dim) {
  G3_PDL_ENTRY();
  const int b = blockIdx.x;
  const int64_t r = seq.t0[b] + seq.len[b] - 1;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(int64_t)b * dim + i] = in[r * dim + i];
}

template <typename T>
void gather_last_rows(T* out, const T* in, SeqMeta seq, int B, int dim, cudaStream_t s) {
  launch_k(gather_last_rows_kernel<T>, B, 256, 0, s, out, in, seq, dim);
  CUDA_LAUNCH_CHECK();
}

template void embedding_rmsnorm<float>(float*, float*, const float*, const int32_t*, int, int, float, const float*,
                                       float, cudaStream_t);
template void embedding_rmsnorm<bf16>(float*, bf16*, const bf16*, const int32_t*, int, int, float, const float*, float,
                                      cudaStream_t);
template void gather_last_rows<float>(float*, const float*, SeqMeta, int, int, cudaStream_t);
template void gather_last_rows<bf16>(bf16*, const bf16*, SeqMeta, int, int, cudaStream_t);

}  // namespace g3cuda
