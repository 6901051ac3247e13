// decode_persistent.cu: the layers of a decode step (B <= 2 sequences of one token each, bf16) as one
// persistent kernel: one block of 8 warps per SM, the phases of a layer separated by grid-wide
// barriers instead of kernel boundaries. Measured on an H100 (bench/gpu/NOTES.md), the separate launches
// of the ordinary path cost 2-4 us each even inside a CUDA graph with programmatic dependent launch,
// 8 per layer, while 270M / 1B move only 11 / 54 MB of weights per layer (4 / 18 us at 3 TB/s).
//
// Per layer (every block takes part in every phase; | = grid barrier):
//   A  x += post_ffw_norm(down out) (layer 0: the scaled embedding); xn = input_norm(x), each block
//      for itself into shared memory (block 0 also writes x); qkv = xn . Wqkv                     |
//   B  attention items (split, kv head, sequence): the item's query heads QK-normed and RoPEd into
//      its tile, and (the split holding position p) k / v into the cache, then the tensor-core
//      decode block (attention_decode_tc.cuh) on warps 0-3                                       |
//   C  o = attn . Wo                                                                              |
//   D  x += post_attn_norm(o); xn = pre_ffw_norm(x); act = gelu(xn . Wgate) * (xn . Wup)          |
//   E  down = act . Wdown                                                                         |
// and after the last layer block 0 writes final_norm(x) for the LM head (an ordinary launch).
// The residual stream ping-pongs between two buffers, so that no block overwrites what another still
// reads before the next barrier.
// Products: block b owns a contiguous range of output rows of every product. Its slices of the weights
// stream through a ring of NS shared-memory slots (Hopper bulk copies, an mbarrier per slot), in the one
// order all phases of the step consume them, NS - 1 slots ahead: the next phase's first weights are in
// flight while the block waits at a grid barrier, runs the residual step or sits out the attention
// (weights do not depend on the activations). The warps then take the slot's rows (several warps per
// row when the slot holds fewer than 8, combined in a fixed order) against the activations in shared
// memory.
// Every sum is in a fixed order: the result does not depend on timing or on the batch size.
#include "attention_decode_tc.cuh"
#include "kernels.cuh"
#include "qk_prep.cuh"
#include "tma.cuh"

namespace g3cuda {

namespace {

constexpr int kPThreads = 256, kPWarps = kPThreads / 32, kPMaxSlots = 8;

// Grid-wide barrier on a counter that only grows during the launch (the last block out resets it):
// the block's writes are ordered before thread 0's release add by the block barrier, and its acquire
// load before everything after the second block barrier.
__device__ __forceinline__ void grid_barrier(unsigned* count, unsigned& target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    target += gridDim.x;
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count) : "memory");
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

// The weight ring's transfers: Hopper bulk copies (TMA, one instruction per contiguous run of rows)
// completing on a shared-memory mbarrier per slot. 16-byte cp.async from every thread measured at
// ~1.2 TB/s here (H100, 4B gate_up), the bulk engine is not limited by per-thread request slots.
// (tma.cuh.)

// The products of a layer in the order the phases consume them: qkv, o, gate_up (R = 2: the gate and
// up rows of an output), down.
enum Kind { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3, kKinds = 4 };

// The block's share of one product: output rows [r0, r1), `rows` of them per slot, nst slots.
struct Share {
  int r0, r1, rows, nst;
};

// The block's weight stream: every product of every layer, slot by slot, through the ring of ns slots.
// Every thread calls issue() and consume() together (the copies are spread over the block). The tables
// indexed by kind or layer live in shared memory: as arrays in the struct they would be local memory,
// which with this kernel's shared-memory carve-out is L2 traffic.
constexpr int kPMaxLayers = 64, kSlotTrace = kPersistentSlotTrace / 4;
struct StreamTables {
  uint64_t full[kPMaxSlots];  // per slot: its copies have landed (one phase per use)
  int N[kKinds], K[kKinds], R[kKinds];
  Share sh[kKinds];
  const bf16* W[kPMaxLayers][kKinds];
};

struct WeightStream {
  StreamTables* t;
  int L, ns, slot_elems;
  bf16* ring;
  int pl = 0, pk = 0, pst = 0;  // producer cursor: layer, kind, slot of that share
  unsigned issued = 0, consumed = 0;
  long long* slot_trace = nullptr;  // profiling (block 0, thread 0): 4 clocks per slot, the first kSlotTrace slots
  __device__ void stamp(int i) {
    if (slot_trace && consumed < kSlotTrace) slot_trace[4 * consumed + i] = clock64();
  }

