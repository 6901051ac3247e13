// vision_attention.cu: SigLIP's non-causal multi-head attention on tensor cores (flash-attention style,
// bf16 WMMA 16x16x16 with float32 accumulation). head_dim 72 is padded to 80 (five 16-wide fragments)
// with zeros in shared memory, so the padding never reaches a dot product or the output.
// Block = 4 warps = 64 queries of one (image, head); keys/values stream through shared memory in tiles
// of 64. Per tile each warp computes S = Q K^T for its 16 queries, updates the running max / sum of each
// row (two lanes per row), writes P = exp(S - max) as bf16, rescales its float32 O rows and adds P V.
// O lives in shared memory because WMMA accumulators cannot be rescaled row by row in registers.
// DRAFT: compiles for sm_80/sm_90, has not run yet (see vision_kernels.cuh).
#include <mma.h>
#include "vision_common.cuh"
#include "vision_kernels.cuh"

namespace g3cuda {
namespace vision {

namespace {
constexpr int kQ = 64;      // queries per block
constexpr int kK = 64;      // keys per tile
constexpr int kDP = 80;     // padded head dim
constexpr int kWarps = 4;
constexpr size_t kSmem = (size_t)(kQ + 2 * kK) * kDP * sizeof(bf16)   // sQ, sK, sV
                         + (size_t)kWarps * 16 * kK * sizeof(float)    // sS
                         + (size_t)kWarps * 16 * kK * sizeof(bf16)     // sP
                         + (size_t)kWarps * 16 * kDP * sizeof(float);  // sO
}  // namespace

using namespace nvcuda;

__global__ void __launch_bounds__(128) attention_full_kernel(bf16* out, const bf16* qkv, int N, int heads, int D,
                                                             float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sQ = (bf16*)smem;
  bf16* sK = sQ + kQ * kDP;
  bf16* sV = sK + kK * kDP;
  float* sS = (float*)(sV + kK * kDP);
  bf16* sP = (bf16*)(sS + kWarps * 16 * kK);
  float* sO = (float*)(sP + kWarps * 16 * kK);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = blockIdx.x * kQ, h = blockIdx.y, img = blockIdx.z;
  const size_t row_stride = (size_t)3 * heads * D;
  const bf16* base = qkv + (size_t)img * N * row_stride;
  const bf16 zero = __float2bfloat16_rn(0.f);

  for (int idx = threadIdx.x; idx < kQ * kDP; idx += blockDim.x) {
    const int r = idx / kDP, d = idx % kDP;
    sQ[idx] = (d < D && q0 + r < N) ? base[(size_t)(q0 + r) * row_stride + (size_t)h * D + d] : zero;
  }
  float* sSw = sS + warp * 16 * kK;
  bf16* sPw = sP + warp * 16 * kK;
  float* sOw = sO + warp * 16 * kDP;
  for (int idx = lane; idx < 16 * kDP; idx += 32) sOw[idx] = 0.f;
  const int r = lane >> 1, half = lane & 1;  // this lane's row of the warp's 16, and its half of the columns
  float m = -INFINITY, l = 0.f;

  for (int j0 = 0; j0 < N; j0 += kK) {
    __syncthreads();  // the previous tile's K/V are no longer read
    for (int idx = threadIdx.x; idx < kK * kDP; idx += blockDim.x) {
      const int j = idx / kDP, d = idx % kDP;
      const bool ok = d < D && j0 + j < N;
      const size_t g = (size_t)(j0 + j) * row_stride + (size_t)h * D + d;
      sK[idx] = ok ? base[g + (size_t)heads * D] : zero;
      sV[idx] = ok ? base[g + (size_t)2 * heads * D] : zero;
    }
    __syncthreads();

    // S = Q_w K^T  [16 x 64]
    for (int nf = 0; nf < kK / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < kDP / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
        wmma::load_matrix_sync(a, sQ + warp * 16 * kDP + kk * 16, kDP);
        wmma::load_matrix_sync(b, sK + nf * 16 * kDP + kk * 16, kDP);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sSw + nf * 16, acc, kK, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax of row r over this tile: lanes 2r and 2r+1 take 32 columns each
    float tmax = -INFINITY;
    for (int c = half * 32; c < half * 32 + 32; ++c)
      if (j0 + c < N) tmax = fmaxf(tmax, sSw[r * kK + c] * scale_log2);
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m, tmax);
    const float alpha = m == -INFINITY ? 0.f : exp2f(m - m_new);
    float psum = 0.f;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const float p = j0 + c < N ? exp2f(sSw[r * kK + c] * scale_log2 - m_new) : 0.f;
      sPw[r * kK + c] = __float2bfloat16_rn(p);
      psum += p;
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l = l * alpha + psum;
    m = m_new;
    for (int d = half * (kDP / 2); d < (half + 1) * (kDP / 2); ++d) sOw[r * kDP + d] *= alpha;
    __syncwarp();

    // O_w += P V  [16 x 80]
    for (int nd = 0; nd < kDP / 16; ++nd) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sOw + nd * 16, kDP, wmma::mem_row_major);
      for (int kk = 0; kk < kK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
        wmma::load_matrix_sync(a, sPw + kk * 16, kK);
        wmma::load_matrix_sync(b, sV + kk * 16 * kDP + nd * 16, kDP);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sOw + nd * 16, acc, kDP, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int q = q0 + warp * 16 + r;
  if (q < N) {
    const float inv = 1.f / l;
    bf16* o = out + ((size_t)img * N + q) * heads * D + (size_t)h * D;
    for (int d = half * (kDP / 2); d < (half + 1) * (kDP / 2) && d < D; ++d) o[d] = __float2bfloat16_rn(sOw[r * kDP + d] * inv);
  }
}

bool vision_attention_full_supported(int D) { return D > 0 && D <= kDP; }

void vision_attention_full(bf16* out, const bf16* qkv, int n_img, int N, int heads, int D, float scale,
                           cudaStream_t s) {
  if (!vision_attention_full_supported(D)) throw std::runtime_error("vision_attention_full: head_dim must be <= 80");
  if (n_img <= 0 || N <= 0) return;
  static bool configured = false;
  if (!configured) {
    vcheck(cudaFuncSetAttribute(attention_full_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmem),
           "vision_attention_full smem");
    configured = true;
  }
  const dim3 grid((N + kQ - 1) / kQ, heads, n_img);
  attention_full_kernel<<<grid, 32 * kWarps, kSmem, s>>>(out, qkv, N, heads, D, scale * 1.4426950408889634f);
  G3V_LAUNCH_CHECK("vision_attention_full");
}

}  // namespace vision
}  // namespace g3cuda
