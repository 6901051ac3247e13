// bench_cuda_kernels.cu: microbenchmarks of the CUDA kernels (csrc/cuda/kernels.cuh) at the real shapes of
// Gemma 3 270M, 1B, 4B, 12B and 27B, in the style of llm.c's dev/cuda benchmarks: every kernel first runs
// once on random inputs and is checked against its CPU twin (csrc/cpu, the reference backend) with the
// tolerances stated below; a failed check prints CHECK FAILED and the program exits 1 (after writing the
// JSON of what was measured so far). Then it is timed:
//   - inputs (and outputs) live in enough rotated copies to exceed twice the L2 cache (50 MB on an H100):
//     run i uses copy i % copies, so every run reads from HBM, as a decode step reads its weights;
//   - warm-up, then >= 50 timed runs (--runs), each between two CUDA events; a run is k back-to-back
//     launches (k chosen so that a run lasts >= 20 us; k = 1 for anything longer), each on the next copy;
//     the stream is held by a spinning kernel while the runs are queued, so host launch latency never
//     shows in the times; reported: the median per launch (and the minimum);
//   - bytes = the bytes the job must move (each input read once, each output written once);
//     flops = the arithmetic of the job (products and attention only);
//   - floor = max(bytes / copy bandwidth, flops / cuBLAS bf16 rate), both measured in this run:
//     cudaMemcpyAsync of 1 GiB device to device (bytes read + written) and an 8192^3 cublasGemmEx
//     (bf16 in, float32 out and accumulation, as the engine's products); "% floor" = floor / time.
// Side by side, where a library or a plainer launch sequence does the same job:
//   decode attention      vs cuBLAS batched Q.K^T + a softmax kernel + cuBLAS batched P.V
//   fused residual + norms vs separate rmsnorm, add and rmsnorm launches (simple kernels below)
//   batch-1 GEMV (and the GeGLU-fused GEMV) vs cublasGemmEx at M = 1 (+ the geglu kernel)
//   decode attention modes (tensor cores, warp-per-key, lanes-over-keys); many-block vs one-block argmax
//   vision attention      vs cuBLAS batched Q.K^T + the softmax kernel + cuBLAS batched P.V (per image)
//   fused residual + LayerNorm (vision) vs a bias + residual add kernel and the plain LayerNorm
//
//   bench_cuda_kernels [--sizes 270m,1b,4b,12b,27b,siglip] [--json out.json] [--quick] [--runs N] [--filter SUBSTR]
//
// "siglip" (in the default run, once): the vision encoder's kernels (csrc/cuda/vision_*.cu) at SigLIP-400M's
// shapes in Gemma 3, 1 and 8 images (--quick: 1); section "Vision encoder kernels" below, with its checks.
//
// Tolerances (those of tests/test_cuda_kernels.py): bf16 outputs within one bf16 ulp of the float32 CPU
// result rounded to bf16 (|got - r| <= 2^-7 |r| + 1e-6; reported in ulps, tolerance 1); float32 outputs
// max|got - ref| <= rtol * max(1, max|ref|) (2e-6 for norms and adds, 1e-6 soft-cap); products
// max|got - ref| / max(1e-3, max|ref|) <= max(1e-5, 4 sqrt(K) 2^-24) (the tests' K are <= 1600, where this
// is 1e-5; both sides sum K float32 products in different orders, cuBLAS in its own tiling, and the
// rounding error of a sum grows as sqrt(K) u: at the 4B down product, K = 10240, cuBLAS differs from the
// CPU's order by 1.03e-5, H100 2026-11-22); the GeGLU-fused products |got - ref| <= 2^-7 |ref| +
// 1e-5 max|ref|; attention in bf16 ||got - ref|| / ||ref|| <= 1e-2 (probabilities rounded to bf16 before
// P.V in the tensor-core kernel); KV-cache writes and gathers bit-exact; sampled ids identical. Vision
// (tests/test_cuda_vision.py): patch embedding max|d| <= 1e-5 max(1, max|ref|); LayerNorm bf16 one ulp, float32
// 2e-6, the fused residual add bit-exact; q/k/v split bit-exact; attention rel L2 <= 1e-2 and <= 3e-2 per row;
// bias + gelu and pool + RMSNorm one bf16 ulp; products as above (bf16 outputs: one ulp + the product tolerance).
#include <cublas_v2.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cuda/kernels.cuh"
#include "cuda/vision_kernels.cuh"

using g3cuda::bf16;
using g3cuda::SeqMeta;
using g3cuda::TokMeta;

namespace {

// ---- shapes --------------------------------------------------------------------------------------------
// Gemma 3 text decoders (/work/shared/GEMMA.md; config.json of each checkpoint). Global layers use RoPE
// base 1e6 (linear factor 8 from 4B up); local layers base 1e4 and the sliding window.
struct Shape {
  const char* name;
  int hidden, layers, heads, kv_heads, head_dim, ffn, window, vocab;
  float query_pre_attn_scalar, global_rope_factor;
  int qkv() const { return (heads + 2 * kv_heads) * head_dim; }
  int q_dim() const { return heads * head_dim; }
  float scale() const { return 1.f / std::sqrt(query_pre_attn_scalar); }
};
//   size   hidden layers heads kv  head_dim  ffn    window vocab    q_pre_attn rope factor
const Shape kShapes[] = {
    {"270m", 640, 18, 4, 1, 256, 2048, 512, 262144, 256.f, 1.f},
    {"1b", 1152, 26, 4, 1, 256, 6912, 512, 262144, 256.f, 1.f},
    {"4b", 2560, 34, 8, 4, 256, 10240, 1024, 262208, 256.f, 8.f},
    {"12b", 3840, 48, 16, 8, 256, 15360, 1024, 262208, 256.f, 8.f},
    {"27b", 5376, 62, 32, 16, 128, 21504, 1024, 262208, 168.f, 8.f},
};
constexpr float kEps = 1e-6f;
constexpr int kPrefill = 2048;  // tokens of one prefill chunk (bench/gpu/bench_e2e.py's long prompt)
constexpr int kDepth = 4096;    // cached positions of the decode attention benches (and 32768 without --quick)
constexpr double kRunUs = 20;   // a timed run lasts at least this long (k launches)

// ---- options and global state ----------------------------------------------------------------------------
int g_runs = 100;
bool g_quick = false;
std::string g_filter, g_json;
cudaStream_t g_s;
cublasHandle_t g_h;
int g_sms = 0;
size_t g_l2 = 50u << 20, g_budget = 0;
double g_copy_bw = 0, g_gemm_rate = 0;
std::string g_device;

#define CUBLAS_CHECK(x)                                                                              \
  do {                                                                                               \
    cublasStatus_t st_ = (x);                                                                        \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                              \
      std::fprintf(stderr, "cuBLAS error %d at %s:%d: %s\n", (int)st_, __FILE__, __LINE__, #x);      \
      std::exit(2);                                                                                  \
    }                                                                                                \
  } while (0)

std::string fmt(const char* f, ...) {
  char b[512];
  va_list a;
  va_start(a, f);
  std::vsnprintf(b, sizeof b, f, a);
  va_end(a);
  return b;
}
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// ---- device helpers: random fill, the stream hold, and the plain kernels of the side-by-side paths ---------
__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// p[i] = mean + scale * N(0, 1) from a hash of (seed, i): the same values on every run and machine.
template <typename T>
__global__ void fill_normal_kernel(T* p, size_t n, uint64_t seed, float scale, float mean) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const uint64_t u = mix64(seed ^ mix64(i));
    const float u1 = ((float)(u >> 40) + 0.5f) * (1.f / 16777216.f);
    const float u2 = ((float)(u & 0xffffffu) + 0.5f) * (1.f / 16777216.f);
    const float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    p[i] = g3cuda::from_f<T>(mean + scale * z);
  }
}
__global__ void fill_ids_kernel(int32_t* p, size_t n, uint64_t seed, int V) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = (int32_t)(mix64(seed ^ mix64(i)) % (uint64_t)V);
}

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// Holds the stream until the host has queued a batch of runs (flag >= gen), at most timeout_ns.
__global__ void hold_kernel(const volatile int* flag, int gen, unsigned long long timeout_ns, volatile int* timed_out) {
  const unsigned long long t0 = globaltimer();
  while (*flag < gen) {
    if (globaltimer() - t0 > timeout_ns) {
      *timed_out = 1;
      break;
    }
    __nanosleep(2000);
  }
}

// Unfused residual step: out = rmsnorm(x) * (1 + w) in float32 (one block per row), and resid += d.
__global__ void plain_rmsnorm_f32_kernel(float* out, const float* x, const float* w, int dim, float eps) {
  G3_PDL_ENTRY();
  __shared__ double sh[33];
  const float* xr = x + (int64_t)blockIdx.x * dim;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
  ss = g3cuda::block_sum(ss, sh);
  const float r = 1.f / sqrtf((float)(ss / dim) + eps);
  float* o = out + (int64_t)blockIdx.x * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (xr[i] * r) * (1.f + w[i]);
}
__global__ void plain_add_kernel(float* resid, const float* d, int64_t n) {
  G3_PDL_ENTRY();
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x)
    resid[k] += d[k];
}

// Softmax of the rows of S (float32, already scaled) into P (bf16, normalised): the middle of the cuBLAS
// decode-attention path. One block of 256 per row.
__global__ void softmax_rows_kernel(bf16* P, const float* S, int n) {
  G3_PDL_ENTRY();
  __shared__ float sh[32];
  const float* s = S + (int64_t)blockIdx.x * n;
  bf16* p = P + (int64_t)blockIdx.x * n;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, s[i]);
  m = g3cuda::warp_max(m);
  if (lane == 0) sh[w] = m;
  __syncthreads();
  m = sh[0];
  for (int i = 1; i < nw; ++i) m = fmaxf(m, sh[i]);
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __expf(s[i] - m);
  sum = g3cuda::warp_sum(sum);
  if (lane == 0) sh[w] = sum;
  __syncthreads();
  sum = 0.f;
  for (int i = 0; i < nw; ++i) sum += sh[i];
  const float inv = 1.f / sum;
  for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = __float2bfloat16_rn(__expf(s[i] - m) * inv);
}

// ---- buffers: a pool of rotated copies -------------------------------------------------------------------
// rot<T>(n): n elements per copy, `copies` copies; one<T>(n): a single buffer (weights shared by every run,
// metadata, workspaces). commit() picks copies so that the rotated bytes exceed 2 x L2 (at least 2 copies,
// within the memory budget), allocates and fills nothing; fill_*() fill every copy (each with its own values).
class Pool {
 public:
  struct Buf {
    size_t bytes, stride;
    bool rotated;
    char* base;
  };
  template <typename T>
  struct H {
    Pool* p;
    int i;
    size_t n;
    T* operator()(long r = 0) const {
      const Buf& b = p->bufs_[i];
      return reinterpret_cast<T*>(b.base + (b.rotated ? (size_t)(r % p->copies_) * b.stride : 0));
    }
    size_t total() const { return p->alloc_bytes(i) / sizeof(T); }  // elements over every copy
  };
  template <typename T> H<T> rot(size_t n) { return add<T>(n, true); }
  template <typename T> H<T> one(size_t n) { return add<T>(n, false); }

  void commit() {
    size_t per = 0, fixed = 0;
    for (auto& b : bufs_) (b.rotated ? per : fixed) += b.stride;
    copies_ = 1;
    if (per) {
      copies_ = (int)std::max<size_t>(2, (2 * g_l2 + per - 1) / per);
      while (copies_ > 1 && fixed + per * copies_ > g_budget) --copies_;
    }
    if (fixed + per * copies_ > g_budget)
      throw std::runtime_error(fmt("bench needs %.2f GB, over the budget of %.2f GB", (fixed + per * copies_) / 1e9,
                                   g_budget / 1e9));
    for (size_t i = 0; i < bufs_.size(); ++i) {
      void* p = nullptr;
      CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(alloc_bytes((int)i), 256)));
      bufs_[i].base = static_cast<char*>(p);
    }
  }
  int copies() const { return copies_; }
  size_t rotated_bytes() const {
    size_t per = 0;
    for (auto& b : bufs_) per += b.rotated ? b.stride : 0;
    return per * copies_;
  }
  ~Pool() {
    cudaStreamSynchronize(g_s);
    for (auto& b : bufs_)
      if (b.base) cudaFree(b.base);
  }

 private:
  template <typename T> H<T> add(size_t n, bool rotated) {
    bufs_.push_back({n * sizeof(T), (n * sizeof(T) + 255) / 256 * 256, rotated, nullptr});
    return {this, (int)bufs_.size() - 1, n};
  }
  size_t alloc_bytes(int i) const { return bufs_[i].rotated ? bufs_[i].stride * copies_ : bufs_[i].stride; }
  std::vector<Buf> bufs_;
  int copies_ = 1;
};

uint64_t g_seed = 1;
template <typename T>
void fill_normal(const Pool::H<T>& b, float scale, float mean = 0.f) {
  const size_t n = b.total();
  const int blocks = (int)std::min<size_t>((n + 255) / 256, 65536);
  fill_normal_kernel<T><<<blocks, 256, 0, g_s>>>(b(0), n, mix64(++g_seed), scale, mean);
  CUDA_CHECK(cudaGetLastError());
}
void fill_ids(const Pool::H<int32_t>& b, int V) {
  const size_t n = b.total();
  fill_ids_kernel<<<(int)std::min<size_t>((n + 255) / 256, 65536), 256, 0, g_s>>>(b(0), n, mix64(++g_seed), V);
  CUDA_CHECK(cudaGetLastError());
}

