// bench_vision.cpp: microbenchmarks of the vision encoder's CPU kernels at Gemma 3's SigLIP shapes
// (896 px, 4096 patches, hidden 1152 in 16 heads of 72, MLP 4304; projector 64x64 -> 16x16 -> 2560).
// For each kernel: check against a double-precision reference (all of it, or sampled rows for the big
// products; fail -> exit 1), then time it (warm-up, median of repeats) and report GFLOP/s or GB/s and
// the fraction of the floor measured in the same run (floors.h: copy bandwidth, FMA rate).
//   bench_vision [--quick] [--json out.json]      (--quick: 1024 patches instead of 4096)
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

using namespace g3;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median_time(const std::function<void()>& fn, int reps) {
  fn();  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const double a = now();
    fn();
    t.push_back(now() - a);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::mt19937 rng(4242);
std::vector<float> randn(size_t n, float s = 1.f) {
  std::normal_distribution<float> d(0.f, s);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

void check(const char* what, double err, double tol) {
  std::printf("  %-34s check: relative error %.2e (tolerance %.0e)\n", what, err, tol);
  if (!(err <= tol)) {
    std::fprintf(stderr, "CHECK FAILED: %s\n", what);
    std::exit(1);
  }
}

double g_copy_bw = 0, g_fma_rate = 0;
std::string g_json;  // JSON rows

void line(const char* kernel, const std::string& shape, double t, double bytes, double flops) {
  const double t_mem = bytes / g_copy_bw, t_math = flops / g_fma_rate, fl = std::max(t_mem, t_math);
  std::printf("%-22s %-30s %10.1f ms %8.1f GB/s %8.1f GFLOP/s %6.0f%% of floor (%s)\n", kernel, shape.c_str(),
              t * 1e3, bytes / t / 1e9, flops / t / 1e9, 100.0 * fl / t, t_mem >= t_math ? "bandwidth" : "FMA");
  char row[512];
  std::snprintf(row, sizeof row,
                "%s{\"kernel\": \"%s\", \"shape\": \"%s\", \"seconds\": %.9g, \"bytes\": %.6g, \"flops\": %.6g, "
                "\"floor_fraction\": %.4f}",
                g_json.empty() ? "" : ",\n", kernel, shape.c_str(), t, bytes, flops, fl / t);
  g_json += row;
}

double rel(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

const int H = 1152, I = 4304, NH = 16, D = 72, C = 3, S = 896, P = 14, HT = 2560;

void bench_layernorm(int N) {
  auto x = randn((size_t)N * H, 2.f), w = randn(H), b = randn(H);
  std::vector<float> out((size_t)N * H);
  layernorm_cpu(out.data(), x.data(), w.data(), b.data(), N, H, 1e-6f);
  std::vector<double> got, ref;
  for (int r = 0; r < N; r += std::max(1, N / 64)) {
    double m = 0, v = 0;
    for (int i = 0; i < H; ++i) m += x[(size_t)r * H + i];
    m /= H;
    for (int i = 0; i < H; ++i) v += (x[(size_t)r * H + i] - m) * (x[(size_t)r * H + i] - m);
    v /= H;
    for (int i = 0; i < H; ++i) {
      ref.push_back((x[(size_t)r * H + i] - m) / std::sqrt(v + 1e-6) * w[i] + b[i]);
      got.push_back(out[(size_t)r * H + i]);
    }
  }
  check("layernorm", rel(got, ref), 2e-6);
  const double t = median_time([&] { layernorm_cpu(out.data(), x.data(), w.data(), b.data(), N, H, 1e-6f); }, 5);
  line("layernorm", std::to_string(N) + "x" + std::to_string(H), t, 2.0 * N * H * 4, 0);
}

void bench_bias_gelu(int N) {
  auto x = randn((size_t)N * I, 2.f), b = randn(I);
  auto y = x;
  bias_gelu_tanh_cpu(y.data(), b.data(), N, I);
  std::vector<double> got, ref;
  for (size_t i = 0; i < y.size(); i += 97) {
    const double v = (double)x[i] + b[i % I];
    ref.push_back(0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))));
    got.push_back(y[i]);
  }
  check("bias_gelu_tanh", rel(got, ref), 2e-6);
  const double t = median_time([&] { bias_gelu_tanh_cpu(y.data(), b.data(), N, I); }, 5);
  line("bias_gelu_tanh", std::to_string(N) + "x" + std::to_string(I), t, 2.0 * N * I * 4, 0);
}

