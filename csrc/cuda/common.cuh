// common.cuh: shared pieces of the CUDA kernels: error checks, the element type T (float or bf16)
// with its load/store helpers, warp/block reductions, and the ring-buffer write rule of the KV cache.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "trace.cuh"

namespace g3cuda {

using bf16 = __nv_bfloat16;

inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + " (" + what +
                             "): " + cudaGetErrorString(e));
}
#define CUDA_CHECK(x) ::g3cuda::check_cuda((x), #x, __FILE__, __LINE__)
// After every launch: catches bad launch configurations at once (no sync).
#define CUDA_LAUNCH_CHECK() ::g3cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Programmatic dependent launch (Hopper): every kernel is launched with the programmatic-serialization
// attribute, so its launch overlaps the tail of the kernel before it in the stream (in the decode
// graph: the gaps between ~150-300 small kernels). Each kernel's first statement is G3_PDL_ENTRY():
// wait until the previous grid has completed and its writes are visible (nothing is read or written
// before that), then let the next kernel start launching.
// A kernel with a prologue splits this in two: before G3_PDL_WAIT() it may read only what no kernel of
// the step before it writes (weights, norm weights, the forward's metadata, keys cached by earlier
// steps): when kernel N starts, kernel N-2 has completed (N-1 let N launch only after its own wait), so
// the metadata copy that opens the forward is done, but N-1 may still be running.
// In a GEMMA3_TRACE build the entry macros also open the kernel's timeline record and the wait marks when it
// returned (trace.cuh); otherwise those hooks are empty statements.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define G3_PDL_WAIT()                                    \
  do {                                                   \
    asm volatile("griddepcontrol.wait;" ::: "memory");   \
    G3_TRACE_WAIT();                                     \
  } while (0)
#define G3_PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define G3_PDL_WAIT() \
  do {                \
  } while (0)
#define G3_PDL_LAUNCH() \
  do {                  \
  } while (0)
#endif
#define G3_PDL_ENTRY() \
  G3_TRACE_SCOPE();    \
  do {                 \
    G3_PDL_WAIT();     \
    G3_PDL_LAUNCH();   \
  } while (0)

// The current device's compute capability as 10 * major + minor (90: Hopper), read once; 0 without a device.
inline int device_cc() {
  static const int cc = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return 10 * major + minor;
  }();
  return cc;
}

// 1 on compute capability >= 9 unless the environment sets G3_PDL=0; set_pdl() overrides.
inline int& pdl_flag() {
  static int f = [] {
    const char* e = std::getenv("G3_PDL");
    return (device_cc() >= 90 && !(e && e[0] == '0')) ? 1 : 0;
  }();
  return f;
}

// The kernels' PDL prologues (the GEMV's first weights, the norms' weights and residual row, QK-norm +
// RoPE's weights and angles, the decode attention's cached keys and values but the new token's, loaded
// before the wait for the kernel before): on unless the environment sets G3_PDL_PROLOGUE=0;
// set_pdl_prologue() overrides (switchable so that the benchmark times the step both ways in one run).
inline int& pdl_prologue_flag() {
  static int f = [] {
    const char* e = std::getenv("G3_PDL_PROLOGUE");
    return (e && e[0] == '0') ? 0 : 1;
  }();
  return f;
}
inline bool pdl_prologue() { return pdl_prologue_flag() != 0; }

// Where a kernel lets the next one launch. By default after its own wait (G3_PDL_ENTRY), so that when
// kernel N starts, N-2 has completed. With the early trigger (kPdlEarly) a kernel lets the next launch at
// its entry: the next kernel's blocks become resident and run their prologues (weight loads) while this
// one and the ones before it still run, so a chain of short dependent kernels is resident ahead of its
// data. Their prologues may then read only what no kernel of the step writes (weights, cached keys,
// metadata): a kernel whose successor reads the residual row in its prologue (residual_rmsnorm, the fused
// residual GEMVs) triggers early only if that successor is launched with kPdlResidLate (the row read
// after its wait). Host side: pdl_next_flags() holds the kPdlEarly / kPdlResidLate bits of the launches
// made now (the engine's decode forward sets them around each launch; 0 elsewhere); the kernels with
// prologues get them with pdl_flags(), bit 0 (kPdlPrologue) from pdl_prologue(). Kernels without a
// prologue keep G3_PDL_ENTRY.
constexpr int kPdlPrologue = 1, kPdlEarly = 2, kPdlResidLate = 4;
inline int& pdl_next_flags() {
  static int f = 0;
  return f;
}
inline int pdl_flags() { return (pdl_prologue() ? kPdlPrologue : 0) | pdl_next_flags(); }
// Device side: at kernel entry, and in place of the wait (G3_PDL_WAIT + G3_PDL_LAUNCH).
#define G3_PDL_TRIGGER_EARLY(pdl)          \
  G3_TRACE_SCOPE();                        \
  do {                                     \
    if ((pdl) & ::g3cuda::kPdlEarly) G3_PDL_LAUNCH(); \
  } while (0)
#define G3_PDL_WAIT_FLAGS(pdl)                          \
  do {                                                  \
    G3_PDL_WAIT();                                      \
    if (!((pdl) & ::g3cuda::kPdlEarly)) G3_PDL_LAUNCH(); \
  } while (0)

