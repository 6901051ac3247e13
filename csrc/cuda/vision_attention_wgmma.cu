// vision_attention_wgmma.cu: SigLIP's non-causal multi-head attention on Hopper's warpgroup MMA
// (wgmma.mma_async, sm_90a), the same job and input layout as vision_attention.cu's mma.sync kernel.
// A block takes 128 queries of one (image, head) as two consumer warpgroups of 64 rows, plus a producer
// warpgroup (one thread of it busy, its registers handed to the consumers) that streams key/value tiles of
// 128 through four shared-memory stages with the bulk-copy engine (TMA, a tensor map over q/k/v; full /
// empty mbarriers per stage, no block-wide barrier per tile).
// Per tile and warpgroup: S = Q.K^T is five m64n128k16 products (Q's fragments in registers, K from shared
// memory), the online softmax runs on S in registers (base 2), and O += P.V is eight m64n(8 * NDT)k16
// products with P's bf16 fragments straight from S's registers and V read transposed from shared memory.
// The next tile's Q.K^T is issued before this tile's P.V, so that the exponentials of one overlap the
// tensor cores' work on the other (FlashAttention-3's intra-warpgroup pipelining), and the two warpgroups
// take turns issuing (ping-pong through two named barriers), so that one's softmax overlaps the other's
// products.
// Two input layouts (template kT):
// - qh (vision_qkv_bias_split's): a shared tile holds [128 keys][16 * KC dims] as KC boxes of 16 dims (32-byte
//   rows, the bulk-copy engine's and wgmma's 32-byte swizzle; each box is one k-step of Q.K^T, and V's boxes
//   are P.V's n-range in steps of 16). The rows of q/k/v are zero-padded to 80 dims, so a box reaching past D
//   brings zeros.
// - the q/k/v product transposed (vision_gemm_lt_t's, feature-major, no bias): a tile holds [16 * KC dims][128
//   keys] as two boxes of 64 keys (128-byte rows, 128-byte swizzle; dims past D arrive as zeros). K is then
//   MN-major for Q.K^T (a k-step is 16 rows), V K-major for P.V (a k-step is 32 bytes of a row). Q's rows are
//   gathered from global memory with q's bias added; v's bias is added to the output, k's is not needed
//   (vision_kernels.cuh).
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include "vision_kernels.cuh"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace g3cuda {

namespace {
constexpr int kWBQ = 128, kWBK = 128, kWConsumers = 256, kWThreads = kWConsumers + 128, kWStages = 4;
// registers per thread after the warpgroups rebalance them (setmaxnreg): the producer warpgroup needs few,
// the consumers hold S, P, O and Q's fragments (128 x 40 + 256 x 232 <= 64K)
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
constexpr int kWBoxDims = 16, kWBoxesMax = kVisionDP / kWBoxDims;  // 16 dims (32 bytes) per box, 5 a row
constexpr uint32_t kBoxBytes = kWBK * kWBoxDims * 2;       // one box: 128 rows x 32 bytes
constexpr uint32_t kStageBytes = 2 * kWBoxesMax * kBoxBytes;  // K then V, room for 5 boxes each
constexpr size_t kWSmem = (size_t)kWStages * kStageBytes + 2 * kWStages * sizeof(uint64_t) + 1024;  // + align
static_assert(kVisionDP % kWBoxDims == 0, "whole boxes per padded row");
// the transposed layout: boxes of 64 keys (128 bytes) x up to 80 dims, two per K or V tile
constexpr int kTBoxKeys = 64;
constexpr uint32_t kTBoxBytes = kVisionDP * kTBoxKeys * 2;
static_assert(4 * kTBoxBytes == kStageBytes, "K and V of a stage: two boxes each");
static_assert(kTBoxBytes % 1024 == 0, "boxes start on the 128-byte swizzle's 1024-byte pattern");

// Shared addresses of tile t's key and value boxes (stage t % kWStages).
__device__ __forceinline__ uint32_t k_stage(uint32_t sbase, int t) {
  return sbase + (uint32_t)(t % kWStages) * kStageBytes;
}
__device__ __forceinline__ uint32_t v_stage(uint32_t sbase, int t) { return k_stage(sbase, t) + kWBoxesMax * kBoxBytes; }

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
}  // namespace

// Q's A fragments for the consumer thread's rows of work item (q0, h, img) (zeros past N): rows ra, ra + 8 with
// ra = q0 + 16 * (warp in the block) + lane / 4.
template <int KC, bool kT>
__device__ __forceinline__ void load_q(uint32_t (&qa)[KC][4], const bf16* qh, const float* qb, int n_img, int N,
                                       int heads, int D, int q0, int h, int img) {
  const int tid = threadIdx.x, lane = tid & 31, c4 = lane & 3;
  const int ra = q0 + (tid >> 5) * 16 + (lane >> 2), rb = ra + 8;
  if constexpr (kT) {
    // feature-major: dim c of token (img, r) at qt[c * R + r]; q's bias added in float32 before the rounding
    // to bf16, as vision_qkv_bias_split does
    const int64_t R = (int64_t)n_img * N;
    const bf16* Qt = qh + (int64_t)h * D * R + (int64_t)img * N;
    const float* qbh = qb + h * D;
    auto q2 = [&](int r, int c) -> uint32_t {  // dims c, c + 1 of row r (D even: both or neither exist)
      if (r >= N || c >= D) return 0u;
      return pack_bf16(__bfloat162float(Qt[(int64_t)c * R + r]) + qbh[c],
                       __bfloat162float(Qt[(int64_t)(c + 1) * R + r]) + qbh[c + 1]);
    };
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = kc * 16 + 2 * c4;
      qa[kc][0] = q2(ra, col);
      qa[kc][1] = q2(rb, col);
      qa[kc][2] = q2(ra, col + 8);
      qa[kc][3] = q2(rb, col + 8);
    }
  } else {
    const bf16* Qg = qh + vision_qh_slice(0, h, img, heads, n_img) * ((int64_t)N * kVisionDP);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const int col = kc * 16 + 2 * c4;
      qa[kc][0] = ra < N ? lds32(Qg + (int64_t)ra * kVisionDP + col) : 0u;
      qa[kc][1] = rb < N ? lds32(Qg + (int64_t)rb * kVisionDP + col) : 0u;
      qa[kc][2] = ra < N ? lds32(Qg + (int64_t)ra * kVisionDP + col + 8) : 0u;
      qa[kc][3] = rb < N ? lds32(Qg + (int64_t)rb * kVisionDP + col + 8) : 0u;
    }
  }
}

