// vision_bias_act.cu: the elementwise steps after SigLIP's biased products (the products are cuBLAS with
// bf16 outputs): the q/k/v bias added while splitting the stacked product into per-head, zero-padded
// rows for the attention kernel; fc1's bias + gelu_tanh in place. (The o and fc2 biases are folded into
// the residual add of vision_layernorm.)
//
// Both are pure streams (read the product once, write once), so the main kernels move 16 bytes per
// access: each thread owns one 8-element column chunk (its bias chunk loaded once, its head/dim indices
// decoded once) and RT rows of it, all RT loads issued before any arithmetic; consecutive threads take
// consecutive chunks of a row (512-byte warp accesses). The per-element arithmetic is the scalar
// kernels' (float32 sum, the same gelu_tanh expression, round to nearest bf16), so the results are
// bit-identical to them. The scalar kernels remain for shapes or pointers the vector path cannot take
// (a row length or head dim not a multiple of 8, a pointer not 16-byte aligned).
#include <climits>
#include "vision_kernels.cuh"

namespace g3cuda {

static int grid_for(int64_t n) { return (int)std::min<int64_t>((n + 255) / 256, 65536); }
static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

constexpr int kRowsPerThread = 8;  // RT: rows (16-byte loads in flight) per thread in the vector kernels

// ---- q/k/v bias + split + pad ----

// One thread per element of qh [which][h][R rows][d], in qh's order (coalesced writes; reads coalesced along
// d). The fallback.
__global__ void vision_qkv_split_kernel(bf16* qh, const bf16* qkv, const float* bias, int R, int heads, int D,
                                        int64_t total) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int d = (int)(i % kVisionDP);
    const int64_t q = i / kVisionDP;
    const int r = (int)(q % R);
    const int t = (int)(q / R);  // stacked head t = which * heads + h
    float v = 0.f;
    if (d < D) {
      const int col = t * D + d;
      v = __bfloat162float(qkv[(int64_t)r * (3 * heads * D) + col]) + bias[col];
    }
    qh[i] = __float2bfloat16_rn(v);
  }
}

// 8 bf16 + 8 float32 biases -> 8 bf16 (float32 sum, round to nearest), as the scalar kernel per element.
__device__ __forceinline__ uint4 add_bias8(uint4 v, const float (&b)[8]) {
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = __bfloat1622float2(p[e]);
    p[e] = __floats2bfloat162_rn(f.x + b[2 * e], f.y + b[2 * e + 1]);
  }
  return v;
}

__device__ __forceinline__ void load_bias8(float (&b)[8], const float* bias) {
  const float4 b0 = reinterpret_cast<const float4*>(bias)[0], b1 = reinterpret_cast<const float4*>(bias)[1];
  b[0] = b0.x, b[1] = b0.y, b[2] = b0.z, b[3] = b0.w, b[4] = b1.x, b[5] = b1.y, b[6] = b1.z, b[7] = b1.w;
}

// Vector path (D % 8 == 0, 16-byte aligned pointers). Thread g: chunk j = g % cpr of the qkv rows
// (cpr = 3 * heads * D / 8 chunks a row; a chunk never straddles a head as D % 8 == 0) and rows
// [RT * (g / cpr), + RT). The thread writing a head's last chunk also writes its zero padding D..79.
template <int RT>
__global__ void __launch_bounds__(256) vision_qkv_split_vec_kernel(bf16* qh, const bf16* qkv, const float* bias,
                                                                   int Dc, int cpr, int R) {
  G3_PDL_ENTRY();
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned rg = g / (unsigned)cpr;
  const int j = (int)(g - rg * (unsigned)cpr);
  const int r0 = (int)rg * RT;
  if (r0 >= R) return;
  const int nr = min(RT, R - r0);
  const uint4* src = reinterpret_cast<const uint4*>(qkv) + (int64_t)r0 * cpr + j;
  uint4 v[RT];
#pragma unroll
  for (int k = 0; k < RT; ++k)
    if (k < nr) v[k] = src[(int64_t)k * cpr];
  float b[8];
  load_bias8(b, bias + (int64_t)j * 8);
  const int t = j / Dc, c = j - t * Dc;            // stacked head t = which * heads + h, chunk c in it
  // qh's rows of head t, all images, are contiguous: [R][kVisionDP] (vision_qh_slice)
  int64_t o = ((int64_t)t * R + r0) * kVisionDP + c * 8;
  const bool pad = c == Dc - 1;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int k = 0; k < RT; ++k) {
    if (k < nr) {
      *reinterpret_cast<uint4*>(qh + o) = add_bias8(v[k], b);
      if (pad)
        for (int p = 8; p < kVisionDP - c * 8; p += 8) *reinterpret_cast<uint4*>(qh + o + p) = zero;
      o += kVisionDP;
    }
  }
}

