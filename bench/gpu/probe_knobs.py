"""Probe: graph-replayed batch-1 decode step times of engine configurations, alternated several times in one
process so that the spread between repeats shows the noise (random-weight models of the real shapes,
bench_e2e.make_models; 128-token prompt, ~130 keys). A configuration is 'name=value,name=value' of CudaEngine
attributes, or of the module-wide settings in GLOBAL (set through _cuda.set_<name>) ('default' for none);
configurations are separated by ';'.
Example: python3 bench/gpu/probe_knobs.py --sizes 4B --configs 'default;fuse_residual_gemv=2' --reps 5"""
from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_e2e import decode_step_s, make_models, with_knobs  # noqa: E402


def parse(cfg: str) -> dict[str, int]:
    if cfg.strip() == "default":
        return {}
    out = {}
    for kv in cfg.split(","):
        k, v = kv.split("=")
        out[k.strip()] = int(v)
    return out


GLOBAL = ("gemv_mode", "decode_cluster_push")  # module-wide settings (read through _cuda.<name>(), set through _cuda.set_<name>)


def alternate(eng, rng, configs: dict[str, dict[str, int]], reps: int, steps: int) -> dict[str, list[float]]:
    """ms per step of each named configuration (engine attributes), the configurations taken in turn reps
    times (each after 20 untimed steps through a fresh graph)."""
    from gemma3_native import _cuda
    found = {k: getattr(_cuda, k)() for k in GLOBAL}  # restored after each configuration
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(reps):
        for name, knobs in configs.items():
            attrs = {k: v for k, v in knobs.items() if k not in GLOBAL}
            glob = {k: v for k, v in knobs.items() if k in GLOBAL}
            for k, v in glob.items():
                getattr(_cuda, f"set_{k}")(v)
            try:
                times[name].append(with_knobs(eng, lambda: (decode_step_s(eng, rng, 20),
                                                            decode_step_s(eng, rng, steps))[1], **attrs) * 1e3)
            finally:
                for k in glob:
                    getattr(_cuda, f"set_{k}")(found[k])
    return times


def report(size: str, times: dict[str, list[float]]) -> str:
    return f"[{size}] step ms, {len(next(iter(times.values())))} alternations: " + "; ".join(
        f"{name}: " + " ".join(f"{v:.3f}" for v in vs) + f" (median {np.median(vs):.3f})" for name, vs in times.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270M,1B,4B")
    ap.add_argument("--configs", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    import torch
    configs = {c.strip(): parse(c) for c in a.configs.split(";") if c.strip()}
    for size in a.sizes.split(","):
        hf, eng = make_models(size, max_batch=1, max_context=512)
        del hf
        torch.cuda.empty_cache()
        rng = np.random.default_rng(0)
        print(report(size, alternate(eng, rng, configs, a.reps, a.steps)), flush=True)


if __name__ == "__main__":
    main()
