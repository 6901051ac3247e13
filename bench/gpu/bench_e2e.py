"""End-to-end benchmark of the CUDA engine against transformers, on random-weight bf16 models of the
real Gemma 3 270M, 1B and 4B shapes generated on the GPU itself (transformers builds the model, its
own weights go into our engine through set_weight: the same weights on both sides).

Per size: prefill of 2048 tokens; batch 1 with a 128-token prompt and 128 new tokens (greedy);
decode throughput at batch 8 and 32 (128-token prompts, 128 steps); transformers (bf16, default
attention, generate()) in the same run; the device-to-device copy bandwidth measured in the same
run; % of the bandwidth roofline = (weight bytes / bandwidth) / measured time per decode step at
batch 1; peak GPU memory (our engine: every byte it cudaMalloc'd; transformers: torch's peak).
Writes JSON to $OUT/bench.json and prints a table last."""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time
import zlib

import numpy as np
import torch

from gemma3_native import _cuda
from gemma3_native.config import spec_from_dict
from gemma3_native.weights import canonical_name

SIZES = {
    "270M": dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                 intermediate_size=2048, sliding_window=512, max_position_embeddings=32768, scaling=None),
    "1B": dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
               intermediate_size=6912, sliding_window=512, max_position_embeddings=32768, scaling=None),
    "4B": dict(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=10240, sliding_window=1024, max_position_embeddings=131072, scaling=8.0),
}
TARGET_B1 = {"270M": 2000, "1B": 1000, "4B": 330}


def hf_config(size: str):
    from transformers import AutoConfig
    s = dict(SIZES[size])
    scaling = s.pop("scaling")
    L = s["num_hidden_layers"]
    glob = {"rope_type": "default", "rope_theta": 1e6} if scaling is None else \
        {"rope_type": "linear", "factor": scaling, "rope_theta": 1e6}
    cfg = AutoConfig.for_model("gemma3_text", vocab_size=262144, head_dim=256, query_pre_attn_scalar=256,
                               layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                            for i in range(L)],
                               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                "full_attention": glob}, **s)
    return cfg


def cuda_sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(ts)  # bytes read + written per second


def make_models(size: str, max_batch: int, max_context: int):
    from transformers import AutoModelForCausalLM
    cfg = hf_config(size)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    hf.eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    spec = spec_from_dict(cfg.to_dict(), "bench")
    eng = _cuda.CudaEngine(spec.config, "bfloat16", max_batch, max_context)
    mt = cfg.model_type
    for name, t in hf.state_dict().items():
        cn = canonical_name(name, mt)
        if cn is None or cn.startswith("?") or cn not in eng.expected_weights():
            continue
        if t.ndim == 2:
            eng.set_weight(cn, t.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16))
        else:
            eng.set_weight(cn, t.detach().float().cpu().numpy())
    assert not eng.missing_weights(), eng.missing_weights()[:5]
    eng.finalize()
    return hf, eng


def greedy(B):
    return (np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32), np.zeros(B, np.uint64))


def ours_prefill(eng, rng, n=2048, reps=3):
    toks = rng.integers(4, 262144, n).astype(np.int32)
    ts = []
    for i in range(reps + 1):
        eng.reset_all()
        t = time.perf_counter()
        eng.forward(np.array([0], np.int32), np.array([n], np.int32), toks, False)
        dt = time.perf_counter() - t
        if i:
            ts.append(dt)
    return n / statistics.median(ts)