// Host copies (bf16 -> float).
template <typename T>
std::vector<float> d2h(const T* d, size_t n) {
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  std::vector<float> out(n);
  if constexpr (std::is_same<T, float>::value) {
    CUDA_CHECK(cudaMemcpy(out.data(), d, n * 4, cudaMemcpyDeviceToHost));
  } else if constexpr (std::is_same<T, bf16>::value) {
    std::vector<uint16_t> t(n);
    CUDA_CHECK(cudaMemcpy(t.data(), d, n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = g3::bf16_to_f32(t[i]);
  } else {
    std::vector<T> t(n);
    CUDA_CHECK(cudaMemcpy(t.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = (float)t[i];
  }
  return out;
}
template <typename T>
std::vector<T> d2h_raw(const T* d, size_t n) {
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  std::vector<T> t(n);
  CUDA_CHECK(cudaMemcpy(t.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return t;
}
template <typename T>
void h2d(T* d, const std::vector<T>& h) {
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}
void h2d_f32(float* d, const std::vector<float>& h) { h2d(d, h); }
// rows r0, r0 + stride, ... (nr of them, each `cols` bf16 wide) of a device matrix, as raw bf16 bits.
std::vector<uint16_t> d2h_rows_bf16(const bf16* d, int64_t r0, int64_t stride, int nr, int cols) {
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  std::vector<uint16_t> t((size_t)nr * cols);
  CUDA_CHECK(cudaMemcpy2D(t.data(), (size_t)cols * 2, d + r0 * cols, (size_t)stride * cols * 2, (size_t)cols * 2, nr,
                          cudaMemcpyDeviceToHost));
  return t;
}
float bf16r(float x) { return g3::bf16_to_f32(g3::f32_to_bf16(x)); }

// Metadata of one forward (SeqMeta + TokMeta) in one small device buffer.
struct Meta {
  SeqMeta seq;
  TokMeta tok;
};
Meta make_meta(const Pool::H<int32_t>& buf, const std::vector<int>& slot, const std::vector<int>& start,
               const std::vector<int>& len, const std::vector<int>& t0, const std::vector<int>& pos,
               const std::vector<int>& seqof) {
  std::vector<int32_t> h;
  for (auto* v : {&slot, &start, &len, &t0, &pos, &seqof}) h.insert(h.end(), v->begin(), v->end());
  if (h.size() > buf.n) throw std::logic_error("metadata buffer too small");
  h.resize(buf.n, 0);
  h2d(buf(0), h);
  const int32_t* p = buf(0);
  const size_t B = slot.size(), T = pos.size();
  Meta m;
  m.seq = SeqMeta{p, p + B, p + 2 * B, p + 3 * B};
  m.tok = TokMeta{p + 4 * B, p + 4 * B + T};
  return m;
}
// Every sequence b of B brings len tokens at positions start..start+len-1 (rows b*len..), slot b.
Meta uniform_meta(const Pool::H<int32_t>& buf, int B, int start, int len) {
  std::vector<int> slot(B), st(B, start), ln(B, len), t0(B), pos, sq;
  for (int b = 0; b < B; ++b) {
    slot[b] = b;
    t0[b] = b * len;
    for (int i = 0; i < len; ++i) pos.push_back(start + i), sq.push_back(b);
  }
  return make_meta(buf, slot, st, ln, t0, pos, sq);
}
size_t meta_ints(int B, int T) { return 4 * (size_t)B + 2 * (size_t)T; }

// ---- checks -------------------------------------------------------------------------------------------------
struct Err {
  double err = 0, tol = 0;
  std::string how;
};
Err worst(const Err& a, const Err& b) {
  const double ra = a.tol > 0 ? a.err / a.tol : (a.err > 0 ? 1e30 : 0);
  const double rb = b.tol > 0 ? b.err / b.tol : (b.err > 0 ? 1e30 : 0);
  return ra >= rb ? a : b;
}
// bf16 output vs the float32 reference: error in bf16 ulps of the rounded reference (tolerance 1).
Err cmp_bf16(const float* got, const float* ref, size_t n) {
  double e = 0;
  for (size_t i = 0; i < n; ++i) {
    const float r = bf16r(ref[i]);
    const double d = std::fabs((double)got[i] - r) / (std::ldexp(std::fabs((double)r), -7) + 1e-6);
    e = std::max(e, std::isfinite(got[i]) ? d : 1e30);
  }
  return {e, 1.0, "bf16 ulps"};
}
Err cmp_bf16(const std::vector<float>& g, const std::vector<float>& r) { return cmp_bf16(g.data(), r.data(), g.size()); }
Err cmp_f32(const std::vector<float>& got, const std::vector<float>& ref, double rtol) {
  double m = 1, d = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    m = std::max(m, (double)std::fabs(ref[i]));
    d = std::max(d, std::isfinite(got[i]) ? std::fabs((double)got[i] - ref[i]) : 1e30);
  }
  return {d / m, rtol, "max|d|/max(1,|ref|)"};
}
Err cmp_product(const std::vector<float>& got, const std::vector<float>& ref, int K) {
  double m = 1e-3, d = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    m = std::max(m, (double)std::fabs(ref[i]));
    d = std::max(d, std::isfinite(got[i]) ? std::fabs((double)got[i] - ref[i]) : 1e30);
  }
  return {d / m, std::max(1e-5, 4.0 * std::sqrt((double)K) * std::ldexp(1.0, -24)), "max|d|/max|ref|"};
}
Err cmp_rel_l2(const std::vector<float>& got, const std::vector<float>& ref, double tol) {
  double d = 0, n = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::isfinite(got[i]) ? (double)got[i] - ref[i] : 1e30;
    d += e * e;
    n += (double)ref[i] * ref[i];
  }
  return {std::sqrt(d / std::max(n, 1e-30)), tol, "rel L2"};
}
template <typename A, typename B>
Err cmp_exact(const std::vector<A>& got, const std::vector<B>& ref) {
  double bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += !((double)got[i] == (double)ref[i]);
  return {bad, 0.0, "mismatches"};
}

// ---- results -----------------------------------------------------------------------------------------------
struct Row {
  std::string kernel, model, shape, variant, group;
  double us = 0, us_min = 0, bytes = 0, flops = 0;
  Err err;
  int k = 1, copies = 1;
  double rotated_mb = 0;
  bool hold_timeout = false;
};
std::vector<Row> g_rows;
std::string g_failed;

// A JSON number (null where it is not finite).
std::string jnum(double x) { return std::isfinite(x) ? fmt("%.6g", x) : std::string("null"); }

void write_json() {
  if (g_json.empty()) return;
  FILE* f = std::fopen(g_json.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", g_json.c_str());
    return;
  }
  std::fprintf(f,
               "{\"device\": \"%s\", \"sms\": %d, \"l2_bytes\": %zu, \"copy_bw\": %s, \"gemm_rate\": %s, "
               "\"runs\": %d, \"quick\": %s, \"pdl\": %d, \"failed\": \"%s\", \"results\": [\n",
               g_device.c_str(), g_sms, g_l2, jnum(g_copy_bw).c_str(), jnum(g_gemm_rate).c_str(), g_runs,
               g_quick ? "true" : "false", g3cuda::pdl_flag(), g_failed.c_str());
  for (size_t i = 0; i < g_rows.size(); ++i) {
    const Row& r = g_rows[i];
    const double t_mem = r.bytes / g_copy_bw, t_math = r.flops / g_gemm_rate, t = r.us * 1e-6;
    const double floor = std::max(t_mem, t_math);
    std::fprintf(f,
                 "  {\"kernel\": \"%s\", \"model\": \"%s\", \"shape\": \"%s\", \"variant\": \"%s\", "
                 "\"group\": \"%s\", \"us\": %s, \"us_min\": %s, \"bytes\": %s, \"flops\": %s, \"gbps\": %s, "
                 "\"tflops\": %s, \"bound\": \"%s\", \"floor_us\": %s, \"pct_floor\": %s, \"err\": %s, "
                 "\"tol\": %s, \"check\": \"%s\", \"k\": %d, \"copies\": %d, \"rotated_mb\": %s, "
                 "\"hold_timeout\": %s}%s\n",
                 r.kernel.c_str(), r.model.c_str(), r.shape.c_str(), r.variant.c_str(), r.group.c_str(),
                 jnum(r.us).c_str(), jnum(r.us_min).c_str(), jnum(r.bytes).c_str(), jnum(r.flops).c_str(),
                 jnum(r.bytes / t / 1e9).c_str(), jnum(r.flops / t / 1e12).c_str(), t_math > t_mem ? "compute" : "memory",
                 jnum(floor * 1e6).c_str(), jnum(100.0 * floor / t).c_str(), jnum(r.err.err).c_str(),
                 jnum(r.err.tol).c_str(), r.err.how.c_str(), r.k, r.copies, jnum(r.rotated_mb).c_str(),
                 r.hold_timeout ? "true" : "false", i + 1 < g_rows.size() ? "," : "");
  }
  std::fprintf(f, "]}\n");
  std::fclose(f);
}

void require(const std::string& what, const Err& e) {
  if (e.err <= e.tol) return;
  g_failed = fmt("%s: %s %.3g > %.3g", what.c_str(), e.how.c_str(), e.err, e.tol);
  std::fprintf(stderr, "CHECK FAILED: %s\n", g_failed.c_str());
  write_json();
  std::exit(1);
}

// ---- timing --------------------------------------------------------------------------------------------------
struct Timer {
  std::vector<cudaEvent_t> ev;
  volatile int* h_flag = nullptr;
  volatile int* h_timeout = nullptr;
  int* d_flag = nullptr;
  int* d_timeout = nullptr;
  int gen = 0;
  void* flush = nullptr;
  void init(int max_runs) {
    ev.resize(2 * max_runs + 2);
    for (auto& e : ev) CUDA_CHECK(cudaEventCreate(&e));
    int* p;
    CUDA_CHECK(cudaHostAlloc(&p, 2 * sizeof(int), cudaHostAllocMapped));
    p[0] = p[1] = 0;
    h_flag = p;
    h_timeout = p + 1;
    CUDA_CHECK(cudaHostGetDevicePointer(&d_flag, p, 0));
    d_timeout = d_flag + 1;
    CUDA_CHECK(cudaMalloc(&flush, 2 * g_l2));
  }
  void hold() {
    ++gen;
    hold_kernel<<<1, 1, 0, g_s>>>(d_flag, gen, 1000000000ull, d_timeout);
    CUDA_CHECK(cudaGetLastError());
  }
  void release() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    *h_flag = gen;
  }
  float ms(int i) {
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]));
    return t;
  }
} g_timer;

struct Timing {
  double us, us_min;
  int k;
  bool timeout;
};

// fn(r): the launches of one job on rotated copy r (r counts up over warm-up and runs).
Timing time_it(const std::function<void(long)>& fn, int runs = 0) {
  if (runs <= 0) runs = g_runs;
  Timer& T = g_timer;
  long r = 0;
  *T.h_timeout = 0;
  for (int i = 0; i < 3; ++i) fn(r++);  // warm-up (and first-call set-up inside cuBLAS)
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  T.hold();
  CUDA_CHECK(cudaEventRecord(T.ev[0], g_s));
  for (int i = 0; i < 5; ++i) fn(r++);
  CUDA_CHECK(cudaEventRecord(T.ev[1], g_s));
  T.release();
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  const double est_us = std::max(1e-3, 1e3 * T.ms(0) / 5);
  const int k = (int)std::min<double>(64, std::max(1.0, std::ceil(kRunUs / est_us)));
  CUDA_CHECK(cudaMemsetAsync(T.flush, (int)(r & 0xff), 2 * g_l2, g_s));  // nothing of the inputs left in L2
  const int per_hold = std::max(1, 256 / k);
  for (int done = 0; done < runs;) {
    const int n = std::min(per_hold, runs - done);
    T.hold();
    for (int i = done; i < done + n; ++i) {
      CUDA_CHECK(cudaEventRecord(T.ev[2 * i], g_s));
      for (int j = 0; j < k; ++j) fn(r++);
      CUDA_CHECK(cudaEventRecord(T.ev[2 * i + 1], g_s));
    }
    T.release();
    done += n;
  }
  CUDA_CHECK(cudaStreamSynchronize(g_s));
  std::vector<double> t(runs);
  for (int i = 0; i < runs; ++i) t[i] = 1e3 * T.ms(i) / k;
  std::sort(t.begin(), t.end());
  return {t[runs / 2], t[0], k, *T.h_timeout != 0};
}

bool selected(const char* kernel) { return g_filter.empty() || std::string(kernel).find(g_filter) != std::string::npos; }

void report(const std::string& kernel, const Shape& s, const std::string& shape, const std::string& variant,
            const Timing& t, double bytes, double flops, const Err& err, const Pool& pool) {
  Row r;
  r.kernel = kernel;
  r.model = s.name;
  r.shape = shape;
  r.variant = variant;
  r.group = kernel + " " + s.name + " " + shape;
  r.us = t.us;
  r.us_min = t.us_min;
  r.bytes = bytes;
  r.flops = flops;
  r.err = err;
  r.k = t.k;
  r.copies = pool.copies();
  r.rotated_mb = pool.rotated_bytes() / 1e6;
  r.hold_timeout = t.timeout;
  const double t_mem = bytes / g_copy_bw, t_math = flops / g_gemm_rate, sec = t.us * 1e-6;
  const bool math = t_math > t_mem;
  std::printf("%-18s %-5s %-30s %-24s %9.2f us  %8.1f %-6s %5.1f%% floor  err %.2g/%.2g %s%s\n", kernel.c_str(),
              s.name, shape.c_str(), variant.c_str(), t.us, math ? flops / sec / 1e12 : bytes / sec / 1e9,
              math ? "TFLOPS" : "GB/s", 100.0 * std::max(t_mem, t_math) / sec, err.err, err.tol, err.how.c_str(),
              t.timeout ? "  [host fell behind: times include launch gaps]" : "");
  std::fflush(stdout);
  g_rows.push_back(r);
}

// ---- floors ----------------------------------------------------------------------------------------------------
double measure_copy_bw() {
  const size_t n = (size_t)1 << 30;
  void *a, *b;
  CUDA_CHECK(cudaMalloc(&a, n));
  CUDA_CHECK(cudaMalloc(&b, n));
  CUDA_CHECK(cudaMemsetAsync(a, 1, n, g_s));
  const Timing t =
      time_it([&](long) { CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, g_s)); }, g_quick ? 10 : 20);
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  return 2.0 * n / (t.us * 1e-6);
}

