// trace.cuh: a timeline of the kernels as they run in a replayed graph (build option GEMMA3_TRACE, off by
// default; bench/gpu/trace_decode.py reads it). ncu times each launch alone, without the PDL overlap that
// decides the decode step; this records, per block, when it became resident (entry), when its
// griddepcontrol.wait returned and when it left, all in %globaltimer, with the launch's %gridid (a
// number per launch, which a graph's node keeps over its replays), so that the critical path through the step (the
// hand-off from one kernel's last block to the next one's wait, the work after the wait) can be read off.
// G3_TRACE_MARK(i) (i = 0..3) records four more times of thread 0 where a kernel places them.
// Hooked into the PDL macros (common.cuh), which every kernel opens with: thread 0 of a block stores its
// record at exit into a slot fixed by (gridid mod kRegions, block): no atomic, so no round trip delays the
// block's exit (a first version took a per-SM slot counter; its atomic under the weight stream's load added
// ~1-2 us to every block's exit and 3-6 % to the step). A replay overwrites the one before: the table holds
// the last replay of each node (two launches whose gridids meet mod kRegions would share slots: the reader
// counts launches with records missing). Grids of more than kSlots blocks record every 64th block and their last 512.
#pragma once
#ifdef G3_TRACE
#include <cuda_runtime.h>
#include <cstdint>
#include <vector>

namespace g3trace {

struct Rec {  // 80 bytes; bench/gpu/trace_decode.py reads this layout
  unsigned long long t0, tw, t1, gridid, tm[4];
  unsigned tag, block, grid, smid;
};
static_assert(sizeof(Rec) == 80, "bench/gpu/trace_decode.py reads 80-byte records");
constexpr int kRegions = 2048, kSlots = 4096;  // 671 MB

// Per translation unit (no relocatable device code): each unit's copy is set by its attach() below.
static __device__ Rec* d_buf = nullptr;
static __shared__ unsigned long long s_tw, s_tm[4];

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ bool thread0() { return threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0; }
__device__ __forceinline__ void mark_wait() {
  if (thread0()) s_tw = now();
}
__device__ __forceinline__ void mark(int i) {
  if (thread0()) s_tm[i] = now();
}

// A kernel's tag: the source file's name (FNV-1a of the part after the last '/', 16 bits) and the line of
// the PDL macro, so that the reader can name it.
constexpr unsigned fnv(const char* s, unsigned h = 2166136261u) {
  return *s ? fnv(s + 1, (h ^ (unsigned char)*s) * 16777619u) : h;
}
constexpr const char* base(const char* s, const char* b) { return *s ? base(s + 1, *s == '/' ? s + 1 : b) : b; }
constexpr unsigned tag(const char* file, int line) {
  return ((fnv(base(file, file)) & 0xffffu) << 16) | (unsigned)line;
}

struct Scope {
  unsigned long long t0 = 0;
  unsigned tag;
  __device__ explicit Scope(unsigned t) : tag(t) {
    if (thread0()) {
      t0 = now();
      s_tw = s_tm[0] = s_tm[1] = s_tm[2] = s_tm[3] = 0;
    }
  }
  __device__ ~Scope() {
    if (!thread0()) return;
    // the exit time before d_buf's load: a global load, which under the next kernel's prologue loads takes
    // up to ~1 us and (read first, as until session 19) put that into every block's exit
    const unsigned long long t1 = now();
    if (!d_buf) return;
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned grid = gridDim.x * gridDim.y * gridDim.z;
    unsigned slot = block;
    if (grid > (unsigned)kSlots) {
      if (block + 512 >= grid) slot = kSlots - 512 + (block + 512 - grid);
      else if (block % 64 == 0 && block / 64 < (unsigned)kSlots - 512) slot = block / 64;
      else return;
    }
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    unsigned long long gid;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(gid));
    d_buf[(size_t)(gid % kRegions) * kSlots + slot] =
        Rec{t0, s_tw, t1, gid, {s_tm[0], s_tm[1], s_tm[2], s_tm[3]}, tag, block, grid, sm};
  }
};

// Host: every translation unit that includes this registers a function that points its own d_buf.
inline std::vector<cudaError_t (*)(Rec*)>& attachers() {
  static std::vector<cudaError_t (*)(Rec*)> v;
  return v;
}
static cudaError_t attach(Rec* buf) { return cudaMemcpyToSymbol(d_buf, &buf, sizeof buf); }
static const bool attach_registered = (attachers().push_back(&attach), true);

}  // namespace g3trace

#define G3_TRACE_SCOPE() ::g3trace::Scope g3_trace_scope_(::g3trace::tag(__FILE__, __LINE__))
#define G3_TRACE_WAIT() ::g3trace::mark_wait()
#define G3_TRACE_MARK(i) ::g3trace::mark(i)
#else
#define G3_TRACE_MARK(i) \
  do {                   \
  } while (0)
#define G3_TRACE_SCOPE() \
  do {                   \
  } while (0)
#define G3_TRACE_WAIT() \
  do {                  \
  } while (0)
#endif
