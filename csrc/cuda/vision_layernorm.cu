// vision_layernorm.cu: SigLIP's LayerNorms (with bias), optionally fused with the residual add before
// them (x += delta + dbias: the biased output of the o or fc2 product), which saves a pass over the
// residual stream per norm. One warp per row; float32 statistics, two-pass variance. The residual stream x
// is float32, or bf16 (X = bf16: the sum is rounded once, and the norm reads the rounded value, as
// transformers' bf16 tower does).
//
// Main kernel (dim % 4 == 0, aligned pointers): the warp streams its row once with 16-byte accesses
// (4 elements of x: 16 bytes of float32 or 8 of bf16; 4 bf16 of delta; several accesses in flight) into shared memory (dim floats a
// warp), and the statistics and the normalisation read the row from there. The statistics are summed
// in the fallback kernel's order (lane l adds elements l, l + 32, ..., then the warp butterfly), and
// every element is computed by the same float32 expressions, so both kernels give identical results.
// The fallback (any dim; also rows too long for 48 KB of shared memory) keeps the row in L1.
#include "vision_kernels.cuh"

namespace g3cuda {

template <typename T, typename X>
__global__ void vision_layernorm_kernel(T* out, X* x, const bf16* delta, const float* dbias, const float* w,
                                        const float* b, int rows, int dim, float eps) {
  G3_PDL_ENTRY();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  X* xr = x + (int64_t)row * dim;
  float sum = 0.f;
  if (delta) {
    const bf16* dr = delta + (int64_t)row * dim;
    for (int i = lane; i < dim; i += 32) {
      const X v = from_f<X>(to_f(xr[i]) + (__bfloat162float(dr[i]) + dbias[i]));
      xr[i] = v;
      sum += to_f(v);
    }
  } else {
    for (int i = lane; i < dim; i += 32) sum += to_f(xr[i]);
  }
  const float mean = warp_sum(sum) / (float)dim;
  float ss = 0.f;
  for (int i = lane; i < dim; i += 32) {
    const float d = to_f(xr[i]) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_sum(ss) / (float)dim + eps);
  T* o = out + (int64_t)row * dim;
  for (int i = lane; i < dim; i += 32) o[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * w[i] + b[i]);
}

constexpr int kLnUnroll = 4;        // 16-byte chunks a lane has in flight per batch
constexpr int kLnSmemMax = 48 * 1024;  // the default dynamic shared memory limit of a block

template <typename T>
__device__ __forceinline__ void store4(T* p, float a, float b, float c, float d);
template <>
__device__ __forceinline__ void store4<float>(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
template <>
__device__ __forceinline__ void store4<bf16>(bf16* p, float a, float b, float c, float d) {
  uint2 u;
  *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(a, b);  // round to nearest, as from_f
  *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(c, d);
  *reinterpret_cast<uint2*>(p) = u;
}

// 4 consecutive elements of the residual stream: 16 bytes of float32 or 8 of bf16.
template <typename X> struct Vec4;
template <> struct Vec4<float> {
  using type = float4;
  __device__ static float4 to_f4(float4 v) { return v; }
  __device__ static float4 from_f4(float4 v) { return v; }
};
template <> struct Vec4<bf16> {
  using type = uint2;
  __device__ static float4 to_f4(uint2 u) {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  __device__ static uint2 from_f4(float4 v) {  // round to nearest, as from_f
    uint2 u;
    *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(v.z, v.w);
    return u;
  }
};

// Dynamic shared memory: (blockDim.x / 32) * dim floats. Chunk k of a row = elements 4k .. 4k + 3.
template <typename T, typename X>
__global__ void vision_layernorm_vec_kernel(T* out, X* x, const bf16* delta, const float* dbias, const float* w,
                                            const float* b, int rows, int dim, float eps) {
  using V = Vec4<X>;
  using XV = typename V::type;
  G3_PDL_ENTRY();
  extern __shared__ float4 ln_rows[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + warp;
  if (row >= rows) return;  // whole warps only; no block-wide synchronisation below
  const int nc = dim >> 2;
  float4* sr = ln_rows + (int64_t)warp * nc;
  XV* xr = reinterpret_cast<XV*>(x + (int64_t)row * dim);
  if (delta) {
    const uint2* dr = reinterpret_cast<const uint2*>(delta + (int64_t)row * dim);
    const float4* db = reinterpret_cast<const float4*>(dbias);
    for (int base = lane; base < nc; base += 32 * kLnUnroll) {
      XV xv[kLnUnroll];
      float4 bv[kLnUnroll];
      uint2 dv[kLnUnroll];
#pragma unroll
      for (int u = 0; u < kLnUnroll; ++u) {
        const int k = base + 32 * u;
        if (k < nc) {
          xv[u] = xr[k];
          dv[u] = dr[k];
          bv[u] = db[k];
        }
      }
#pragma unroll
      for (int u = 0; u < kLnUnroll; ++u) {
        const int k = base + 32 * u;
        if (k < nc) {
          const float2 d01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dv[u].x));
          const float2 d23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dv[u].y));
          const float4 xf = V::to_f4(xv[u]);
          float4 v;
          v.x = xf.x + (d01.x + bv[u].x);
          v.y = xf.y + (d01.y + bv[u].y);
          v.z = xf.z + (d23.x + bv[u].z);
          v.w = xf.w + (d23.y + bv[u].w);
          const XV r = V::from_f4(v);
          xr[k] = r;
          sr[k] = V::to_f4(r);  // the stored (rounded) value is what is normalised
        }
      }
    }
  } else {
    for (int base = lane; base < nc; base += 32 * kLnUnroll) {
      XV xv[kLnUnroll];
#pragma unroll
      for (int u = 0; u < kLnUnroll; ++u)
        if (base + 32 * u < nc) xv[u] = xr[base + 32 * u];
#pragma unroll
      for (int u = 0; u < kLnUnroll; ++u)
        if (base + 32 * u < nc) sr[base + 32 * u] = V::to_f4(xv[u]);
    }
  }
  __syncwarp();
  const float* s = reinterpret_cast<const float*>(sr);
  float sum = 0.f;
  for (int i = lane; i < dim; i += 32) sum += s[i];
  const float mean = warp_sum(sum) / (float)dim;
  float ss = 0.f;
  for (int i = lane; i < dim; i += 32) {
    const float d = s[i] - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(warp_sum(ss) / (float)dim + eps);
  T* o = out + (int64_t)row * dim;
  const float4* w4 = reinterpret_cast<const float4*>(w);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  for (int base = lane; base < nc; base += 32 * kLnUnroll) {
    float4 wv[kLnUnroll], bv[kLnUnroll];
#pragma unroll
    for (int u = 0; u < kLnUnroll; ++u) {
      const int k = base + 32 * u;
      if (k < nc) {
        wv[u] = w4[k];
        bv[u] = b4[k];
      }
    }
#pragma unroll
    for (int u = 0; u < kLnUnroll; ++u) {
      const int k = base + 32 * u;
      if (k < nc) {
        const float4 xv = sr[k];
        store4<T>(o + 4 * k, (xv.x - mean) * rstd * wv[u].x + bv[u].x, (xv.y - mean) * rstd * wv[u].y + bv[u].y,
                  (xv.z - mean) * rstd * wv[u].z + bv[u].z, (xv.w - mean) * rstd * wv[u].w + bv[u].w);
      }
    }
  }
}

static bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

template <typename T, typename X>
void vision_layernorm(T* out, X* x, const bf16* delta, const float* dbias, const float* w, const float* b,
                      int rows, int dim, float eps, cudaStream_t s) {
  if (rows <= 0) return;
  // The vector kernel: 16-byte accesses to w, b, dbias and a float x or out, 8-byte ones to delta and a bf16
  // x or out; with dim % 4 == 0 every row starts so aligned when the pointers are.
  int warps = dim > 0 ? (int)std::min<int64_t>(8, kLnSmemMax / ((int64_t)dim * 4)) : 0;
  const bool vec = !vision_force_scalar() && dim % 4 == 0 && warps >= 1 && aligned_to(x, sizeof(X) * 4) && aligned_to(w, 16) &&
                   aligned_to(b, 16) && aligned_to(out, sizeof(T) * 4) &&
                   (!delta || (aligned_to(delta, 8) && aligned_to(dbias, 16)));
  if (vec) {
    launch_k(vision_layernorm_vec_kernel<T, X>, (rows + warps - 1) / warps, warps * 32, (size_t)warps * dim * 4, s, out,
             x, delta, dbias, w, b, rows, dim, eps);
  } else {
    constexpr int kWarps = 8;
    launch_k(vision_layernorm_kernel<T, X>, (rows + kWarps - 1) / kWarps, kWarps * 32, 0, s, out, x, delta, dbias, w,
             b, rows, dim, eps);
  }
  CUDA_LAUNCH_CHECK();
}

template void vision_layernorm<float, float>(float*, float*, const bf16*, const float*, const float*, const float*, int,
                                             int, float, cudaStream_t);
template void vision_layernorm<bf16, float>(bf16*, float*, const bf16*, const float*, const float*, const float*, int,
                                            int, float, cudaStream_t);
template void vision_layernorm<float, bf16>(float*, bf16*, const bf16*, const float*, const float*, const float*, int,
                                            int, float, cudaStream_t);
template void vision_layernorm<bf16, bf16>(bf16*, bf16*, const bf16*, const float*, const float*, const float*, int,
                                           int, float, cudaStream_t);

}  // namespace g3cuda