double measure_gemm_rate() {
  const int n = 8192;
  bf16 *a, *b;
  float* c;
  CUDA_CHECK(cudaMalloc(&a, (size_t)n * n * 2));
  CUDA_CHECK(cudaMalloc(&b, (size_t)n * n * 2));
  CUDA_CHECK(cudaMalloc(&c, (size_t)n * n * 4));
  fill_normal_kernel<bf16><<<4096, 256, 0, g_s>>>(a, (size_t)n * n, 11, 1.f, 0.f);
  fill_normal_kernel<bf16><<<4096, 256, 0, g_s>>>(b, (size_t)n * n, 12, 1.f, 0.f);
  const float one = 1.f, zero = 0.f;
  const Timing t = time_it(
      [&](long) {
        CUBLAS_CHECK(cublasGemmEx(g_h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n,
                                  &zero, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      },
      g_quick ? 10 : 20);
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  CUDA_CHECK(cudaFree(c));
  return 2.0 * n * n * (double)n / (t.us * 1e-6);
}

// ==============================================================================================================
// Text decoder kernels
// ==============================================================================================================

// embedding_rmsnorm: x[t] = table[ids[t]] * sqrt(H) (f32) and the first layer's input norm (bf16).
void bench_embedding(const Shape& s, int T) {
  const int H = s.hidden, V = s.vocab;
  Pool p;
  auto table = p.one<bf16>((size_t)V * H);
  auto w = p.one<float>(H);
  auto ids = p.rot<int32_t>(T);
  auto x = p.rot<float>((size_t)T * H);
  auto xn = p.rot<bf16>((size_t)T * H);
  p.commit();
  fill_normal(table, 1.f);
  fill_normal(w, 0.3f);
  fill_ids(ids, V);
  const float scale = bf16r(std::sqrt((float)H));
  auto run = [&](long r) { g3cuda::embedding_rmsnorm<bf16>(x(r), xn(r), table(), ids(r), T, H, scale, w(), kEps, g_s); };
  run(0);
  // reference: the rows of the ids, embedding_cpu + rmsnorm_cpu
  const auto id = d2h_raw(ids(0), T);
  std::vector<uint16_t> rows((size_t)T * H);
  for (int t = 0; t < T; ++t)
    CUDA_CHECK(cudaMemcpy(rows.data() + (size_t)t * H, table() + (size_t)id[t] * H, (size_t)H * 2, cudaMemcpyDeviceToHost));
  std::vector<int32_t> idx(T);
  for (int t = 0; t < T; ++t) idx[t] = t;
  std::vector<float> rx((size_t)T * H), rxn((size_t)T * H);
  g3::embedding_cpu(rx.data(), g3::WeightView{rows.data(), g3::DType::BF16, T, H}, idx.data(), T, scale);
  const auto hw = d2h(w(), H);
  g3::rmsnorm_cpu(rxn.data(), H, rx.data(), H, hw.data(), T, H, kEps);
  const std::string shape = fmt("T=%d H=%d", T, H);
  const Err e = worst(cmp_exact(d2h(x(0), (size_t)T * H), rx), cmp_bf16(d2h(xn(0), (size_t)T * H), rxn));
  require("embedding_rmsnorm " + shape, e);
  const double bytes = 4.0 * T + 2.0 * T * H + 4.0 * H + 4.0 * T * H + 2.0 * T * H;
  report("embedding_rmsnorm", s, shape, "ours", time_it(run), bytes, 0, e, p);
}

// gather_last_rows: each sequence's last row (before the LM head of a prefill).
void bench_gather_last_rows(const Shape& s) {
  const int H = s.hidden, B = 4, len = kPrefill / B;
  Pool p;
  auto in = p.rot<bf16>((size_t)kPrefill * H);
  auto out = p.rot<bf16>((size_t)B * H);
  auto mb = p.one<int32_t>(meta_ints(B, kPrefill));
  p.commit();
  fill_normal(in, 1.f);
  const Meta m = uniform_meta(mb, B, 0, len);
  auto run = [&](long r) { g3cuda::gather_last_rows<bf16>(out(r), in(r), m.seq, B, H, g_s); };
  run(0);
  const auto hin = d2h(in(0), (size_t)kPrefill * H);
  std::vector<float> ref((size_t)B * H);
  for (int b = 0; b < B; ++b)
    std::copy_n(hin.begin() + (size_t)(b * len + len - 1) * H, H, ref.begin() + (size_t)b * H);
  const std::string shape = fmt("B=%d of T=%d H=%d", B, kPrefill, H);
  const Err e = cmp_exact(d2h(out(0), (size_t)B * H), ref);
  require("gather_last_rows " + shape, e);
  report("gather_last_rows", s, shape, "ours", time_it(run), 4.0 * B * H + 16.0 * B, 0, e, p);
}

// rmsnorm: out (bf16) = rmsnorm(x) * (1 + w).
void bench_rmsnorm(const Shape& s, int rows) {
  const int H = s.hidden;
  Pool p;
  auto w = p.one<float>(H);
  auto x = p.rot<float>((size_t)rows * H);
  auto out = p.rot<bf16>((size_t)rows * H);
  p.commit();
  fill_normal(w, 0.3f);
  fill_normal(x, 1.f);
  auto run = [&](long r) { g3cuda::rmsnorm<bf16>(out(r), x(r), w(), rows, H, kEps, g_s); };
  run(0);
  const auto hx = d2h(x(0), (size_t)rows * H), hw = d2h(w(), H);
  std::vector<float> ref(hx.size());
  g3::rmsnorm_cpu(ref.data(), H, hx.data(), H, hw.data(), rows, H, kEps);
  const std::string shape = fmt("rows=%d H=%d", rows, H);
  const Err e = cmp_bf16(d2h(out(0), ref.size()), ref);
  require("rmsnorm " + shape, e);
  report("rmsnorm", s, shape, "ours", time_it(run), 4.0 * rows * H + 4.0 * H + 2.0 * rows * H, 0, e, p);
}

// residual_rmsnorm: resid += rmsnorm(delta) * (1 + post_w); out = rmsnorm(resid) * (1 + next_w). Side by side:
// the same job as three launches (rmsnorm to float32, add, rmsnorm).
void bench_residual_rmsnorm(const Shape& s, int rows) {
  const int H = s.hidden;
  const size_t n = (size_t)rows * H;
  Pool p;
  auto post = p.one<float>(H);
  auto next = p.one<float>(H);
  auto resid = p.rot<float>(n);
  auto delta = p.rot<float>(n);
  auto out = p.rot<bf16>(n);
  auto tmp = p.rot<float>(n);
  p.commit();
  fill_normal(post, 0.3f);
  fill_normal(next, 0.3f);
  fill_normal(resid, 1.f);
  fill_normal(delta, 1.f);
  auto fused = [&](long r) {
    g3cuda::residual_rmsnorm<bf16>(resid(r), out(r), delta(r), post(), next(), rows, H, kEps, g_s);
  };
  auto unfused = [&](long r) {
    g3cuda::launch_k(plain_rmsnorm_f32_kernel, rows, 256, 0, g_s, tmp(r), (const float*)delta(r), (const float*)post(),
                     H, kEps);
    const int blocks = (int)std::min<size_t>((n + 255) / 256, (size_t)g_sms * 16);
    g3cuda::launch_k(plain_add_kernel, blocks, 256, 0, g_s, resid(r), (const float*)tmp(r), (int64_t)n);
    g3cuda::rmsnorm<bf16>(out(r), resid(r), next(), rows, H, kEps, g_s);
  };
  const auto r0 = d2h(resid(0), n), d0 = d2h(delta(0), n), hp = d2h(post(), H), hn = d2h(next(), H);
  std::vector<float> rr = r0, ro(n);
  g3::residual_rmsnorm_cpu(rr.data(), ro.data(), d0.data(), hp.data(), hn.data(), rows, H, kEps);
  const std::string shape = fmt("rows=%d H=%d", rows, H);
  Err e[2];
  for (int v = 0; v < 2; ++v) {
    h2d_f32(resid(0), r0);
    (v == 0 ? std::function<void(long)>(fused) : std::function<void(long)>(unfused))(0);
    e[v] = worst(cmp_f32(d2h(resid(0), n), rr, 2e-6), cmp_bf16(d2h(out(0), n), ro));
    require(fmt("residual_rmsnorm %s (%s)", shape.c_str(), v ? "unfused" : "fused"), e[v]);
  }
  const double bytes = 4.0 * n * 3 + 2.0 * n + 8.0 * H;  // resid read + written, delta read, out written
  report("residual_rmsnorm", s, shape, "ours", time_it(fused), bytes, 0, e[0], p);
  report("residual_rmsnorm", s, shape, "unfused: rmsnorm+add+rmsnorm", time_it(unfused), bytes, 0, e[1], p);
}

// RoPE's inverse frequencies as the engine computes them on the host (float32).
std::vector<float> rope_inv_freq(int D, float theta, float factor) {
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[i] = (1.f / std::pow(theta, (float)(2 * i) / (float)D)) / factor;
  return inv;
}

// The reference of qk_rope_kv's work for T tokens at positions start.. from their float32 qkv rows [T, QKV]
// (qk_norm_cpu, rope_cpu), split into q [T, NH, D], k and v [T, KVH, D]; and the check of a kernel's outputs
// against it: q, k, v within one bf16 ulp, the cache rows of the tokens (slot pos % cap) equal to k and v.
struct QkvRef {
  std::vector<float> q, k, v;
};
QkvRef qk_rope_ref(std::vector<float> rows, const Shape& s, int T, int start, const std::vector<float>& qw,
                   const std::vector<float>& kw, float theta, float factor) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, QKV = s.qkv();
  std::vector<int32_t> pos(T);
  for (int t = 0; t < T; ++t) pos[t] = start + t;
  g3::qk_norm_cpu(rows.data(), QKV, qw.data(), T, NH, D, kEps);
  g3::qk_norm_cpu(rows.data() + NH * D, QKV, kw.data(), T, KVH, D, kEps);
  g3::rope_cpu(rows.data(), QKV, pos.data(), T, NH, D, theta, factor);
  g3::rope_cpu(rows.data() + NH * D, QKV, pos.data(), T, KVH, D, theta, factor);
  QkvRef r;
  for (int t = 0; t < T; ++t) {
    const float* row = rows.data() + (size_t)t * QKV;
    r.q.insert(r.q.end(), row, row + NH * D);
    r.k.insert(r.k.end(), row + NH * D, row + (NH + KVH) * D);
    r.v.insert(r.v.end(), row + (NH + KVH) * D, row + QKV);
  }
  return r;
}
Err check_qk_rope(const QkvRef& r, const bf16* q, const bf16* kn, const bf16* vn, const bf16* kc, const bf16* vc,
                  int T, int start, int cap, int KVH, int D) {
  const auto gk = d2h(kn, r.k.size()), gv = d2h(vn, r.v.size());
  const auto gkc = d2h(kc, (size_t)KVH * cap * D), gvc = d2h(vc, (size_t)KVH * cap * D);
  std::vector<float> ck, cv;  // the cache rows of the tokens, in knew's layout
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < KVH; ++h) {
      const size_t o = ((size_t)h * cap + (start + t) % cap) * D;
      ck.insert(ck.end(), gkc.begin() + o, gkc.begin() + o + D);
      cv.insert(cv.end(), gvc.begin() + o, gvc.begin() + o + D);
    }
  const Err e = worst(cmp_bf16(d2h(q, r.q.size()), r.q), worst(cmp_bf16(gk, r.k), cmp_bf16(gv, r.v)));
  return worst(e, worst(cmp_exact(ck, gk), cmp_exact(cv, gv)));
}

// The buffers qk_rope_kv's work reads and writes, for T tokens at positions start.. of a global layer (cache of
// cap positions), shared by the qk_rope_kv and gemv_qkv_rope benchmarks: allocated in the pool before its commit,
// filled by init() after it; ref() and check() as qk_rope_ref / check_qk_rope on them.
struct QkRopeBufs {
  int NH, KVH, D, T, start, cap;
  float theta = 1e6f, factor;
  Pool::H<float> qw, kw, inv;
  Pool::H<int32_t> mb;
  Pool::H<bf16> q, kn, vn, kc, vc;
  QkRopeBufs(Pool& p, const Shape& s, int T_, int start_, int cap_)
      : NH(s.heads), KVH(s.kv_heads), D(s.head_dim), T(T_), start(start_), cap(cap_), factor(s.global_rope_factor),
        qw(p.one<float>(D)), kw(p.one<float>(D)), inv(p.one<float>(D / 2)), mb(p.one<int32_t>(meta_ints(1, T))),
        q(p.rot<bf16>((size_t)T * NH * D)), kn(p.rot<bf16>((size_t)T * KVH * D)), vn(p.rot<bf16>((size_t)T * KVH * D)),
        kc(p.rot<bf16>((size_t)KVH * cap * D)), vc(p.rot<bf16>((size_t)KVH * cap * D)) {}
  Meta init() {
    fill_normal(qw, 0.3f);
    fill_normal(kw, 0.3f);
    h2d(inv(), rope_inv_freq(D, theta, factor));
    return uniform_meta(mb, 1, start, T);
  }
  QkvRef ref(std::vector<float> rows, const Shape& s) const {
    return qk_rope_ref(std::move(rows), s, T, start, d2h(qw(), D), d2h(kw(), D), theta, factor);
  }
  Err check(const QkvRef& r) const { return check_qk_rope(r, q(0), kn(0), vn(0), kc(0), vc(0), T, start, cap, KVH, D); }
};

