"""Decode-step profile of the CUDA engine on a random-weight model of a real Gemma 3 shape.
Without ncu: times graph-replayed and ungraphed decode steps (batch 1, 128-token context).
Under ncu (--profile-from-start off): the profiled range is `--steps` ungraphed decode steps, so
ncu lists every kernel of a step with its duration; summarize with --summarize CSV. G3_KNOBS='name=v,name=v;...'
(engine attributes) profiles the steps once per configuration, in that order."""
from __future__ import annotations

import argparse
import collections
import csv
import os
import sys

import numpy as np


def summarize(path: str, steps: int) -> None:
    rows = list(csv.reader(open(path)))
    hdr_i = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    hdr = rows[hdr_i]
    ki, mi, vi, ui = hdr.index("Kernel Name"), hdr.index("Metric Name"), hdr.index("Metric Value"), hdr.index("Metric Unit")
    tot = collections.defaultdict(float)
    cnt = collections.Counter()
    for r in rows[hdr_i + 1:]:
        if len(r) <= vi or r[mi] != "gpu__time_duration.sum":
            continue
        v = float(r[vi].replace(",", ""))
        v = v / 1e3 if r[ui] == "nsecond" else (v * 1e3 if r[ui] == "msecond" else v)  # -> usecond
        name = r[ki].split("(")[0].split("<")[0].replace("void ", "")
        key = name + ("" if "<" not in r[ki] else "<" + r[ki].split("<", 1)[1].split(">")[0][:40] + ">")
        tot[key] += v
        cnt[key] += 1
    all_us = sum(tot.values()) / steps
    print(f"kernel time per decode step: {all_us:.1f} us over {sum(cnt.values()) // steps} kernels")
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"  {v / steps:9.1f} us  {cnt[k] // steps:4d} x  {v / cnt[k]:7.2f} us  {k}")