template <int NDT, bool kT>
__device__ __forceinline__ void consume(bf16* out, const bf16* qh, const float* qb, const float* vb, int n_img, int N,
                                        int heads, int D, float scale_log2, int pingpong, uint64_t* full,
                                        uint64_t* empty, uint32_t sbase, int q0, int h, int img, int ntiles);

// NDT: output n-tiles of 8 dims (= chunks loaded per K / V row); KC: k-steps of 16 for Q.K^T. kT: qh is the
// transposed product (qb, vb: q's and v's biases), else the padded layout (qb, vb unused).
template <int NDT, bool kT>
__global__ void __launch_bounds__(kWThreads, 1)
    vision_attention_wgmma_kernel(bf16* out, const bf16* qh, const float* qb, const float* vb,
                                  const __grid_constant__ CUtensorMap qkv_map, int n_img, int N, int heads, int D,
                                  float scale_log2, int pingpong) {
#ifdef G3_WGMMA
  constexpr int KC = (NDT + 1) / 2;
  extern __shared__ uint8_t wsmem_raw[];
  // 1024-byte alignment: every box starts on a multiple of the swizzle pattern
  uint8_t* wsmem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wsmem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(wsmem + kWStages * kStageBytes);
  uint64_t* empty = full + kWStages;
  const uint32_t sbase = smem_addr(wsmem);
  const int tid = threadIdx.x;
  const int q0 = blockIdx.x * kWBQ, h = blockIdx.y, img = blockIdx.z;
  const int ntiles = (N + kWBK - 1) / kWBK;

  if (tid == 0) {
    for (int i = 0; i < kWStages; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], kWConsumers / 32);  // every consumer warp releases the stage
    }
    mbar_init_fence();
  }
  __syncthreads();
  G3_PDL_ENTRY();  // q/k/v are written by the kernel before

  if (tid >= kWConsumers) {  // the producer warpgroup: one thread issues every tile's boxes
    setmaxnreg_dec<kProducerRegs>();
    if (tid != kWConsumers) return;
    for (int t = 0; t < ntiles; ++t) {
      const int st = t % kWStages;
      if (t >= kWStages) mbar_wait(&empty[st], ((t / kWStages) + 1) & 1);
      if constexpr (kT) {  // 4-d map (key, image, dim, stacked head): boxes of 64 keys
        mbar_expect_tx(&full[st], 4 * kTBoxKeys * 16 * KC * 2);
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          tma_load_4d(k_stage(sbase, t) + b * kTBoxBytes, &qkv_map, t * kWBK + b * kTBoxKeys, img, 0, heads + h,
                      &full[st]);
          tma_load_4d(k_stage(sbase, t) + (2 + b) * kTBoxBytes, &qkv_map, t * kWBK + b * kTBoxKeys, img, 0,
                      2 * heads + h, &full[st]);
        }
      } else {
        const int ks = (int)vision_qh_slice(1, h, img, heads, n_img);
        const int vs = (int)vision_qh_slice(2, h, img, heads, n_img);
        mbar_expect_tx(&full[st], 2 * KC * kBoxBytes);
#pragma unroll
        for (int c = 0; c < KC; ++c) {
          tma_load_3d(k_stage(sbase, t) + c * kBoxBytes, &qkv_map, c * kWBoxDims, t * kWBK, ks, &full[st]);
          tma_load_3d(v_stage(sbase, t) + c * kBoxBytes, &qkv_map, c * kWBoxDims, t * kWBK, vs, &full[st]);
        }
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    consume<NDT, kT>(out, qh, qb, vb, n_img, N, heads, D, scale_log2, pingpong, full, empty, sbase, q0, h, img,
                     ntiles);
  }
#else
  __trap();
#endif
}