  // fills tab (all threads call it; it ends with a block barrier)
  __device__ void init(const PersistentDecode& p, StreamTables* tab, bf16* ring_, int D) {
    t = tab;
    L = p.L;
    ns = p.ns;
    slot_elems = p.slot_bytes / 2;
    ring = ring_;
    if (threadIdx.x == 0) {
      const int QD = p.NH * D;
      const int n[kKinds] = {(p.NH + 2 * p.KVH) * D, p.H, p.F, p.H}, k[kKinds] = {p.H, QD, p.H, p.F};
      for (int i = 0; i < kKinds; ++i) {
        tab->N[i] = n[i];
        tab->K[i] = k[i];
        tab->R[i] = i == kGateUp ? 2 : 1;
        Share& s = tab->sh[i];
        s.r0 = (int)((int64_t)n[i] * blockIdx.x / gridDim.x);
        s.r1 = (int)((int64_t)n[i] * (blockIdx.x + 1) / gridDim.x);
        s.rows = max(1, p.slot_bytes / (tab->R[i] * k[i] * 2));
        s.nst = (s.r1 - s.r0 + s.rows - 1) / s.rows;
      }
    }
    if (threadIdx.x < p.ns) mbar_init(&tab->full[threadIdx.x], 1);
    for (int l = threadIdx.x; l < p.L; l += kPThreads) {
      tab->W[l][kQkv] = p.layers[l].qkv;
      tab->W[l][kO] = p.layers[l].o;
      tab->W[l][kGateUp] = p.layers[l].gate_up;
      tab->W[l][kDown] = p.layers[l].down;
    }
    __syncthreads();
    skip_empty();
  }
  __device__ void skip_empty() {
    while (pl < L && pst >= t->sh[pk].nst) {
      pst = 0;
      if (++pk == kKinds) {
        pk = 0;
        ++pl;
      }
    }
  }
  // thread 0: the next slot's copies (nothing past the end of the step)
  __device__ void issue() {
    if (pl < L) {
      if (threadIdx.x == 0) {
        const Share s = t->sh[pk];
        const bf16* W = t->W[pl][pk];
        const int row0 = s.r0 + pst * s.rows, nrows = min(s.rows, s.r1 - row0);
        const int K = t->K[pk], N = t->N[pk], R = t->R[pk];
        const unsigned bytes = (unsigned)nrows * K * 2;
        const unsigned j = issued % ns;
        bf16* dst = ring + (int64_t)j * slot_elems;
        uint64_t* bar = &t->full[j];
        G3_SM90_ASM("fence.proxy.async.shared::cta;" ::: "memory");  // the slot's last reads before the copy
        mbar_expect_tx(bar, bytes * R);
        for (int r = 0; r < R; ++r)
          bulk_copy(dst + (int64_t)r * s.rows * K, W + ((int64_t)r * N + row0) * K, bytes, bar);
      }
      ++pst;
      skip_empty();
    }
    ++issued;
  }

