// vision_attention.cu: SigLIP's non-causal multi-head attention on tensor cores (mma.sync m16n8k16,
// bf16 in, float32 accumulation), flash style: a block takes 128 queries of one (image, head), 8 warps of
// 16 query rows; key/value tiles of 64 stream through shared memory, double-buffered with cp.async, and
// every warp keeps its scores, running max / sum and output in registers (online softmax in base 2).
// The input rows are already padded to 80 dims with zeros (vision_qkv_bias_split), so Q.K^T takes five
// k-steps of 16 over the padded rows and the padding adds nothing; P.V runs only over the n-tiles of 8
// that hold real dims (9 for SigLIP's 72). Fragments come from shared memory through ldmatrix (.trans
// for V); rows are padded by 16 bytes, which makes those loads conflict-free.
#include "vision_kernels.cuh"
#include "mma.cuh"

namespace g3cuda {

namespace {
constexpr int kBQ = 128, kBK = 64, kWarps = 8;
constexpr int kLD = kVisionDP + 8;  // shared-memory row, in bf16
constexpr int kChunks = kVisionDP / 8;  // 16-byte chunks per row
constexpr size_t kSmem = (size_t)(kBQ + 4 * kBK) * kLD * sizeof(bf16);  // Q, K[2], V[2]


// rows [r0, r0 + nrows) of a [N][kVisionDP] head slice -> shared [nrows][kLD]
template <int NROWS>
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int r0, int N) {
  for (int c = threadIdx.x; c < NROWS * kChunks; c += kWarps * 32) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = r0 + r < N;
    cp_async16(dst + r * kLD + cc * 8, src + (int64_t)(ok ? r0 + r : 0) * kVisionDP + cc * 8, ok);
  }
}
}  // namespace

// NDT: output n-tiles of 8 dims (ceil(D / 8)); KC: k-steps of 16 over the padded dims for Q.K^T.
template <int NDT>
__global__ void __launch_bounds__(kWarps * 32, 2) vision_attention_kernel(bf16* out, const bf16* qh, int n_img,
                                                                        int N, int heads, int D, float scale_log2) {
  G3_PDL_ENTRY();
  constexpr int KC = (NDT + 1) / 2;
  extern __shared__ uint4 smem_u4[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_u4);
  bf16* Ks = Qs + kBQ * kLD;  // [2][kBK][kLD]
  bf16* Vs = Ks + 2 * kBK * kLD;

  const int q0 = blockIdx.x * kBQ, h = blockIdx.y, img = blockIdx.z;
  const int64_t slice = (int64_t)N * kVisionDP;
  const bf16* Qg = qh + vision_qh_slice(0, h, img, heads, n_img) * slice;
  const bf16* Kg = qh + vision_qh_slice(1, h, img, heads, n_img) * slice;
  const bf16* Vg = qh + vision_qh_slice(2, h, img, heads, n_img) * slice;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;

  const int ntiles = (N + kBK - 1) / kBK;
  load_rows<kBQ>(Qs, Qg, q0, N);
  load_rows<kBK>(Ks, Kg, 0, N);
  load_rows<kBK>(Vs, Vg, 0, N);
  cp_async_commit();

  uint32_t qa[KC][4];
  float o[NDT][4];
#pragma unroll
  for (int i = 0; i < NDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < ntiles) {
      load_rows<kBK>(Ks + (buf ^ 1) * kBK * kLD, Kg, (t + 1) * kBK, N);
      load_rows<kBK>(Vs + (buf ^ 1) * kBK * kLD, Vg, (t + 1) * kBK, N);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t == 0) {
      // A fragments of this warp's 16 query rows, kept for every tile: matrices (rows 0-7 | 8-15) x
      // (dims +0 | +8), lane l addressing row (l & 7) + 8 * ((l >> 3) & 1), dim 8 * (l >> 4).
      const bf16* qp = Qs + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * kLD + 8 * (lane >> 4);
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) ldsm_x4(qa[kc], qp + kc * 16);
    }
    const bf16* Kb = Ks + buf * kBK * kLD;
    const bf16* Vb = Vs + buf * kBK * kLD;
    const int kb = t * kBK;

    // S = Q K^T [16 x 64] per warp. B fragments of two key n-tiles per ldmatrix.x4: matrices (keys +0 |
    // +8) x (dims +0 | +8) in the order b0(nt), b1(nt), b0(nt+1), b1(nt+1).
    float s[kBK / 8][4];
#pragma unroll
    for (int i = 0; i < kBK / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    const bf16* kp = Kb + ((lane & 7) + 8 * (lane >> 4)) * kLD + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int np = 0; np < kBK / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, kp + np * 16 * kLD + kc * 16);
        mma_bf16(s[2 * np], qa[kc], b[0], b[1]);
        mma_bf16(s[2 * np + 1], qa[kc], b[2], b[3]);
      }
    }
    // scale (base 2), mask keys past N, online softmax; rows g (e 0, 1) and g + 8 (e 2, 3)
    float mx0 = -INFINITY, mx1 = -INFINITY;
    const bool tail = kb + kBK > N;
