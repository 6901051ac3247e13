#!/usr/bin/env python3
"""bench/cpp/json_to_md.py: the JSON of bench_cuda_kernels (--json) as the markdown table of bench/README.md.

    python3 bench/cpp/json_to_md.py micro.json [--flat] > micro.md

One row per job (kernel, model, shape): our kernel's time, what it achieved (GB/s, or TFLOP/s where the job is
compute-bound), the fraction of the floor measured in the same run, and in the last column the other ways of
doing the same job measured next to it (cuBLAS, unfused launches, other kernel modes) with their time and how
ours compares. Rows under 50 % of the floor are marked and listed after the table, each with a first guess
at the reason (an automatic hint from the shape of the job, to be checked and rewritten by a person).
--flat: every measured row in the table, alternatives included.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict


def achieved(r: dict) -> str:
    if r["bound"] == "compute":
        return f"{r['tflops']:.1f} TFLOP/s"
    gbps = r["gbps"]
    return f"{gbps / 1000:.2f} TB/s" if gbps >= 1000 else f"{gbps:.0f} GB/s"


def pct(r: dict) -> str:
    p = r["pct_floor"]
    return f"**{p:.0f} %** ⚠" if p < 50 else f"{p:.0f} %"


def versus(row: dict, other: dict, who: str = "ours") -> str:
    ratio = other["us"] / row["us"]
    how = f"{who} {ratio:.2f}x faster" if ratio >= 1 else f"{who} {1 / ratio:.2f}x slower"
    return f"{other['variant']}: {other['us']:.1f} us ({how})"


def hint(r: dict, copy_bw: float) -> str:
    """A first guess at why a job is under half its floor, from its size and kind."""
    k, shape, floor_us = r["kernel"], r["shape"], r["floor_us"]
    if floor_us < 3:
        kb = r["bytes"] / 1e3
        return (f"latency-bound: the job moves {kb:.0f} kB (floor {floor_us:.2f} us); a dependent launch and one "
                f"pass over HBM cost ~2-4 us on this GPU whatever the size")
    if k == "attention_generic":
        return ("reference-shaped kernel (one warp per query and head, CUDA cores, no reuse of a key across the "
                "query heads of its group or across queries): the fallback, not the engine's decode or prefill path")
    if k == "attention_decode":
        return ("split-K decode reads each key once per kv head; at this depth the splits' partials and the combine "
                "step, and too few blocks per SM to cover HBM latency, keep it from the copy rate")
    if k == "attention_prefill":
        return "tensor-core flash attention (mma.sync, not wgmma): below cuBLAS's wgmma rate on Hopper"
    if k == "vision_attention":
        return ("wgmma flash attention at head_dim 72 (padded to 80 in Q.K^T): one exponential per score at 16 per "
                "clock and SM costs about as many cycles as the tensor cores' work")
    if (k.startswith("gemm") and "M=1 " in shape) or k.startswith("gemv"):
        return "batch-1 GEMV: weight streaming with too few bytes in flight per SM for this N x K"
    if k == "sample":
        return "several dependent passes over the row (radix search / select), each a launch"
    return "(no automatic hint: needs a look with ncu)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--flat", action="store_true", help="every measured row, alternatives included")
    a = ap.parse_args()
    with open(a.json) as f:
        d = json.load(f)
    rows = d["results"]
    print(f"Device: {d['device']} ({d['sms']} SMs, L2 {d['l2_bytes'] / 1e6:.0f} MB); PDL {'on' if d['pdl'] else 'off'}; "
          f"median of {d['runs']} runs per kernel{' (--quick)' if d.get('quick') else ''}.  ")
    print(f"Floors measured in the same run: copy bandwidth **{d['copy_bw'] / 1e9:.0f} GB/s** (1 GiB device-to-device "
          f"copy, bytes read + written), cuBLAS bf16 GEMM **{d['gemm_rate'] / 1e12:.0f} TFLOP/s** (8192^3, float32 "
          f"accumulation).")
    if d.get("failed"):
        print(f"\n**CHECK FAILED: {d['failed']}** (the table holds what ran before it)")
    print()
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    print("| kernel | model | shape | us | achieved | % floor | side by side |")
    print("|---|---|---|---:|---:|---:|---|")
    low = []
    for g, rs in groups.items():
        primary = next((r for r in rs if r["variant"].startswith("ours")), rs[0])
        alts = [r for r in rs if r is not primary]
        shown = rs if a.flat else [primary]
        for r in shown:
            name = r["kernel"]
            v = r["variant"]
            if v.startswith("ours"):
                v = v[4:].lstrip(":").strip()
            if v.startswith("(") and v.endswith(")"):
                v = v[1:-1]
            if v:
                name += f": {v}"
            side = "; ".join(versus(r, x) if r is primary else versus(r, x, "this")
                             for x in (alts if r is primary else [primary]))
            print(f"| {name} | {r['model']} | {r['shape']} | {r['us']:.2f} | {achieved(r)} | {pct(r)} | {side} |")
        if primary["pct_floor"] < 50:
            low.append(primary)
    if low:
        print(f"\nUnder 50 % of the floor ({len(low)} of {len(groups)} jobs); why (automatic first guess, to be checked):\n")
        for r in low:
            print(f"- {r['kernel']} {r['model']} {r['shape']}: {r['pct_floor']:.0f} % — {hint(r, d['copy_bw'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
