"""Long-context benchmark of the CUDA engine (issue #6): random bf16 weights of the real Gemma 3 shapes,
generated on the GPU (torch) and loaded through set_weight; no weights travel, no transformers needed.

Per size (4B up to 128K tokens, 270M and 1B up to their 32K limit):
- KV-cache bytes at 32K and 128K: our engine (ring buffers of `sliding_window` positions on local
  layers) against the same config with every layer global. Both engines are constructed (the cache is
  allocated at construction) and their kv_cache_bytes() checked against the closed form
  2 * kv_heads * head_dim * 2 bytes * (n_local * min(window, ctx) + n_global * ctx).
- Prefill tok/s at each --lengths value, batch 1, fed in chunks of --chunk tokens (by default what
  Model.generate uses on the GPU: PREFILL_CHUNK * GPU_CHUNK_FACTOR) through forward_sample, as it does;
  with the time of every chunk, so the cost of a chunk can be read against its depth.
- Decode tok/s at depth 0 and at each length: median of --steps graph-replayed batch-1 steps
  (host-timed, as bench_e2e.py), after 3 warm-up steps. The bandwidth bound on the depth-d/depth-0
  ratio: weight bytes / (weight bytes + KV bytes read at depth d).
- Local vs global: the same weights with every layer local ("all-local" variant). Its prefill time per
  token staying flat over 8K..128K shows the local layers' cost growing linearly with length; the
  rest of the real config's time is the global layers' attention, which grows with depth.
- --alt-chunk N: prefill again at lengths >= 32K with chunks of N tokens (more query tiles per
  attention launch), to show what the chunk size costs.
- GPU memory of the real config's run at the default chunk: the engine's own cudaMalloc'd bytes (weights,
  KV cache, activations sized by the chunk, workspaces) and the process's peak total - free
  (cudaMemGetInfo, sampled after each prefill; includes the CUDA context of torch and ours).
Prints markdown tables last; writes JSON to $OUT/long.json. About 2-3 minutes on an H100 for all sizes."""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import SIZES  # noqa: E402  (the real shapes, one table for both benchmarks)

from gemma3_native import _cuda  # noqa: E402
from gemma3_native.config import spec_from_dict  # noqa: E402
from gemma3_native.model import GPU_CHUNK_FACTOR, PREFILL_CHUNK  # noqa: E402

VOCAB = 262144
SLOT0 = np.zeros(1, np.int32)
GREEDY = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint64))  # t, k, p, seed
COUNTER0 = np.zeros(1, np.uint64)
WARM_STEPS = 3
ALT_MIN = 32768  # --alt-chunk runs at lengths from here
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu": only for a dry run of this script's logic


def layer_types(n: int, layout: str) -> list[str]:
    if layout == "local":
        return ["sliding_attention"] * n
    if layout == "global":
        return ["full_attention"] * n
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]  # Gemma 3: 5 + 1


def model_config(size: str, layout: str = "real"):
    s = dict(SIZES[size])
    scaling = s.pop("scaling")
    glob = {"rope_type": "default", "rope_theta": 1e6} if scaling is None else \
        {"rope_type": "linear", "factor": scaling, "rope_theta": 1e6}
    d = dict(model_type="gemma3_text", vocab_size=VOCAB, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
             tie_word_embeddings=True, layer_types=layer_types(s["num_hidden_layers"], layout),
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                              "full_attention": glob}, **s)
    return spec_from_dict(d, f"bench_long {size} {layout}").config


def kv_formula(cfg, ctx: int, all_global: bool = False) -> int:
    """KV-cache bytes of one sequence slot in bf16, from the config alone."""
    per_pos = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    n_local = 0 if all_global else sum(1 for t in cfg.layer_types if t.name == "Local")
    return per_pos * (n_local * min(cfg.sliding_window, ctx) + (cfg.num_layers - n_local) * ctx)