// Kernels that hold a row in registers, PER elements a thread (residual_rmsnorm.cu, embedding.cu): calls
// f(std::integral_constant<int, PER>{}) with the smallest PER of 4, 8, 12, 16, 24 for which threads * PER covers
// n (fewer registers for short rows); false, without calling f, for longer rows.
constexpr int kRowMaxPer = 24;
template <typename F>
inline bool with_row_per(int n, int threads, F&& f) {
  if (n <= threads * 4) f(std::integral_constant<int, 4>{});
  else if (n <= threads * 8) f(std::integral_constant<int, 8>{});
  else if (n <= threads * 12) f(std::integral_constant<int, 12>{});
  else if (n <= threads * 16) f(std::integral_constant<int, 16>{});
  else if (n <= threads * kRowMaxPer) f(std::integral_constant<int, kRowMaxPer>{});
  else return false;
  return true;
}

// The decode attention's largest thread-block cluster (splits per cluster): the portable cluster size.
constexpr int kDecodeMaxCluster = 8;

// The launch every kernel goes through: with the programmatic-serialization attribute (when pdl_flag()),
// or, for a kernel whose blocks wait on each other (grid barriers), cooperative: all blocks resident.
// cluster_x > 0 (PDL launches, sm_90): blocks in thread-block clusters of cluster_x along x (at most
// kDecodeMaxCluster, dividing grid.x), which run at once and may read each other's shared memory (the
// decode attention's split combine).
enum class Launch { Pdl, Cooperative };
template <typename... KArgs, typename... Args>
inline cudaError_t launch_ex(Launch how, int cluster_x, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (how == Launch::Cooperative) {
    attr[n].id = cudaLaunchAttributeCooperative;
    attr[n++].val.cooperative = 1;
  } else {
    if (cluster_x > 0) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n++].val.clusterDim = {(unsigned)cluster_x, 1u, 1u};
    }
    if (pdl_flag()) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... KArgs, typename... Args>
inline void launch_k(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  check_cuda(launch_ex(Launch::Pdl, 0, kernel, grid, block, smem, s, std::forward<Args>(args)...),
             "cudaLaunchKernelEx", __FILE__, __LINE__);
}
template <typename... KArgs, typename... Args>
inline void launch_k_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, int cx,
                             Args&&... args) {
  check_cuda(launch_ex(Launch::Pdl, cx, kernel, grid, block, smem, s, std::forward<Args>(args)...),
             "cudaLaunchKernelEx (cluster)", __FILE__, __LINE__);
}

// Thread-block cluster primitives (sm_90). cluster_sync: every thread of every block of the cluster
// arrives (release) and waits (acquire): shared-memory writes before it are visible to the other blocks
// after it. cluster_map: the address of the same shared-memory variable in block `rank` of the cluster.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
#else
  __trap();
#endif
}
// The two halves of cluster_sync, for a block that must stay alive until the others have read its shared
// memory but has work of its own in between: arrive when done reading theirs, wait before exiting.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release;" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
#else
  __trap();
#endif
}
// The arrive of a split barrier whose wait comes much later, ordering nothing: a kernel that will write into
// the other blocks' shared memory arrives at its start and waits before its first such write, so that
// every block of the cluster has started (as the programming guide asks) at no cost by then.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
#else
  __trap();
#endif
}
template <typename T>
__device__ __forceinline__ const T* cluster_map(const T* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t r;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<const T*>(r);
#else
  __trap();
  return p;
#endif
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// 8 bf16 (one 16-byte load) to float; GELU with the tanh approximation (Gemma's activation).
__device__ __forceinline__ void bf16x8_to_f(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(p[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ float gelu_tanh(float g) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `sh` holds 33 doubles. Double: the norm statistic is then exact to float32 whatever the order,
// as in the CPU kernels.
__device__ __forceinline__ double block_sum(double v, double* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    double s = lane < nw ? sh[lane] : 0.0;
    s = warp_sum(s);
    if (lane == 0) sh[32] = s;
  }
  __syncthreads();
  return sh[32];
}

// KV-cache ring rule (see engine.cu): a chunk's new key/value at position `pos`, index `idx` within
// its chunk, may go straight into the cache before attention iff no query of the chunk still needs
// what its slot holds: always on global layers (no wrap), and on local layers for the chunk's first
// token (its slot held pos - cap, which no query of the chunk sees) or while the ring is unfilled.
__device__ __forceinline__ bool kv_direct_ok(bool local, int idx, int pos, int cap) {
  return !local || idx == 0 || pos < cap;
}

// Per-forward metadata on the device (one H2D copy per forward; inside the decode graph).
struct SeqMeta {
  const int32_t* slot;   // [B]
  const int32_t* start;  // [B] positions already cached
  const int32_t* len;    // [B] new tokens
  const int32_t* t0;     // [B] first row of the sequence's tokens
  // [T] or nullptr (causal): per token of the batch, the last key position it sees (>= its own; clamped
  // to its chunk's end). Multimodal prefill: the tokens of one image attend to each other bidirectionally.
  const int32_t* extent = nullptr;
};
struct TokMeta {
  const int32_t* pos;  // [T] absolute position
  const int32_t* seq;  // [T] sequence index b
};

}  // namespace g3cuda