// qk_rope_kv: QK-norm + RoPE of q and k from the stacked qkv product, the cast to bf16 and the cache write
// (a global layer: every token straight into the cache).
void bench_qk_rope_kv(const Shape& s, int T, int start) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, QKV = s.qkv(), cap = start + T;
  Pool p;
  QkRopeBufs b(p, s, T, start, cap);
  auto qkv = p.rot<float>((size_t)T * QKV);
  p.commit();
  const Meta m = b.init();
  fill_normal(qkv, 2.f);
  auto run = [&](long r) {
    g3cuda::qk_rope_kv<bf16>(b.q(r), b.kn(r), b.vn(r), b.kc(r), b.vc(r), qkv(r), b.qw(), b.kw(), b.inv(), m.tok, m.seq,
                             T, NH, KVH, D, cap, false, kEps, g_s);
  };
  run(0);
  const std::string shape = fmt("T=%d pos=%d NH=%d KVH=%d D=%d", T, start, NH, KVH, D);
  const Err e = b.check(b.ref(d2h(qkv(0), (size_t)T * QKV), s));
  require("qk_rope_kv " + shape, e);
  const double bytes = 4.0 * T * QKV + 8.0 * D + 2.0 * D + 8.0 * T + 2.0 * T * NH * D + 8.0 * T * KVH * D;
  report("qk_rope_kv", s, shape, "ours", time_it(run), bytes, 0, e, p);
}

// gemv_qkv_rope: the decode step's qkv product with QK-norm, RoPE and the cache write in one kernel (a
// cluster per head; sm_90), one token at position kDepth of a global layer. Checked against the CPU kernels
// (matmul_cpu on the same bf16 x and W, qk_norm_cpu, rope_cpu): q, k, v within one bf16 ulp, the cache rows
// equal to k / v; timed against the two launches it replaces (the GEMV, then qk_rope_kv).
void bench_gemv_qkv_rope(const Shape& s) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, QKV = s.qkv(), K = s.hidden, start = kDepth;
  const int cap = start + 1;
  if (!g3cuda::gemv_qkv_rope_supported(1, K, D)) {
    std::printf("  gemv_qkv_rope: not supported here (K=%d D=%d)\n", K, D);
    return;
  }
  Pool p;
  QkRopeBufs b(p, s, 1, start, cap);
  auto x = p.rot<bf16>(K);
  auto w = p.rot<bf16>((size_t)QKV * K);
  auto qkv = p.rot<float>(QKV);
  p.commit();
  const Meta m = b.init();
  fill_normal(x, 1.f);
  fill_normal(w, 1.f / std::sqrt((float)K));
  auto fused = [&](long r) {
    const g3cuda::QkvRope a{b.q(r), b.kn(r), b.vn(r), b.kc(r), b.vc(r), b.qw(), b.kw(), b.inv(), m.tok, m.seq,
                            NH, KVH, D, K, cap, false, kEps};
    g3cuda::gemv_qkv_rope(a, x(r), w(r), 1, nullptr, g_s);
  };
  auto two = [&](long r) {
    g3cuda::gemm(g_h, qkv(r), x(r), w(r), true, 1, K, QKV, 1, g_s);
    g3cuda::qk_rope_kv<bf16>(b.q(r), b.kn(r), b.vn(r), b.kc(r), b.vc(r), qkv(r), b.qw(), b.kw(), b.inv(), m.tok, m.seq,
                             1, NH, KVH, D, cap, false, kEps, g_s);
  };
  const auto hx = d2h(x(0), K);
  const auto hw = d2h_rows_bf16(w(0), 0, 1, QKV, K);
  std::vector<float> prod(QKV);
  g3::matmul_cpu(prod.data(), hx.data(), g3::WeightView{hw.data(), g3::DType::BF16, QKV, K}, 1, K, QKV);
  const QkvRef ref = b.ref(std::move(prod), s);
  const std::string shape = fmt("M=1 pos=%d K=%d NH=%d KVH=%d D=%d", start, K, NH, KVH, D);
  Err e[2];
  for (int v = 0; v < 2; ++v) {
    (v == 0 ? std::function<void(long)>(fused) : std::function<void(long)>(two))(0);
    e[v] = b.check(ref);
    require(fmt("gemv_qkv_rope %s (%s)", shape.c_str(), v ? "two launches" : "fused"), e[v]);
  }
  const double bytes = 2.0 * QKV * K + 2.0 * K + 8.0 * D + 4.0 * D + 2.0 * NH * D + 8.0 * KVH * D;
  report("gemv_qkv_rope", s, shape, "ours", time_it(fused), bytes, 2.0 * QKV * K, e[0], p);
  report("gemv_qkv_rope", s, shape, "two launches: GEMV + qk_rope_kv", time_it(two), bytes, 2.0 * QKV * K, e[1], p);
}

// kv_cache_write: after a prefill chunk on a local layer, the keys/values that survive in the ring
// (mode 1; mode 0 wrote the first one before attention). Checked: mode 0 + mode 1 = kv_cache_write_cpu.
void bench_kv_cache_write(const Shape& s) {
  const int KVH = s.kv_heads, D = s.head_dim, T = kPrefill, cap = s.window;
  Pool p;
  auto mb = p.one<int32_t>(meta_ints(1, T));
  auto kn = p.rot<bf16>((size_t)T * KVH * D);
  auto vn = p.rot<bf16>((size_t)T * KVH * D);
  auto kc = p.rot<bf16>((size_t)KVH * cap * D);
  auto vc = p.rot<bf16>((size_t)KVH * cap * D);
  p.commit();
  fill_normal(kn, 1.f);
  fill_normal(vn, 1.f);
  fill_normal(kc, 1.f);
  fill_normal(vc, 1.f);
  const Meta m = uniform_meta(mb, 1, 0, T);
  auto write = [&](long r, int mode) {
    g3cuda::kv_cache_write<bf16>(kc(r), vc(r), kn(r), vn(r), m.tok, m.seq, T, KVH, D, cap, true, mode, g_s);
  };
  auto rk = d2h(kc(0), (size_t)KVH * cap * D), rv = d2h(vc(0), (size_t)KVH * cap * D);
  const auto hk = d2h(kn(0), (size_t)T * KVH * D), hv = d2h(vn(0), (size_t)T * KVH * D);
  write(0, 0);
  write(0, 1);
  g3::kv_cache_write_cpu(rk.data(), rv.data(), hk.data(), hv.data(), (int64_t)KVH * D, cap, 0, T, KVH, D);
  const std::string shape = fmt("local T=%d cap=%d KVH=%d D=%d", T, cap, KVH, D);
  const Err e = worst(cmp_exact(d2h(kc(0), rk.size()), rk), cmp_exact(d2h(vc(0), rv.size()), rv));
  require("kv_cache_write " + shape, e);
  int written = 0;  // rows mode 1 copies
  for (int t = 0; t < T; ++t) written += !(t == 0 || t < cap) && t >= T - cap;
  report("kv_cache_write", s, shape, "ours (mode 1)", time_it([&](long r) { write(r, 1); }),
         8.0 * written * KVH * D + 8.0 * T, 0, e, p);
}

// The CPU reference of queries [q0, q0 + nq) of a chunk that starts at position 0 (keys and values of the
// chunk in kn/vn [T, KVH, D]): keys before q0 go in as a cache of cap q0, the rest as the new keys.
std::vector<float> ref_chunk_attention(const std::vector<float>& q, const std::vector<float>& kn,
                                       const std::vector<float>& vn, int NH, int KVH, int D, int q0, int nq, int window,
                                       float scale) {
  const int cap = std::max(q0, 1);
  std::vector<float> kc((size_t)KVH * cap * D, 0.f), vc(kc.size(), 0.f);
  for (int j = 0; j < q0; ++j)
    for (int h = 0; h < KVH; ++h)
      for (int d = 0; d < D; ++d) {
        kc[((size_t)h * cap + j) * D + d] = kn[((size_t)j * KVH + h) * D + d];
        vc[((size_t)h * cap + j) * D + d] = vn[((size_t)j * KVH + h) * D + d];
      }
  std::vector<float> out((size_t)nq * NH * D), scratch(g3::attention_cpu_scratch(std::min(cap, q0) + nq, NH, KVH, D));
  g3::attention_cpu(out.data(), (int64_t)NH * D, q.data() + (size_t)q0 * NH * D, (int64_t)NH * D,
                    kn.data() + (size_t)q0 * KVH * D, vn.data() + (size_t)q0 * KVH * D, (int64_t)KVH * D, kc.data(),
                    vc.data(), cap, q0, nq, NH, KVH, D, window, scale, 0.f, nullptr, scratch.data());
  return out;
}
Err check_chunk_attention(const bf16* dout, const std::vector<float>& q, const std::vector<float>& kn,
                          const std::vector<float>& vn, int T, int NH, int KVH, int D, int window, float scale) {
  const auto out = d2h(dout, (size_t)T * NH * D);
  Err e;
  const int nq = std::min(64, T);
  for (int q0 : {0, T - nq}) {
    const auto ref = ref_chunk_attention(q, kn, vn, NH, KVH, D, q0, nq, window, scale);
    const std::vector<float> got(out.begin() + (size_t)q0 * NH * D, out.begin() + (size_t)(q0 + nq) * NH * D);
    e = worst(e, cmp_rel_l2(got, ref, 1e-2));
  }
  return e;
}
double causal_pairs(int T, int window) {
  double pairs = 0;
  for (int i = 0; i < T; ++i) pairs += window > 0 ? std::min(i + 1, window) : i + 1;
  return pairs;
}

// attention_prefill_tc: a 2048-token chunk from position 0, causal (global layer) or sliding window (local).
void bench_attention_prefill(const Shape& s, bool local) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, T = kPrefill;
  if (!g3cuda::attention_prefill_tc_supported(D)) return;
  const int window = local ? s.window : 0, cap = local ? s.window : T;
  Pool p;
  auto mb = p.one<int32_t>(meta_ints(1, T));
  auto tiles = p.one<int2>(T / 64 + 1);
  auto kc = p.one<bf16>((size_t)KVH * cap * D);  // not read: the chunk starts at position 0
  auto vc = p.one<bf16>((size_t)KVH * cap * D);
  auto q = p.rot<bf16>((size_t)T * NH * D);
  auto kn = p.rot<bf16>((size_t)T * KVH * D);
  auto vn = p.rot<bf16>((size_t)T * KVH * D);
  auto out = p.rot<bf16>((size_t)T * NH * D);
  p.commit();
  fill_normal(q, 1.f);
  fill_normal(kn, 1.f);
  fill_normal(vn, 1.f);
  fill_normal(kc, 1.f);
  fill_normal(vc, 1.f);
  const Meta m = uniform_meta(mb, 1, 0, T);
  std::vector<int2> ht;
  for (int q0 = 0; q0 < T; q0 += 64) ht.push_back(make_int2(0, q0));
  h2d(tiles(), ht);
  const int ntiles = (int)ht.size();
  auto run = [&](long r) {
    g3cuda::attention_prefill_tc(out(r), q(r), kn(r), vn(r), kc(), vc(), m.seq, tiles(), ntiles, NH, KVH, D, cap,
                                 window, s.scale(), 0.f, g_s);
  };
  run(0);
  const Err e = check_chunk_attention(out(0), d2h(q(0), (size_t)T * NH * D), d2h(kn(0), (size_t)T * KVH * D),
                                      d2h(vn(0), (size_t)T * KVH * D), T, NH, KVH, D, window, s.scale());
  const std::string shape = fmt("%s T=%d NH=%d KVH=%d D=%d", local ? "local" : "global", T, NH, KVH, D);
  require("attention_prefill " + shape, e);
  const double bytes = 4.0 * T * NH * D + 4.0 * T * KVH * D, flops = 4.0 * D * NH * causal_pairs(T, window);
  report("attention_prefill", s, shape, "ours (tensor cores)", time_it(run), bytes, flops, e, p);
}

// attention_generic (the float32 engine's path and the fallback): decode-shaped (one token after `depth`
// cached positions) and a 512-token chunk from position 0, global layer.
void bench_attention_generic(const Shape& s, int T, int depth) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, cap = depth + T;
  Pool p;
  auto mb = p.one<int32_t>(meta_ints(1, T));
  auto q = p.rot<bf16>((size_t)T * NH * D);
  auto kn = p.rot<bf16>((size_t)T * KVH * D);
  auto vn = p.rot<bf16>((size_t)T * KVH * D);
  auto kc = p.rot<bf16>((size_t)KVH * cap * D);
  auto vc = p.rot<bf16>((size_t)KVH * cap * D);
  auto out = p.rot<bf16>((size_t)T * NH * D);
  p.commit();
  for (auto* b : {&q, &kn, &vn, &kc, &vc}) fill_normal(*b, 1.f);
  const Meta m = uniform_meta(mb, 1, depth, T);
  auto run = [&](long r) {
    g3cuda::attention_generic<bf16>(out(r), q(r), kn(r), vn(r), kc(r), vc(r), m.tok, m.seq, T, NH, KVH, D, cap, 0,
                                    s.scale(), 0.f, g_s);
  };
  run(0);
  Err e;
  const auto hq = d2h(q(0), (size_t)T * NH * D), hk = d2h(kn(0), (size_t)T * KVH * D),
             hv = d2h(vn(0), (size_t)T * KVH * D);
  if (depth == 0) {
    e = check_chunk_attention(out(0), hq, hk, hv, T, NH, KVH, D, 0, s.scale());
  } else {
    const auto hkc = d2h(kc(0), (size_t)KVH * cap * D), hvc = d2h(vc(0), (size_t)KVH * cap * D);
    std::vector<float> ref((size_t)T * NH * D), scratch(g3::attention_cpu_scratch(std::min(cap, depth) + T, NH, KVH, D));
    g3::attention_cpu(ref.data(), (int64_t)NH * D, hq.data(), (int64_t)NH * D, hk.data(), hv.data(), (int64_t)KVH * D,
                      hkc.data(), hvc.data(), cap, depth, T, NH, KVH, D, 0, s.scale(), 0.f, nullptr, scratch.data());
    e = cmp_rel_l2(d2h(out(0), ref.size()), ref, 1e-2);
  }
  const std::string shape = fmt("global T=%d depth=%d NH=%d KVH=%d D=%d", T, depth, NH, KVH, D);
  require("attention_generic " + shape, e);
  // keys of the cache read once per kv head, the chunk's own keys once; q and out once
  double pairs = 0;
  for (int i = 0; i < T; ++i) pairs += depth + i + 1;
  const double bytes = 4.0 * T * NH * D + 4.0 * (double)(depth + T) * KVH * D, flops = 4.0 * D * NH * pairs;
  report("attention_generic", s, shape, "ours (one warp per query/head)", time_it(run), bytes, flops, e, p);
}

