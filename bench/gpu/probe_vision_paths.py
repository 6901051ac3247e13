"""Probe: the vision tower (SigLIP-400M shapes, random bf16 weights, bench_vision.make_siglip / make_ours) under
several settings of the encoder's switches, alternated reps times in one process, with transformers'
SiglipVisionModel (sdpa, bf16) timed in the same rounds, so that the spread between rounds shows the noise and
every ratio is taken against the same run's transformers. A configuration is 'name=0|1,...' of encoder
properties ('default' for none); configurations are separated by ';'. Also prints each configuration's
agreement with transformers (relative to float32), as bench_vision.check_agreement.
Example: python3 bench/gpu/probe_vision_paths.py --configs 'default;residual_bf16=1' --batches 1,8 --reps 3"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_vision import IMAGE, LAYERS, PATCH, H, check_agreement, make_ours, make_siglip, timed  # noqa: E402


def parse(cfg: str) -> dict[str, bool]:
    if cfg.strip() == "default":
        return {}
    return {k.strip(): bool(int(v)) for k, v in (kv.split("=") for kv in cfg.split(","))}


def with_paths(enc, knobs: dict[str, bool], fn):
    saved = {k: getattr(enc, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(enc, k, v)
        return fn()
    finally:
        for k, v in saved.items():
            setattr(enc, k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    configs = {c.strip(): parse(c) for c in a.configs.split(";") if c.strip()}
    batches = [int(b) for b in a.batches.split(",")]
    hf = make_siglip(LAYERS)
    enc, _ = make_ours(hf, LAYERS, max(batches))
    print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    for name, knobs in configs.items():
        r = with_paths(enc, knobs, lambda: check_agreement(hf, enc))
        print(f"[{name}] vs fp32: ours {r['ours_vs_fp32']:.2e}, transformers bf16 {r['transformers_bf16_vs_fp32']:.2e}",
              flush=True)
    for B in batches:
        px = torch.rand(B, 3, IMAGE, IMAGE, device="cuda") * 2 - 1
        px16 = px.to(torch.bfloat16)
        out = torch.empty(B, (IMAGE // PATCH) ** 2, H, device="cuda")
        ms: dict[str, list[float]] = {name: [] for name in configs}
        hf_ms: list[float] = []
        for _ in range(a.reps):
            with torch.no_grad():
                hf_ms.append(timed(lambda: hf(pixel_values=px16), a.iters) * 1e3)
            for name, knobs in configs.items():
                ms[name].append(with_paths(enc, knobs, lambda: timed(
                    lambda: enc.run_device(px.data_ptr(), B, out.data_ptr(), False), a.iters)) * 1e3)
        t_hf = float(np.median(hf_ms))
        print(f"batch {B}: transformers " + " ".join(f"{v:.2f}" for v in hf_ms) + f" ms (median {t_hf:.2f})")
        for name, vs in ms.items():
            med = float(np.median(vs))
            print(f"  [{name}] " + " ".join(f"{v:.2f}" for v in vs) + f" ms (median {med:.2f}; {t_hf / med:.3f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