  // The block's rows of product k against xs [M][K] (shared memory): emit(n, acc[R][M]) once per row.
  template <int M, int RR, typename Emit>
  __device__ void consume(int k, const bf16* xs, float* red, Emit emit) {
    const Share s = t->sh[k];
    const int K8 = t->K[k] / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int st = 0; st < s.nst; ++st) {
      stamp(0);
      mbar_wait(&t->full[consumed % ns], (consumed / ns) & 1);
      __syncthreads();  // red of the previous slot has been read
      stamp(1);
      const uint4* slot = reinterpret_cast<const uint4*>(ring + (int64_t)(consumed % ns) * slot_elems);
      const int row0 = s.r0 + st * s.rows, nrows = min(s.rows, s.r1 - row0);
      const int wpr = nrows >= kPWarps ? 1 : kPWarps / nrows;  // warps per row
      const int seg = (K8 + wpr - 1) / wpr;
      for (int item = warp; item < nrows * wpr; item += kPWarps) {
        const int row = item / wpr, sg = item % wpr;
        const int c_hi = min(K8, (sg + 1) * seg);
        float acc[RR][M];
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
#pragma unroll 4
        for (int c = sg * seg + lane; c < c_hi; c += 32) {
          float wf[RR][8];
#pragma unroll
          for (int r = 0; r < RR; ++r) bf16x8_to_f(slot[((int64_t)r * s.rows + row) * K8 + c], wf[r]);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float xf[8];
            bf16x8_to_f(reinterpret_cast<const uint4*>(xs)[(int64_t)m * K8 + c], xf);
#pragma unroll
            for (int r = 0; r < RR; ++r)
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
          }
        }
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
        if (lane == 0) {
          if (wpr == 1) {
            emit(row0 + row, acc);
          } else {
#pragma unroll
            for (int r = 0; r < RR; ++r)
#pragma unroll
              for (int m = 0; m < M; ++m) red[(item * RR + r) * M + m] = acc[r][m];
          }
        }
      }
      __syncthreads();  // the slot is free; red is complete
      if (wpr > 1 && threadIdx.x < nrows) {  // the segments of a row, summed in order
        const int row = threadIdx.x;
        float acc[RR][M];
#pragma unroll
        for (int r = 0; r < RR; ++r)
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float t = 0.f;
            for (int sg = 0; sg < wpr; ++sg) t += red[((row * wpr + sg) * RR + r) * M + m];
            acc[r][m] = t;
          }
        emit(row0 + row, acc);
      }
      stamp(2);
      const unsigned c = consumed;
      ++consumed;
      issue();  // into the slot just freed
      if (slot_trace && c < kSlotTrace) slot_trace[4 * c + 3] = clock64();
    }
  }
};

// xs [M][K] <- src [M][K] (bf16 written earlier in this launch: read through L2, not the read-only path)
template <int M>
__device__ __forceinline__ void stage_rows(bf16* xs, const bf16* src, int K) {
  const int n = M * K / 8;
  for (int i = threadIdx.x; i < n; i += kPThreads)
    reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(src) + i);
  __syncthreads();
}

// The step between sub-blocks, every block for itself: d = the previous product's output h (or, with
// emb, the scaled embedding row of token tok[m] as x itself); x = x_cur + post-norm(d); xs = rmsnorm(x) *
// (1 + next_w) in bf16. Block 0 writes x to x_next. Statistics in double as in residual_rmsnorm.cu.
// xf: 2 M H floats of scratch.
template <int M>
__device__ __forceinline__ void norm_stage(bf16* xs, float* xf, double* sh, const float* x_cur, float* x_next,
                                           const float* h, const float* post_w, const float* next_w,
                                           const bf16* emb, const int32_t* tok, float emb_scale, int H, float eps) {
  constexpr int PER = 8, CH = PER * kPThreads;  // elements per thread whose loads are issued together
  float* xc = xf + (int64_t)M * H;
  for (int m = 0; m < M; ++m) {
    float* xr = xf + (int64_t)m * H;
    float* cr = xc + (int64_t)m * H;
    const bf16* row = emb ? emb + (int64_t)tok[m] * H : nullptr;
    double ss = 0.0;
    for (int base = 0; base < H; base += CH) {
      float d[PER], c[PER];
#pragma unroll
      for (int k = 0; k < PER; ++k) {
        const int i = base + threadIdx.x + k * kPThreads;
        if (emb) {
          d[k] = i < H ? __bfloat162float(row[i]) * emb_scale : 0.f;
        } else {
          d[k] = i < H ? __ldcg(h + (int64_t)m * H + i) : 0.f;
          c[k] = i < H ? __ldcg(x_cur + (int64_t)m * H + i) : 0.f;
        }
      }
#pragma unroll
      for (int k = 0; k < PER; ++k) {
        const int i = base + threadIdx.x + k * kPThreads;
        if (i < H) {
          xr[i] = d[k];
          if (!emb) cr[i] = c[k];
          ss += (double)d[k] * d[k];
        }
      }
    }
    float r = 1.f;
    if (!emb) {
      if (post_w) {
        ss = block_sum(ss, sh);
        r = 1.f / sqrtf((float)(ss / H) + eps);
      }
      for (int i = threadIdx.x; i < H; i += kPThreads) {
        const float add = post_w ? (xr[i] * r) * (1.f + post_w[i]) : xr[i];
        xr[i] = cr[i] + add;
      }
    }
    ss = 0.0;
    for (int i = threadIdx.x; i < H; i += kPThreads) {
      ss += (double)xr[i] * xr[i];
      if (blockIdx.x == 0 && x_next) x_next[(int64_t)m * H + i] = xr[i];
    }
    ss = block_sum(ss, sh);
    r = 1.f / sqrtf((float)(ss / H) + eps);
    for (int i = threadIdx.x; i < H; i += kPThreads)
      xs[(int64_t)m * H + i] = __float2bfloat16_rn((xr[i] * r) * (1.f + next_w[i]));
  }
  __syncthreads();
}

}  // namespace

