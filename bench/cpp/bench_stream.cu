// bench_stream.cu: how fast the decode step's products can stream their weights on this GPU when each is its own
// launch, as in the engine's graph. A chain of launches, one per product of every layer of the real 270M / 1B / 4B
// shapes (qkv, o, gate_up, down; each layer's weights a separate slice of one buffer, 6.4 GB at 4B, so nothing is in
// L2 when a product starts), captured in a CUDA graph with programmatic dependent launch, the first loads issued
// before the wait as the engine does. The launches:
//   gemv        the engine's decode GEMVs (gemm / gemm_geglu, M = 1, bf16): what a step runs;
//   u4 rule     the engine's GEMV kernel rebuilt here (gemv_u: plain, M = 1) with the engine's configuration;
//   best        gemv_u with, for each product, the fastest configuration of a sweep over U loads a lane a round (4,
//               5, 8, 10), W warps a row (1, 2, 4, 8) and launch bounds asking for 0 / 5 / 6 blocks an SM, each timed
//               as a chain of that product alone over the layers (the sweep's 8 fastest are printed);
//   short 8     read-only blocks of 256 threads, 8 16-byte loads a thread all in flight at once, one 32 KB tile a block
//               (the GEMV's shape with no arithmetic);
//   short 8 x / r / xr  the same with parts of a GEMV's work after the wait: one 16-byte read of a 1 KB vector a
//               thread (x), the checksum reduced through shared memory and a barrier (r), both (xr);
//   loop 8/4    read-only, 4 blocks an SM looping over 32 KB tiles, the next tile's loads issued as soon as a tile's
//               have arrived.
// A read-only launch does nothing with its bytes but an XOR checksum. Checked before anything is timed: every
// read-only variant's checksums of every slice against a plain grid-stride reference, and every GEMV configuration's
// outputs of layer 0 against the engine's GEMV (another summation order where the configuration differs: within
// 4e-7 K for the float32 outputs, 1 % + 1e-3 for the bf16 GeGLU ones). Reported: each chain's median time over the
// replays and its bytes / time, the same for each product alone, and one 1.34 GB read (the 4B LM head's bytes) in
// one launch as the steady-state read rate.
//   bench_stream [--sizes 270m,1b,4b] [--reps N] [--sweep 0] [--layers N] [--check-only 1]
//     --sweep 0: no sweep ("best" is the engine's configuration); --layers N: fewer layers; --check-only 1: the checks
//     of every configuration, nothing timed (for compute-sanitizer, with --layers 1).
// The chain leaves out what a step has between the products (attention, norms), so a configuration that wins here
// need not win in the step: bench/gpu/NOTES.md, session 17.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <cublas_v2.h>

#include "cuda/common.cuh"
#include "cuda/gemv_chunk.cuh"
#include "cuda/kernels.cuh"

using namespace g3cuda;

__device__ __forceinline__ unsigned xor4(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// A slice's checksum is the XOR of kSlots words; each warp adds its XOR to one of them, so that no address takes
// more than a few atomics (one address for every warp of a 100k-block launch serialises in L2).
constexpr int kSlots = 1024;
__device__ __forceinline__ void warp_xor_out(unsigned v, unsigned* acc) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0 && v) atomicXor(acc + ((blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) % kSlots), v);
}