// attention_decode: B sequences of one new token after `depth` cached positions (its key already in the
// cache), global layer (cap = depth + 1) or local (ring of the window, full). Side by side: the lanes-over-keys
// kernel (decode_kernel_mode 0) and cuBLAS: S = Q.K^T (batched over sequence x kv head), softmax, O = P.V.
void bench_attention_decode(const Shape& s, int B, int depth, bool local) {
  const int NH = s.heads, KVH = s.kv_heads, D = s.head_dim, G = NH / KVH;
  const int window = local ? s.window : 0, cap = local ? s.window : depth + 1, pos = depth;
  const int keys = local ? std::min(s.window, pos + 1) : pos + 1;  // visible keys (local: the whole ring)
  // the engine's decode_splits: about one wave of blocks
  const int nsplit = std::max(1, std::min(g3cuda::kDecodeMaxSplit, (g_sms + B * KVH - 1) / (B * KVH)));
  Pool p;
  auto mb = p.one<int32_t>(meta_ints(B, B));
  auto part = p.one<float>(g3cuda::attention_decode_workspace_floats(B, NH, D, nsplit));
  auto counters = p.one<unsigned>((size_t)B * KVH);
  auto S = p.one<float>((size_t)B * NH * keys);
  auto P = p.one<bf16>((size_t)B * NH * keys);
  auto q = p.rot<bf16>((size_t)B * NH * D);
  auto kc = p.rot<bf16>((size_t)B * KVH * cap * D);
  auto vc = p.rot<bf16>((size_t)B * KVH * cap * D);
  auto out = p.rot<bf16>((size_t)B * NH * D);
  auto outf = p.rot<float>((size_t)B * NH * D);
  p.commit();
  for (auto* b : {&q, &kc, &vc}) fill_normal(*b, 1.f);
  CUDA_CHECK(cudaMemsetAsync(counters(), 0, (size_t)B * KVH * sizeof(unsigned), g_s));
  std::vector<int> slot(B), st(B, pos), ln(B, 1), t0(B), tp(B, pos), ts(B);
  for (int b = 0; b < B; ++b) slot[b] = t0[b] = ts[b] = b;
  const Meta m = make_meta(mb, slot, st, ln, t0, tp, ts);
  const float scale = s.scale();
  auto ours = [&](long r) {
    g3cuda::attention_decode<bf16>(out(r), q(r), kc(r), vc(r), m.seq, B, NH, KVH, D, cap, window, scale, 0.f, nsplit,
                                   part(), counters(), g_s);
  };
  auto cublas = [&](long r) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(g_h, CUBLAS_OP_T, CUBLAS_OP_N, keys, G, D, &scale, kc(r), CUDA_R_16BF, D,
                                            (long long)cap * D, q(r), CUDA_R_16BF, D, (long long)G * D, &zero, S(),
                                            CUDA_R_32F, keys, (long long)G * keys, B * KVH, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
    g3cuda::launch_k(softmax_rows_kernel, B * NH, 256, 0, g_s, P(), (const float*)S(), keys);
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, D, G, keys, &one, vc(r), CUDA_R_16BF, D,
                                            (long long)cap * D, P(), CUDA_R_16BF, keys, (long long)G * keys, &zero,
                                            outf(r), CUDA_R_32F, D, (long long)G * D, B * KVH, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
  };
  // CPU reference for the first and last sequence: the token's key/value is the cache row at pos % cap.
  const auto hq = d2h(q(0), (size_t)B * NH * D);
  const auto hkc = d2h(kc(0), (size_t)B * KVH * cap * D), hvc = d2h(vc(0), (size_t)B * KVH * cap * D);
  std::vector<int> check_b = {0};
  if (B > 1) check_b.push_back(B - 1);
  std::vector<float> ref;
  for (int b : check_b) {
    const size_t cb = (size_t)b * KVH * cap * D;
    std::vector<float> knew((size_t)KVH * D), vnew((size_t)KVH * D);
    for (int h = 0; h < KVH; ++h)
      for (int d = 0; d < D; ++d) {
        knew[(size_t)h * D + d] = hkc[cb + ((size_t)h * cap + pos % cap) * D + d];
        vnew[(size_t)h * D + d] = hvc[cb + ((size_t)h * cap + pos % cap) * D + d];
      }
    std::vector<float> o((size_t)NH * D), scratch(g3::attention_cpu_scratch(std::min(cap, pos) + 1, NH, KVH, D));
    g3::attention_cpu(o.data(), (int64_t)NH * D, hq.data() + (size_t)b * NH * D, (int64_t)NH * D, knew.data(),
                      vnew.data(), (int64_t)KVH * D, hkc.data() + cb, hvc.data() + cb, cap, pos, 1, NH, KVH, D, window,
                      scale, 0.f, nullptr, scratch.data());
    ref.insert(ref.end(), o.begin(), o.end());
  }
  auto got_rows = [&](const std::vector<float>& all) {
    std::vector<float> g;
    for (int b : check_b) g.insert(g.end(), all.begin() + (size_t)b * NH * D, all.begin() + (size_t)(b + 1) * NH * D);
    return g;
  };
  const std::string shape =
      fmt("%s B=%d depth=%d NH=%d KVH=%d D=%d", local ? "local" : "global", B, depth, NH, KVH, D);
  const double bytes = B * (4.0 * keys * KVH * D + 4.0 * NH * D), flops = 4.0 * D * NH * (double)keys * B;
  int& mode = g3cuda::decode_kernel_mode();
  const int saved = mode;
  std::vector<int> modes = {saved};
  for (int v : {2, 1, 0})
    if (v != saved && (v != 2 || g3cuda::attention_decode_tc_supported(NH, KVH, D))) modes.push_back(v);
  for (int v : modes) {
    mode = v;
    ours(0);
    const Err e = cmp_rel_l2(got_rows(d2h(out(0), (size_t)B * NH * D)), ref, 1e-2);
    const char* name = v == 2 ? "tensor cores" : v == 1 ? "warp-per-key" : "lanes-over-keys";
    require(fmt("attention_decode %s (mode %d: %s)", shape.c_str(), v, name), e);
    report("attention_decode", s, shape, fmt("%s%s (mode %d)", v == saved ? "ours: " : "", name, v), time_it(ours),
           bytes, flops, e, p);
  }
  mode = saved;
  cublas(0);
  const Err e = cmp_rel_l2(got_rows(d2h(outf(0), (size_t)B * NH * D)), ref, 1e-2);
  require("attention_decode " + shape + " (cuBLAS path)", e);
  report("attention_decode", s, shape, "cuBLAS QK^T+softmax+PV", time_it(cublas), bytes, flops, e, p);
}

// geglu: out (bf16) = gelu_tanh(gate) * up from the float32 product [rows, 2F].
void bench_geglu(const Shape& s, int rows) {
  const int F = s.ffn;
  Pool p;
  auto gu = p.rot<float>((size_t)rows * 2 * F);
  auto out = p.rot<bf16>((size_t)rows * F);
  p.commit();
  fill_normal(gu, 2.f);
  auto run = [&](long r) { g3cuda::geglu<bf16>(out(r), gu(r), rows, F, g_s); };
  run(0);
  const auto hgu = d2h(gu(0), (size_t)rows * 2 * F);
  std::vector<float> ref((size_t)rows * F);
  g3::geglu_cpu(ref.data(), hgu.data(), rows, F);
  const std::string shape = fmt("rows=%d F=%d", rows, F);
  const Err e = cmp_bf16(d2h(out(0), ref.size()), ref);
  require("geglu " + shape, e);
  report("geglu", s, shape, "ours", time_it(run), 8.0 * rows * F + 2.0 * rows * F, 0, e, p);
}

// Sampled rows of x (M of them at most 4) and of W (at most 512): the CPU product of those.
struct ProductCheck {
  std::vector<int> ms;
  int n_stride, nr;
};
ProductCheck product_rows(int M, int N) {
  ProductCheck c;
  for (int m : {0, M / 3, (2 * M) / 3, M - 1})
    if (std::find(c.ms.begin(), c.ms.end(), m) == c.ms.end()) c.ms.push_back(m);
  c.n_stride = std::max(1, N / 512);
  c.nr = (N + c.n_stride - 1) / c.n_stride;
  return c;
}
std::vector<float> x_rows(const bf16* x, const std::vector<int>& ms, int K) {
  const auto all = d2h(x, (size_t)(ms.back() + 1) * K);
  std::vector<float> out;
  for (int m : ms) out.insert(out.end(), all.begin() + (size_t)m * K, all.begin() + (size_t)(m + 1) * K);
  return out;
}

// gemm: out[M, N] (f32) = x[M, K] . W[N, K]^T. M <= 2: our GEMV (the engine's path) vs cublasGemmEx;
// larger M: the engine's path (cuBLAS).
void bench_gemm(const Shape& s, const char* which, int N, int K, int M) {
  Pool p;
  auto x = p.rot<bf16>((size_t)M * K);
  auto w = p.rot<bf16>((size_t)N * K);
  auto out = p.rot<float>((size_t)M * N);
  p.commit();
  fill_normal(x, 1.f);
  fill_normal(w, 1.f / std::sqrt((float)K));
  const ProductCheck c = product_rows(M, N);
  const auto hx = x_rows(x(0), c.ms, K);
  const auto hw = d2h_rows_bf16(w(0), 0, c.n_stride, c.nr, K);
  const int mr = (int)c.ms.size();
  std::vector<float> ref((size_t)mr * c.nr);
  g3::matmul_cpu(ref.data(), hx.data(), g3::WeightView{hw.data(), g3::DType::BF16, c.nr, K}, mr, K, c.nr);
  const std::string shape = fmt("%s M=%d N=%d K=%d", which, M, N, K);
  const double bytes = 2.0 * N * K + 2.0 * M * K + 4.0 * M * N, flops = 2.0 * M * N * (double)K;
  std::vector<std::pair<int, std::string>> paths;
  if (M <= 2 && g3cuda::gemv_supported(true, M, K))
    paths = {{1, "ours (GEMV)"}, {2, "cublasGemmEx"}};
  else
    paths = {{0, "ours (engine path: cuBLAS)"}};
  for (auto& [path, name] : paths) {
    auto run = [&, path = path](long r) { g3cuda::gemm(g_h, out(r), x(r), w(r), true, M, K, N, path, g_s); };
    run(0);
    const auto all = d2h(out(0), (size_t)M * N);
    std::vector<float> got;
    for (int m : c.ms)
      for (int i = 0; i < c.nr; ++i) got.push_back(all[(size_t)m * N + (size_t)i * c.n_stride]);
    const Err e = cmp_product(got, ref, K);
    require(fmt("gemm %s (%s)", shape.c_str(), name.c_str()), e);
    report("gemm", s, shape, name, time_it(run), bytes, flops, e, p);
  }
}

// gemm_geglu: act[M, F] (bf16) = gelu_tanh(x . Wgate^T) * (x . Wup^T). M = 1: the fused GEMV (engine) vs
// cublasGemmEx into [M, 2F] + the geglu kernel; larger M: the engine's path (cuBLAS + geglu).
void bench_gemm_geglu(const Shape& s, int M) {
  const int K = s.hidden, F = s.ffn;
  Pool p;
  auto x = p.rot<bf16>((size_t)M * K);
  auto w = p.rot<bf16>((size_t)2 * F * K);
  auto act = p.rot<bf16>((size_t)M * F);
  auto gu = p.rot<float>((size_t)M * 2 * F);
  p.commit();
  fill_normal(x, 1.f);
  fill_normal(w, 2.f / std::sqrt((float)K));
  const ProductCheck c = product_rows(M, F);
  const auto hx = x_rows(x(0), c.ms, K);
  auto hw = d2h_rows_bf16(w(0), 0, c.n_stride, c.nr, K);  // gate rows, then the matching up rows
  const auto up = d2h_rows_bf16(w(0), F, c.n_stride, c.nr, K);
  hw.insert(hw.end(), up.begin(), up.end());
  const int mr = (int)c.ms.size();
  std::vector<float> gref((size_t)mr * 2 * c.nr), ref((size_t)mr * c.nr);
  g3::matmul_cpu(gref.data(), hx.data(), g3::WeightView{hw.data(), g3::DType::BF16, 2 * c.nr, K}, mr, K, 2 * c.nr);
  g3::geglu_cpu(ref.data(), gref.data(), mr, c.nr);
  const std::string shape = fmt("gate_up M=%d F=%d K=%d", M, F, K);
  const double bytes = 4.0 * F * K + 2.0 * M * K + 2.0 * M * F, flops = 4.0 * M * F * (double)K;
  std::vector<std::pair<int, std::string>> paths;
  if (M <= 2 && g3cuda::gemv_supported(true, M, K))
    paths = {{1, "ours (fused GeGLU GEMV)"}, {2, "cublasGemmEx + geglu"}};
  else
    paths = {{0, "ours (engine path: cuBLAS + geglu)"}};
  double mref = 0;
  for (float v : ref) mref = std::max(mref, (double)std::fabs(v));
  for (auto& [path, name] : paths) {
    auto run = [&, path = path](long r) {
      g3cuda::gemm_geglu<bf16>(g_h, act(r), gu(r), x(r), w(r), M, K, F, path, g_s);
    };
    run(0);
    const auto all = d2h(act(0), (size_t)M * F);
    Err e{0, 1.0, "|d|/(2^-7|ref|+1e-5 max|ref|)"};
    size_t k = 0;
    for (int m : c.ms)
      for (int i = 0; i < c.nr; ++i, ++k) {
        const double g = all[(size_t)m * F + (size_t)i * c.n_stride], r = ref[k];
        e.err = std::max(e.err, std::isfinite(g) ? std::fabs(g - r) / (std::ldexp(std::fabs(r), -7) + 1e-5 * mref) : 1e30);
      }
    require(fmt("gemm_geglu %s (%s)", shape.c_str(), name.c_str()), e);
    report("gemm_geglu", s, shape, name, time_it(run), bytes, flops, e, p);
  }
}

