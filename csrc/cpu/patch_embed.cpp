// patch_embed.cpp: SigLIP's patch embedding, a 14x14 stride-14 convolution, computed as a product over
// unfolded patches (im2col, then matmul_cpu against the conv weight seen as [hidden, C*14*14]), plus the
// conv bias and the learned position embedding of each patch.
#include <algorithm>
#include "kernels.h"

namespace g3 {

void unfold_patches_cpu(float* out, const float* image, int C, int H, int W, int patch) {
  const int gh = H / patch, gw = W / patch;
  const int64_t pd = (int64_t)C * patch * patch;
#pragma omp parallel for schedule(static) if (gh * gw > 16)
  for (int pi = 0; pi < gh * gw; ++pi) {
    const int py = pi / gw, px = pi % gw;
    float* o = out + (int64_t)pi * pd;
    for (int c = 0; c < C; ++c)
      for (int y = 0; y < patch; ++y) {
        const float* src = image + ((int64_t)c * H + (int64_t)py * patch + y) * W + (int64_t)px * patch;
        std::copy_n(src, patch, o + ((int64_t)c * patch + y) * patch);
      }
  }
}

void patch_embed_cpu(float* out, const float* image, int C, int image_size, int patch, const WeightView& w,
                     const float* bias, const float* pos, float* scratch) {
  const int g = image_size / patch;
  const int P = g * g, pd = C * patch * patch;
  const int hidden = (int)w.rows;
  unfold_patches_cpu(scratch, image, C, image_size, image_size, patch);
  matmul_cpu(out, scratch, w, P, pd, hidden);
#pragma omp parallel for schedule(static) if (P > 4)
  for (int p = 0; p < P; ++p) {
    float* o = out + (int64_t)p * hidden;
    const float* e = pos + (int64_t)p * hidden;
    for (int i = 0; i < hidden; ++i) o[i] += bias[i] + e[i];
  }
}

}  // namespace g3