// One tile of 256 x U chunks a block; every load issued before the wait (weights do not depend on the kernel
// before); the checksum goes out after it. With parts of a GEMV's work after the wait, to see which of them costs:
// XIN, each thread reads one of the first 64 16-byte chunks of a vector (as a GEMV reads x, which the kernel before
// wrote; here from L2); RED, the block's checksum through shared memory and a barrier, stored by one thread (a
// GEMV's block reduction). Neither: "short U", the GEMV's shape without the arithmetic.
template <int U, bool XIN, bool RED>
__global__ void __launch_bounds__(256) read_parts(const uint4* __restrict__ p, int64_t n, unsigned* acc,
                                                  const uint4* __restrict__ xin) {
  __shared__ unsigned red[8];
  const int64_t base = (int64_t)blockIdx.x * 256 * U + threadIdx.x;
  uint4 v[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = base + (int64_t)u * 256;
    v[u] = i < n ? __ldcs(p + i) : make_uint4(0, 0, 0, 0);
  }
  G3_PDL_WAIT();
  G3_PDL_LAUNCH();
  unsigned x = 0;
  // read and waited for; contributes nothing unless a chunk's XOR is this constant (then the check fails loudly)
  if constexpr (XIN) x = xor4(__ldg(xin + threadIdx.x % 64)) == 0x9e3779b9u ? 1u : 0u;
#pragma unroll
  for (int u = 0; u < U; ++u) x ^= xor4(v[u]);
  if constexpr (RED) {
#pragma unroll
    for (int o = 16; o; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned t = 0;
      for (int w = 0; w < 8; ++w) t ^= red[w];
      if (t) atomicXor(acc + blockIdx.x % kSlots, t);
    }
  } else {
    warp_xor_out(x, acc);
  }
}

// Tiles blockIdx.x, + gridDim.x, ...; a tile's loads are copied out (which waits for them) and the next tile's issued
// before the copy is XORed.
template <int U>
__global__ void __launch_bounds__(256) read_loop(const uint4* __restrict__ p, int64_t n, unsigned* acc) {
  const int64_t tiles = (n + 256 * U - 1) / (256 * U);
  uint4 v[U];
  auto load = [&](int64_t t) {
    const int64_t base = t * 256 * U + threadIdx.x;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + (int64_t)u * 256;
      v[u] = i < n ? __ldcs(p + i) : make_uint4(0, 0, 0, 0);
    }
  };
  int64_t t = blockIdx.x;
  if (t < tiles) load(t);
  G3_PDL_WAIT();
  G3_PDL_LAUNCH();
  unsigned x = 0;
  while (t < tiles) {
    uint4 w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) w[u] = v[u];
    t += gridDim.x;
    if (t < tiles) load(t);
#pragma unroll
    for (int u = 0; u < U; ++u) x ^= xor4(w[u]);
  }
  warp_xor_out(x, acc);
}

// The engine's plain decode GEMV (gemm.cu's gemv_bf16_kernel, M = 1, no residual step) with its loads a round U a
// lane instead of 4: the same chunks in the same order a lane (so the same bits for any U), wpr warps a row.
template <bool GEGLU, int U, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_u(void* out_, const bf16* __restrict__ x, const bf16* __restrict__ W, int N,
                                              int K, int wpr) {
  constexpr int R = GEGLU ? 2 : 1;
  __shared__ float red[8][R];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows_per_block = 8 / wpr;
  const int n = blockIdx.x * rows_per_block + warp / wpr, wi = warp % wpr;
  const int K8 = K / 8, stride = wpr * 32;
  uint4 wv[R][U];
  auto load_w = [&](int c0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4* wr = reinterpret_cast<const uint4*>(W + (int64_t)(n + r * N) * K);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * stride;
        wv[r][u] = c < K8 ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  const int cfirst = wi * 32 + lane;
  if (n < N) load_w(cfirst);
  G3_PDL_WAIT();
  G3_PDL_LAUNCH();
  float acc[R][1] = {};
  if (n < N) {
    for (int c0 = cfirst; c0 < K8; c0 += stride * U) {
      if (c0 != cfirst) load_w(c0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * stride;
        if (c < K8) gemv_chunk_fma<1, R, U, false>(acc, wv, u, x, K, c);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r][0] = warp_sum(acc[r][0]);
  if (wpr > 1) {
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < R; ++r) red[warp][r] = acc[r][0];
    __syncthreads();
    if (wi == 0)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float t = 0.f;
        for (int w = 0; w < wpr; ++w) t += red[warp + w][r];
        acc[r][0] = t;
      }
  }
  if (lane == 0 && wi == 0 && n < N) {
    if constexpr (GEGLU) static_cast<bf16*>(out_)[n] = __float2bfloat16_rn(gelu_tanh(acc[0][0]) * acc[1][0]);
    else static_cast<float*>(out_)[n] = acc[0][0];
  }
}

__global__ void read_reference(const uint4* __restrict__ p, int64_t n, unsigned* acc) {
  unsigned x = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x ^= xor4(p[i]);
  warp_xor_out(x, acc);
}

// bf16 values in [-1, 1) from a hash of the index (finite, so the GEMVs stay finite too)
__global__ void fill_bf16(bf16* p, int64_t n, unsigned seed) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed ^ (unsigned)(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16((float)(h & 0xffffu) / 32768.f - 1.f);
  }
}