// softcap (Gemma 2's final logits; Gemma 3 has none): x = tanh(x / 30) * 30 over rows of the vocabulary.
void bench_softcap(const Shape& s, int rows) {
  const size_t n = (size_t)rows * s.vocab;
  Pool p;
  auto x = p.rot<float>(n);
  p.commit();
  fill_normal(x, 40.f);
  auto ref = d2h(x(0), n);
  g3cuda::softcap(x(0), (int64_t)n, 30.f, g_s);
  g3::softcap_cpu(ref.data(), (int64_t)n, 30.f);
  const std::string shape = fmt("rows=%d V=%d", rows, s.vocab);
  const Err e = cmp_f32(d2h(x(0), n), ref, 1e-6);
  require("softcap " + shape, e);
  report("softcap", s, shape, "ours", time_it([&](long r) { g3cuda::softcap(x(r), (int64_t)n, 30.f, g_s); }), 8.0 * n,
         0, e, p);
}

// sample: the next token per row of logits on the GPU (with the engine's workspace). Greedy: the many-block
// argmax (engine) vs one block per row; sampling at temperature 0.8 and top-p 0.95 with top-k 64 (one block
// per row, bit-exact sums) and with top-k off (the whole vocabulary: the many-block radix-search path).
void bench_sample(const Shape& s, int B) {
  const int V = s.vocab;
  Pool p;
  auto temp = p.one<float>(2 * B);     // [0, B): 0 (greedy); [B, 2B): 0.8
  auto topk = p.one<int32_t>(2 * B);   // [0, B): 64; [B, 2B): 0 (off)
  auto topp = p.one<float>(B);
  auto seed = p.one<uint64_t>(B);
  auto counter = p.one<uint64_t>(B);
  const size_t ws_bytes = g3cuda::sample_workspace_bytes(B, V);
  auto ws = p.one<char>(ws_bytes);
  auto logits = p.rot<float>((size_t)B * V);
  auto ids = p.rot<int32_t>(B);
  p.commit();
  fill_normal(logits, 3.f);
  std::vector<float> ht(2 * B, 0.f), hp(B, 0.95f);
  std::vector<int32_t> hk(2 * B, 64);
  std::vector<uint64_t> hs(B), hc(B, 7);
  for (int b = 0; b < B; ++b) ht[B + b] = 0.8f, hk[B + b] = 0, hs[b] = 1000 + b;
  h2d(temp(), ht);
  h2d(topk(), hk);
  h2d(topp(), hp);
  h2d(seed(), hs);
  h2d(counter(), hc);
  CUDA_CHECK(cudaMemsetAsync(ws(), 0, ws_bytes, g_s));
  const auto hl = d2h(logits(0), (size_t)B * V);
  struct Case {
    std::string what, variant;
    bool greedy, use_ws;
    int top_k;
  };
  for (const Case& c : {Case{"argmax", "ours (many-block argmax)", true, true, 64},
                        Case{"argmax", "one block per row", true, false, 64},
                        Case{"T .8 top-k 64 top-p .95", "ours", false, true, 64},
                        Case{"T .8 top-k off top-p .95", "ours (wide rows)", false, true, 0}}) {
    const float* t = temp() + (c.greedy ? 0 : B);
    const int32_t* k = topk() + (c.top_k == 64 ? 0 : B);
    const int searches = c.greedy ? 0 : g3cuda::sample_searches(0.8f, c.top_k, 0.95f, V);
    auto run = [&](long r) {
      g3cuda::sample(ids(r), logits(r), B, V, t, k, topp(), seed(), counter(), c.use_ws ? (void*)ws() : nullptr, B,
                     searches, g_s);
    };
    run(0);
    const auto got = d2h_raw(ids(0), B);
    std::vector<int> ref(B);
    for (int b = 0; b < B; ++b)
      ref[b] = c.greedy ? g3::argmax_cpu(hl.data() + (size_t)b * V, V)
                        : g3::sample_cpu(hl.data() + (size_t)b * V, V, 0.8f, c.top_k, 0.95f, hs[b], hc[b]);
    const std::string shape = fmt("%s B=%d V=%d", c.what.c_str(), B, V);
    const Err e = cmp_exact(got, ref);
    require(fmt("sample %s (%s)", shape.c_str(), c.variant.c_str()), e);
    report("sample", s, shape, c.variant, time_it(run), 4.0 * B * V + 4.0 * B, 0, e, p);
  }
}

// ==============================================================================================================
// Vision encoder kernels (SigLIP So400m/14 at 896 px + the multimodal projector: csrc/cuda/vision_*.cu,
// launchers in csrc/cuda/vision_kernels.cuh), model "siglip" (--sizes siglip; once in the default run)
// ==============================================================================================================
// Shapes of one image: 896 x 896 x 3 pixels, 4096 patches (64 x 64 of 14 x 14 x 3 = 588 values), hidden 1152,
// 16 heads of 72 (80 in the attention kernel's padded layout), MLP 4304, 27 layers; pooled 4 x 4 to 256 soft
// tokens, projected to the text hidden size (2560: the 4B model; kSiglip.hidden). Every job at 1 image and at
// 8 images (R = 4096 and 32768 rows; --quick: 1 image only). Each is checked as the text jobs are, against the
// CPU kernels (unfold_patches_cpu + matmul_cpu, layernorm_cpu, attention_full_cpu, bias_gelu_tanh_cpu,
// avg_pool_cpu + rmsnorm_cpu) or, for the q/k/v split, a host loop in the kernel's float32 order, with the
// tolerances of tests/test_cuda_vision.py; the large jobs are checked on the first and last image of the batch
// (attention: on the last image only, the CPU attention at N = 4096 being the slowest reference).
struct VisionShape {
  int image, patch, channels, grid, patches, patch_dim, hidden, heads, head_dim, mlp, pool, pooled;
};
constexpr VisionShape kVision = {896, 14, 3, 64, 4096, 588, 1152, 16, 72, 4304, 4, 256};
constexpr float kVisionEps = 1e-6f;  // layer_norm_eps of SigLIP; the soft-embedding RMSNorm's eps
//   name     hidden (text, the projector's output) layers heads kv head_dim ffn (unused: window vocab ...)
const Shape kSiglip = {"siglip", 2560, 27, 16, 16, 72, 4304, 0, 0, 72.f, 1.f};

// x += delta (bf16) + dbias: the residual add of the unfused side-by-side path, in vision_layernorm's order.
__global__ void plain_bias_residual_kernel(float* x, const bf16* delta, const float* dbias, int64_t n, int dim) {
  G3_PDL_ENTRY();
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x)
    x[k] = x[k] + (__bfloat162float(delta[k]) + dbias[k % dim]);
}

std::vector<int> first_last(int n) { return n > 1 ? std::vector<int>{0, n - 1} : std::vector<int>{0}; }

// Attention as tests/test_cuda_vision.py checks it: ||got - ref|| / ||ref|| <= 1e-2 over everything and
// <= 3e-2 for every (query, head) row of D.
Err cmp_attention_rows(const std::vector<float>& got, const std::vector<float>& ref, int D) {
  Err e = cmp_rel_l2(got, ref, 1e-2);
  double worst_row = 0;
  for (size_t r0 = 0; r0 < ref.size(); r0 += D) {
    double d = 0, n = 0;
    for (int i = 0; i < D; ++i) {
      const double x = std::isfinite(got[r0 + i]) ? (double)got[r0 + i] - ref[r0 + i] : 1e30;
      d += x * x;
      n += (double)ref[r0 + i] * ref[r0 + i];
    }
    worst_row = std::max(worst_row, std::sqrt(d / std::max(n, 1e-30)));
  }
  return worst(e, Err{worst_row, 3e-2, "worst row rel L2"});
}

// vision_patch_embed: im2col of the pixels (bf16), the product with the conv weight (cuBLAS, f32 out), bias +
// position embeddings. Checked on 4 patches of the first and last image: unfold_patches_cpu of the
// bf16-rounded pixels, matmul_cpu, + bias + pos; max|d| <= 1e-5 max(1, max|ref|). The weight's rows and the
// patches are padded to vision_patch_ld (588 -> 592) with zeros, as the encoder keeps them.
void bench_vision_patch_embed(const Shape& s, int n) {
  const VisionShape& v = kVision;
  const int C = v.channels, S = v.image, P = v.patches, pd = v.patch_dim, H = v.hidden, R = n * P;
  const int ld = g3cuda::vision_patch_ld(C, v.patch);
  const size_t img_px = (size_t)C * S * S;
  Pool p;
  auto w = p.one<bf16>((size_t)H * ld);
  auto bias = p.one<float>(H);
  auto pos = p.one<float>((size_t)P * H);
  auto px = p.rot<float>(n * img_px);
  auto patches = p.rot<bf16>((size_t)R * ld);
  auto x = p.rot<float>((size_t)R * H);
  p.commit();
  fill_normal(w, 1.f / std::sqrt((float)pd));
  if (ld > pd)  // zero the padding columns
    CUDA_CHECK(cudaMemset2DAsync(w() + pd, (size_t)ld * 2, 0, (size_t)(ld - pd) * 2, H, g_s));
  fill_normal(bias, 0.5f);
  fill_normal(pos, 0.5f);
  fill_normal(px, 0.5f);
  auto run = [&](long r) {
    g3cuda::vision_patch_embed(g_h, x(r), patches(r), px(r), w(), bias(), pos(), n, C, S, v.patch, H, g_s);
  };
  run(0);
  const auto hwp = d2h_rows_bf16(w(), 0, 1, H, ld);
  std::vector<uint16_t> hw((size_t)H * pd);
  for (int r = 0; r < H; ++r) std::copy(hwp.begin() + (size_t)r * ld, hwp.begin() + (size_t)r * ld + pd, hw.begin() + (size_t)r * pd);
  const auto hb = d2h(bias(), H), hpos = d2h(pos(), (size_t)P * H);
  const std::vector<int> ms = product_rows(P, H).ms;
  std::vector<float> got, ref;
  for (int img : first_last(n)) {
    auto im = d2h(px(0) + img * img_px, img_px);
    for (float& f : im) f = bf16r(f);  // the kernel's im2col rounds the pixels to bf16
    std::vector<float> unf((size_t)P * pd), sel, o((size_t)ms.size() * H);
    g3::unfold_patches_cpu(unf.data(), im.data(), C, S, S, v.patch);
    for (int m : ms) sel.insert(sel.end(), unf.begin() + (size_t)m * pd, unf.begin() + (size_t)(m + 1) * pd);
    g3::matmul_cpu(o.data(), sel.data(), g3::WeightView{hw.data(), g3::DType::BF16, H, pd}, (int)ms.size(), pd, H);
    for (size_t i = 0; i < ms.size(); ++i)
      for (int c = 0; c < H; ++c) o[i * H + c] += hb[c] + hpos[(size_t)ms[i] * H + c];
    ref.insert(ref.end(), o.begin(), o.end());
    for (int m : ms) {
      const auto row = d2h(x(0) + ((size_t)img * P + m) * H, H);
      got.insert(got.end(), row.begin(), row.end());
    }
  }
  const std::string shape = fmt("img=%d %dpx p=%d H=%d", n, S, v.patch, H);
  const Err e = cmp_f32(got, ref, 1e-5);
  require("vision_patch_embed " + shape, e);
  const double bytes = 4.0 * n * img_px + 2.0 * H * ld + 4.0 * H + 4.0 * P * H + 4.0 * R * H;
  report("vision_patch_embed", s, shape, "ours (im2col + cuBLAS + bias/pos)", time_it(run), bytes,
         2.0 * R * pd * (double)H, e, p);
}