def gpu_state() -> str:
    """SM clock, power and temperature right after our runs: the same code has measured up to ~30 %
    apart on two H100 machines of this pool, so each table carries the state it was taken in."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


CHUNK = [8]  # decode steps per engine call (Model.decode_chunk's default on the GPU); the variants set 1


def ours_generate(eng, rng, B, prompt=128, new=128):
    """B sequences: one ragged prefill (forward_sample), then new-1 graph-replayed decode steps, CHUNK[0] a call
    (decode_steps: one graph of that many steps, as generate() runs them; 1: forward_sample, a call a step).
    Returns (decode seconds per step, end-to-end seconds, ids of sequence 0)."""
    eng.reset_all()
    toks = rng.integers(4, 262144, B * prompt).astype(np.int32)
    slots = np.arange(B, dtype=np.int32)
    temp, topk, topp, seed = greedy(B)
    t0 = time.perf_counter()
    nxt = eng.forward_sample(slots, np.full(B, prompt, np.int32), toks, temp, topk, topp, seed, np.zeros(B, np.uint64))
    t1 = time.perf_counter()
    out = [nxt]
    ones = np.ones(B, np.int32)
    i = 1
    while i < new:
        n = min(CHUNK[0], new - i)
        while n & (n - 1):
            n &= n - 1
        if n == 1:
            rows = [eng.forward_sample(slots, ones, nxt, temp, topk, topp, seed, np.full(B, i, np.uint64))]
        else:
            rows = list(eng.decode_steps(slots, nxt, temp, topk, topp, seed, np.full(B, i, np.uint64), n))
        out.extend(rows)
        nxt = rows[-1]
        i += len(rows)
    t2 = time.perf_counter()
    return (t2 - t1) / (new - 1), t2 - t0, [int(o[0]) for o in out], toks[:prompt]


def start_decode(eng, rng, graphs: bool = True):
    """A batch-1 greedy decode after a 128-token prompt and 3 untimed steps (~130 keys): returns step(), which runs
    one more step (forward_sample)."""
    eng.use_graphs = graphs
    z = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint64))
    one, sl = np.ones(1, np.int32), np.zeros(1, np.int32)
    eng.reset_all()
    nxt = eng.forward_sample(sl, np.array([128], np.int32), rng.integers(4, 1000, 128).astype(np.int32), *z,
                             np.zeros(1, np.uint64))

    def step() -> None:
        nonlocal nxt
        nxt = eng.forward_sample(sl, one, nxt, *z, np.zeros(1, np.uint64))
    for _ in range(3):
        step()
    return step


def decode_step_s(eng, rng, steps: int, graphs: bool = True) -> float:
    """Seconds per step of start_decode's decode (the probes' and profile_decode.py's timing)."""
    step = start_decode(eng, rng, graphs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def with_knobs(eng, fn, **knobs):
    """fn() with engine attributes set for the call (graphs dropped before and after), restored after it."""
    saved = {k: getattr(eng, k) for k in knobs}
    for k, v in knobs.items():
        setattr(eng, k, v)
    eng.clear_graphs()
    try:
        return fn()
    finally:
        for k, v in saved.items():
            setattr(eng, k, v)
        eng.clear_graphs()


def hf_prefill(hf, rng, n=2048, reps=3):
    ids = torch.tensor(rng.integers(4, 262144, (1, n)), device="cuda")
    ts = []
    with torch.no_grad():
        for i in range(reps + 1):
            dt, _ = cuda_sync_time(lambda: hf(ids, logits_to_keep=1))
            if i:
                ts.append(dt)
    return n / statistics.median(ts)


def hf_generate(hf, prompt_ids: np.ndarray, B: int, new: int):
    ids = torch.tensor(np.tile(prompt_ids, (B, 1)), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t1, _ = cuda_sync_time(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
        tn, out = cuda_sync_time(lambda: hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw))
    per_step = (tn - t1) / (new - 1)
    return per_step, tn, out[0, prompt_ids.shape[0]:].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270M,1B,4B")
    ap.add_argument("--hf-new", type=int, default=128, help="new tokens for transformers at batch 1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    dev = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    print(f"device: {dev}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    results = {"device": dev, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "copy_bandwidth_GBps": bw / 1e9, "sizes": {}}
    for size in a.sizes.split(","):
        # a generator per size, so that its prompts do not depend on the sizes and variants timed before it
        rng = np.random.default_rng(zlib.crc32(size.encode()))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free0, _ = _cuda.mem_info()
        t = time.perf_counter()
        hf, eng = make_models(size, max_batch=32, max_context=2048 + 256)
        print(f"[{size}] models ready in {time.perf_counter() - t:.1f}s; weight bytes {eng.weight_bytes / 1e9:.3f} GB",
              flush=True)
        r = {"weight_bytes": eng.weight_bytes, "kv_cache_bytes": eng.kv_cache_bytes}
        r["prefill2048_tok_s"] = ours_prefill(eng, rng)
        ours_generate(eng, rng, 1, 16, 16)  # warm-up (graph capture)
        step, e2e, ids1, prompt = ours_generate(eng, rng, 1)
        r["b1_ms_per_token"] = step * 1e3
        r["b1_tok_s"] = 1.0 / step
        r["b1_e2e_tok_s"] = 128 / e2e
        # the same step's graph replayed back to back (one synchronisation at the end): the GPU's time per step
        # without the host's turnaround between steps (the step time above includes it)
        r["b1_graph_ms_per_token"] = eng.time_graph_replays(1, 200)
        r["roofline_ms"] = eng.weight_bytes / bw * 1e3
        r["roofline_pct"] = 100.0 * r["roofline_ms"] / r["b1_ms_per_token"]
        # side by side, the same batch-1 decode: through the persistent decode kernel (off by default), with
        # decode attention in one split per kv head, on the one-wave split grid instead of a cluster of 8 (or in
        # a cluster of 4), with QK-norm + RoPE in their own launch (qk_rope_kv) everywhere or inside the
        # attention also in a cluster,
        # with the residual steps in their own launches or fused into every GEMV, with the qkv product and
        # QK-norm + RoPE + cache write in one launch (gemv_qkv_rope, off by default: at hidden sizes up to 768),
        # with the residual step inside that kernel too, or with it at every hidden size (where its clusters
        # fit), without the
        # kernels' PDL prologues, with the GEMV's warps per row by the rule before the wave rule, without the PDL
        # early triggers, with the gate_up product's fused residual step only where its kernel is one wave, and
        # with one decode step an engine call (forward_sample) instead of 8 (decode_steps), and without the o
        # product's L2 prefetch of gate_up rows (gate_up_l2_prefetch_kb: 4B's gate_up)
        variants = {"persistent": lambda on, e=eng: setattr(e, "persistent_decode", on),
                    "one_split": lambda on, e=eng: setattr(e, "decode_max_splits", 1 if on else 128),
                    "no_cluster": lambda on, e=eng: setattr(e, "decode_cluster", 0 if on else 8),
                    "cluster4": lambda on, e=eng: setattr(e, "decode_cluster", 4 if on else 8),
                    "unfused_qk": lambda on, e=eng: setattr(e, "fuse_qk_attention", 0 if on else 1),
                    "fused_qk_cluster": lambda on, e=eng: setattr(e, "fuse_qk_attention", 2 if on else 1),
                    "unfused_residual": lambda on, e=eng: setattr(e, "fuse_residual_gemv", 0 if on else 1),
                    "fused_residual_all": lambda on, e=eng: setattr(e, "fuse_residual_gemv", 2 if on else 1),
                    "fused_qkv_rope": lambda on, e=eng: setattr(e, "fuse_qkv_rope", 1 if on else 0),
                    "qkv_rope_residual_inside": lambda on, e=eng: setattr(e, "fuse_qkv_rope", 2 if on else 0),
                    "qkv_rope_any_hidden": lambda on, e=eng: (setattr(e, "fuse_qkv_rope", 1 if on else 0),
                                                              setattr(e, "qkv_rope_max_hidden", 1 << 30 if on else 768)),
                    "no_prologue": lambda on: _cuda.set_pdl_prologue(not on),
                    "gemv_old_rule": lambda on: _cuda.set_gemv_mode(1 if on else 2),
                    "no_early_trigger": lambda on, e=eng: setattr(e, "pdl_early_trigger", 0 if on else -1),
                    "gate_up_residual_one_wave_only": lambda on, e=eng: setattr(e, "fuse_residual_gemv", 3 if on else 1),
                    "one_step_a_call": lambda on: CHUNK.__setitem__(0, 1 if on else 8),
                    "no_l2_prefetch": lambda on, e=eng: setattr(e, "gate_up_l2_prefetch_kb", 0 if on else 4096)}
        r["b1_variant_ms_per_token"] = {}
        for name, switch in variants.items():
            switch(True)
            eng.clear_graphs()
            ours_generate(eng, rng, 1, 16, 16)
            step_v = ours_generate(eng, rng, 1)[0]
            switch(False)
            eng.clear_graphs()
            r["b1_variant_ms_per_token"][name] = step_v * 1e3
        r["b1_persistent_ms_per_token"] = r["b1_variant_ms_per_token"]["persistent"]
        eng.persistent_decode = True
        r["b1_persistent_ok"] = eng.persistent_decode_ok(1)  # False: the persistent column is the default path
        eng.persistent_decode = False
        ours_generate(eng, rng, 1, 16, 16)  # the default again, after the variants: drift shows here
        r["b1_variant_ms_per_token"]["default_again"] = ours_generate(eng, rng, 1)[0] * 1e3
        print(f"[{size}] b1 ms/token: default {step * 1e3:.3f}; " +
              "; ".join(f"{k} {v:.3f}" for k, v in r["b1_variant_ms_per_token"].items()), flush=True)
        for B in (8, 32):
            # warm-up: the timed run's prompt length (a longer batch would regrow the activations and drop the
            # graphs) and the graphs of 8, 4, 2 and 1 steps
            ours_generate(eng, rng, B, 128, 16)
            stepB, _, _, _ = ours_generate(eng, rng, B)
            r[f"b{B}_tok_s"] = B / stepB
            r[f"b{B}_ms_per_step"] = stepB * 1e3
        r["ours_device_bytes"] = eng.device_bytes
        r["gpu_state"] = gpu_state()
        print(f"[{size}] ours: prefill {r['prefill2048_tok_s']:.0f} tok/s; b1 {r['b1_tok_s']:.0f} tok/s "
              f"({r['b1_ms_per_token']:.3f} ms, graph back to back {r['b1_graph_ms_per_token']:.3f} ms, "
              f"{r['roofline_pct']:.0f}% of roofline; persistent kernel "
              f"{r['b1_persistent_ms_per_token']:.3f} ms); b8 {r['b8_tok_s']:.0f}; "
              f"b32 {r['b32_tok_s']:.0f} tok/s; GPU {r['gpu_state']}", flush=True)
        # transformers, same weights
        r["hf_prefill2048_tok_s"] = hf_prefill(hf, rng)
        hstep, he2e, hids = hf_generate(hf, prompt, 1, a.hf_new)
        r["hf_b1_tok_s"] = 1.0 / hstep
        r["hf_b1_ms_per_token"] = hstep * 1e3
        n = min(len(hids), len(ids1))
        agree = next((i for i in range(n) if hids[i] != ids1[i]), n)
        r["greedy_ids_agree_prefix"] = agree
        if agree < n:  # how close transformers' own logits were to a tie there (bench/gpu/check_greedy.py)
            with torch.no_grad():
                ctx = torch.tensor(np.concatenate([prompt, np.array(hids[:agree], np.int32)])[None].astype(np.int64),
                                   device="cuda")
                lg = hf(ctx).logits[0, -1].float()
            r["greedy_first_difference_gap"] = float(lg[hids[agree]] - lg[ids1[agree]])
            print(f"[{size}] first different id at {agree}: transformers' logit for its id exceeds ours by "
                  f"{r['greedy_first_difference_gap']:.4f} (max |logit| {lg.abs().max().item():.2f})", flush=True)
        for B in (8, 32):
            hs, _, _ = hf_generate(hf, prompt, B, 16)
            r[f"hf_b{B}_tok_s"] = B / hs
        r["hf_peak_bytes"] = torch.cuda.max_memory_allocated()
        print(f"[{size}] transformers: prefill {r['hf_prefill2048_tok_s']:.0f} tok/s; b1 {r['hf_b1_tok_s']:.1f} tok/s; "
              f"greedy ids agree for the first {agree} of {n}", flush=True)
        results["sizes"][size] = r
        del hf, eng
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(f"Gemma 3 random bf16 weights, {dev}, {results['date']}, copy bandwidth {bw / 1e9:.0f} GB/s")
    hdr = (f"{'size':5} {'b1 tok/s':>9} {'ms/tok':>7} {'persist':>7} {'roofl%':>6} {'target':>6} {'HF b1':>6} {'b8 tok/s':>9} "
           f"{'HF b8':>6} {'b32 tok/s':>9} {'HF b32':>7} {'prefill':>8} {'HF pref':>8} {'ours GB':>7} {'HF GB':>6}")
    print(hdr)
    for size, r in results["sizes"].items():
        print(f"{size:5} {r['b1_tok_s']:9.0f} {r['b1_ms_per_token']:7.3f} {r['b1_persistent_ms_per_token']:7.3f} {r['roofline_pct']:6.0f} "
              f"{TARGET_B1[size]:6d} {r['hf_b1_tok_s']:6.1f} {r['b8_tok_s']:9.0f} {r['hf_b8_tok_s']:6.0f} "
              f"{r['b32_tok_s']:9.0f} {r['hf_b32_tok_s']:7.0f} {r['prefill2048_tok_s']:8.0f} "
              f"{r['hf_prefill2048_tok_s']:8.0f} {r['ours_device_bytes'] / 1e9:7.2f} {r['hf_peak_bytes'] / 1e9:6.2f}")


if __name__ == "__main__":
    main()
