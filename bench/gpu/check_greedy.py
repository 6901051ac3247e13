"""Greedy agreement with transformers on the random-weight real shapes of bench_e2e.py, with the margin
behind each disagreement: for each of N random 128-token prompts, the first generated token of our engine
(bf16, prefill through forward) and of transformers (bf16, sdpa), our logits' relative difference from
transformers', and where the ids differ, transformers' logit gap between its top two and the gap between
its choice and ours (a disagreement inside bf16's rounding noise is a near-tie, not a bug).
Usage on the GPU machine: python bench/gpu/check_greedy.py --size 1B --prompts 16"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1B")
    ap.add_argument("--prompts", type=int, default=16)
    a = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_e2e import make_models
    from gemma3_native import _cuda
    hf, eng = make_models(a.size, max_batch=1, max_context=512)
    rng = np.random.default_rng(7)
    agree = 0
    for i in range(a.prompts):
        toks = rng.integers(4, 262144, 128).astype(np.int32)
        eng.reset_all()
        ours = eng.forward(np.zeros(1, np.int32), np.array([128], np.int32), toks, False)[0]
        _cuda.set_pdl_prologue(False)  # the kernels' PDL prologues change no bit (also a test at tiny sizes)
        eng.reset_all()
        same = np.array_equal(eng.forward(np.zeros(1, np.int32), np.array([128], np.int32), toks, False)[0], ours)
        _cuda.set_pdl_prologue(True)
        with torch.no_grad():
            ref = hf(torch.tensor(toks[None].astype(np.int64), device="cuda")).logits[0, -1].float().cpu().numpy()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        o, r = int(np.argmax(ours)), int(np.argmax(ref))
        top2 = np.sort(ref)[-2:]
        line = f"prompt {i}: ours {o} transformers {r}; logits rel. diff {rel:.3g}; transformers top-2 gap {top2[1] - top2[0]:.4f}; prologue off same bits: {same}"
        if o != r:
            line += f"; transformers' gap between its id and ours {ref[r] - ref[o]:.4f} (logit scale {np.abs(ref).max():.2f})"
        else:
            agree += 1
        print(line, flush=True)
    print(f"{a.size}: first greedy token equal on {agree} of {a.prompts} prompts")


if __name__ == "__main__":
    main()