// vision_layernorm on the residual stream x of type X (float32, or bf16: the encoder's default): mode 0: xn (bf16)
// = LN(x) (the first layer's LN1, or any LN after a residual epilogue); mode 1: x += delta + dbias (rounded to X),
// then xn (bf16) = LN(x) (LN2 and the later LN1s), on float32 side by side with the unfused add + LN; mode 2
// (float32 only): the same into x itself in float32 (the post-LayerNorm). Checked on every row: the residual
// bit-exact against the host add in the kernel's order, bf16 outputs within one bf16 ulp of layernorm_cpu (on the
// stored residual), float32 within 2e-6.
template <typename X>
void bench_vision_layernorm(const Shape& s, int n, int mode) {
  constexpr bool f32 = std::is_same<X, float>::value;
  static_assert(f32 || std::is_same<X, bf16>::value, "float32 or bf16 residual");
  if (!f32 && mode == 2) throw std::invalid_argument("bench_vision_layernorm: mode 2 writes a float32 x");
  const int H = kVision.hidden, R = n * kVision.patches;
  const size_t N = (size_t)R * H;
  Pool p;
  auto w = p.one<float>(H);
  auto b = p.one<float>(H);
  auto db = p.one<float>(H);
  auto x = p.rot<X>(N);
  auto delta = mode ? p.rot<bf16>(N) : p.one<bf16>(1);
  auto out = mode != 2 ? p.rot<bf16>(N) : p.one<bf16>(1);
  p.commit();
  fill_normal(w, 0.3f, 1.f);
  fill_normal(b, 0.3f);
  fill_normal(db, 0.3f);
  fill_normal(x, 3.f, 1.5f);  // an offset mean, as the tests: the centring matters
  if (mode) fill_normal(delta, 1.f);
  auto fused = [&](long r) {
    if constexpr (f32) {
      if (mode == 2) {
        g3cuda::vision_layernorm<float>(x(r), x(r), delta(r), db(), w(), b(), R, H, kVisionEps, g_s);
        return;
      }
    }
    g3cuda::vision_layernorm<bf16>(out(r), x(r), mode ? (const bf16*)delta(r) : nullptr, mode ? db() : nullptr, w(),
                                   b(), R, H, kVisionEps, g_s);
  };
  auto unfused = [&](long r) {  // float32 only (mode 1)
    if constexpr (f32) {
      const int blocks = (int)std::min<size_t>((N + 255) / 256, (size_t)g_sms * 16);
      g3cuda::launch_k(plain_bias_residual_kernel, blocks, 256, 0, g_s, x(r), (const bf16*)delta(r),
                       (const float*)db(), (int64_t)N, H);
      g3cuda::vision_layernorm<bf16>(out(r), x(r), nullptr, nullptr, w(), b(), R, H, kVisionEps, g_s);
    }
  };
  const auto x0 = d2h(x(0), N), hw = d2h(w(), H), hb = d2h(b(), H), hdb = d2h(db(), H);
  std::vector<float> xa = x0, ref(N);
  if (mode) {
    const auto d0 = d2h(delta(0), N);
    for (size_t i = 0; i < N; ++i) {
      xa[i] = x0[i] + (d0[i] + hdb[i % H]);
      if (!f32) xa[i] = bf16r(xa[i]);  // the bf16 stream stores the rounded sum
    }
  }
  g3::layernorm_cpu(ref.data(), xa.data(), hw.data(), hb.data(), R, H, kVisionEps);
  const char* what = mode == 0 ? (f32 ? "LN" : "LN of bf16 residual")
                     : mode == 1 ? (f32 ? "residual+LN" : "bf16 residual+LN")
                                 : "residual+post-LN f32";
  const std::string shape = fmt("%s img=%d rows=%d H=%d", what, n, R, H);
  const int nv = f32 && mode == 1 ? 2 : 1;
  Err e[2];
  for (int v = 0; v < nv; ++v) {
    if constexpr (f32)
      if (v) h2d_f32(x(0), x0);  // the fused variant added to x(0) already
    (v == 0 ? std::function<void(long)>(fused) : std::function<void(long)>(unfused))(0);
    if (mode == 2) e[v] = cmp_f32(d2h(x(0), N), ref, 2e-6);
    else if (mode == 1) e[v] = worst(cmp_exact(d2h(x(0), N), xa), cmp_bf16(d2h(out(0), N), ref));
    else e[v] = cmp_bf16(d2h(out(0), N), ref);
    require(fmt("vision_layernorm %s (%s)", shape.c_str(), v ? "unfused" : "fused"), e[v]);
  }
  // x read (and written back after a residual add), delta read, the normalised rows written
  const double xb = sizeof(X);
  const double bytes = mode == 0 ? (xb + 2) * N + 8.0 * H : mode == 1 ? (2 * xb + 4) * N + 12.0 * H : 10.0 * N + 12.0 * H;
  report("vision_layernorm", s, shape, nv == 2 ? "ours (fused)" : "ours", time_it(fused), bytes, 0, e[0], p);
  if (nv == 2)
    report("vision_layernorm", s, shape, "unfused: bias+residual add, LN", time_it(unfused), bytes, 0, e[1], p);
}

// vision_qkv_bias_split: the stacked product [R, 3 * 1152] + bias -> [3][16][img][4096][80] (zero-padded heads).
// Checked bit-exact (padding included) on the first and last image against the host: bf16(bf16 qkv + bias).
void bench_vision_qkv_split(const Shape& s, int n) {
  const VisionShape& v = kVision;
  const int P = v.patches, NH = v.heads, D = v.head_dim, QKV = 3 * NH * D, DP = g3cuda::kVisionDP;
  const size_t slice = (size_t)P * DP;  // one (q|k|v, head, image)
  Pool p;
  auto bias = p.one<float>(QKV);
  auto qkv = p.rot<bf16>((size_t)n * P * QKV);
  auto qh = p.rot<bf16>(3 * NH * n * slice);
  p.commit();
  fill_normal(bias, 0.5f);
  fill_normal(qkv, 1.5f);
  auto run = [&](long r) { g3cuda::vision_qkv_bias_split(qh(r), qkv(r), bias(), n, P, NH, D, g_s); };
  run(0);
  const auto hb = d2h(bias(), QKV);
  std::vector<float> got, ref;
  for (int img : first_last(n)) {
    const auto hq = d2h(qkv(0) + (size_t)img * P * QKV, (size_t)P * QKV);
    for (int which = 0; which < 3; ++which)
      for (int h = 0; h < NH; ++h) {
        const auto g = d2h(qh(0) + g3cuda::vision_qh_slice(which, h, img, NH, n) * slice, slice);
        got.insert(got.end(), g.begin(), g.end());
        for (int t = 0; t < P; ++t)
          for (int d = 0; d < DP; ++d) {
            const int col = (which * NH + h) * D + d;
            ref.push_back(d < D ? bf16r(hq[(size_t)t * QKV + col] + hb[col]) : 0.f);
          }
      }
  }
  const std::string shape = fmt("img=%d N=%d heads=%d D=%d->%d", n, P, NH, D, DP);
  const Err e = cmp_exact(got, ref);
  require("vision_qkv_bias_split " + shape, e);
  report("vision_qkv_bias_split", s, shape, "ours", time_it(run), 2.0 * n * P * QKV + 4.0 * QKV + 6.0 * NH * n * slice,
         0,
         e, p);
}

// t[c, r] = a[r, c]: the stacked q/k/v product [R, C] -> its transposed layout [C, R] (vision_gemm_lt_t's).
__global__ void transpose_bf16_kernel(bf16* t, const bf16* a, int R, int C) {
  G3_PDL_ENTRY();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)R * C; i += (int64_t)gridDim.x * blockDim.x)
    t[i] = a[(i % R) * (int64_t)C + i / R];  // i = c * R + r
}

