"""Command line: `gemma3 generate`, `gemma3 chat`, `gemma3 convert`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF checkpoint directory or .gguf file (default: the packaged Gemma 3 270M)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="weight storage dtype")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")


def _load(args):
    from .model import load
    return load(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                threads=args.threads, progress=sys.stderr.isatty())


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def _print_stats(model) -> None:
    s = model.last_stats
    if not s:
        return
    pre = s["prompt_tokens"] / s["prefill_s"] if s["prefill_s"] > 0 else float("nan")
    dec_n = max(s["generated_tokens"] - 1, 0)  # the first token comes from the prefill
    dec = dec_n / s["decode_s"] if s["decode_s"] > 0 and dec_n else float("nan")
    if s.get("vision_s"):
        print(f"[{model.device}] vision encoder {s['vision_s']:.3f} s", file=sys.stderr)
    print(f"[{model.device}] prompt {s['prompt_tokens']} tokens at {pre:.1f} tok/s; "
          f"generated {s['generated_tokens']} tokens, decode {dec:.1f} tok/s", file=sys.stderr)


def cmd_generate(args) -> int:
    model = _load(args)
    images = {"images": args.image, "pan_and_scan": args.pan_and_scan} if args.image else {}
    for piece in model.generate(args.prompt, stream=True, **images, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        _print_stats(model)
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    if args.image and model.vision is None:
        raise ValueError(f"--image: {model.path} has no vision tower (images need a multimodal Gemma 3 checkpoint)")
    messages: list[dict] = []
    pending_images = list(args.image)  # they go with the first user turn, before its text
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if pending_images:
            parts = [{"type": "image", "image": p} for p in pending_images] + [{"type": "text", "text": line}]
            messages.append({"role": "user", "content": parts})
            pending_images = []
        else:
            messages.append({"role": "user", "content": line})
        reply = []
        for piece in model.chat(messages, stream=True, pan_and_scan=args.pan_and_scan, **_sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "model", "content": "".join(reply)})
        if args.stats:
            _print_stats(model)
    return 0


def cmd_convert(args) -> int:
    from .gguf_import import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype or "bfloat16", progress=True)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gemma3", description="Gemma inference with a native C++/CUDA core")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--image", action="append", default=[],
                   help="image file for a multimodal model (repeatable; a <start_of_image> in the prompt marks "
                        "where each goes, else they come first)")
    g.add_argument("--pan-and-scan", action="store_true", help="add Pan & Scan crops of wide or tall images")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat on stdin with the Gemma chat template")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--image", action="append", default=[],
                   help="image file for a multimodal model (repeatable): shown with the first user turn")
    c.add_argument("--pan-and-scan", action="store_true", help="add Pan & Scan crops of wide or tall images")
    c.set_defaults(func=cmd_chat, max_new_tokens=256)
    v = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face directory")
    v.add_argument("gguf")
    v.add_argument("out_dir")
    v.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    v.set_defaults(func=cmd_convert)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        print(f"gemma3: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