struct Product {
  const char* name;
  int N, K;  // W[N, K]; gate_up: N = 2F rows (gate then up)
  bool geglu;
};

struct Shape {
  const char* name;
  int layers;
  std::vector<Product> prods;
};

static Shape shape_of(const std::string& s) {
  if (s == "1b") return {"1B", 26, {{"qkv", 1536, 1152, false}, {"o", 1152, 1024, false}, {"gate_up", 2 * 6912, 1152, true}, {"down", 1152, 6912, false}}};
  if (s == "4b") return {"4B", 34, {{"qkv", 4096, 2560, false}, {"o", 2560, 2048, false}, {"gate_up", 2 * 10240, 2560, true}, {"down", 2560, 10240, false}}};
  if (s == "270m") return {"270M", 18, {{"qkv", 1536, 640, false}, {"o", 640, 1024, false}, {"gate_up", 2 * 2048, 640, true}, {"down", 640, 2048, false}}};
  std::fprintf(stderr, "unknown size %s (270m, 1b, 4b)\n", s.c_str());
  std::exit(2);
}

int main(int argc, char** argv) {
  std::string sizes = "270m,1b,4b";
  int reps = 15, max_layers = 1 << 20, check_only = 0, sweep = 1;
  for (int a = 1; a + 1 < argc; a += 2) {
    const std::string k = argv[a];
    if (k == "--sizes") sizes = argv[a + 1];
    else if (k == "--reps") reps = std::atoi(argv[a + 1]);
    else if (k == "--layers") max_layers = std::atoi(argv[a + 1]);
    else if (k == "--check-only") check_only = std::atoi(argv[a + 1]);
    else if (k == "--sweep") sweep = std::atoi(argv[a + 1]);
  }
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, L2 %d MB; PDL %s; median of %d graph replays\n", prop.name, sms,
              prop.l2CacheSize >> 20, pdl_flag() ? "on" : "off", reps);
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::printf("cublasCreate failed\n");
    return 1;
  }
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  int failed = 0;

  // times a captured chain: median ms over reps replays (two warm-ups)
  auto time_graph = [&](const std::function<void()>& body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    body();
    CUDA_CHECK(cudaStreamEndCapture(s, &g));
    CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    std::vector<float> t;
    for (int r = 0; r < reps + 2; ++r) {
      CUDA_CHECK(cudaEventRecord(e0, s));
      CUDA_CHECK(cudaGraphLaunch(ge, s));
      CUDA_CHECK(cudaEventRecord(e1, s));
      CUDA_CHECK(cudaStreamSynchronize(s));
      float ms = 0.f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 2) t.push_back(ms);
    }
    CUDA_CHECK(cudaGraphExecDestroy(ge));
    CUDA_CHECK(cudaGraphDestroy(g));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };

  for (size_t pos = 0; pos < sizes.size();) {
    size_t comma = sizes.find(',', pos);
    if (comma == std::string::npos) comma = sizes.size();
    const Shape sh = shape_of(sizes.substr(pos, comma - pos));
    pos = comma + 1;
    const int L = std::max(1, std::min(sh.layers, max_layers)), P = (int)sh.prods.size();
    std::vector<int64_t> off;  // element offset of (layer, product)
    int64_t total = 0;
    for (int l = 0; l < L; ++l)
      for (const Product& p : sh.prods) {
        off.push_back(total);
        total += ((int64_t)p.N * p.K + 63) / 64 * 64;  // 128-byte aligned slices
      }
    int maxN = 0, maxK = 0;
    for (const Product& p : sh.prods) maxN = std::max(maxN, p.N), maxK = std::max(maxK, p.K);
    bf16 *W = nullptr, *x = nullptr, *act = nullptr;
    float* out = nullptr;
    unsigned* acc = nullptr;
    CUDA_CHECK(cudaMalloc(&W, total * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(&x, maxK * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(&act, maxN * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(&out, maxN * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&acc, (size_t)L * P * kSlots * sizeof(unsigned)));
    fill_bf16<<<4 * sms, 256, 0, s>>>(W, total, 1u);
    fill_bf16<<<4 * sms, 256, 0, s>>>(x, maxK, 2u);
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::printf("\n%s: %d layers x (%s", sh.name, L, sh.prods[0].name);
    for (int i = 1; i < P; ++i) std::printf(", %s", sh.prods[i].name);
    std::printf("), %.1f MB of weights\n", total * 2.0 / 1e6);
    auto slice = [&](int l, int i) { return reinterpret_cast<const uint4*>(W + off[l * P + i]); };
    auto chunks = [&](int i) { return (int64_t)sh.prods[i].N * sh.prods[i].K / 8; };

    // the variants: a read-only kernel (run), or a GEMV of product i of layer l (gemv)
    using Reader = std::function<void(const uint4*, int64_t, unsigned*)>;
    using Gemv = std::function<void(int, int)>;
    struct Variant {
      std::string name;
      Reader run;
      Gemv gemv;
    };
    std::vector<Variant> vars;
    auto w_of = [&](int l, int i) { return reinterpret_cast<const bf16*>(slice(l, i)); };
    vars.push_back({"gemv", nullptr, [&](int l, int i) {
                      const Product& p = sh.prods[i];
                      if (p.geglu) gemm_geglu<bf16>(h, act, nullptr, x, w_of(l, i), 1, p.K, p.N / 2, 0, s);
                      else gemm(h, out, x, w_of(l, i), true, 1, p.K, p.N, 0, s);
                    }});
    // the engine's GEMV rebuilt with wpr warps a row, U loads a lane a round and launch bounds asking for minb
    // blocks an SM (0: none)
    struct Cfg {
      int U, wpr, minb;
    };
    auto run_u = [&](const Cfg& c, int l, int i) {
      const Product& p = sh.prods[i];
      const int rows = p.geglu ? p.N / 2 : p.N;
      const int w = c.wpr ? c.wpr : gemv_shape(1, rows, p.K, p.geglu, false).wpr;
      const int blocks = (rows + 8 / w - 1) / (8 / w);
      void* o = p.geglu ? (void*)act : (void*)out;
      bool done = false;
#define G3_U(UU, MB)                                                                                              \
  if (c.U == UU && c.minb == MB) {                                                                                \
    if (p.geglu) launch_k(gemv_u<true, UU, MB>, blocks, 256, 0, s, o, x, w_of(l, i), rows, p.K, w);               \
    else launch_k(gemv_u<false, UU, MB>, blocks, 256, 0, s, o, x, w_of(l, i), rows, p.K, w);                      \
    done = true;                                                                                                  \
  }
      G3_U(4, 0) G3_U(5, 0) G3_U(8, 0) G3_U(10, 0)
      G3_U(4, 5) G3_U(5, 5) G3_U(8, 5) G3_U(10, 5)
      G3_U(4, 6) G3_U(5, 6) G3_U(8, 6) G3_U(10, 6)
#undef G3_U
      if (!done) throw std::runtime_error("no such GEMV configuration");
    };
    std::vector<Cfg> cfgs;
    for (int U : {4, 5, 8, 10})
      for (int w : {1, 2, 4, 8})
        for (int mb : {0, 5, 6}) cfgs.push_back({U, w, mb});
    vars.push_back({"u4 rule", nullptr, [&, run_u](int l, int i) { run_u({4, 0, 0}, l, i); }});  // must match "gemv"
    std::vector<Cfg> best(P, Cfg{4, 0, 0});  // filled by the sweep below, before timing
    vars.push_back({"best", nullptr, [&, run_u](int l, int i) { run_u(best[i], l, i); }});
    auto add_parts = [&](auto kern, const char* name) {
      vars.push_back({name, [=](const uint4* p, int64_t n, unsigned* a) {
                        launch_k(kern, (int)((n + 256 * 8 - 1) / (256 * 8)), 256, 0, s, p, n, a,
                                 reinterpret_cast<const uint4*>(x));
                      }, nullptr});
    };
    add_parts(read_parts<8, false, false>, "short 8");
    add_parts(read_parts<8, true, false>, "short 8 x");
    add_parts(read_parts<8, false, true>, "short 8 r");
    add_parts(read_parts<8, true, true>, "short 8 xr");
    auto add_loop = [&](auto kern, const char* name, int U, int per_sm) {
      vars.push_back({std::string(name) + " " + std::to_string(U) + "/" + std::to_string(per_sm),
                      [=](const uint4* p, int64_t n, unsigned* a) {
                        const int64_t tiles = (n + 256 * U - 1) / (256 * U);
                        launch_k(kern, (int)std::min<int64_t>(tiles, (int64_t)per_sm * sms), 256, 0, s, p, n, a);
                      }, nullptr});
    };
    add_loop(read_loop<8>, "loop", 8, 4);

    // checks: every read-only variant's checksum of every slice equals the reference's (the GEMV variants: agrees below)
    int checked = 0;
    {
      const int S = L * P * kSlots;
      auto sums = [&] {
        std::vector<unsigned> a(S), r(L * P, 0u);
        CUDA_CHECK(cudaMemcpyAsync(a.data(), acc, S * sizeof(unsigned), cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        for (int j = 0; j < S; ++j) r[j / kSlots] ^= a[j];
        return r;
      };
      CUDA_CHECK(cudaMemsetAsync(acc, 0, S * sizeof(unsigned), s));
      for (int l = 0; l < L; ++l)
        for (int i = 0; i < P; ++i)
          read_reference<<<2 * sms, 256, 0, s>>>(slice(l, i), chunks(i), acc + (l * P + i) * kSlots);
      const std::vector<unsigned> ref = sums();
      for (const Variant& v : vars) {
        if (!v.run) continue;
        CUDA_CHECK(cudaMemsetAsync(acc, 0, S * sizeof(unsigned), s));
        for (int l = 0; l < L; ++l)
          for (int i = 0; i < P; ++i) v.run(slice(l, i), chunks(i), acc + (l * P + i) * kSlots);
        if (sums() != ref) {
          std::printf("CHECK FAILED: %s's checksums differ from the reference\n", v.name.c_str());
          failed = 1;
        }
        ++checked;
      }
    }
    auto outputs = [&](const Variant& v, int i) {
      const Product& p = sh.prods[i];
      const int rows = p.geglu ? p.N / 2 : p.N;
      CUDA_CHECK(cudaMemsetAsync(out, 0xff, maxN * sizeof(float), s));
      CUDA_CHECK(cudaMemsetAsync(act, 0xff, maxN * sizeof(bf16), s));
      v.gemv(0, i);
      std::vector<double> r(rows);
      if (p.geglu) {
        std::vector<bf16> a(rows);
        CUDA_CHECK(cudaMemcpyAsync(a.data(), act, rows * sizeof(bf16), cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        for (int j = 0; j < rows; ++j) r[j] = __bfloat162float(a[j]);
      } else {
        std::vector<float> a(rows);
        CUDA_CHECK(cudaMemcpyAsync(a.data(), out, rows * sizeof(float), cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        for (int j = 0; j < rows; ++j) r[j] = a[j];
      }
      return r;
    };
    // a GEMV variant's outputs of layer 0's products against the engine's (another summation order: within 4e-7 K
    // for the float32 outputs, 1 % + 1e-3 for the bf16 GeGLU ones); false if not
    auto agrees = [&](const Variant& v, int i) {
      const std::vector<double> want = outputs(vars[0], i), got = outputs(v, i);
      double worst = 0.0;
      for (size_t j = 0; j < want.size(); ++j) {
        const double tol = sh.prods[i].geglu ? 1e-2 * std::abs(want[j]) + 1e-3 : 4e-7 * sh.prods[i].K;
        const double e = std::abs(got[j] - want[j]);
        worst = std::max(worst, std::isfinite(e) ? e / tol : 1e30);
      }
      if (worst > 1.0) {
        std::printf("CHECK FAILED: %s, %s: worst error %.3g of the bound\n", v.name.c_str(), sh.prods[i].name, worst);
        failed = 1;
      }
      ++checked;
      return worst <= 1.0;
    };
    for (int i = 0; i < P; ++i)
      for (const Variant& v : vars)
        if (v.gemv && &v != &vars[0]) agrees(v, i);
    if (failed) return 1;

    // the chain's launches for one variant; which = -1: every product of every layer, else product `which` only
    auto chain = [&](const Variant& v, int which) {
      return time_graph([&] {
        for (int l = 0; l < L; ++l)
          for (int i = 0; i < P; ++i) {
            if (which >= 0 && i != which) continue;
            if (v.run) v.run(slice(l, i), chunks(i), acc + (l * P + i) * kSlots);
            else v.gemv(l, i);
          }
      });
    };
    if (check_only) {
      for (int i = 0; i < P; ++i)
        for (const Cfg& c : cfgs)
          if (!agrees({"sweep", nullptr, [&, c](int l, int j) { run_u(c, l, j); }}, i)) return 1;
      std::printf("%s: checks passed: %d (read-only checksums over %d slices; every GEMV configuration against the "
                  "engine's)\n", sh.name, checked, L * P);
    }
    // each product alone over the layers with every configuration; the fastest goes into "best"
    for (int i = 0; i < P && !check_only && sweep; ++i) {
      std::vector<std::pair<float, int>> t;
      for (size_t k = 0; k < cfgs.size(); ++k) {
        const Cfg c = cfgs[k];
        const Variant v{"u" + std::to_string(c.U) + " w" + std::to_string(c.wpr) + " b" + std::to_string(c.minb), nullptr,
                        [&, c](int l, int j) { run_u(c, l, j); }};
        if (!agrees(v, i)) return 1;
        t.push_back({chain(v, i) * 1e3f / L, (int)k});
      }
      std::sort(t.begin(), t.end());
      best[i] = cfgs[t[0].second];
      std::printf("%s %s, us a launch (U loads a round, w warps a row, b blocks an SM asked):", sh.name, sh.prods[i].name);
      for (size_t k = 0; k < std::min<size_t>(t.size(), 8); ++k) {
        const Cfg& c = cfgs[t[k].second];
        std::printf("  u%d w%d b%d %.2f", c.U, c.wpr, c.minb, t[k].first);
      }
      std::printf("\n");
    }
    if (!check_only) {
      std::printf("checks passed: %d (read-only checksums over %d slices; GEMV outputs against the engine's)\n", checked,
                  L * P);
      std::printf("%-10s %10s %8s", "variant", "chain ms", "TB/s");
      for (const Product& p : sh.prods) std::printf(" %9s us %5s", p.name, "TB/s");
      std::printf("\n");
      for (const Variant& v : vars) {
        const float ms = chain(v, -1);
        std::printf("%-10s %10.3f %8.3f", v.name.c_str(), ms, total * 2.0 / ms / 1e9);
        for (int i = 0; i < P; ++i) {
          const float mi = chain(v, i);
          const double bytes = 2.0 * sh.prods[i].N * sh.prods[i].K;
          std::printf(" %12.2f %5.2f", mi * 1e3 / L, bytes * L / mi / 1e9);
        }
        std::printf("\n");
      }
      // one long read: the 4B LM head's bytes (262144 x 2560 bf16) in one launch, as a steady-state reference
      {
        const int64_t n = std::min<int64_t>(total, (int64_t)262144 * 2560) / 8;
        for (const Variant& v : vars) {
          if (!v.run) continue;
          const float ms = time_graph([&] { v.run(reinterpret_cast<const uint4*>(W), n, acc); });
          std::printf("one read of %.0f MB, %-9s %8.1f us %6.3f TB/s\n", n * 16 / 1e6, v.name.c_str(), ms * 1e3,
                      n * 16 / ms / 1e9);
        }
      }
    }
    CUDA_CHECK(cudaFree(W));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(act));
    CUDA_CHECK(cudaFree(out));
    CUDA_CHECK(cudaFree(acc));
  }
  cublasDestroy(h);
  return failed;
}