// The consumer warpgroups of vision_attention_wgmma_kernel.
template <int NDT, bool kT>
__device__ __forceinline__ void consume(bf16* out, const bf16* qh, const float* qb, const float* vb, int n_img, int N,
                                        int heads, int D, float scale_log2, int pingpong, uint64_t* full,
                                        uint64_t* empty, uint32_t sbase, int q0, int h, int img, int ntiles) {
#ifdef G3_WGMMA
  constexpr int KC = (NDT + 1) / 2;
  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, warp = (tid >> 5) & 3;
  const int g = lane >> 2, c4 = lane & 3;
  const int ra = q0 + wg * 64 + warp * 16 + g, rb = ra + 8;  // this thread's rows of the output
  uint32_t qa[KC][4];  // kept for every tile
  load_q<KC, kT>(qa, qh, qb, n_img, N, heads, D, q0, h, img);
  float s[64], o[4 * NDT];
  uint32_t p[32];
#pragma unroll
  for (int i = 0; i < 4 * NDT; ++i) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  auto wait_full = [&](int t) { mbar_wait(&full[t % kWStages], (t / kWStages) & 1); };
  auto release = [&](int t) {  // this warp is done with tile t's stage (its P.V has completed)
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[t % kWStages]);
  };
  // Descriptors. qh (32-byte swizzle): K is K-major, a k-step one box (sbo: the next 8 keys; lbo unused); V is
  // MN-major (sbo: the next 8 keys along the product's k, lbo: the next box of 16 dims). Transposed (128-byte
  // swizzle, rows of 128 bytes): K is MN-major (lbo: the next box of 64 keys, sbo: the next 8 dims along k; a
  // k-step 16 rows); V is K-major (sbo: the next 8 dims; a k-step 32 bytes along a row, 4 per box; lbo unused).
  auto issue_qk = [&](int t) {
    const uint32_t kb = k_stage(sbase, t);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      if constexpr (kT)
        wgmma_m64n128k16_rs_tb(s, qa[kc], gmma_desc(kb + kc * 16 * 128, kTBoxBytes, 8 * 128, kGmmaSwizzle128B), kc > 0);
      else
        wgmma_m64n128k16_rs(s, qa[kc], gmma_desc(kb + kc * kBoxBytes, 16, 8 * 32, kGmmaSwizzle32B), kc > 0);
    }
  };
  auto issue_pv = [&](int t) {
    const uint32_t vbase = v_stage(sbase, t);
#pragma unroll
    for (int kk = 0; kk < kWBK / 16; ++kk) {
      const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
      if constexpr (kT)
        wgmma_rs<NDT>(o, a, gmma_desc(vbase + (kk >> 2) * kTBoxBytes + (kk & 3) * 32, 16, 8 * 128, kGmmaSwizzle128B), 1);
      else
        wgmma_rs_tb<NDT>(o, a, gmma_desc(vbase + kk * 16 * 32, kBoxBytes, 8 * 32, kGmmaSwizzle32B), 1);
    }
  };
  // Online softmax over tile t's scores in s: exponentials in place, running max / sum updated; returns
  // the factors by which the output rows (g, g + 8) must be rescaled.
  auto softmax = [&](int t, float& c0, float& c1) {
    const int left = N - t * kWBK;  // keys of this tile that exist
    if (left < kWBK) {
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (8 * j + 2 * c4 + (e & 1) >= left) s[4 * j + e] = -INFINITY;
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
      mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // every tile holds at least one key < N: the maxima are finite
    const float mn0 = fmaxf(m0, mx0 * scale_log2), mn1 = fmaxf(m1, mx1 * scale_log2);
    c0 = ex2(m0 - mn0);  // 0 on the first tile (m = -inf)
    c1 = ex2(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      s[4 * j] = ex2(fmaf(s[4 * j], scale_log2, -mn0));
      s[4 * j + 1] = ex2(fmaf(s[4 * j + 1], scale_log2, -mn0));
      s[4 * j + 2] = ex2(fmaf(s[4 * j + 2], scale_log2, -mn1));
      s[4 * j + 3] = ex2(fmaf(s[4 * j + 3], scale_log2, -mn1));
      ps0 += s[4 * j] + s[4 * j + 1];
      ps1 += s[4 * j + 2] + s[4 * j + 3];
    }
    l0 = l0 * c0 + ps0;
    l1 = l1 * c1 + ps1;
  };
  auto rescale_and_pack = [&](float c0, float c1) {
#pragma unroll
    for (int j = 0; j < NDT; ++j) {
      o[4 * j] *= c0;
      o[4 * j + 1] *= c0;
      o[4 * j + 2] *= c1;
      o[4 * j + 3] *= c1;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      p[2 * j] = pack_bf16(s[4 * j], s[4 * j + 1]);
      p[2 * j + 1] = pack_bf16(s[4 * j + 2], s[4 * j + 3]);
    }
  };

  // tile 0's scores
  wait_full(0);
  reg_fence(s);
  wgmma_fence();
  issue_qk(0);
  wgmma_commit();
  reg_fence(s);
  wgmma_wait<0>();
  reg_fence(s);
  {
    float c0, c1;
    softmax(0, c0, c1);
    rescale_and_pack(c0, c1);
  }
  // Ping-pong (pingpong != 0): the two warpgroups take turns issuing their products (named barriers 1 and
  // 2, one per warpgroup's turn), so that one's exponentials run while the tensor cores work for the other.
  // Each barrier completes ntiles - 1 times: warpgroup 1 opens warpgroup 0's first turn, and neither hands
  // over after its last one.
  if (pingpong && wg == 1 && ntiles > 1) named_bar_arrive(1, 2 * 128);
  for (int t = 0; t + 1 < ntiles; ++t) {
    wait_full(t + 1);
    if (pingpong) named_bar_sync(1 + wg, 2 * 128);
    reg_fence(s);
    reg_fence(o);
    wgmma_fence();
    issue_qk(t + 1);
    wgmma_commit();
    issue_pv(t);
    wgmma_commit();
    if (pingpong && !(wg == 1 && t + 2 == ntiles)) named_bar_arrive(2 - wg, 2 * 128);
    reg_fence(s);
    reg_fence(o);
    wgmma_wait<1>();  // S of tile t + 1 (P.V of tile t may still run)
    reg_fence(s);
    float c0, c1;
    softmax(t + 1, c0, c1);
    wgmma_wait<0>();
    reg_fence(o);
    release(t);
    rescale_and_pack(c0, c1);
  }
  // the last tile's P.V
  reg_fence(o);
  wgmma_fence();
  issue_pv(ntiles - 1);
  wgmma_commit();
  reg_fence(o);
  wgmma_wait<0>();
  reg_fence(o);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.f / l0, i1 = 1.f / l1;
  const int64_t ld = (int64_t)heads * D;
  bf16* o0 = out + ((int64_t)img * N + ra) * ld + (int64_t)h * D + 2 * c4;
  bf16* o1 = out + ((int64_t)img * N + rb) * ld + (int64_t)h * D + 2 * c4;
#pragma unroll
  for (int j = 0; j < NDT; ++j) {
    const int col = j * 8 + 2 * c4;
    if (col >= D) continue;  // D is even: a pair is all in or all out
    float b0 = 0.f, b1 = 0.f;
    if constexpr (kT) b0 = vb[h * D + col], b1 = vb[h * D + col + 1];
    if (ra < N)
      *reinterpret_cast<__nv_bfloat162*>(o0 + j * 8) = __floats2bfloat162_rn(o[4 * j] * i0 + b0, o[4 * j + 1] * i0 + b1);
    if (rb < N)
      *reinterpret_cast<__nv_bfloat162*>(o1 + j * 8) =
          __floats2bfloat162_rn(o[4 * j + 2] * i1 + b0, o[4 * j + 3] * i1 + b1);
  }
#else
  __trap();
#endif
}