void bench_patch_embed() {
  const int g = S / P, Np = g * g, pd = C * P * P;
  auto img = randn((size_t)C * S * S), w = randn((size_t)H * pd, 1.f / std::sqrt((float)pd)), b = randn(H),
       pos = randn((size_t)Np * H);
  std::vector<float> out((size_t)Np * H), scratch((size_t)Np * pd);
  const WeightView wv{w.data(), DType::F32, H, pd};
  patch_embed_cpu(out.data(), img.data(), C, S, P, wv, b.data(), pos.data(), scratch.data());
  std::vector<double> got, ref;
  for (int p = 0; p < Np; p += 301) {
    const int py = p / g, px = p % g;
    for (int o = 0; o < H; o += 7) {
      double a = b[o] + pos[(size_t)p * H + o];
      for (int c = 0; c < C; ++c)
        for (int y = 0; y < P; ++y)
          for (int x = 0; x < P; ++x)
            a += (double)w[(size_t)o * pd + (c * P + y) * P + x] * img[((size_t)c * S + py * P + y) * S + px * P + x];
      ref.push_back(a);
      got.push_back(out[(size_t)p * H + o]);
    }
  }
  check("patch_embed", rel(got, ref), 1e-5);
  const double t = median_time([&] { patch_embed_cpu(out.data(), img.data(), C, S, P, wv, b.data(), pos.data(), scratch.data()); }, 3);
  line("patch_embed", "896px -> 4096x1152", t, 0, 2.0 * Np * pd * H);
}

void bench_attention(int N) {
  auto qkv = randn((size_t)N * 3 * H);
  std::vector<float> out((size_t)N * H), scratch(attention_full_scratch(N, NH, D));
  const float scale = 1.f / std::sqrt((float)D);
  attention_full_cpu(out.data(), qkv.data(), qkv.data() + H, qkv.data() + 2 * H, 3 * H, N, NH, D, scale, scratch.data());
  std::vector<double> got, ref, sc(N);
  for (int i = 0; i < N; i += N / 8)
    for (int h = 0; h < NH; h += 5) {
      const float* q = qkv.data() + (size_t)i * 3 * H + h * D;
      double mx = -1e300, sum = 0;
      for (int j = 0; j < N; ++j) {
        const float* k = qkv.data() + (size_t)j * 3 * H + H + h * D;
        double s = 0;
        for (int d = 0; d < D; ++d) s += (double)q[d] * k[d];
        sc[j] = s * scale;
        mx = std::max(mx, sc[j]);
      }
      for (int j = 0; j < N; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j < N; ++j) o += sc[j] / sum * qkv[(size_t)j * 3 * H + 2 * H + h * D + d];
        ref.push_back(o);
        got.push_back(out[(size_t)i * H + h * D + d]);
      }
    }
  check("attention_full", rel(got, ref), 1e-5);
  const double t = median_time(
      [&] { attention_full_cpu(out.data(), qkv.data(), qkv.data() + H, qkv.data() + 2 * H, 3 * H, N, NH, D, scale, scratch.data()); },
      3);
  line("attention_full", std::to_string(N) + " x 16 heads x 72", t, 0, 4.0 * N * N * D * NH);
}

