"""Probe: graph-replayed batch-1 decode step times of engine configurations, alternated several times in one
process so that the spread between repeats shows the noise (random-weight models of the real shapes,
bench_e2e.make_models; 128-token prompt, ~130 keys). A configuration is 'name=value,name=value' of CudaEngine
attributes ('default' for none); configurations are separated by ';'.
Example: python3 bench/gpu/probe_knobs.py --sizes 4B --configs 'default;fuse_residual_gemv=3' --reps 5"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def parse(cfg: str) -> dict[str, int]:
    if cfg.strip() == "default":
        return {}
    out = {}
    for kv in cfg.split(","):
        k, v = kv.split("=")
        out[k.strip()] = int(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270M,1B,4B")
    ap.add_argument("--configs", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    import torch
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_e2e import make_models
    configs = [c.strip() for c in a.configs.split(";") if c.strip()]
    for size in a.sizes.split(","):
        hf, eng = make_models(size, max_batch=1, max_context=512)
        del hf
        torch.cuda.empty_cache()
        rng = np.random.default_rng(0)
        t, k, p, s = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint64))
        one, sl = np.ones(1, np.int32), np.zeros(1, np.int32)

        def run(steps: int) -> float:
            eng.reset_all()
            nxt = eng.forward_sample(sl, np.array([128], np.int32), rng.integers(4, 1000, 128).astype(np.int32),
                                     t, k, p, s, np.zeros(1, np.uint64))
            for _ in range(3):
                nxt = eng.forward_sample(sl, one, nxt, t, k, p, s, np.zeros(1, np.uint64))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = eng.forward_sample(sl, one, nxt, t, k, p, s, np.zeros(1, np.uint64))
            return (time.perf_counter() - t0) / steps * 1e3

        times: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(a.reps):
            for c in configs:
                knobs = parse(c)
                saved = {kk: getattr(eng, kk) for kk in knobs}
                for kk, v in knobs.items():
                    setattr(eng, kk, v)
                eng.clear_graphs()
                run(20)
                times[c].append(run(a.steps))
                for kk, v in saved.items():
                    setattr(eng, kk, v)
                eng.clear_graphs()
        print(f"[{size}] step ms, {a.reps} alternations: " +
              "; ".join(f"{c}: " + " ".join(f"{v:.3f}" for v in vs) + f" (median {np.median(vs):.3f})"
                        for c, vs in times.items()), flush=True)


if __name__ == "__main__":
    main()