template <int D, int STAGES, int M>
__global__ void __launch_bounds__(kPThreads, 1) decode_persistent_kernel(PersistentDecode p) {
  extern __shared__ uint4 smem_u4[];
  __shared__ double sh[33];
  __shared__ float red[kPWarps * 2 * kPersistentMaxB];
  const int H = p.H, F = p.F, NH = p.NH, KVH = p.KVH, QD = NH * D, QKV = (NH + 2 * KVH) * D;
  const int G = NH / KVH;
  const int warp = threadIdx.x >> 5;
  // shared memory: [region: the attention block's tiles | the product inputs xs [M][max K] + xf [2][M][H]]
  // [ring: ns weight slots]
  bf16* region = reinterpret_cast<bf16*>(smem_u4);
  bf16* xs = region;
  float* xf = reinterpret_cast<float*>(xs + (int64_t)M * p.max_k);
  __shared__ StreamTables tab;
  WeightStream ws;
  ws.init(p, &tab, region + p.region_bytes / 2, D);
  if (p.trace && blockIdx.x == 0 && threadIdx.x == 0) ws.slot_trace = p.trace + kPersistentTracePerLayer * p.L + 2;
  for (int i = 0; i < ws.ns - 1; ++i) ws.issue();

  float* xcur = p.x;                    // holds the residual stream
  float* xnext = p.x + (int64_t)M * H;  // the other buffer
  auto swap_x = [&]() {
    float* t = xcur;
    xcur = xnext;
    xnext = t;
  };
  float* const qkv_out = p.qkvp;
  float* const h_out = p.hp;
  bf16* const act = p.act;
  unsigned bar_target = 0;
  int tk = 0;
  auto mark = [&]() {
    if (p.trace && blockIdx.x == 0 && threadIdx.x == 0) p.trace[tk++] = clock64();
  };
  mark();

  for (int l = 0; l < p.L; ++l) {
    const PersistentLayer& w = p.layers[l];
    // A: the residual step into this layer, then the qkv product
    if (l == 0)
      norm_stage<M>(xs, xf, sh, nullptr, xcur, nullptr, nullptr, w.input_norm, p.embed, p.tokens, p.embed_scale, H,
                    p.eps);
    else {
      norm_stage<M>(xs, xf, sh, xcur, xnext, h_out, p.layers[l - 1].post_ffw_norm, w.input_norm, nullptr, nullptr,
                    0.f, H, p.eps);
      swap_x();
    }
    mark();
    ws.consume<M, 1>(kQkv, xs, red, [=](int n, const float (&acc)[1][M]) {
#pragma unroll
      for (int m = 0; m < M; ++m) qkv_out[(int64_t)m * QKV + n] = acc[0][m];
    });
    grid_barrier(p.bar, bar_target);
    mark();

    // B: attention. Warps 0-3 QK-norm and RoPE the item's query heads into its tile; in the split that
    // holds position pos, warps 4 and 5 write the new key and value into the cache meanwhile.
    const int nitems = M * KVH * p.nsplit;
    for (int it = blockIdx.x; it < nitems; it += gridDim.x) {  // uniform over the block
      const int split = it % p.nsplit, kh = (it / p.nsplit) % KVH, b = it / (p.nsplit * KVH);
      const int pos = p.seq.start[b];
      const int64_t slot = p.seq.slot[b];
      const DecodeSplitRange rg = decode_split_range(pos, w.window, p.nsplit, split);
      if (split >= rg.ns) continue;
      const float* src = qkv_out + (int64_t)b * QKV;
      constexpr int LD = D + 8;
      if (warp < kTcWarps) {
        for (int r = warp; r < 16; r += kTcWarps) {
          if (r < G) {
            float a[D / 64], c[D / 64];
            head_prep<D>(a, c, src + (kh * G + r) * D, w.q_norm, w.inv_freq, pos, p.eps);
            head_store<D>(region + r * LD, a, c);
          } else {
            for (int i = threadIdx.x & 31; i < D; i += 32) region[r * LD + i] = __float2bfloat16_rn(0.f);
          }
        }
      } else if (warp < kTcWarps + 2 && rg.je == pos + 1) {
        float a[D / 64], c[D / 64];
        const int64_t at = ((slot * KVH + kh) * w.cap + pos % w.cap) * D;
        if (warp == kTcWarps) {
          head_prep<D>(a, c, src + QD + kh * D, w.k_norm, w.inv_freq, pos, p.eps);
          head_store<D>(w.kc + at, a, c);
        } else {
          head_prep<D>(a, c, src + QD + (KVH + kh) * D, nullptr, nullptr, pos, p.eps);
          head_store<D>(w.vc + at, a, c);
        }
        __threadfence();
      }
      __syncthreads();  // the query tile and the new cache row are in place before any cp.async reads them
      if (warp < kTcWarps)
        decode_tc_block<D, STAGES>(region, NamedSync128(), [](bf16*, int, bf16*, bf16*, bool) {}, false, p.attn, w.kc, w.vc, slot, b, pos, b, M,
                                   split, kh, NH, KVH, w.cap, w.window, p.attn_scale, p.softcap, p.nsplit, p.part,
                                   p.counters);
      __syncthreads();  // shared memory is reused by the block's next item
    }
    grid_barrier(p.bar, bar_target);
    mark();

    // C: o product
    stage_rows<M>(xs, p.attn, QD);
    mark();
    ws.consume<M, 1>(kO, xs, red, [=](int n, const float (&acc)[1][M]) {
#pragma unroll
      for (int m = 0; m < M; ++m) h_out[(int64_t)m * H + n] = acc[0][m];
    });
    grid_barrier(p.bar, bar_target);
    mark();

    // D: post-attention residual step, gate/up product with the GeGLU
    norm_stage<M>(xs, xf, sh, xcur, xnext, h_out, w.post_attn_norm, w.pre_ffw_norm, nullptr, nullptr, 0.f, H, p.eps);
    swap_x();
    mark();
    ws.consume<M, 2>(kGateUp, xs, red, [=](int n, const float (&acc)[2][M]) {
#pragma unroll
      for (int m = 0; m < M; ++m) act[(int64_t)m * F + n] = __float2bfloat16_rn(gelu_tanh(acc[0][m]) * acc[1][m]);
    });
    grid_barrier(p.bar, bar_target);
    mark();

    // E: down product
    stage_rows<M>(xs, act, F);
    mark();
    ws.consume<M, 1>(kDown, xs, red, [=](int n, const float (&acc)[1][M]) {
#pragma unroll
      for (int m = 0; m < M; ++m) h_out[(int64_t)m * H + n] = acc[0][m];
    });
    grid_barrier(p.bar, bar_target);
    mark();
  }
  // the last residual step and the final norm, for the LM head
  if (blockIdx.x == 0) {
    norm_stage<M>(xs, xf, sh, xcur, nullptr, h_out, p.layers[p.L - 1].post_ffw_norm, p.final_norm, nullptr, nullptr,
                  0.f, H, p.eps);
    for (int i = threadIdx.x; i < M * H / 8; i += kPThreads)
      reinterpret_cast<uint4*>(p.xn_out)[i] = reinterpret_cast<const uint4*>(xs)[i];
    __syncthreads();
    mark();
  }
  // the last block out resets the barrier counter for the next launch (every block has left its last wait)
  if (threadIdx.x == 0 && atomicAdd(p.bar + 1, 1u) == gridDim.x - 1) {
    p.bar[0] = 0;
    p.bar[1] = 0;
    __threadfence();
  }
}

