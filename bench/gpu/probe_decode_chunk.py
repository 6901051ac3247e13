"""Probe: batch-1 greedy decode time per token by decode steps per engine call (bench_e2e.ours_generate: a
128-token prompt, 128 new tokens; 1 = forward_sample a step, n > 1 = decode_steps, one CUDA graph of n steps),
random-weight models of the real shapes. The median of 3 runs per setting; the first setting again at the end.
--engines: engine shapes (max_batch x max_context) to compare, each a fresh engine.
Example: python3 bench/gpu/probe_decode_chunk.py --sizes 270M,1B --chunks 8,16,32,1 --engines 1x512,32x2304"""
from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_e2e as be  # noqa: E402


def probe(size: str, max_batch: int, max_context: int, chunks: list[int]) -> dict[int, list[float]]:
    """ms per token for each setting (the first again at the end) on a fresh engine of that shape."""
    hf, eng = be.make_models(size, max_batch, max_context)
    del hf
    rng = np.random.default_rng(0)
    res: dict[int, list[float]] = {}
    for ch in chunks + chunks[:1]:
        be.CHUNK[0] = ch
        eng.clear_graphs()
        be.ours_generate(eng, rng, 1, 16, 48)  # graphs of every step count used below
        t = sorted(be.ours_generate(eng, rng, 1)[0] for _ in range(3))[1]
        res.setdefault(ch, []).append(round(t * 1e3, 4))
    be.CHUNK[0] = 8
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270M,1B,4B")
    ap.add_argument("--chunks", default="8,16,32,1")
    ap.add_argument("--engines", default="1x512", help="engine shapes max_batch x max_context, comma-separated")
    a = ap.parse_args()
    chunks = [int(c) for c in a.chunks.split(",")]
    for size in a.sizes.split(","):
        for shape in a.engines.split(","):
            mb, mc = (int(v) for v in shape.split("x"))
            res = probe(size, mb, mc, chunks)
            print(f"[{size}, engine {shape}] ms/token by decode steps a call: " +
                  "; ".join(f"{k}: {v}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
