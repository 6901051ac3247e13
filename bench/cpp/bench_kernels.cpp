// bench_kernels.cpp: microbenchmarks of the CPU kernels at the real Gemma 3 shapes (270M..27B).
// For each kernel: check the result against a double-precision reference (fail -> exit 1), then time
// it (warm-up, median of repeats, inputs rotated over buffers larger than the last-level cache), and
// report GB/s or GFLOP/s and the fraction of the floor measured in the same run: copy bandwidth for
// memory-bound kernels, the FMA rate of all cores for products.
//   bench_kernels [--sizes 270m,1b,4b] [--json out.json] [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "floors.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

using namespace g3;

namespace {

struct Shape {
  const char* name;
  int hidden, layers, heads, kv_heads, head_dim, ffn, window;
};
const Shape kShapes[] = {
    {"270m", 640, 18, 4, 1, 256, 2048, 512},     {"1b", 1152, 26, 4, 1, 256, 6912, 512},
    {"4b", 2560, 34, 8, 4, 256, 10240, 1024},    {"12b", 3840, 48, 16, 8, 256, 15360, 1024},
    {"27b", 5376, 62, 32, 16, 128, 21504, 1024},
};
constexpr int kVocab = 262144;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median_time(const std::function<void(int)>& fn, int reps) {
  fn(0);  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double a = now();
    fn(r + 1);
    t.push_back(now() - a);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::mt19937 rng(12345);
std::vector<float> randn(size_t n, float s = 1.f) {
  std::normal_distribution<float> d(0.f, s);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = f32_to_bf16(v[i]);
  return o;
}

// Floors measured in this run.
double g_copy_bw = 0, g_fma_rate = 0;


struct Result {
  std::string kernel, shape;
  double seconds, bytes, flops, max_rel_err;
};
std::vector<Result> g_results;

void report(const Result& r) {
  const double t_mem = r.bytes / g_copy_bw, t_math = r.flops / g_fma_rate;
  const double floor = std::max(t_mem, t_math);
  std::printf("%-22s %-28s %10.1f us %8.1f GB/s %8.1f GFLOP/s %6.0f%% of floor (%s)  err %.1e\n", r.kernel.c_str(),
              r.shape.c_str(), r.seconds * 1e6, r.bytes / r.seconds / 1e9, r.flops / r.seconds / 1e9,
              100.0 * floor / r.seconds, t_mem >= t_math ? "bandwidth" : "FMA", r.max_rel_err);
  g_results.push_back(r);
}

void check(const char* what, double err, double tol) {
  if (!(err <= tol)) {
    std::fprintf(stderr, "CHECK FAILED: %s: relative error %.3e > %.1e\n", what, err, tol);
    std::exit(1);
  }
}

// ---- matmul: decode (T=1) and prefill (T=128), bf16 weights ----
void bench_matmul(const Shape& s, const char* which, int N, int K, int T) {
  // Enough weight copies to exceed L3 (64 MB), so repeats read from memory as decode does.
  const size_t wbytes = (size_t)N * K * 2;
  const int copies = std::max<int>(1, (int)std::min<size_t>(8, (64u << 20) / wbytes + 1));
  std::vector<std::vector<uint16_t>> W;
  for (int c = 0; c < copies; ++c) W.push_back(to_bf16(randn((size_t)N * K, 1.f / std::sqrt((float)K))));
  auto x = randn((size_t)T * K);
  std::vector<float> out((size_t)T * N);
  WeightView wv{W[0].data(), DType::BF16, N, K};
  matmul_cpu(out.data(), x.data(), wv, T, K, N);
  double err = 0;
  for (int i = 0; i < 64; ++i) {  // spot-check 64 outputs against double dot products
    const int t = (int)(rng() % T), n = (int)(rng() % N);
    double ref = 0, mag = 0;
    for (int k = 0; k < K; ++k) {
      const double p = (double)x[(size_t)t * K + k] * bf16_to_f32(W[0][(size_t)n * K + k]);
      ref += p;
      mag += std::fabs(p);
    }
    err = std::max(err, std::fabs(out[(size_t)t * N + n] - ref) / mag);
  }
  check("matmul", err, 1e-5);
  const double t = median_time(
      [&](int r) {
        WeightView w{W[r % copies].data(), DType::BF16, N, K};
        matmul_cpu(out.data(), x.data(), w, T, K, N);
      },
      T == 1 ? 20 : 5);
  char shape[64];
  std::snprintf(shape, sizeof shape, "%s %s T=%d %dx%d", s.name, which, T, N, K);
  report({"matmul_bf16", shape, t, (double)wbytes + 4.0 * T * (K + N), 2.0 * T * N * K, err});
}

void bench_rmsnorm(const Shape& s, int rows) {
  const int H = s.hidden;
  auto x = randn((size_t)rows * H), w = randn(H);
  std::vector<float> out(x.size());
  rmsnorm_cpu(out.data(), H, x.data(), H, w.data(), rows, H, 1e-6f);
  double err = 0;
  for (int r = 0; r < rows; r += std::max(1, rows / 8)) {
    double ss = 0;
    for (int i = 0; i < H; ++i) ss += (double)x[(size_t)r * H + i] * x[(size_t)r * H + i];
    const double rs = 1.0 / std::sqrt(ss / H + 1e-6);
    for (int i = 0; i < H; ++i) {
      const double ref = x[(size_t)r * H + i] * rs * (1.0 + w[i]);
      err = std::max(err, std::fabs(out[(size_t)r * H + i] - ref) / (std::fabs(ref) + 1e-3));
    }
  }
  check("rmsnorm", err, 1e-4);
  const double t = median_time([&](int) { rmsnorm_cpu(out.data(), H, x.data(), H, w.data(), rows, H, 1e-6f); }, 50);
  char shape[64];
  std::snprintf(shape, sizeof shape, "%s rows=%d H=%d", s.name, rows, H);
  report({"rmsnorm", shape, t, 8.0 * rows * H, 4.0 * rows * H, err});
}

void bench_geglu(const Shape& s, int rows) {
  const int F = s.ffn;
  auto gu = randn((size_t)rows * 2 * F);
  std::vector<float> out((size_t)rows * F);
  geglu_cpu(out.data(), gu.data(), rows, F);
  // ||out - ref|| / ||ref|| over every 7th element of the first row, the measure and tolerance of
  // tests/test_kernels_cpu.py (2e-5): an element-wise relative bound fails where 1 + tanh(..)
  // cancels (gate around -3), float32 rounding of a tiny value (1.002e-5 seen at 4b)
  double d2 = 0, r2 = 0;
  for (int i = 0; i < F; i += 7) {
    const double g = gu[i], u = gu[F + i];
    const double ref = 0.5 * g * (1 + std::tanh(std::sqrt(2 / M_PI) * (g + 0.044715 * g * g * g))) * u;
    d2 += (out[i] - ref) * (out[i] - ref);
    r2 += ref * ref;
  }
  const double err = std::sqrt(d2 / std::max(r2, 1e-300));
  check("geglu", err, 2e-5);
  const double t = median_time([&](int) { geglu_cpu(out.data(), gu.data(), rows, F); }, 20);
  char shape[64];
  std::snprintf(shape, sizeof shape, "%s rows=%d F=%d", s.name, rows, F);
  report({"geglu", shape, t, 12.0 * rows * F, 10.0 * rows * F, err});
}

void bench_attention_decode(const Shape& s, int depth, bool local) {
  const int H = s.heads, KVH = s.kv_heads, D = s.head_dim;
  const int cap = local ? s.window : depth + 1;
  const int start = depth;
  auto kc = randn((size_t)KVH * cap * D), vc = randn((size_t)KVH * cap * D);
  auto q = randn((size_t)H * D), kn = randn((size_t)KVH * D), vn = randn((size_t)KVH * D);
  std::vector<float> out((size_t)H * D), scratch(attention_cpu_scratch(std::min(cap, start) + 1, H, KVH, D));
  const int window = local ? s.window : 0;
  const float scale = 1.f / 16.f;
  attention_cpu(out.data(), H * D, q.data(), H * D, kn.data(), vn.data(), KVH * D, kc.data(), vc.data(), cap, start, 1, H,
                KVH, D, window, scale, 0.f, nullptr, scratch.data());
  // reference for head 0
  const int jlo = local ? std::max(0, start - window + 1) : 0;
  std::vector<double> sc;
  double mx = -1e300;
  for (int j = jlo; j <= start; ++j) {
    const float* k = j < start ? kc.data() + (size_t)(j % cap) * D : kn.data();
    double d = 0;
    for (int i = 0; i < D; ++i) d += (double)q[i] * k[i];
    sc.push_back(d * scale);
    mx = std::max(mx, d * scale);
  }
  double sum = 0;
  for (auto& v : sc) sum += (v = std::exp(v - mx));
  double err = 0, nrm = 0;
  for (int i = 0; i < D; ++i) {
    double o = 0;
    for (int j = jlo; j <= start; ++j) {
      const float* v = j < start ? vc.data() + (size_t)(j % cap) * D : vn.data();
      o += sc[j - jlo] / sum * v[i];
    }
    err += (out[i] - o) * (out[i] - o);
    nrm += o * o;
  }
  err = std::sqrt(err / nrm);
  check("attention", err, 1e-5);
  const double t = median_time([&](int) {
    attention_cpu(out.data(), H * D, q.data(), H * D, kn.data(), vn.data(), KVH * D, kc.data(), vc.data(), cap, start, 1,
                  H, KVH, D, window, scale, 0.f, nullptr, scratch.data());
  }, 20);
  const int keys = start - jlo + 1;
  char shape[64];
  std::snprintf(shape, sizeof shape, "%s %s depth=%d", s.name, local ? "local" : "global", depth);
  // KV read once per query head here (GQA groups share it in cache only): count the unique bytes.
  report({"attention_decode", shape, t, 8.0 * keys * KVH * D, 4.0 * keys * H * D, err});
}

void bench_sampling() {
  auto l = randn(kVocab, 3.f);
  int best = argmax_cpu(l.data(), kVocab);
  check("argmax", l[best] == *std::max_element(l.begin(), l.end()) ? 0.0 : 1.0, 0.0);
  double t = median_time([&](int) { best = argmax_cpu(l.data(), kVocab); }, 50);
  report({"argmax", "V=262144", t, 4.0 * kVocab, 0, 0});
  t = median_time([&](int r) { best = sample_cpu(l.data(), kVocab, 0.8f, 64, 0.95f, 1, r); }, 20);
  report({"sample top-k 64 top-p .95", "V=262144", t, 4.0 * kVocab, 0, 0});
}

}  // namespace

int main(int argc, char** argv) {
  std::string sizes = "270m,1b,4b", json;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--sizes") && i + 1 < argc) sizes = argv[++i];
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  g_copy_bw = floors::measure_copy_bw();
  g_fma_rate = floors::measure_fma_rate();
  std::printf("threads %d; copy bandwidth %.1f GB/s (read+write); FMA rate %.1f GFLOP/s\n", num_threads(), g_copy_bw / 1e9,
              g_fma_rate / 1e9);
  for (const Shape& s : kShapes) {
    if (("," + sizes + ",").find(std::string(",") + s.name + ",") == std::string::npos) continue;
    const int QD = s.heads * s.head_dim, KD = s.kv_heads * s.head_dim;
    bench_matmul(s, "qkv", QD + 2 * KD, s.hidden, 1);
    bench_matmul(s, "o", s.hidden, QD, 1);
    bench_matmul(s, "gate_up", 2 * s.ffn, s.hidden, 1);
    bench_matmul(s, "down", s.hidden, s.ffn, 1);
    if (!quick) {
      bench_matmul(s, "lm_head", kVocab, s.hidden, 1);
      bench_matmul(s, "gate_up", 2 * s.ffn, s.hidden, 128);
    }
    bench_rmsnorm(s, 1);
    bench_rmsnorm(s, 512);
    bench_geglu(s, 1);
    bench_attention_decode(s, 4096, true);
    bench_attention_decode(s, 4096, false);
  }
  bench_sampling();
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    std::fprintf(f, "{\"copy_bw\": %g, \"fma_rate\": %g, \"results\": [\n", g_copy_bw, g_fma_rate);
    for (size_t i = 0; i < g_results.size(); ++i) {
      const auto& r = g_results[i];
      std::fprintf(f, "  {\"kernel\": \"%s\", \"shape\": \"%s\", \"seconds\": %g, \"bytes\": %g, \"flops\": %g, \"err\": %g}%s\n",
                   r.kernel.c_str(), r.shape.c_str(), r.seconds, r.bytes, r.flops, r.max_rel_err,
                   i + 1 < g_results.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