namespace {

size_t round128(size_t b) { return (b + 127) / 128 * 128; }

// Shared memory of one launch: the region (attention tiles, or the product inputs) and the weight ring.
template <int D, int STAGES, int M>
bool persistent_layout(PersistentDecode& p, size_t budget, size_t& total) {
  const int QD = p.NH * D;
  const size_t rows = (size_t)M * p.max_k * sizeof(bf16) + 2 * (size_t)M * p.H * sizeof(float);
  p.region_bytes = (int)round128(std::max(decode_tc_smem_bytes<D, STAGES>(p.nsplit), rows));
  size_t row_max = 0;  // the widest slot row: R K bf16
  for (int k : {p.H, QD, p.F}) row_max = std::max(row_max, (size_t)k * sizeof(bf16));
  row_max = std::max(row_max, 2 * (size_t)p.H * sizeof(bf16));
  p.slot_bytes = (int)round128(std::max<size_t>(16384, row_max));  // 32 KB measured slower (NOTES.md)
  if (budget < (size_t)p.region_bytes) return false;
  p.ns = (int)std::min<size_t>(kPMaxSlots, (budget - p.region_bytes) / p.slot_bytes);
  total = (size_t)p.region_bytes + (size_t)p.ns * p.slot_bytes;
  return p.ns >= 2;
}

// Sets the kernel's shared-memory limit (once per size) and says whether a block fits on an SM.
template <int D, int STAGES, int M>
bool persistent_fits(size_t smem) {
  static size_t attr = 0;
  auto kernel = decode_persistent_kernel<D, STAGES, M>;
  if (smem > attr) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    attr = smem;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kPThreads, smem) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return blocks >= 1;
}