// A bf16 tensor map of `rank` dims (innermost first; strides in bytes of dims 1 .. rank - 1) with boxes written
// swizzled as wgmma reads them; parts of a box outside the tensor arrive as zeros. The driver's
// cuTensorMapEncodeTiled is looked up once.
static CUtensorMap bf16_tensor_map(const char* who, const bf16* base, int rank, const cuuint64_t* dims,
                                   const cuuint64_t* strides, const cuuint32_t* box, CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || !fn) {
      cudaGetLastError();
      throw std::runtime_error("vision_attention_wgmma: the driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<bf16*>(base), dims, strides, box,
                            estride, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string(who) + ": cuTensorMapEncodeTiled failed with " + std::to_string((int)r));
  return map;
}

// A 3-d tensor map over qh [3 * heads * n_img slices][N rows][80 dims] with boxes of 16 dims x 128 rows
// written 32-byte swizzled (wgmma's layout); rows past N arrive as zeros.
static CUtensorMap qkv_tensor_map(const bf16* qh, int n_img, int N, int heads) {
  const cuuint64_t dims[3] = {(cuuint64_t)kVisionDP, (cuuint64_t)N, (cuuint64_t)3 * n_img * heads};
  const cuuint64_t strides[2] = {(cuuint64_t)kVisionDP * 2, (cuuint64_t)N * kVisionDP * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {kWBoxDims, (cuuint32_t)kWBK, 1};
  return bf16_tensor_map("vision_attention_wgmma", qh, 3, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_32B);
}

// A 4-d tensor map over the transposed product [3 * heads][D][n_img][N] (dims innermost first: key, image, dim,
// stacked head) with boxes of 64 keys x 16 * KC dims written 128-byte swizzled; keys past N and dims past D
// arrive as zeros.
static CUtensorMap qkv_t_tensor_map(const bf16* qkv_t, int n_img, int N, int heads, int D, int KC) {
  const cuuint64_t R = (cuuint64_t)n_img * N;
  const cuuint64_t dims[4] = {(cuuint64_t)N, (cuuint64_t)n_img, (cuuint64_t)D, (cuuint64_t)3 * heads};
  const cuuint64_t strides[3] = {(cuuint64_t)N * 2, R * 2, (cuuint64_t)D * R * 2};  // bytes, dims 1 to 3
  const cuuint32_t box[4] = {(cuuint32_t)kTBoxKeys, 1, (cuuint32_t)(16 * KC), 1};
  return bf16_tensor_map("vision_attention_wgmma_t", qkv_t, 4, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B);
}

template <int NDT, bool kT>
static void launch_wgmma(bf16* out, const bf16* qh, const float* qb, const float* vb, int n_img, int N, int heads,
                         int D, float scale, cudaStream_t s) {
  static bool attr_set = false;  // per instantiation
  if (!attr_set) {
    CUDA_CHECK(cudaFuncSetAttribute(vision_attention_wgmma_kernel<NDT, kT>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kWSmem));
    attr_set = true;
  }
  const CUtensorMap map =
      kT ? qkv_t_tensor_map(qh, n_img, N, heads, D, (NDT + 1) / 2) : qkv_tensor_map(qh, n_img, N, heads);
  launch_k(vision_attention_wgmma_kernel<NDT, kT>, dim3((N + kWBQ - 1) / kWBQ, heads, n_img), kWThreads, kWSmem, s,
           out, qh, qb, vb, map, n_img, N, heads, D, scale * 1.4426950408889634f, vision_wgmma_pingpong());
  CUDA_LAUNCH_CHECK();
}

int& vision_wgmma_pingpong() {
  static int p = 1;  // on: 7 % faster at batch 1, 1 % at batch 8 (H100, 20:50 UTC)
  return p;
}

bool vision_attention_wgmma_available() {
#ifdef G3_HAVE_SM90A
  return device_cc() == 90;  // sm_90a code runs on compute capability 9.0 only
#else
  return false;
#endif
}

template <bool kT>
static void dispatch_wgmma(bf16* out, const bf16* q, const float* qb, const float* vb, int n_img, int N, int heads,
                           int D, float scale, cudaStream_t s) {
  switch ((D + 7) / 8) {
    case 1: return launch_wgmma<1, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 2: return launch_wgmma<2, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 3: return launch_wgmma<3, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 4: return launch_wgmma<4, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 5: return launch_wgmma<5, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 6: return launch_wgmma<6, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 7: return launch_wgmma<7, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 8: return launch_wgmma<8, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    case 9: return launch_wgmma<9, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
    default: return launch_wgmma<10, kT>(out, q, qb, vb, n_img, N, heads, D, scale, s);
  }
}

static void check_wgmma_args(const char* fn, int D) {
  if (D <= 0 || D > kVisionDP || D % 2)
    throw std::invalid_argument(std::string(fn) + ": head_dim must be even and <= 80, got " + std::to_string(D));
  if (!vision_attention_wgmma_available())
    throw std::runtime_error(std::string(fn) + ": needs a compute capability 9.0 GPU and a build with sm_90a");
}

void vision_attention_wgmma(bf16* out, const bf16* qh, int n_img, int N, int heads, int D, float scale,
                            cudaStream_t s) {
  check_wgmma_args("vision_attention_wgmma", D);
  if (n_img <= 0 || N <= 0 || heads <= 0) return;
  dispatch_wgmma<false>(out, qh, nullptr, nullptr, n_img, N, heads, D, scale, s);
}

void vision_attention_wgmma_t(bf16* out, const bf16* qkv_t, const float* q_bias, const float* v_bias, int n_img, int N,
                              int heads, int D, float scale, cudaStream_t s) {
  check_wgmma_args("vision_attention_wgmma_t", D);
  if (N % 8)
    throw std::invalid_argument("vision_attention_wgmma_t: the patch count must be a multiple of 8, got " +
                                std::to_string(N));
  if (n_img <= 0 || N <= 0 || heads <= 0) return;
  dispatch_wgmma<true>(out, qkv_t, q_bias, v_bias, n_img, N, heads, D, scale, s);
}

}  // namespace g3cuda
