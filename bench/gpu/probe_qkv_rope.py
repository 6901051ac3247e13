"""Probe: the decode step with the qkv product, QK-norm, RoPE and the cache write in one kernel
(engine.fuse_qkv_rope 1: the residual step before it in its own launch; 2: inside it) against the qkv GEMV
then qk_rope_kv (0), per model size, on a random-weight model (bench_e2e.make_models): graph-replayed
batch-1 step times alternated several times (noise band), the stage-doubling cost of each launch, and how
many of the kernel's clusters can be resident at once (the engine uses it only where all are). The kernel is
allowed at every hidden size here (the engine's default stops at 768). Under ncu (--ncu on|off): one
ungraphed step profiled."""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270M,1B,4B")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ncu", default="", help="under ncu: 'on' or 'off', one ungraphed step profiled")
    a = ap.parse_args()
    import torch
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_e2e import decode_step_s, make_models, with_knobs
    from probe_knobs import alternate, report
    from gemma3_native import _cuda
    for size in a.sizes.split(","):
        hf, eng = make_models(size, max_batch=1, max_context=512)
        del hf
        torch.cuda.empty_cache()
        c = eng.config
        eng.qkv_rope_max_hidden = 1 << 30  # the kernel wherever its clusters fit (the default stops at 768)
        rng = np.random.default_rng(0)
        if a.ncu:
            def prof():
                decode_step_s(eng, rng, 3, graphs=False)
                z = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint64))
                torch.cuda.profiler.start()
                eng.forward_sample(np.zeros(1, np.int32), np.ones(1, np.int32), np.array([5], np.int32), *z,
                                   np.zeros(1, np.uint64))
                torch.cuda.profiler.stop()
            with_knobs(eng, prof, fuse_qkv_rope=1 if a.ncu == "on" else 0)
            continue
        H, D = c.hidden_size, c.head_dim
        inside, outside = (_cuda.gemv_qkv_rope_max_clusters(1, H, D, norm) for norm in (True, False))
        print(f"[{size}] clusters of {D // 16} resident at once: residual inside {inside}, outside {outside}; "
              f"needed {c.num_heads + 2 * c.num_kv_heads}", flush=True)
        configs = {"fused, residual step outside": {"fuse_qkv_rope": 1},
                   "two launches (default)": {"fuse_qkv_rope": 0}, "fused, residual step inside": {"fuse_qkv_rope": 2}}
        print(report(size, alternate(eng, rng, configs, a.reps, a.steps)), flush=True)
        L = c.num_layers

        def step_ms(**knobs):
            return with_knobs(eng, lambda: (decode_step_s(eng, rng, 20), decode_step_s(eng, rng, a.steps))[1],
                              **knobs) * 1e3
        for name, knobs, bit in (("fused kernel", {}, 0), ("qkv GEMV", {"fuse_qkv_rope": 0}, 0),
                                 ("qk_rope_kv", {"fuse_qkv_rope": 0}, 1)):
            base, dbl = step_ms(**knobs), step_ms(repeat_mask=1 << bit, **knobs)
            print(f"[{size}] doubling {name}: +{(dbl - base) * 1e3 / L:.2f} us per launch "
                  f"(step {base:.3f} -> {dbl:.3f} ms)", flush=True)

if __name__ == "__main__":
    main()