void bench_matmul(const char* which, int N_out, int K, int T) {
  auto x = randn((size_t)T * K), w = randn((size_t)N_out * K, 1.f / std::sqrt((float)K));
  std::vector<uint16_t> wb(w.size());
  for (size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16(w[i]);
  std::vector<float> out((size_t)T * N_out);
  const WeightView wv{wb.data(), DType::BF16, N_out, K};
  matmul_cpu(out.data(), x.data(), wv, T, K, N_out);
  std::vector<double> got, ref;
  for (int t = 0; t < T; t += T / 8)
    for (int n = 0; n < N_out; n += 37) {
      double a = 0;
      for (int k = 0; k < K; ++k) a += (double)x[(size_t)t * K + k] * bf16_to_f32(wb[(size_t)n * K + k]);
      ref.push_back(a);
      got.push_back(out[(size_t)t * N_out + n]);
    }
  check(which, rel(got, ref), 1e-5);
  const double t = median_time([&] { matmul_cpu(out.data(), x.data(), wv, T, K, N_out); }, 3);
  line(which, std::to_string(T) + "x" + std::to_string(K) + " . " + std::to_string(N_out) + "x" + std::to_string(K) + " bf16",
       t, 0, 2.0 * T * K * N_out);
}

void bench_projector() {
  const int g = 64, k = 4, t = g / k;
  auto x = randn((size_t)g * g * H), nw = randn(H, 0.3f), w = randn((size_t)HT * H, 1.f / std::sqrt((float)H));
  std::vector<float> out((size_t)t * t * HT), scratch(2 * (size_t)t * t * H);
  const WeightView wv{w.data(), DType::F32, HT, H};
  mm_projector_cpu(out.data(), x.data(), g, H, k, nw.data(), 1e-6f, wv, scratch.data());
  std::vector<double> got, ref, pooled(H);
  for (int o = 0; o < t * t; o += 37) {
    const int oy = o / t, ox = o % t;
    double ss = 0;
    for (int i = 0; i < H; ++i) {
      double a = 0;
      for (int dy = 0; dy < k; ++dy)
        for (int dx = 0; dx < k; ++dx) a += x[((size_t)(oy * k + dy) * g + ox * k + dx) * H + i];
      pooled[i] = a / (k * k);
      ss += pooled[i] * pooled[i];
    }
    const double r = 1.0 / std::sqrt(ss / H + 1e-6);
    for (int n = 0; n < HT; n += 11) {
      double a = 0;
      for (int i = 0; i < H; ++i) a += pooled[i] * r * (1.0 + nw[i]) * w[(size_t)n * H + i];
      ref.push_back(a);
      got.push_back(out[(size_t)o * HT + n]);
    }
  }
  check("mm_projector", rel(got, ref), 1e-5);
  const double tm = median_time([&] { mm_projector_cpu(out.data(), x.data(), g, H, k, nw.data(), 1e-6f, wv, scratch.data()); }, 5);
  line("mm_projector", "4096x1152 -> 256x2560", tm, 0, 2.0 * t * t * H * HT);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
  }
  const int N = quick ? 1024 : 4096;
  g_copy_bw = floors::measure_copy_bw();
  g_fma_rate = floors::measure_fma_rate();
  std::printf("threads %d; SigLIP So400m/14 shapes, %d patches; copy bandwidth %.1f GB/s (read+write); FMA rate %.1f GFLOP/s\n",
              num_threads(), N, g_copy_bw / 1e9, g_fma_rate / 1e9);
  bench_patch_embed();
  bench_layernorm(N);
  bench_matmul("matmul qkv", 3 * H, H, N);
  bench_attention(N);
  bench_matmul("matmul fc1", I, H, N);
  bench_bias_gelu(N);
  bench_matmul("matmul fc2", H, I, N);
  bench_projector();
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", json.c_str());
      return 1;
    }
    std::fprintf(f, "{\"threads\": %d, \"copy_bw\": %.6g, \"fma_rate\": %.6g, \"rows\": [\n%s\n]}\n", num_threads(),
                 g_copy_bw, g_fma_rate, g_json.c_str());
    std::fclose(f);
  }
  return 0;
}
