"""CPU benchmark of the vision encoder: SigLIP So400m/14 at 896 px (Gemma 3's shapes) with random weights,
ours (float32 or bf16 weights, float32 arithmetic) against transformers' SiglipVisionModel (float32, sdpa)
on the same weights in the same run. Also checks that the two agree.

    python bench/bench_vision_cpu.py [--layers 27] [--images 1] [--dtype float32|bfloat16] [--threads N]

--layers fewer than 27 keeps a run short on a small machine (per-layer cost is uniform; the report
scales nothing, it prints what it measured)."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gemma3_native import _native as core
from gemma3_native.safetensors_io import f32_to_bf16_bits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        core.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.layers,
                             num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim == 1 else torch.randn_like(p) / p[0].numel() ** 0.5)
            if args.dtype == "bfloat16" and p.ndim > 1:  # both sides on the same rounded weights
                p.copy_(p.to(torch.bfloat16).float())
    v = core.VisionConfig()
    v.num_layers = args.layers
    v.text_hidden_size = 2560
    enc = core.VisionEncoderCpu(v, args.dtype)
    for name, p in hf.state_dict().items():
        if name.startswith("head."):
            continue
        a = p.detach().numpy()
        mat = a.ndim >= 2 and "position_embedding" not in name
        enc.set_weight(name, f32_to_bf16_bits(a) if (mat and args.dtype == "bfloat16") else np.ascontiguousarray(a))
    rng = np.random.default_rng(0)
    dummy = rng.standard_normal((1152, 2560)).astype(np.float32) / 34
    enc.set_weight("mm_input_projection_weight", f32_to_bf16_bits(dummy) if args.dtype == "bfloat16" else dummy)
    enc.set_weight("mm_soft_emb_norm.weight", np.zeros(1152, np.float32))
    px = rng.uniform(-1, 1, (args.images, 3, 896, 896)).astype(np.float32)

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return out, best

    ours, t_ours = timed(lambda: enc.encode(px))
    with torch.no_grad():
        ref, t_hf = timed(lambda: hf(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy())
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"SigLIP 896px, {args.layers} layers, {args.images} image(s), weights {args.dtype}, "
          f"{core.num_threads()} threads")
    print(f"  ours        {t_ours:8.2f} s  ({args.images / t_ours:.3f} images/s)")
    print(f"  transformers{t_hf:8.2f} s  ({args.images / t_hf:.3f} images/s)   speed-up {t_hf / t_ours:.2f}x")
    print(f"  relative difference {err:.2e}")


if __name__ == "__main__":
    main()
