// batch.h: validation of a ragged batch (slots, per-sequence token counts, token ids), shared by the
// CPU and CUDA engines so that the same bad input raises the same exception on either backend.
#pragma once
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>
#include "config.h"

namespace g3 {

// slot_lengths: positions already cached per slot. Throws std::invalid_argument (ValueError),
// std::out_of_range (IndexError) or std::length_error (ValueError: beyond max_context).
inline void check_batch(const ModelConfig& cfg, int max_batch, int max_context, const std::vector<int>& slot_lengths,
                        const int32_t* slots, const int32_t* lengths, int B, const int32_t* tokens) {
  if (B < 1 || B > max_batch)
    throw std::invalid_argument("batch of " + std::to_string(B) + " sequences; this engine holds 1.." +
                                std::to_string(max_batch) + " (max_batch)");
  std::set<int> seen;
  int64_t T = 0;
  for (int b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= max_batch) throw std::out_of_range("slot " + std::to_string(slots[b]) + " out of range");
    if (!seen.insert(slots[b]).second) throw std::invalid_argument("slot " + std::to_string(slots[b]) + " appears twice in one batch");
    if (lengths[b] < 1) throw std::invalid_argument("sequence " + std::to_string(b) + " brings no tokens");
    if ((int64_t)slot_lengths[slots[b]] + lengths[b] > max_context)
      throw std::length_error("sequence " + std::to_string(b) + " would reach " +
                              std::to_string(slot_lengths[slots[b]] + lengths[b]) + " tokens, beyond max_context " +
                              std::to_string(max_context));
    T += lengths[b];
  }
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= cfg.vocab_size)
      throw std::out_of_range("token id " + std::to_string(tokens[t]) + " out of range [0, " +
                              std::to_string(cfg.vocab_size) + ")");
}

// decode_steps (both engines): at most this many steps a call, each sequence's cache room for all of them.
constexpr int kMaxDecodeSteps = 32;
inline void check_decode_steps(int max_context, const std::vector<int>& slot_lengths, const int32_t* slots, int B,
                               int nsteps) {
  if (nsteps < 1 || nsteps > kMaxDecodeSteps)
    throw std::invalid_argument("decode_steps: nsteps must be 1.." + std::to_string(kMaxDecodeSteps) + ", got " +
                                std::to_string(nsteps));
  for (int b = 0; b < B; ++b)
    if ((int64_t)slot_lengths[slots[b]] + nsteps > max_context)
      throw std::length_error("decode_steps: sequence " + std::to_string(b) + " would reach " +
                              std::to_string(slot_lengths[slots[b]] + nsteps) + " tokens, beyond max_context " +
                              std::to_string(max_context));
}

}  // namespace g3