// ---- fc1 bias + gelu_tanh ----

__global__ void vision_bias_gelu_kernel(bf16* h, const float* bias, int64_t n, int cols) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    h[i] = __float2bfloat16_rn(gelu_tanh(__bfloat162float(h[i]) + bias[i % cols]));
}

// Vector path (cols % 8 == 0, 16-byte aligned pointers): thread g owns chunk j = g % cpr (cpr = cols / 8)
// of rows [RT * (g / cpr), + RT).
template <int RT>
__global__ void __launch_bounds__(256) vision_bias_gelu_vec_kernel(bf16* h, const float* bias, int rows, int cpr) {
  G3_PDL_ENTRY();
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned rg = g / (unsigned)cpr;
  const int j = (int)(g - rg * (unsigned)cpr);
  const int r0 = (int)rg * RT;
  if (r0 >= rows) return;
  const int nr = min(RT, rows - r0);
  uint4* p = reinterpret_cast<uint4*>(h) + (int64_t)r0 * cpr + j;
  uint4 v[RT];
#pragma unroll
  for (int k = 0; k < RT; ++k)
    if (k < nr) v[k] = p[(int64_t)k * cpr];
  float b[8];
  load_bias8(b, bias + (int64_t)j * 8);
#pragma unroll
  for (int k = 0; k < RT; ++k) {
    if (k < nr) {
      __nv_bfloat162* e2 = reinterpret_cast<__nv_bfloat162*>(&v[k]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(e2[e]);
        e2[e] = __floats2bfloat162_rn(gelu_tanh(f.x + b[2 * e]), gelu_tanh(f.y + b[2 * e + 1]));
      }
      p[(int64_t)k * cpr] = v[k];
    }
  }
}

// ---- launchers ----

void vision_qkv_bias_split(bf16* qh, const bf16* qkv, const float* bias, int n_img, int N, int heads, int D,
                           cudaStream_t s) {
  if (D > kVisionDP) throw std::invalid_argument("vision_qkv_bias_split: head_dim must be <= 80");
  const int64_t total = (int64_t)3 * n_img * heads * N * kVisionDP;
  if (total <= 0) return;
  const int64_t R = (int64_t)n_img * N, cpr = (int64_t)3 * heads * (D / 8);
  constexpr int RT = kRowsPerThread;
  const int64_t threads = cpr * ((R + RT - 1) / RT);
  if (!vision_force_scalar() && D % 8 == 0 && aligned16(qh) && aligned16(qkv) && aligned16(bias) &&
      threads + 256 <= INT_MAX) {
    launch_k(vision_qkv_split_vec_kernel<RT>, (int)((threads + 255) / 256), 256, 0, s, qh, qkv, bias, D / 8,
             (int)cpr, (int)R);
  } else {
    launch_k(vision_qkv_split_kernel, grid_for(total), 256, 0, s, qh, qkv, bias, (int)R, heads, D, total);
  }
  CUDA_LAUNCH_CHECK();
}

void vision_bias_gelu(bf16* h, const float* bias, int rows, int cols, cudaStream_t s) {
  const int64_t n = (int64_t)rows * cols;
  if (n <= 0) return;
  constexpr int RT = kRowsPerThread;
  const int64_t cpr = cols / 8, threads = cpr * (((int64_t)rows + RT - 1) / RT);
  if (!vision_force_scalar() && cols % 8 == 0 && aligned16(h) && aligned16(bias) && threads + 256 <= INT_MAX) {
    launch_k(vision_bias_gelu_vec_kernel<RT>, (int)((threads + 255) / 256), 256, 0, s, h, bias, rows, (int)cpr);
  } else {
    launch_k(vision_bias_gelu_kernel, grid_for(n), 256, 0, s, h, bias, n, cols);
  }
  CUDA_LAUNCH_CHECK();
}

}  // namespace g3cuda
