// tma.cuh: Hopper's bulk-copy engine (TMA) and the shared-memory mbarriers its copies complete on: plain
// bulk copies of contiguous bytes (decode_persistent.cu's weight ring) and tiled copies through a tensor
// map (vision_attention_wgmma.cu's key / value tiles); and st.async, a block's stores into another block of its
// cluster that complete on the receiver's mbarrier (decode_split.cuh's cluster combine). sm_90 instructions: the kernels using them are only
// launched on compute capability 9 and newer; older targets compile them to a trap.
#pragma once
#include <cuda.h>  // CUtensorMap
#include "mma.cuh"

namespace g3cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define G3_SM90_ASM(...) __trap()
#else
#define G3_SM90_ASM(...) asm volatile(__VA_ARGS__)
#endif

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  G3_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes mbarrier initialisations visible to the bulk-copy engine (then a block barrier for the threads).
__device__ __forceinline__ void mbar_init_fence() { G3_SM90_ASM("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  G3_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  G3_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// Cluster: acquire at cluster scope, for bytes other blocks of the cluster stored (st_async below).
template <bool Cluster = false>
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
    if constexpr (Cluster)
      G3_SM90_ASM(
          "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(smem_addr(bar)), "r"(parity)
          : "memory");
    else
      G3_SM90_ASM(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(smem_addr(bar)), "r"(parity)
          : "memory");
  } while (!done);
}
// Stores into another block of the cluster: the shared::cluster address of `p` in block `rank`, and
// 8 / 16 bytes stored there whose completion counts on that block's mbarrier (an address from the same map).
__device__ __forceinline__ uint32_t cluster_map_u32(const void* p, int rank) {
  uint32_t r = 0;
  G3_SM90_ASM("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_addr(p)), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_async_v4(uint32_t addr, float4 v, uint32_t bar) {
  G3_SM90_ASM("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(addr),
              "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar)
              : "memory");
}
__device__ __forceinline__ void st_async_v2(uint32_t addr, float a, float b, uint32_t bar) {
  G3_SM90_ASM("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(addr), "f"(a),
              "f"(b), "r"(bar)
              : "memory");
}
// `bytes` contiguous bytes global -> shared, completing on `bar` (which expects them).
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  G3_SM90_ASM("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
// One box of a 3-d tensor map at element coordinates (c0, c1, c2) -> shared `dst`, completing on `bar`;
// the box's parts outside the tensor arrive as zeros (and count as bytes).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint64_t* bar) {
  G3_SM90_ASM(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// The same for a 4-d tensor map.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  G3_SM90_ASM(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

}  // namespace g3cuda