template <int D, int STAGES, int M>
cudaError_t launch_persistent(const PersistentDecode& p, int grid, size_t smem, cudaStream_t s) {
  // cooperative: every block resident at once (the grid barriers need it)
  return launch_ex(Launch::Cooperative, 0, decode_persistent_kernel<D, STAGES, M>, grid, kPThreads, smem, s, p);
}

// Three attention stages where they leave at least 4 weight slots, else two.
template <int D, int M>
bool dispatch_stages(PersistentDecode p, int num_sms, bool launch, cudaStream_t s) {
  static int optin = -1;
  if (optin < 0) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  }
  const size_t budget = (size_t)optin - 3072;  // the kernel's own __shared__ (stream tables, block_sum scratch, the combine's maxima)
  PersistentDecode p3 = p, p2 = p;
  size_t s3 = 0, s2 = 0;
  const bool three = persistent_layout<D, 3, M>(p3, budget, s3) && p3.ns >= 4 && persistent_fits<D, 3, M>(s3);
  if (!three && !(persistent_layout<D, 2, M>(p2, budget, s2) && persistent_fits<D, 2, M>(s2))) return false;
  if (!launch) return true;
  const cudaError_t e = three ? launch_persistent<D, 3, M>(p3, num_sms, s3, s) : launch_persistent<D, 2, M>(p2, num_sms, s2, s);
  check_cuda(e, "persistent decode launch", __FILE__, __LINE__);
  return true;
}

template <int D>
bool dispatch_m(const PersistentDecode& p, int num_sms, bool launch, cudaStream_t s) {
  return p.B == 1 ? dispatch_stages<D, 1>(p, num_sms, launch, s) : dispatch_stages<D, 2>(p, num_sms, launch, s);
}

bool dispatch(const PersistentDecode& p, int num_sms, bool launch, cudaStream_t s) {
  return p.D == 256 ? dispatch_m<256>(p, num_sms, launch, s) : dispatch_m<128>(p, num_sms, launch, s);
}

}  // namespace

bool persistent_decode_supported(const PersistentDecode& p) {
  if (p.B < 1 || p.B > kPersistentMaxB || !attention_decode_tc_supported(p.NH, p.KVH, p.D)) return false;
  if (p.L < 1 || p.L > kPMaxLayers) return false;
  if (p.H % 8 || p.F % 8 || (p.NH * p.D) % 8 || p.nsplit < 1 || p.nsplit > kDecodeMaxSplit) return false;
  int dev = 0, coop = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return coop && major >= 9 && dispatch(p, 0, false, nullptr);  // Hopper bulk copies and mbarriers
}

void persistent_decode(const PersistentDecode& p, int num_sms, cudaStream_t s) {
  if (!persistent_decode_supported(p)) throw std::invalid_argument("persistent_decode: configuration not supported");
  dispatch(p, num_sms, true, s);
}

}  // namespace g3cuda
