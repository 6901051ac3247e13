// sampling.cpp: greedy argmax and temperature / top-k / top-p sampling. The uniform draw is a
// counter-based hash of (seed, counter): reproducible, and independent of batch composition and of
// backend (the CUDA sampler uses the same hash).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>
#include "kernels.h"

namespace g3 {

int argmax_cpu(const float* logits, int V) {
  int best = 0;
  for (int i = 1; i < V; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

static inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double uniform_from(uint64_t seed, uint64_t counter) {
  const uint64_t h = splitmix64(splitmix64(seed) ^ (counter * 0xd1b54a32d192ed03ull));
  return (double)(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
}

int sample_cpu(const float* logits, int V, float temperature, int top_k, float top_p, uint64_t seed,
               uint64_t counter) {
  if (!(temperature > 0.f)) return argmax_cpu(logits, V);
  const int k = (top_k > 0 && top_k < V) ? top_k : V;
  // Descending by logit, ties by lower id: a strict total order, so the top k (a unique set) and the
  // draw are fully determined whatever the selection algorithm.
  auto better = [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int> idx;
  if (k < V) {
    // One pass with a heap of the k best so far (its front the worst of them): an id enters only if its
    // logit beats the front's (an equal logit never does, its id being larger), instead of nth_element
    // over an array of all V ids.
    idx.reserve(k);
    for (int i = 0; i < k; ++i) idx.push_back(i);
    std::make_heap(idx.begin(), idx.end(), better);
    float thr = logits[idx.front()];
    for (int i = k; i < V; ++i) {
      if (!(logits[i] > thr)) continue;
      std::pop_heap(idx.begin(), idx.end(), better);
      idx.back() = i;
      std::push_heap(idx.begin(), idx.end(), better);
      thr = logits[idx.front()];
    }
  } else {
    idx.resize(V);
    std::iota(idx.begin(), idx.end(), 0);
  }
  std::sort(idx.begin(), idx.end(), better);
  const double mx = logits[idx[0]];
  std::vector<double> p(idx.size());
  double sum = 0.0;
  for (size_t i = 0; i < idx.size(); ++i) sum += (p[i] = std::exp(((double)logits[idx[i]] - mx) / temperature));
  size_t keep = idx.size();
  if (top_p > 0.f && top_p < 1.f) {
    double c = 0.0;
    for (size_t i = 0; i < idx.size(); ++i) {
      c += p[i] / sum;
      if (c >= top_p) { keep = i + 1; break; }
    }
  }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += p[i];
  const double u = uniform_from(seed, counter) * kept;
  double c = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    c += p[i];
    if (u < c) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace g3