// vision_attention: non-causal, 16 heads of 72 (padded 80) over 4096 patches per image, tensor cores. Inputs
// made by vision_qkv_bias_split (the padding must be zeros). On Hopper also vision_attention_wgmma_t on the
// transposed product (no bias; q's and v's added inside, k's cancelled by the softmax): the same reference. Side by side: cuBLAS per image, batched over the
// heads: S = scale Q.K^T (f32), the softmax kernel above (P in bf16), O = P.V (bf16, into the same [R, 1152]
// rows). Checked on the last image against attention_full_cpu (the CPU kernel, float32): rel L2 <= 1e-2,
// every (query, head) row <= 3e-2.
void bench_vision_attention(const Shape& s, int n) {
  const VisionShape& v = kVision;
  const int P = v.patches, NH = v.heads, D = v.head_dim, H = v.hidden, QKV = 3 * NH * D, DP = g3cuda::kVisionDP;
  const size_t slice = (size_t)NH * P * DP;  // the q (or k, v) rows of all heads of one image
  const size_t hs = (size_t)P * DP;           // one (q|k|v, head, image)
  auto at = [&](const bf16* base, int which, int h, int i) {
    return base + g3cuda::vision_qh_slice(which, h, i, NH, n) * hs;
  };
  const float scale = 1.f / std::sqrt((float)D);
  Pool p;
  auto bias = p.one<float>(QKV);
  auto qkv = p.one<bf16>((size_t)n * P * QKV);  // the source of every copy of qh
  auto Sm = p.one<float>((size_t)NH * P * P);   // cuBLAS path: one image's scores, then probabilities
  auto Pm = p.one<bf16>((size_t)NH * P * P);
  auto qh = p.rot<bf16>(3 * n * slice);
  auto out = p.rot<bf16>((size_t)n * P * H);
  auto qkv_t = p.rot<bf16>((size_t)n * P * QKV);  // each copy's product, transposed
  p.commit();
  const bool have_t = g3cuda::vision_attention_wgmma_available();
  fill_normal(bias, 0.5f);
  for (int c = 0; c < p.copies(); ++c) {
    fill_normal(qkv, 1.5f);
    g3cuda::vision_qkv_bias_split(qh(c), qkv(), bias(), n, P, NH, D, g_s);
    if (have_t) g3cuda::launch_k(transpose_bf16_kernel, 4096, 256, 0, g_s, qkv_t(c), (const bf16*)qkv(), n * P, QKV);
  }
  auto ours = [&](long r) { g3cuda::vision_attention(out(r), qh(r), n, P, NH, D, scale, g_s); };
  auto ours_t = [&](long r) {
    g3cuda::vision_attention_wgmma_t(out(r), qkv_t(r), bias(), bias() + 2 * NH * D, n, P, NH, D, scale, g_s);
  };
  auto cublas = [&](long r) {
    const float zero = 0.f, one = 1.f;
    for (int i = 0; i < n; ++i) {
      // image i's heads are n * hs apart in qh
      const bf16 *Q = at(qh(r), 0, 0, i), *K = at(qh(r), 1, 0, i), *V = at(qh(r), 2, 0, i);
      const long long hstride = (long long)n * hs;
      CUBLAS_CHECK(cublasGemmStridedBatchedEx(g_h, CUBLAS_OP_T, CUBLAS_OP_N, P, P, D, &scale, K, CUDA_R_16BF, DP,
                                              hstride, Q, CUDA_R_16BF, DP, hstride, &zero, Sm(),
                                              CUDA_R_32F, P, (long long)P * P, NH, CUBLAS_COMPUTE_32F,
                                              CUBLAS_GEMM_DEFAULT));
      g3cuda::launch_k(softmax_rows_kernel, NH * P, 256, 0, g_s, Pm(), (const float*)Sm(), P);
      CUBLAS_CHECK(cublasGemmStridedBatchedEx(g_h, CUBLAS_OP_N, CUBLAS_OP_N, D, P, P, &one, V, CUDA_R_16BF, DP,
                                              hstride, Pm(), CUDA_R_16BF, P, (long long)P * P, &zero,
                                              out(r) + (size_t)i * P * H, CUDA_R_16BF, H, (long long)D, NH,
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  };
  // CPU reference of the last image: q, k, v unpadded into [N, heads * 72] rows
  const int img = n - 1;
  std::vector<float> hq((size_t)P * H), hk((size_t)P * H), hv((size_t)P * H);
  for (int which = 0; which < 3; ++which) {
    std::vector<float>& dst = which == 0 ? hq : which == 1 ? hk : hv;
    for (int h = 0; h < NH; ++h) {
      const auto g = d2h(at(qh(0), which, h, img), hs);
      for (int t = 0; t < P; ++t)
        for (int d = 0; d < D; ++d) dst[(size_t)t * H + h * D + d] = g[(size_t)t * DP + d];
    }
  }
  std::vector<float> ref((size_t)P * H), scratch(g3::attention_full_scratch(P, NH, D));
  g3::attention_full_cpu(ref.data(), hq.data(), hk.data(), hv.data(), H, P, NH, D, scale, scratch.data());
  const std::string shape = fmt("img=%d N=%d heads=%d D=%d", n, P, NH, D);
  const double bytes = 6.0 * n * slice + 2.0 * n * P * H, flops = 4.0 * n * (double)P * P * NH * D;
  Err e[3];
  const char* names[3] = {"ours", "cuBLAS path", "ours, transposed q/k/v"};
  for (int path = 0; path < (have_t ? 3 : 2); ++path) {
    CUDA_CHECK(cudaMemsetAsync(out(0), 0xff, (size_t)n * P * H * 2, g_s));  // NaNs: every row must be written
    (path == 0 ? std::function<void(long)>(ours) : path == 1 ? std::function<void(long)>(cublas)
                                                             : std::function<void(long)>(ours_t))(0);
    e[path] = cmp_attention_rows(d2h(out(0) + (size_t)img * P * H, (size_t)P * H), ref, D);
    require(fmt("vision_attention %s (%s)", shape.c_str(), names[path]), e[path]);
  }
  report("vision_attention", s, shape, "ours (tensor cores)", time_it(ours), bytes, flops, e[0], p);
  report("vision_attention", s, shape, "cuBLAS QK^T+softmax+PV", time_it(cublas), bytes, flops, e[1], p);
  if (have_t)  // reads the product's 3 x 72 dims a row instead of qh's 3 x 80 (no zero padding)
    report("vision_attention", s, shape, "ours (wgmma, transposed q/k/v, no split)", time_it(ours_t),
           6.0 * n * P * NH * D + 2.0 * n * P * H, flops, e[2], p);
}

// vision_bias_gelu: fc1's output h [R, 4304] (bf16) = gelu_tanh(h + bias) in place. Checked on the rows of the
// first and last image against bias_gelu_tanh_cpu: one bf16 ulp.
void bench_vision_bias_gelu(const Shape& s, int n) {
  const int I = kVision.mlp, P = kVision.patches, R = n * P;
  Pool p;
  auto bias = p.one<float>(I);
  auto h = p.rot<bf16>((size_t)R * I);
  p.commit();
  fill_normal(bias, 1.f);
  fill_normal(h, 2.f);
  std::vector<std::vector<float>> before;
  for (int img : first_last(n)) before.push_back(d2h(h(0) + (size_t)img * P * I, (size_t)P * I));
  auto run = [&](long r) { g3cuda::vision_bias_gelu(h(r), bias(), R, I, g_s); };
  run(0);
  const auto hb = d2h(bias(), I);
  std::vector<float> got, ref;
  int k = 0;
  for (int img : first_last(n)) {
    std::vector<float>& x = before[k++];
    g3::bias_gelu_tanh_cpu(x.data(), hb.data(), P, I);
    ref.insert(ref.end(), x.begin(), x.end());
    const auto g = d2h(h(0) + (size_t)img * P * I, (size_t)P * I);
    got.insert(got.end(), g.begin(), g.end());
  }
  const std::string shape = fmt("img=%d rows=%d I=%d", n, R, I);
  const Err e = cmp_bf16(got, ref);
  require("vision_bias_gelu " + shape, e);
  report("vision_bias_gelu", s, shape, "ours (in place)", time_it(run), 4.0 * R * I + 4.0 * I, 0, e, p);
}

// vision_pool_rmsnorm: per image, 4 x 4 average pooling of the 64 x 64 grid (f32) -> 256 tokens, RMSNorm with
// (1 + w) -> bf16. Checked on the first and last image against avg_pool_cpu + rmsnorm_cpu: one bf16 ulp.
void bench_vision_pool(const Shape& s, int n) {
  const VisionShape& v = kVision;
  const int H = v.hidden, P = v.patches, T = v.pooled;
  Pool p;
  auto w = p.one<float>(H);
  auto y = p.rot<float>((size_t)n * P * H);
  auto out = p.rot<bf16>((size_t)n * T * H);
  p.commit();
  fill_normal(w, 0.3f);
  fill_normal(y, 1.f);
  auto run = [&](long r) { g3cuda::vision_pool_rmsnorm(out(r), y(r), w(), n, v.grid, v.pool, H, kVisionEps, g_s); };
  run(0);
  const auto hw = d2h(w(), H);
  std::vector<float> got, ref;
  for (int img : first_last(n)) {
    const auto hy = d2h(y(0) + (size_t)img * P * H, (size_t)P * H);
    std::vector<float> pooled((size_t)T * H), o((size_t)T * H);
    g3::avg_pool_cpu(pooled.data(), hy.data(), v.grid, H, v.pool);
    g3::rmsnorm_cpu(o.data(), H, pooled.data(), H, hw.data(), T, H, kVisionEps);
    ref.insert(ref.end(), o.begin(), o.end());
    const auto g = d2h(out(0) + (size_t)img * T * H, (size_t)T * H);
    got.insert(got.end(), g.begin(), g.end());
  }
  const std::string shape = fmt("img=%d %dx%d/%d H=%d", n, v.grid, v.grid, v.pool, H);
  const Err e = cmp_bf16(got, ref);
  require("vision_pool_rmsnorm " + shape, e);
  report("vision_pool_rmsnorm", s, shape, "ours", time_it(run), 4.0 * n * P * H + 2.0 * n * T * H + 4.0 * H, 0, e, p);
}

// vision_gemm: out[M, N] = x[M, K] . W[N, K]^T through the encoder's launcher (cuBLAS; bf16 out for the tower's
// products, f32 for the projector). Checked on sampled rows and columns against matmul_cpu: f32 out as the text
// products; bf16 out |got - ref| <= 2^-7 |ref| + max(1e-5, 4 sqrt(K) 2^-24) max|ref| (one bf16 ulp of rounding
// plus the products' summation-order tolerance; the tests' 1e-6 absolute term holds at their K = 129 only).
void bench_vision_gemm(const Shape& s, const char* which, int n, int M, int K, int N, bool out_bf16) {
  Pool p;
  auto x = p.rot<bf16>((size_t)M * K);
  auto w = p.rot<bf16>((size_t)N * K);
  auto out = out_bf16 ? p.rot<bf16>((size_t)M * N) : p.one<bf16>(1);
  auto outf = out_bf16 ? p.one<float>(1) : p.rot<float>((size_t)M * N);
  p.commit();
  fill_normal(x, 1.f);
  fill_normal(w, 1.f / std::sqrt((float)K));
  const ProductCheck c = product_rows(M, N);
  const auto hx = x_rows(x(0), c.ms, K);
  const auto hw = d2h_rows_bf16(w(0), 0, c.n_stride, c.nr, K);
  const int mr = (int)c.ms.size();
  std::vector<float> ref((size_t)mr * c.nr);
  g3::matmul_cpu(ref.data(), hx.data(), g3::WeightView{hw.data(), g3::DType::BF16, c.nr, K}, mr, K, c.nr);
  auto run = [&](long r) {
    g3cuda::vision_gemm(g_h, out_bf16 ? (void*)out(r) : (void*)outf(r), out_bf16, x(r), w(r), M, K, N, g_s);
  };
  run(0);
  const auto all = out_bf16 ? d2h(out(0), (size_t)M * N) : d2h(outf(0), (size_t)M * N);
  std::vector<float> got;
  for (int m : c.ms)
    for (int i = 0; i < c.nr; ++i) got.push_back(all[(size_t)m * N + (size_t)i * c.n_stride]);
  Err e = cmp_product(got, ref, K);
  if (out_bf16) {
    double mref = 0;
    for (float r : ref) mref = std::max(mref, (double)std::fabs(r));
    const double tol = e.tol;
    e = Err{0, 1.0, "|d|/(2^-7|ref|+tol max|ref|)"};
    for (size_t i = 0; i < ref.size(); ++i) {
      const double d = std::fabs((double)got[i] - ref[i]) / (std::ldexp(std::fabs((double)ref[i]), -7) + tol * mref);
      e.err = std::max(e.err, std::isfinite(got[i]) ? d : 1e30);
    }
  }
  const std::string shape = fmt("%s img=%d M=%d N=%d K=%d", which, n, M, N, K);
  require("vision_gemm " + shape, e);
  const double bytes = 2.0 * N * K + 2.0 * M * K + (out_bf16 ? 2.0 : 4.0) * M * N, flops = 2.0 * M * N * (double)K;
  report("vision_gemm", s, shape, out_bf16 ? "ours (cuBLAS, bf16 out)" : "ours (cuBLAS, f32 out)", time_it(run),
         bytes, flops, e, p);
}

void run_vision_benches(const Shape& s) {
  const VisionShape& v = kVision;
  const double t0 = now();
  std::printf("\n== SigLIP (Gemma 3 vision encoder): %dpx, patch %d -> %d patches, hidden %d, %d heads of %d "
              "(padded %d), mlp %d; pool %dx%d -> %d tokens, projector to %d\n",
              v.image, v.patch, v.patches, v.hidden, v.heads, v.head_dim, g3cuda::kVisionDP, v.mlp, v.pool, v.pool,
              v.pooled, s.hidden);
  // batch 8: about 1.5 GB for the attention's cuBLAS path and < 1.2 GB for any other job (2 rotated copies)
  std::vector<int> batches = {1};
  if (!g_quick) {
    if (g_budget > (size_t)4 << 30) batches.push_back(8);
    else std::printf("(8-image jobs skipped: memory budget %.1f GB)\n", g_budget / 1e9);
  }
  const int H = v.hidden, I = v.mlp;
  for (int n : batches)
    if (selected("vision_patch_embed")) bench_vision_patch_embed(s, n);
  for (int n : batches)
    if (selected("vision_layernorm")) {
      bench_vision_layernorm<float>(s, n, 0);
      bench_vision_layernorm<float>(s, n, 1);
      bench_vision_layernorm<bf16>(s, n, 0);
      bench_vision_layernorm<bf16>(s, n, 1);
      if (n == 1) bench_vision_layernorm<float>(s, n, 2);
    }
  for (int n : batches)
    if (selected("vision_qkv_bias_split")) bench_vision_qkv_split(s, n);
  for (int n : batches)
    if (selected("vision_attention")) bench_vision_attention(s, n);
  for (int n : batches)
    if (selected("vision_bias_gelu")) bench_vision_bias_gelu(s, n);
  for (int n : batches)
    if (selected("vision_pool_rmsnorm")) bench_vision_pool(s, n);
  for (int n : batches)
    if (selected("vision_gemm")) {
      const int R = n * v.patches;
      bench_vision_gemm(s, "qkv", n, R, H, 3 * H, true);
      bench_vision_gemm(s, "o", n, R, H, H, true);
      bench_vision_gemm(s, "fc1", n, R, H, I, true);
      bench_vision_gemm(s, "fc2", n, R, I, H, true);
      bench_vision_gemm(s, "projector", n, n * v.pooled, H, s.hidden, false);
    }
  std::printf("-- %s done in %.1f s\n", s.name, now() - t0);
}

// ==============================================================================================================

void run_size(const Shape& s) {
  const double t0 = now();
  const int H = s.hidden, F = s.ffn, QD = s.q_dim();
  std::printf("\n== Gemma 3 %s: hidden %d, %d heads / %d kv heads of %d, ffn %d, window %d, vocab %d\n", s.name, H,
              s.heads, s.kv_heads, s.head_dim, F, s.window, s.vocab);
  auto sel = [&](const char* kernel) { return selected(kernel); };  // --filter: a substring of the kernel name
  if (sel("embedding_rmsnorm")) {
    bench_embedding(s, 1);
    bench_embedding(s, kPrefill);
  }
  if (sel("rmsnorm")) {
    bench_rmsnorm(s, 1);
    bench_rmsnorm(s, kPrefill);
  }
  if (sel("residual_rmsnorm")) {
    bench_residual_rmsnorm(s, 1);
    bench_residual_rmsnorm(s, kPrefill);
  }
  if (sel("qk_rope_kv")) {
    bench_qk_rope_kv(s, 1, kDepth);
    bench_qk_rope_kv(s, kPrefill, 0);
  }
  if (sel("gemv_qkv_rope")) bench_gemv_qkv_rope(s);
  if (sel("kv_cache_write")) bench_kv_cache_write(s);
  if (sel("attention_prefill")) {
    bench_attention_prefill(s, false);
    bench_attention_prefill(s, true);
  }
  if (sel("attention_generic")) {
    bench_attention_generic(s, 1, kDepth);
    if (!g_quick) bench_attention_generic(s, 512, 0);
  }
  if (sel("attention_decode")) {
    bench_attention_decode(s, 1, kDepth, false);
    bench_attention_decode(s, 1, kDepth, true);
    if (!g_quick) {
      bench_attention_decode(s, 1, 32768, false);
      bench_attention_decode(s, 8, kDepth, false);
    }
  }
  if (sel("geglu")) {
    bench_geglu(s, 1);
    bench_geglu(s, kPrefill);
  }
  if (sel("gemm")) {
    bench_gemm(s, "qkv", s.qkv(), H, 1);
    bench_gemm(s, "o", H, QD, 1);
    bench_gemm(s, "down", H, F, 1);
    bench_gemm(s, "lm_head", s.vocab, H, 1);
    if (!g_quick) {
      bench_gemm(s, "qkv", s.qkv(), H, kPrefill);
      bench_gemm(s, "o", H, QD, kPrefill);
      bench_gemm(s, "down", H, F, kPrefill);
    }
  }
  if (sel("gemm_geglu")) {
    bench_gemm_geglu(s, 1);
    if (!g_quick) bench_gemm_geglu(s, kPrefill);
  }
  if (sel("softcap")) bench_softcap(s, 1);
  if (sel("sample")) {
    bench_sample(s, 1);
    if (!g_quick) bench_sample(s, 8);
  }
  if (sel("gather_last_rows")) bench_gather_last_rows(s);
  std::printf("-- %s done in %.1f s\n", s.name, now() - t0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string sizes = "270m,1b,4b,12b,27b,siglip";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--sizes") sizes = val();
    else if (a == "--json") g_json = val();
    else if (a == "--quick") g_quick = true;
    else if (a == "--runs") g_runs = std::stoi(val());
    else if (a == "--filter") g_filter = val();
    else {
      std::fprintf(stderr,
                   "usage: %s [--sizes 270m,1b,4b,12b,27b,siglip] [--json out.json] [--quick] [--runs N (>= 50)] "
                   "[--filter kernel-substring]\n",
                   argv[0]);
      return 2;
    }
  }
  if (g_quick && g_runs == 100) g_runs = 50;
  g_runs = std::max(50, std::min(1000, g_runs));
  std::transform(sizes.begin(), sizes.end(), sizes.begin(), ::tolower);

  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  g_l2 = prop.l2CacheSize > 0 ? (size_t)prop.l2CacheSize : g_l2;
  g_device = prop.name;
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  g_budget = (size_t)(0.7 * free_b);
  CUDA_CHECK(cudaStreamCreateWithFlags(&g_s, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&g_h));
  void* ws = nullptr;
  CUDA_CHECK(cudaMalloc(&ws, 32u << 20));
  CUBLAS_CHECK(cublasSetWorkspace(g_h, ws, 32u << 20));
  CUBLAS_CHECK(cublasSetStream(g_h, g_s));
  g_timer.init(g_runs + 1);

  const double t0 = now();
  g_copy_bw = measure_copy_bw();
  g_gemm_rate = measure_gemm_rate();
  std::printf("%s: %d SMs, L2 %.0f MB, %.1f GB free; PDL %s; %d runs per kernel (median)\n", g_device.c_str(), g_sms,
              g_l2 / 1e6, free_b / 1e9, g3cuda::pdl_flag() ? "on" : "off", g_runs);
  std::printf("floors measured now: copy bandwidth %.0f GB/s (1 GiB device copy, read + write); cuBLAS bf16 GEMM "
              "%.0f TFLOP/s (8192^3)\n",
              g_copy_bw / 1e9, g_gemm_rate / 1e12);
  std::printf("%-18s %-5s %-30s %-24s %12s  %15s %11s  %s\n", "kernel", "model", "shape", "variant", "time",
              "achieved", "% floor", "check");
  int nsizes = 0;
  for (const Shape& s : kShapes) {
    if (("," + sizes + ",").find(std::string(",") + s.name + ",") == std::string::npos) continue;
    try {
      run_size(s);
    } catch (const std::exception& e) {  // a launcher refused a shape, or out of memory: fail loudly too
      g_failed = fmt("%s: %s", s.name, e.what());
      std::fprintf(stderr, "FAILED: %s\n", g_failed.c_str());
      write_json();
      return 1;
    }
    ++nsizes;
  }
  if (("," + sizes + ",").find(std::string(",") + kSiglip.name + ",") != std::string::npos) {
    try {  // the vision encoder's kernels, once (not per text size)
      run_vision_benches(kSiglip);
    } catch (const std::exception& e) {
      g_failed = fmt("%s: %s", kSiglip.name, e.what());
      std::fprintf(stderr, "FAILED: %s\n", g_failed.c_str());
      write_json();
      return 1;
    }
    ++nsizes;
  }
  if (!nsizes) {
    std::fprintf(stderr, "no known size in --sizes %s (270m,1b,4b,12b,27b,siglip)\n", sizes.c_str());
    return 2;
  }
  write_json();
  std::printf("\n%zu results, all checks passed, %.1f s%s%s\n", g_rows.size(), now() - t0,
              g_json.empty() ? "" : "; JSON: ", g_json.c_str());
  cublasDestroy(g_h);
  return 0;
}