def kv_read_bytes(cfg, depth: int) -> int:
    """KV bytes one decode step reads at `depth` cached positions (local layers: the last window)."""
    per_pos = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return sum(per_pos * (min(cfg.sliding_window, depth + 1) if t.name == "Local" else depth + 1)
               for t in cfg.layer_types)


def gpu_used() -> int:
    free, total = _cuda.mem_info()
    return total - free


class Peak:
    def __init__(self):
        self.bytes = 0

    def sample(self) -> None:
        self.bytes = max(self.bytes, gpu_used())


def random_weights(expected: dict, seed: int) -> dict[str, np.ndarray]:
    """bf16 matrices N(0, 1/fan_in) and float32 norm vectors N(0, 0.3^2), drawn on the GPU (as
    bench_e2e.py scales them), kept on the host in the engine's storage form for several engines."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    out = {}
    for name, shape in sorted(expected.items()):
        shape = tuple(int(x) for x in shape)
        t = torch.randn(shape, generator=g, device=DEV)
        if len(shape) == 2:
            t = (t * shape[-1] ** -0.5).to(torch.bfloat16)
            out[name] = t.view(torch.int16).cpu().numpy().view(np.uint16)
        else:
            out[name] = (t * 0.3).cpu().numpy()
        del t
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


def build_engine(cfg, weights: dict, max_context: int):
    eng = _cuda.CudaEngine(cfg, "bfloat16", 1, max_context)
    for name, a in weights.items():
        eng.set_weight(name, a)
    assert not eng.missing_weights(), eng.missing_weights()[:5]
    eng.finalize()
    return eng


def prefill(eng, toks: np.ndarray, chunk: int) -> tuple[float, list[float], int]:
    """A fresh sequence fed in chunks as Model._prefill_sample does: (seconds, seconds per chunk, first id)."""
    eng.reset_all()
    times, nxt = [], None
    t0 = time.perf_counter()
    for s in range(0, len(toks), chunk):
        n = min(chunk, len(toks) - s)
        ta = time.perf_counter()
        nxt = eng.forward_sample(SLOT0, np.array([n], np.int32), toks[s:s + n], *GREEDY, COUNTER0)  # synchronizes
        times.append(time.perf_counter() - ta)
    return time.perf_counter() - t0, times, int(nxt[0])


def decode(eng, first: int, steps: int) -> tuple[float, list[int]]:
    """Median seconds per graph-replayed batch-1 decode step after WARM_STEPS warm-up steps, and the ids."""
    nxt = np.array([first], np.int32)
    ones = np.ones(1, np.int32)
    ts, ids = [], []
    for i in range(WARM_STEPS + steps):
        t = time.perf_counter()
        nxt = eng.forward_sample(SLOT0, ones, nxt, *GREEDY, np.array([i + 1], np.uint64))
        dt = time.perf_counter() - t
        ids.append(int(nxt[0]))
        if i >= WARM_STEPS:
            ts.append(dt)
    return statistics.median(ts), ids


def chunk_profile(times: list[float], chunk: int) -> dict:
    """ms per chunk at a few depths: the first chunk, and the mean of the last 4 (the deepest)."""
    last = times[-5:-1] if len(times) > 4 else times[-1:]  # the final chunk may be partial
    return {"first_chunk_ms": times[0] * 1e3, "deepest_chunks_ms": statistics.mean(last) * 1e3,
            "chunk": chunk, "n_chunks": len(times)}


def run_lengths(eng, cfg, lengths: list[int], limit: int, steps: int, chunk: int, rng, peak: Peak,
                with_decode: bool, tag: str) -> dict:
    r: dict = {"prefill": {}, "decode": {}}
    warm = rng.integers(4, VOCAB, min(chunk, 2 * 1024)).astype(np.int32)
    prefill(eng, warm, chunk)  # activations sized, cuBLAS warmed
    if with_decode:
        eng.reset_all()
        first = int(eng.forward_sample(SLOT0, np.ones(1, np.int32), np.array([2], np.int32), *GREEDY, COUNTER0)[0])
        step, _ = decode(eng, first, steps)  # depth ~0 (graph captured in the warm-up steps)
        r["decode"]["0"] = {"depth": 1, "ms": step * 1e3, "tok_s": 1.0 / step}
        print(f"  [{tag}] decode at depth 0: {1.0 / step:.1f} tok/s ({step * 1e3:.3f} ms)", flush=True)
    for L in lengths:
        n = min(L, limit - WARM_STEPS - steps - 1) if with_decode else min(L, limit)
        toks = rng.integers(4, VOCAB, n).astype(np.int32)
        secs, times, first = prefill(eng, toks, chunk)
        peak.sample()
        p = {"tokens": n, "seconds": secs, "tok_s": n / secs, "us_per_token": secs / n * 1e6}
        p.update(chunk_profile(times, chunk))
        r["prefill"][str(L)] = p
        msg = f"  [{tag}] prefill {n} tokens: {n / secs:.0f} tok/s ({secs:.2f} s; chunk ms first {p['first_chunk_ms']:.1f}, deepest {p['deepest_chunks_ms']:.1f})"
        if with_decode:
            step, ids = decode(eng, first, steps)
            d = {"depth": n, "ms": step * 1e3, "tok_s": 1.0 / step, "ids_in_range": all(0 <= i < VOCAB for i in ids)}
            r["decode"][str(L)] = d
            msg += f"; decode at depth {n}: {1.0 / step:.1f} tok/s ({step * 1e3:.3f} ms)"
        print(msg, flush=True)
    return r


def kv_comparison(size: str, contexts: list[int]) -> dict:
    """Both layouts constructed (no weights: the cache is allocated by the constructor) where memory allows."""
    out = {}
    for ctx in contexts:
        row = {}
        for layout in ("real", "global"):
            cfg = model_config(size, layout)
            want = kv_formula(cfg, ctx, all_global=layout == "global")
            free, _ = _cuda.mem_info()
            got = None
            if want + (2 << 30) < free:
                eng = _cuda.CudaEngine(cfg, "bfloat16", 1, ctx)
                got = eng.kv_cache_bytes
                del eng
                gc.collect()
                assert got == want, f"{size} {layout} ctx {ctx}: kv_cache_bytes {got} != closed form {want}"
            row[layout] = {"bytes": want, "engine_bytes": got}
        row["ratio"] = row["real"]["bytes"] / row["global"]["bytes"]
        out[str(ctx)] = row
        print(f"  KV cache at {ctx}: ours {row['real']['bytes'] / 2**20:.1f} MiB, all-global "
              f"{row['global']['bytes'] / 2**20:.1f} MiB ({row['ratio'] * 100:.1f} %); engines constructed: "
              f"{row['real']['engine_bytes'] is not None}/{row['global']['engine_bytes'] is not None}", flush=True)
    return out


def bench_size(size: str, lengths_all: list[int], a, rng) -> dict:
    peak = Peak()
    limit = SIZES[size]["max_position_embeddings"]
    lengths = [L for L in lengths_all if L <= limit]
    cfg = model_config(size)
    n_local = sum(1 for t in cfg.layer_types if t.name == "Local")
    r: dict = {"layers": cfg.num_layers, "local_layers": n_local, "window": cfg.sliding_window,
               "max_position_embeddings": limit, "lengths": lengths}
    r["kv"] = kv_comparison(size, [c for c in (32768, 131072) if c <= limit])
    if not lengths:
        return r
    max_context = min(limit, max(lengths) + WARM_STEPS + a.steps + 1)
    t = time.perf_counter()
    probe = _cuda.CudaEngine(cfg, "bfloat16", 1, 16)
    weights = random_weights(probe.expected_weights(), seed=0)
    del probe
    eng = build_engine(cfg, weights, max_context)
    peak.sample()
    r["weight_bytes"] = eng.weight_bytes
    r["kv_cache_bytes"] = eng.kv_cache_bytes
    r["max_context"] = max_context
    print(f"[{size}] engine ready in {time.perf_counter() - t:.1f}s: weights {eng.weight_bytes / 1e9:.2f} GB, "
          f"KV cache {eng.kv_cache_bytes / 1e9:.3f} GB for {max_context} positions", flush=True)
    r["real"] = run_lengths(eng, cfg, lengths, max_context, a.steps, a.chunk, rng, peak, True, f"{size} real")
    for L, d in r["real"]["decode"].items():
        depth = d["depth"]
        d["bound_vs_depth0"] = eng.weight_bytes / (eng.weight_bytes + kv_read_bytes(cfg, depth) - kv_read_bytes(cfg, 1))
        d["vs_depth0"] = d["tok_s"] / r["real"]["decode"]["0"]["tok_s"]
    # memory of the default chunk's run, taken before the alt-chunk run and the every-layer-local variant (another engine)
    r["engine_device_bytes"] = eng.device_bytes
    r["activation_and_workspace_bytes"] = eng.device_bytes - eng.weight_bytes - eng.kv_cache_bytes  # chunk-sized
    r["peak_gpu_used_bytes"] = peak.bytes
    print(f"  [{size} real] GPU memory: engine {eng.device_bytes / 1e9:.2f} GB (activations + workspace "
          f"{r['activation_and_workspace_bytes'] / 1e9:.2f} GB), process peak {peak.bytes / 1e9:.2f} GB", flush=True)
    if a.alt_chunk:
        alt = [L for L in lengths if L >= ALT_MIN]
        r["alt_chunk"] = {"chunk": a.alt_chunk, "prefill": {}}
        for L in alt:
            n = min(L, max_context)
            toks = rng.integers(4, VOCAB, n).astype(np.int32)
            secs, times, _ = prefill(eng, toks, a.alt_chunk)
            peak.sample()
            p = {"tokens": n, "seconds": secs, "tok_s": n / secs}
            p.update(chunk_profile(times, a.alt_chunk))
            r["alt_chunk"]["prefill"][str(L)] = p
            print(f"  [{size} real, chunk {a.alt_chunk}] prefill {n} tokens: {n / secs:.0f} tok/s ({secs:.2f} s)",
                  flush=True)
    del eng
    gc.collect()
    if a.local_variant:
        cfg_l = model_config(size, "local")
        eng = build_engine(cfg_l, weights, max_context)
        r["all_local"] = run_lengths(eng, cfg_l, lengths, max_context, a.steps, a.chunk, rng, peak, True,
                                     f"{size} all-local")
        del eng
        gc.collect()
        # Per token: all-local = L layers of (GEMMs + local attention); real = n_local of those + n_global
        # global layers; the global layers' attention = real - all-local (their GEMMs cost the same).
        for L in lengths:
            ur = r["real"]["prefill"][str(L)]["us_per_token"]
            ul = r["all_local"]["prefill"][str(L)]["us_per_token"]
            r["real"]["prefill"][str(L)]["global_attention_us_per_token"] = ur - ul
    del weights
    return r


def klabel(L: int | str) -> str:
    L = int(L)
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def fmt_int(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ")


def tables(res: dict) -> str:
    lines = [f"Gemma 3 random bf16 weights, batch 1, {res['device']}, {res['date']}, prefill chunk {res['chunk']}",
             "", "KV cache (bytes, one sequence, bf16): ours (ring buffers on local layers) vs every layer global", "",
             "| size | context | ours | all global | ours / all global |", "|---|---|---|---|---|"]
    for size, r in res["sizes"].items():
        for ctx, k in r["kv"].items():
            lines.append(f"| {size} | {klabel(ctx)} | {k['real']['bytes'] / 2**20:,.1f} MiB | "
                         f"{k['global']['bytes'] / 2**20:,.1f} MiB | {k['ratio'] * 100:.1f} % |")
    Ls = sorted({L for r in res["sizes"].values() for L in r.get("lengths", [])})
    hdr = "| size | " + " | ".join(f"prefill {klabel(L)} tok/s" for L in Ls) + " | decode depth 0 | " + \
        " | ".join(f"decode {klabel(L)}" for L in Ls) + " | 32K / depth 0 (bound) | GPU memory: engine / process peak |"
    lines += ["", "Prefill tok/s (chunked) and decode tok/s at depth (graph-replayed steps, median)", "", hdr,
              "|" + "---|" * (hdr.count("|") - 1)]
    for size, r in res["sizes"].items():
        if "real" not in r:
            continue
        pre, dec = r["real"]["prefill"], r["real"]["decode"]
        cells = [fmt_int(pre[str(L)]["tok_s"]) if str(L) in pre else "-" for L in Ls]
        dcells = [f"{dec[str(L)]['tok_s']:.1f}" if str(L) in dec else "-" for L in Ls]
        k32 = dec.get("32768")
        ratio = f"{k32['vs_depth0'] * 100:.1f} % ({k32['bound_vs_depth0'] * 100:.1f} %)" if k32 else "-"
        lines.append(f"| {size} | " + " | ".join(cells) + f" | {dec['0']['tok_s']:.1f} | " + " | ".join(dcells) +
                     f" | {ratio} | {r['engine_device_bytes'] / 1e9:.2f} / {r['peak_gpu_used_bytes'] / 1e9:.2f} GB |")
    if any("all_local" in r for r in res["sizes"].values()):
        lines += ["", "Prefill time per token (us): real config, every layer local (same weights), and their "
                  "difference (the global layers' attention)", "",
                  "| size | " + " | ".join(f"{klabel(L)} real / all-local / global attn" for L in Ls) + " |",
                  "|---|" + "---|" * len(Ls)]
        for size, r in res["sizes"].items():
            if "all_local" not in r:
                continue
            cells = []
            for L in Ls:
                p = r["real"]["prefill"].get(str(L))
                q = r["all_local"]["prefill"].get(str(L))
                cells.append(f"{p['us_per_token']:.1f} / {q['us_per_token']:.1f} / "
                             f"{p['global_attention_us_per_token']:.1f}" if p and q else "-")
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
    if any("alt_chunk" in r for r in res["sizes"].values()):
        lines += ["", "Prefill tok/s by chunk size", "", "| size | length | chunk "
                  f"{res['chunk']} | alt chunk |", "|---|---|---|---|"]
        for size, r in res["sizes"].items():
            for L, p in r.get("alt_chunk", {}).get("prefill", {}).items():
                lines.append(f"| {size} | {klabel(L)} | {fmt_int(r['real']['prefill'][L]['tok_s'])} | "
                             f"{fmt_int(p['tok_s'])} (chunk {p['chunk']}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4B,1B,270M", help="run in this order (4B first: the 128K case)")
    ap.add_argument("--lengths", default="8192,32768,131072",
                    help="prompt lengths; each size takes those within its max_position_embeddings")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per depth")
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK * GPU_CHUNK_FACTOR,
                    help="prefill chunk (default: what Model.generate uses on the GPU)")
    ap.add_argument("--alt-chunk", type=int, default=1024, help="second prefill chunk at lengths >= 32K (0: off)")
    ap.add_argument("--no-local-variant", dest="local_variant", action="store_false",
                    help="skip the every-layer-local variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",") if x]
    dev = _cuda.device_name(0)
    res = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chunk": a.chunk,
           "steps": a.steps, "sizes": {}}
    print(f"device: {dev}; prefill chunk {a.chunk}; lengths {lengths}", flush=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for size in a.sizes.split(","):
        t = time.perf_counter()
        res["sizes"][size] = bench_size(size, lengths, a, rng)
        print(f"[{size}] done in {time.perf_counter() - t:.1f}s", flush=True)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        with open(os.path.join(a.out, "long.json"), "w") as f:  # partial results survive a timeout
            json.dump(res, f, indent=1)
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(a.out, "long.json"), "w") as f:
        json.dump(res, f, indent=1)
    print()
    print(tables(res))


if __name__ == "__main__":
    main()
