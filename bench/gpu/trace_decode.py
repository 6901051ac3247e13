"""The decode step's critical path from a kernel timeline (a GEMMA3_TRACE build: csrc/cuda/trace.cuh).

ncu times each launch alone; in the graph-replayed step the launches overlap through PDL, and what a kernel
costs the step is how much later the next one can start. For every block of every kernel the trace holds when
it became resident, when its griddepcontrol.wait returned (thread 0) and when it left, with the launch's
%gridid. Per launch i: end_i (its last block's exit), wait_i (its first block's wait return: the kernel before
has completed), so that the step is the sum of the shares end_i - end_(i-1) = hand-off (wait_i - end_(i-1)) +
work after the wait (end_i - wait_i). Printed per kernel of the layer (mean over layers and steps), with
lead = wait_i - first entry (how long its blocks sat resident ahead of their input).

  pip install --no-build-isolation --no-deps . -C cmake.define.GEMMA3_TRACE=ON   (bench/run_gpu.sh --trace)
  python3 bench/gpu/trace_decode.py --sizes 1B,4B [--steps 5] [--knobs 'name=v,...']
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REC = np.dtype([("t0", "<u8"), ("tw", "<u8"), ("t1", "<u8"), ("gridid", "<u8"), ("tm", "<u8", (4,)),
                ("tag", "<u4"), ("block", "<u4"),
                ("grid", "<u4"), ("smid", "<u4")])


def fnv16(name: str) -> int:
    h = 2166136261
    for ch in name.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h & 0xFFFF


def tag_names() -> dict[int, str]:
    """tag -> 'file:line' for the CUDA sources (trace.cuh's tag: the file name's hash and the macro's line)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "cuda")
    return {fnv16(os.path.basename(p)): os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.cu"))}


def name_of(tag: int, files: dict[int, str]) -> str:
    return f"{files.get(tag >> 16, hex(tag >> 16))}:{tag & 0xFFFF}"


def launches(recs: np.ndarray, files: dict[int, str]) -> list[dict]:
    """One dict per launch (the records of one trace: each graph node's last replay, trace.cuh), in the order of
    their first entries: name, grid, block times (ns)."""
    out = []
    r = recs[np.argsort(recs["gridid"], kind="stable")]
    _, starts = np.unique(r["gridid"], return_index=True)
    for h in np.split(r, starts[1:]):
        tw = h["tw"][h["tw"] > 0]
        z = h[int(np.argmax(h["t1"]))]  # the last block out: its marks (G3_TRACE_MARK) split its time
        ts = [int(z["tw"])] + [int(t) for t in z["tm"] if t] + [int(z["t1"])]
        marks = tuple(b - a for a, b in zip(ts, ts[1:])) if z["tw"] and len(ts) > 2 else None
        spread = None  # every block's marks and exit from the launch's first wait return: min / median / max
        if len(tw) and marks:
            ts_all = np.concatenate([h["tm"], h["t1"][:, None]], axis=1).astype(np.int64)
            rel = ts_all[:, (ts_all > 0).all(axis=0)] - int(tw.min())  # the marks every block placed, and exit
            spread = np.stack([rel.min(axis=0), np.median(rel, axis=0), rel.max(axis=0)])
        out.append(dict(name=name_of(int(h["tag"][0]), files), grid=int(h["grid"][0]), n=len(h),
                        t0=int(h["t0"].min()), t0_last=int(h["t0"].max()), tw=int(tw.min()) if len(tw) else 0,
                        t1=int(h["t1"].max()), marks=marks, spread=spread))
    return sorted(out, key=lambda x: x["t0"])


def critical_path(ls: list[dict]) -> list[dict]:
    """Per launch: share (end - previous end), handoff, work after the wait, lead; keyed by (previous kernel,
    kernel, grid) so that the products of one shape (4B's o and down) stay apart."""
    rows = []
    for i in range(1, len(ls)):
        a, b = ls[i - 1], ls[i]
        wait = b["tw"] if b["tw"] else b["t0"]
        rows.append(dict(key=(a["name"], b["name"], b["grid"]), share=(b["t1"] - a["t1"]) / 1e3,
                         handoff=(wait - a["t1"]) / 1e3, work=(b["t1"] - wait) / 1e3, lead=(wait - b["t0"]) / 1e3,
                         span=(b["t1"] - b["t0"]) / 1e3, marks=b["marks"], spread=b["spread"]))
    return rows


def summarize(rows: list[dict], steps: int) -> str:
    agg: dict = defaultdict(list)
    for r in rows:
        agg[r["key"]].append(r)
    lines = [f"{'kernel (after)':<58} {'grid':>6} {'n':>4} {'share':>7} {'handoff':>7} {'work':>7} {'lead':>7} "
             f"{'span':>7} {'us/step':>8}"]
    tot = 0.0
    for key, rs in sorted(agg.items(), key=lambda kv: -sum(r["share"] for r in kv[1])):
        m = {f: float(np.mean([r[f] for r in rs])) for f in ("share", "handoff", "work", "lead", "span")}
        per_step = sum(r["share"] for r in rs) / steps
        tot += per_step
        lines.append(f"{key[1] + '  (after ' + key[0] + ')':<58} {key[2]:>6} {len(rs):>4} {m['share']:7.2f} "
                     f"{m['handoff']:7.2f} {m['work']:7.2f} {m['lead']:7.2f} {m['span']:7.2f} {per_step:8.1f}")
    lines.append(f"sum of shares per step: {tot:.1f} us")
    lines.append("the last block's time split by its marks (us, mean): wait -> marks -> exit "
                 "(residual_rmsnorm / fused GEMVs: the two block sums; cluster attention: key tiles done, slices "
                 "sent, slices received, combine done; with decode_cluster_push=0 or without a cluster: q staged, "
                 "key tiles done, cluster barrier, cluster combine)")
    for key, rs in agg.items():
        mk = [r["marks"] for r in rs if r["marks"]]
        if mk and len({len(x) for x in mk}) == 1:
            m = np.mean(np.array(mk, dtype=np.float64), axis=0) / 1e3
            name = f"{key[1]}  (after {key[0]})"
            lines.append(f"  {name:<56} {key[2]:>6}  " + " ".join(f"{v:6.2f}" for v in m))
    lines.append("every block's marks and exit, us after the launch's first wait return (mean over launches of "
                 "min / median / max over blocks; the marks every block placed)")
    for key, rs in agg.items():
        sp = [r["spread"] for r in rs if r["spread"] is not None]
        if sp and len({x.shape for x in sp}) == 1:
            m = np.mean(np.array(sp, dtype=np.float64), axis=0) / 1e3
            lines.append(f"  {key[1] + '  (after ' + key[0] + ')':<56} {key[2]:>6}  " + "  ".join(
                f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in m.T))
    return "\n".join(lines)


def timer_resolution(recs: np.ndarray) -> str:
    t = np.concatenate([recs["t0"], recs["t1"]]).astype(np.int64)
    d = np.diff(np.unique(t))
    return f"globaltimer: {len(np.unique(t))} distinct values, smallest steps (ns) {np.unique(d)[:6].tolist()}"


def run(size: str, steps: int, knobs: dict[str, int]) -> None:
    import torch
    from bench_e2e import decode_step_s, make_models, start_decode
    from gemma3_native import _cuda
    if not _cuda.trace_available():
        raise SystemExit("trace_decode: this build has no timeline; build with -C cmake.define.GEMMA3_TRACE=ON")
    hf, eng = make_models(size, max_batch=1, max_context=512)
    del hf
    torch.cuda.empty_cache()
    for k, v in knobs.items():  # engine attributes, or module-wide settings (_cuda.set_<name>)
        if hasattr(_cuda, f"set_{k}"):
            getattr(_cuda, f"set_{k}")(v)
        else:
            setattr(eng, k, v)
    rng = np.random.default_rng(0)
    plain = np.median([decode_step_s(eng, rng, 100) for _ in range(3)]) * 1e3
    # the same decode recording: its prompt and 20 untimed steps, then `steps` steps traced
    step = start_decode(eng, rng)
    for _ in range(17):
        step()
    torch.cuda.synchronize()
    files = tag_names()
    rows: list[dict] = []
    gpu_ms, short = [], 0
    for _ in range(steps):  # one step a trace: the table holds the last replay of each graph node (trace.cuh)
        _cuda.trace_start()
        step()
        recs = np.frombuffer(_cuda.trace_stop(), dtype=REC)
        ls = launches(recs, files)
        short += sum(1 for x in ls if x["grid"] <= 4096 and x["n"] != x["grid"])  # slots another launch took
        over = sum(1 for a, b in zip(ls, ls[1:]) if b["tw"] and b["tw"] < a["t1"])
        if over:  # a wait returns only once the kernel before has completed: if not, the order is wrong
            print(f"warning: {over} launches' waits returned before the launch before them ended")
        rows += critical_path(ls)
        gpu_ms.append((ls[-1]["t1"] - ls[0]["t0"]) / 1e6)
    print(f"[{size}{' ' + str(knobs) if knobs else ''}] step {plain:.3f} ms (this build, not recording; host-timed); "
          f"{np.median(gpu_ms):.3f} ms a traced step on the GPU's clock (first entry to last exit, median of {steps}); "
          f"{len(recs)} block records, {len(ls)} launches in the last"
          + (f"; {short} launches lost records" if short else ""))
    print(timer_resolution(recs))
    print(summarize(rows, steps))
    # the start of the last step as it ran, times from its first entry
    print("the last step's first launches (us from its first entry): name grid | first entry, last entry, wait, end")
    base = ls[0]["t0"]
    for x in ls[:18]:
        print(f"  {x['name']:<28} {x['grid']:>6} | {(x['t0'] - base) / 1e3:8.2f} {(x['t0_last'] - base) / 1e3:8.2f} "
              f"{((x['tw'] or x['t0']) - base) / 1e3:8.2f} {(x['t1'] - base) / 1e3:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1B,4B")
    ap.add_argument("--steps", type=int, default=5, help="steps traced, one a trace")
    ap.add_argument("--knobs", default="", help="engine attributes or module settings: 'name=v,name=v'")
    a = ap.parse_args()
    knobs = {kv.split("=")[0].strip(): int(kv.split("=")[1]) for kv in a.knobs.split(",") if kv.strip()}
    for size in a.sizes.split(","):
        run(size, a.steps, knobs)


if __name__ == "__main__":
    main()