#pragma unroll
    for (int nt = 0; nt < kBK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * scale_log2;
        if (tail && kb + nt * 8 + 2 * t4 + (e & 1) >= N) v = -INFINITY;
        s[nt][e] = v;
        if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // every tile holds at least one key < N, so the new maxima are finite
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float c0 = exp2f(m0 - mn0), c1 = exp2f(m1 - mn1);  // exp2(-inf) = 0 on the first tile
    m0 = mn0;
    m1 = mn1;
    float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBK / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - mn0);
      s[nt][1] = exp2f(s[nt][1] - mn0);
      s[nt][2] = exp2f(s[nt][2] - mn1);
      s[nt][3] = exp2f(s[nt][3] - mn1);
      ps0 += s[nt][0] + s[nt][1];
      ps1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * c0 + ps0;
    l1 = l1 * c1 + ps1;
#pragma unroll
    for (int dt = 0; dt < NDT; ++dt) {
      o[dt][0] *= c0;
      o[dt][1] *= c0;
      o[dt][2] *= c1;
      o[dt][3] *= c1;
    }
    // O += P V: P (bf16) as A fragments straight from the score registers; V B fragments through
    // ldmatrix.trans: matrices (keys +0 | +8) x (dims +0 | +8) in the order b0(dt), b1(dt), b0(dt+1), b1(dt+1).
    const bf16* vp = Vb + ((lane & 7) + 8 * ((lane >> 3) & 1)) * kLD + 8 * (lane >> 4);
#pragma unroll
    for (int kc2 = 0; kc2 < kBK / 16; ++kc2) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kc2][0], s[2 * kc2][1]), pack_bf16(s[2 * kc2][2], s[2 * kc2][3]),
                              pack_bf16(s[2 * kc2 + 1][0], s[2 * kc2 + 1][1]), pack_bf16(s[2 * kc2 + 1][2], s[2 * kc2 + 1][3])};
      const bf16* vk = vp + kc2 * 16 * kLD;
#pragma unroll
      for (int dp = 0; dp < NDT / 2; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, vk + dp * 16);
        mma_bf16(o[2 * dp], pa, b[0], b[1]);
        mma_bf16(o[2 * dp + 1], pa, b[2], b[3]);
      }
      if constexpr (NDT % 2) {
        // the last n-tile alone: lanes 0-15 address keys +0 | +8 at dims 8 * (NDT - 1)
        uint32_t b0, b1;
        ldsm_x2_t(b0, b1, Vb + (kc2 * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * kLD + 8 * (NDT - 1));
        mma_bf16(o[NDT - 1], pa, b0, b1);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.f / l0, i1 = 1.f / l1;
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
  const int64_t ld = (int64_t)heads * D;
  bf16* o0 = out + ((int64_t)img * N + r0) * ld + (int64_t)h * D + 2 * t4;
  bf16* o1 = out + ((int64_t)img * N + r1) * ld + (int64_t)h * D + 2 * t4;
#pragma unroll
  for (int dt = 0; dt < NDT; ++dt) {
    if (dt * 8 + 2 * t4 >= D) continue;  // D is even: a pair is all in or all out
    if (r0 < N) *reinterpret_cast<__nv_bfloat162*>(o0 + dt * 8) = __floats2bfloat162_rn(o[dt][0] * i0, o[dt][1] * i0);
    if (r1 < N) *reinterpret_cast<__nv_bfloat162*>(o1 + dt * 8) = __floats2bfloat162_rn(o[dt][2] * i1, o[dt][3] * i1);
  }
}

template <int NDT>
static void launch_vision_attention(bf16* out, const bf16* qh, int n_img, int N, int heads, int D, float scale,
                                    cudaStream_t s) {
  static bool attr_set = false;  // per instantiation
  if (!attr_set) {
    CUDA_CHECK(cudaFuncSetAttribute(vision_attention_kernel<NDT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)kSmem));
    attr_set = true;
  }
  launch_k(vision_attention_kernel<NDT>, dim3((N + kBQ - 1) / kBQ, heads, n_img), kWarps * 32, kSmem, s, out, qh,
           n_img, N, heads, D, scale * 1.4426950408889634f);
  CUDA_LAUNCH_CHECK();
}

int& vision_attention_mode() {
  static int m = 0;
  return m;
}

void vision_attention(bf16* out, const bf16* qh, int n_img, int N, int heads, int D, float scale, cudaStream_t s) {
  if (D <= 0 || D > kVisionDP || D % 2)
    throw std::invalid_argument("vision_attention: head_dim must be even and <= 80, got " + std::to_string(D));
  const int mode = vision_attention_mode();
  if (mode == 2 || (mode == 0 && vision_attention_wgmma_available()))
    return vision_attention_wgmma(out, qh, n_img, N, heads, D, scale, s);
  if (n_img <= 0 || N <= 0 || heads <= 0) return;
  // n-tiles of 8 output dims, rounded up to an instantiated count (the padded dims are zeros)
  const int ndt = (D + 7) / 8;
  if (ndt <= 2) launch_vision_attention<2>(out, qh, n_img, N, heads, D, scale, s);
  else if (ndt <= 4) launch_vision_attention<4>(out, qh, n_img, N, heads, D, scale, s);
  else if (ndt <= 6) launch_vision_attention<6>(out, qh, n_img, N, heads, D, scale, s);
  else if (ndt <= 8) launch_vision_attention<8>(out, qh, n_img, N, heads, D, scale, s);
  else if (ndt == 9) launch_vision_attention<9>(out, qh, n_img, N, heads, D, scale, s);
  else launch_vision_attention<10>(out, qh, n_img, N, heads, D, scale, s);
}

}  // namespace g3cuda