def trace_phases(eng, run, _cuda) -> None:
    """Per-phase times of the persistent decode kernel (block 0's clock at each grid barrier), median over
    layers and 5 steps, and the graph-replayed step with and without the persistent kernel."""
    L = eng.config.num_layers
    khz = _cuda.clock_rate_khz()
    eng.persistent_decode = True
    names = ["A residual + norm", "A qkv product + barrier", "B attention + barrier", "C stage attn",
             "C o product + barrier", "D residual + norm", "D gate_up+GeGLU + barrier", "E stage act",
             "E down product + barrier"]  # the stamps of a layer (kPersistentTracePerLayer)
    S = len(names)
    per, slots = [], []
    run(3, False)
    for _ in range(5):
        eng.trace_persistent = True
        run(1, False)
        eng.trace_persistent = False
        t = np.array(eng.persistent_trace(), np.float64)
        d = np.diff(t[:S * L + 2]) / khz * 1e3  # us
        per.append(d)
        st = t[S * L + 2:].reshape(-1, 4)
        st = st[st[:, 0] > 0]
        slots.append(np.diff(st, axis=1) / khz * 1e3)
    d = np.median(np.stack(per), axis=0)
    total = d.sum()
    print(f"persistent kernel, block 0 clock ({khz / 1e3:.0f} MHz reported): {total:.1f} us per step, "
          f"{(total - d[-1]) / L:.2f} us per layer")
    for i, nm in enumerate(names):
        v = d[i:S * L:S]
        print(f"  {nm:34s} median {np.median(v):6.2f} us  (min {v.min():.2f}, max {v.max():.2f})")
    print(f"  final norm                         {d[-1]:6.2f} us")
    sl = np.concatenate(slots)
    print(f"  weight slots (block 0, {len(sl) // 5} per step): wait {np.median(sl[:, 0]):.2f} us, "
          f"compute {np.median(sl[:, 1]):.2f} us, issue {np.median(sl[:, 2]):.2f} us (medians); "
          f"mean wait {sl[:, 0].mean():.2f}, compute {sl[:, 1].mean():.2f}, issue {sl[:, 2].mean():.2f}")
    g = run(200, True)
    eng.persistent_decode = False
    eng.clear_graphs()
    g0 = run(200, True)
    print(f"graph-replayed step: persistent {g * 1e3:.3f} ms, one launch per operation {g0 * 1e3:.3f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="270M")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--summarize", default=None)
    ap.add_argument("--trace", action="store_true", help="phase times of the persistent decode kernel only")
    a = ap.parse_args()
    if a.summarize:
        summarize(a.summarize, a.steps)
        return
    import torch
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_e2e import decode_step_s, make_models, with_knobs
    from probe_knobs import parse
    hf, eng = make_models(a.size, max_batch=1, max_context=512)
    del hf
    torch.cuda.empty_cache()
    rng = np.random.default_rng(0)
    t, k, p, s = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint64))
    one = np.ones(1, np.int32)
    sl = np.zeros(1, np.int32)

    def run(steps, graphs):
        return decode_step_s(eng, rng, steps, graphs)

    from gemma3_native import _cuda
    c = eng.config
    if a.trace:
        trace_phases(eng, run, _cuda)
        return
    kernel_names = {0: "lanes-over-keys", 1: "warp-per-key", 2: "tensor-core"}
    for mode in (0, 1, 2):
        _cuda.set_decode_kernel(mode)
        row = []
        for start, ns in ((0, 1), (130, 1), (130, 32), (2000, 1), (2000, 8), (2000, 32)):
            hot, cold, cp = _cuda.bench_decode_attention(c.num_heads, c.num_kv_heads, c.head_dim, start, 0, 2304,
                                                         ns, 50)
            row.append(f"{start + 1}k/{ns}s {hot:.1f}")
        print(f"  attention alone, us hot ({kernel_names[mode]}): " + ", ".join(row), flush=True)
    _cuda.set_decode_kernel(2)
    if _cuda.decode_cluster_supported():  # the cluster combine against the split grid, same key counts
        for cl in (False, True):
            row = []
            for start, ns in ((0, 8), (130, 4), (130, 8), (255, 8), (511, 8), (1023, 8)):
                hot, _, _ = _cuda.bench_decode_attention(c.num_heads, c.num_kv_heads, c.head_dim, start, 0, 2304,
                                                         ns if cl else 128, 50, cluster=cl)
                row.append(f"{start + 1}k/{ns if cl else 'wave'} {hot:.1f}")
            print(f"  attention alone, us hot (tensor-core, {'cluster' if cl else 'split grid'}): " + ", ".join(row),
                  flush=True)
    def profiled_steps():  # under ncu: only this range is profiled
        run(3, False)
        eng.use_graphs = False
        torch.cuda.profiler.start()
        nxt = np.array([5], np.int32)
        for _ in range(a.steps):
            nxt = eng.forward_sample(sl, one, nxt, t, k, p, s, np.zeros(1, np.uint64))
        torch.cuda.profiler.stop()
        eng.use_graphs = True

    if a.steps > 0:
        # G3_KNOBS='name=v,name=v;...': the steps once per configuration of engine attributes, in that order
        for cfg in os.environ.get("G3_KNOBS", "default").split(";"):
            with_knobs(eng, profiled_steps, **parse(cfg))
        return
    g = run(200, True)
    u = run(100, False)
    _cuda.set_pdl(False)
    eng.clear_graphs()
    g0 = run(200, True)
    _cuda.set_pdl(True)
    eng.clear_graphs()
    mode0 = _cuda.gemv_mode()
    _cuda.set_gemv_mode(0)
    g1 = run(200, True)
    _cuda.set_gemv_mode(mode0)
    eng.clear_graphs()
    print(f"{a.size}: decode step (batch 1, ~130 positions) {g * 1e3:.3f} ms with the graph, {u * 1e3:.3f} ms without; "
          f"graph without PDL {g0 * 1e3:.3f} ms; one-warp-per-row GEMV rule {g1 * 1e3:.3f} ms "
          f"(weights {eng.weight_bytes / 1e9:.3f} GB)", flush=True)
    for mode in (1, 0):
        _cuda.set_decode_kernel(mode)
        eng.clear_graphs()
        gw = run(200, True)
        print(f"  {kernel_names[mode]} decode attention kernel instead of tensor-core: {gw * 1e3:.3f} ms per step",
              flush=True)
    _cuda.set_decode_kernel(2)
    eng.clear_graphs()
    # per-stage cost: launch one stage twice (engine.repeat_mask) and take the difference; with the
    # decode fusions off, so that every stage is its own launch
    eng.fuse_qk_attention, eng.fuse_residual_gemv = 0, 0
    eng.clear_graphs()
    g = run(200, True)
    print(f"  per stage, fusions off (step {g * 1e3:.3f} ms):", flush=True)
    names = ["qkv product", "qk_rope_kv", "decode attention", "o product", "residual+norm (x2/layer)",
             "gate_up+GeGLU", "down product", "LM head", "argmax/sampling"]
    L = eng.config.num_layers
    for i, nm in enumerate(names):
        eng.repeat_mask = 1 << i
        eng.clear_graphs()
        d = run(200, True) - g
        per = d / (L * (2 if i == 4 else 1)) if i < 7 else d
        print(f"  {nm:26s} +{d * 1e3:.3f} ms per step when doubled = {per * 1e6:.1f} us per launch", flush=True)
    eng.repeat_mask = 0
    eng.fuse_qk_attention, eng.fuse_residual_gemv = 1, 1
    eng.clear_graphs()


if __name__ == "__main__":
    main()
