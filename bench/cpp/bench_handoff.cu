// bench_handoff.cu: what one dependent handoff between decode stages costs on this GPU, with no work around it.
// A decode step is a chain of ~130-210 stages, each needing the one before complete. Three ways to hand over:
//   pdl       one launch per stage in a CUDA graph, programmatic dependent launch (the engine's way): the next
//             kernel's blocks launch at the trigger and pass griddepcontrol.wait once this grid has completed;
//   pdl_early the same, each kernel triggering at its entry (the engine's early trigger: the next kernel resident
//             while this one runs);
//   counter   one persistent (cooperative) kernel, each stage ending in an arrive on a global counter (fence +
//             atomic add by every block) and the next stage waiting until it reaches stages x blocks (what a
//             megakernel's stages would do, here every block depending on every block);
//   flag      the same kernel with one producer block per stage (block 0 writes, fences and releases a flag;
//             the other blocks acquire it): a stage whose output one block makes.
// Every stage: each block reads v[i - 1] (made by the stage before), block 0 writes v[i] = v[i - 1] + 1. Checked
// before timing: v[i] = i for every stage and every block saw it (bad[] counts blocks that read a wrong value).
// Reported: median over repeats of the chain's time / stages, for 1 block and one block per SM.
//   bench_handoff [--stages N] [--reps R]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/common.cuh"

using namespace g3cuda;

__global__ void pdl_stage(int* v, int* bad, int i, int early) {
  if (early) G3_PDL_LAUNCH();
  G3_PDL_WAIT();
  if (!early) G3_PDL_LAUNCH();
  if (threadIdx.x == 0) {
    const int prev = *(volatile int*)&v[i - 1];
    if (prev != i - 1) atomicAdd(bad, 1);
    if (blockIdx.x == 0) v[i] = prev + 1;
  }
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned x;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(x) : "l"(p) : "memory");
  return x;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned x) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}

// mode 0: counter (every block arrives, every block waits for all); mode 1: flag (block 0 releases stage i's flag)
__global__ void persistent_chain(int* v, int* bad, unsigned* sync, int stages, int mode) {
  const unsigned G = gridDim.x;
  for (int i = 1; i < stages; ++i) {
    if (threadIdx.x == 0) {
      if (mode == 0) {
        while (ld_acquire(sync) < (unsigned)(i - 1) * G) {
        }
      } else if (i > 1) {
        while (ld_acquire(sync + i - 1) == 0u) {
        }
      }
      const int prev = *(volatile int*)&v[i - 1];
      if (prev != i - 1) atomicAdd(bad, 1);
      if (blockIdx.x == 0) {
        v[i] = prev + 1;
        if (mode == 1) {
          __threadfence();
          st_release(sync + i, 1u);
        }
      }
      if (mode == 0) {
        __threadfence();
        atomicAdd(sync, 1u);
      }
    }
    __syncthreads();
  }
}

int main(int argc, char** argv) {
  int stages = 256, reps = 21;
  for (int a = 1; a + 1 < argc; a += 2) {
    const std::string k = argv[a];
    if (k == "--stages") stages = std::atoi(argv[a + 1]);
    else if (k == "--reps") reps = std::atoi(argv[a + 1]);
  }
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs; %d stages, median of %d repeats\n", prop.name, sms, stages, reps);
  int *v = nullptr, *bad = nullptr;
  unsigned* sync = nullptr;
  CUDA_CHECK(cudaMalloc(&v, stages * sizeof(int)));
  CUDA_CHECK(cudaMalloc(&bad, sizeof(int)));
  CUDA_CHECK(cudaMalloc(&sync, (stages + 1) * sizeof(unsigned)));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  auto reset = [&] {
    CUDA_CHECK(cudaMemsetAsync(v, 0, stages * sizeof(int), s));
    CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), s));
    CUDA_CHECK(cudaMemsetAsync(sync, 0, (stages + 1) * sizeof(unsigned), s));
  };
  int failed = 0;
  // run(): the chain once (between e0 and e1); returns us per stage after checking v and bad
  auto measure = [&](const char* name, int G, auto&& run) {
    std::vector<float> t;
    for (int r = 0; r < reps + 2; ++r) {
      reset();
      CUDA_CHECK(cudaEventRecord(e0, s));
      run();
      CUDA_CHECK(cudaEventRecord(e1, s));
      CUDA_CHECK(cudaStreamSynchronize(s));
      float ms = 0.f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      std::vector<int> hv(stages);
      int hb = 0;
      CUDA_CHECK(cudaMemcpy(hv.data(), v, stages * sizeof(int), cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(&hb, bad, sizeof(int), cudaMemcpyDeviceToHost));
      bool ok = hb == 0;
      for (int i = 0; i < stages; ++i) ok = ok && hv[i] == i;
      if (!ok) {
        std::printf("CHECK FAILED: %s, %d blocks: %d wrong reads, v[last] = %d\n", name, G, hb, hv[stages - 1]);
        failed = 1;
        return;
      }
      if (r >= 2) t.push_back(ms * 1e3f / (stages - 1));  // two warm-up repeats
    }
    std::sort(t.begin(), t.end());
    std::printf("%-10s %4d blocks: %6.3f us a handoff (min %.3f)\n", name, G, t[t.size() / 2], t.front());
  };
  for (int G : {1, sms}) {
    for (int early = 0; early <= 1; ++early) {
      // the chain as a graph of stages - 1 launches, as the engine captures a step
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      for (int i = 1; i < stages; ++i) launch_k(pdl_stage, G, 128, 0, s, v, bad, i, early);
      CUDA_CHECK(cudaStreamEndCapture(s, &g));
      CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
      measure(early ? "pdl_early" : "pdl", G, [&] { CUDA_CHECK(cudaGraphLaunch(ge, s)); });
      CUDA_CHECK(cudaGraphExecDestroy(ge));
      CUDA_CHECK(cudaGraphDestroy(g));
    }
    for (int mode = 0; mode <= 1; ++mode)
      measure(mode == 0 ? "counter" : "flag", G, [&] {
        CUDA_CHECK(launch_ex(Launch::Cooperative, 0, persistent_chain, dim3(G), dim3(128), 0, s, v, bad, sync, stages,
                             mode));
      });
  }
  return failed;
}
