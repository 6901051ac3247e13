"""`load()` and `Model`: a checkpoint, its tokenizer and an engine, with generate / chat / forward."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from . import _native
from .chat import format_chat
from .config import ConfigError, ModelSpec, load_config_file, spec_from_dict
from .generate import SamplingParams, Sequence as Seq
from .tokenizer import Tokenizer
from .weights import CheckpointError, load_into, scan, storage_dtype

DEFAULT_MAX_CONTEXT = 8192
PREFILL_CHUNK = 1024  # tokens per forward call during prefill: bounds activation memory
# The CUDA engine's prefill chunk when only ids come back (generation) is this many times longer: at
# 32K tokens a 1024-token chunk leaves the GPU under-used in the global layers' attention (H100,
# bench/gpu/bench_long.py: 4096-token chunks prefill 1.5-2.8x faster), at ~0.4 GB more activations (4B).
GPU_CHUNK_FACTOR = 4
VISION_MAX_IMAGES = 4  # images the CUDA vision encoder runs at once (its preallocated activations)


class ContextLengthError(ValueError):
    """A prompt (plus what must follow it) does not fit in max_context."""


def _resolve_path(path: str | os.PathLike | None, dtype: str | None) -> Path:
    if path is None:
        from .gguf_import import cached_default_model
        return cached_default_model(dtype or "bfloat16")
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GGUF file not found")
        from .gguf_import import cached_conversion
        return cached_conversion(p, dtype or "bfloat16")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model directory or GGUF file")
    if not p.is_dir():
        raise CheckpointError(f"{p}: expected a Hugging Face checkpoint directory or a .gguf file")
    return p


def load(path: str | os.PathLike | None = None, device: str = "auto", dtype: str | None = None,
         max_context: int | None = None, max_batch: int = 1, threads: int | None = None,
         progress: bool = False) -> "Model":
    """Load a Hugging Face Gemma checkpoint directory or a GGUF file (None: the packaged Gemma 3 270M).

    device: "auto" (the GPU when the CUDA backend and a GPU are present, else the CPU), "cpu" or "cuda".
    dtype: storage dtype of the weights, None = as in the checkpoint ("bfloat16" or "float32").
    max_context: positions per sequence the KV cache holds (default min(model limit, 8192)).
    max_batch: sequences decoded together.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if dtype not in (None, "bfloat16", "float32"):
        raise ValueError(f"dtype must be None, 'bfloat16' or 'float32', got {dtype!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    directory = _resolve_path(path, dtype)
    spec = spec_from_dict(load_config_file(directory / "config.json"), str(directory / "config.json"))
    tokenizer = Tokenizer(directory / "tokenizer.model")
    found = scan(directory, spec.model_type)
    if "embed" not in found:
        raise CheckpointError(f"{directory}: missing tensor model.embed_tokens.weight")
    wdtype = storage_dtype(found["embed"][1], dtype)
    if spec.config.tie_word_embeddings and "lm_head" in found and not np.array_equal(
            found["lm_head"][1].data, found["embed"][1].data):
        # A checkpoint that stores a distinct head despite tie_word_embeddings: transformers then keeps
        # the two apart, and so do we.
        spec.config.tie_word_embeddings = False
    limit = spec.config.max_position_embeddings
    if max_context is None:
        max_context = min(limit, DEFAULT_MAX_CONTEXT)
    if not isinstance(max_context, int) or not (1 <= max_context <= limit):
        raise ValueError(f"max_context must be an integer in [1, {limit}] for this model, got {max_context!r}")
    backend = _pick_backend(device, spec.vision is not None)
    if threads is not None:
        _native.set_num_threads(int(threads))
    if backend == "cuda":
        from . import _cuda
        engine = _cuda.CudaEngine(spec.config, wdtype, max_batch, max_context)
    else:
        engine = _native.CpuEngine(spec.config, wdtype, max_batch, max_context)
    report = _print_progress if progress else None
    load_into(engine, directory, found, wdtype, report)
    return Model(spec, engine, tokenizer, directory, backend, vision=_load_vision(spec, directory, wdtype, backend))


def _print_progress(i: int, n: int) -> None:
    print(f"\rloading weights {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)


def _load_vision(spec: ModelSpec, directory: Path, wdtype: str, backend: str = "cpu"):
    """The vision encoder of a multimodal checkpoint (None for text-only ones, or a multimodal config
    whose checkpoint holds only the text model): _cuda.CudaVisionEncoder with the CUDA backend in
    bfloat16, else _core.VisionEncoderCpu (the CUDA tower computes in bf16 only, so a float32 load keeps
    its tower on the CPU, in float32, next to the float32 CUDA text engine)."""
    if spec.vision is None:
        return None
    from .weights import load_vision_into, scan_vision
    found = scan_vision(directory)
    if not found:
        return None
    if spec.vision.num_channels != 3:
        raise ConfigError(f"{spec.source}: vision num_channels must be 3 (RGB), got {spec.vision.num_channels}")
    if backend == "cuda" and wdtype == "bfloat16":
        from . import _cuda
        vision = _cuda.CudaVisionEncoder(spec.vision, wdtype, VISION_MAX_IMAGES)
    else:
        vision = _native.VisionEncoderCpu(spec.vision, wdtype)
    load_vision_into(vision, directory, found)
    return vision


def _pick_backend(device: str, multimodal: bool) -> str:
    """'cuda' when asked for, or for 'auto' when the CUDA module sees a GPU (multimodal checkpoints
    included: the CUDA engine takes image embeddings and bidirectional image blocks)."""
    if device == "cpu":
        return "cpu"
    try:
        from . import _cuda
        has_gpu = _cuda.device_count() > 0
        why = "no GPU was found"
    except ImportError as e:
        has_gpu, why = False, f"the CUDA module is not built ({e})"
    if device == "cuda":
        if not has_gpu:
            raise RuntimeError(f"device='cuda': {why}; use device='cpu' or 'auto'")
        return "cuda"
    return "cuda" if has_gpu else "cpu"


class Model:
    def __init__(self, spec: ModelSpec, engine, tokenizer: Tokenizer, path: Path, device: str, vision=None):
        self.spec = spec
        self.vision = vision  # _core.VisionEncoderCpu / _cuda.CudaVisionEncoder of a multimodal checkpoint, else None
        self.config = spec.config
        self.engine = engine
        self.tokenizer = tokenizer
        self.path = path
        self.device = device
        stop = set(spec.eos_token_ids) | {tokenizer.eos_id}
        if tokenizer.end_of_turn_id is not None:
            stop.add(tokenizer.end_of_turn_id)
        self.stop_ids = stop
        self.last_stats: dict[str, float] = {}  # of the last generate(): token counts and seconds
        # Decode steps per engine call (engine.decode_steps; a power of two up to 32, 1 = one step a call). On the
        # GPU one call is one CUDA graph of that many steps, each embedding the ids the step before sampled on the
        # device: no host turnaround between them (bench/gpu/NOTES.md, session 13). The price: tokens come in
        # chunks, and a sequence that stops inside a chunk leaves the rest of it computed for nothing.
        self.decode_chunk = 8 if device == "cuda" else 1

    # ---- properties ----
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def kv_cache_bytes(self) -> int:
        return self.engine.kv_cache_bytes

    def __repr__(self) -> str:
        return (f"Model({self.path}, {self.spec.model_type}, device={self.device}, dtype={self.engine.weight_dtype}, "
                f"max_context={self.max_context}, max_batch={self.max_batch})")

    # ---- token level ----
    def _check_ids(self, ids: Sequence[int], what: str) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{what}: expected a non-empty list of token ids")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what}: token ids must be integers, got {a.dtype}")
        V = self.config.vocab_size
        bad = (a < 0) | (a >= V)
        if bad.any():
            raise ValueError(f"{what}: token id {int(a[bad][0])} out of range [0, {V})")
        if a.size > self.max_context:
            raise ContextLengthError(f"{what}: {a.size} tokens exceed max_context {self.max_context}")
        return a.astype(np.int32)

    def _chunks(self, slots: list[int], seqs: list[np.ndarray], mm: list | None, chunk: int | None = None):
        """Plans prefill: yields (members, slots, lengths, tokens, extras) for forward calls of at most
        `chunk` (default PREFILL_CHUNK) tokens in all, after resetting the slots. mm: per sequence, None
        or its multimodal.ImageRows (image embeddings; a chunk never splits an image)."""
        mm = mm or [None] * len(seqs)
        for s in slots:
            self.engine.reset_slot(s)
        pos = [0] * len(seqs)
        while any(p < len(s) for p, s in zip(pos, seqs)):
            budget = chunk or PREFILL_CHUNK
            b_slots, b_lens, b_toks, members = [], [], [], []
            b_emb, b_rows, b_ext, off = [], [], [], 0
            for i, (p, s) in enumerate(zip(pos, seqs)):
                if p >= len(s) or budget <= 0:
                    continue
                n = min(len(s) - p, budget)
                if mm[i] is not None:
                    n = mm[i].chunk_end(p, p + n) - p
                    emb, rows, ext = mm[i].for_chunk(p, n)
                    b_emb.append(emb); b_rows.append(rows + off)
                else:
                    ext = np.arange(p, p + n, dtype=np.int32)
                b_ext.append(ext)
                off += n
                budget -= n
                b_slots.append(slots[i]); b_lens.append(n); b_toks.append(s[p:p + n]); members.append(i)
                pos[i] += n
            extra = {}
            if b_emb:
                extra = dict(embeds=np.ascontiguousarray(np.concatenate(b_emb), dtype=np.float32),
                             embed_rows=np.concatenate(b_rows).astype(np.int32), extent=np.concatenate(b_ext))
            yield (members, np.array(b_slots, np.int32), np.array(b_lens, np.int32), np.concatenate(b_toks),
                   extra)

    def _prefill(self, slots: list[int], seqs: list[np.ndarray], all_logits: bool, mm: list | None = None) -> np.ndarray:
        """Feeds whole prompts; returns the last logits of each sequence ([B, V]), or every position's
        ([sum len, V]) when all_logits."""
        last: list[np.ndarray | None] = [None] * len(seqs)
        every: list[list[np.ndarray]] = [[] for _ in seqs]
        for members, b_slots, b_lens, b_toks, extra in self._chunks(slots, seqs, mm):
            out = self.engine.forward(b_slots, b_lens, b_toks, all_logits, **extra)
            off = 0
            for j, i in enumerate(members):
                if all_logits:
                    every[i].append(out[off:off + b_lens[j]])
                    off += b_lens[j]
                else:
                    last[i] = out[j]
        if all_logits:
            return np.concatenate([np.concatenate(e) for e in every])
        return np.stack(last)

    def _prefill_sample(self, slots: list[int], seqs: list[np.ndarray], mm: list | None, temp: np.ndarray,
                        top_k: np.ndarray, top_p: np.ndarray, seeds: np.ndarray) -> list[int]:
        """Feeds whole prompts and returns each sequence's first generated token. The engine samples,
        so only ids come back (chunks with image embeddings return logits and sample on the host)."""
        first: list[int] = [0] * len(seqs)
        chunk = PREFILL_CHUNK * (GPU_CHUNK_FACTOR if self.device == "cuda" else 1)
        for members, b_slots, b_lens, b_toks, extra in self._chunks(slots, seqs, mm, chunk):
            m = np.array(members)
            zeros = np.zeros(len(members), np.uint64)
            if extra:
                logits = np.ascontiguousarray(self.engine.forward(b_slots, b_lens, b_toks, False, **extra))
                ids = _native.sample(logits, list(temp[m]), list(top_k[m]), list(top_p[m]), list(seeds[m]), list(zeros))
            else:
                ids = self.engine.forward_sample(b_slots, b_lens, b_toks, temp[m], top_k[m], top_p[m], seeds[m], zeros)
            for j, i in enumerate(members):
                first[i] = int(ids[j])  # the last chunk of a sequence writes its final value
        return first

    def forward(self, ids: Sequence[int] | Sequence[Sequence[int]], all_logits: bool = True,
                pixel_values=None) -> np.ndarray | list[np.ndarray]:
        """Logits of a fresh sequence (or a list of them, run as one batch): [len, V] per sequence
        (all_logits) or [V] for the last position. pixel_values (multimodal checkpoints): [n, 3, S, S]
        for one sequence (a list of them for a batch), one image per run of mm_tokens_per_image
        <image_soft_token> ids, as transformers' Gemma3ForConditionalGeneration takes them."""
        batch = len(ids) > 0 and not isinstance(ids[0], (int, np.integer))
        seqs = [self._check_ids(s, f"ids[{i}]") for i, s in enumerate(ids)] if batch else [self._check_ids(ids, "ids")]
        if len(seqs) > self.max_batch:
            raise ValueError(f"{len(seqs)} sequences exceed max_batch {self.max_batch}")
        mm = self._image_rows(seqs, pixel_values if batch or pixel_values is None else [pixel_values])
        out = self._prefill(list(range(len(seqs))), seqs, all_logits, mm)
        if all_logits:
            parts, off = [], 0
            for s in seqs:
                parts.append(out[off:off + len(s)]); off += len(s)
            return parts if batch else parts[0]
        return list(out) if batch else out[0]

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                     pixel_values: Sequence | None = None, **kw) -> list[list[int]]:
        """Token-level generation: prompt ids in, generated ids out (stop tokens excluded).
        pixel_values: per prompt, None or [n, 3, S, S] for its <image_soft_token> runs (see forward)."""
        params = params or SamplingParams(**kw)
        params.validate()
        return [s.generated for s in self._generate_batch([list(p) for p in prompts], params, pixel_values)]

    # ---- images ----
    def _image_rows(self, seqs: list[np.ndarray], pixel_values: Sequence | None) -> list | None:
        """Per sequence: None, or its image embeddings on its soft-token rows (multimodal.ImageRows)."""
        from .multimodal import image_rows
        if pixel_values is None:
            if self.vision is not None and any((s == self.vision.config.image_token_id).any() for s in seqs):
                raise ValueError("the prompt holds <image_soft_token> ids but no pixel values were given")
            return None
        if self.vision is None:
            raise ValueError(f"{self.path}: images need a multimodal Gemma 3 checkpoint with a vision tower; "
                             "this model has none")
        if len(pixel_values) != len(seqs):
            raise ValueError(f"{len(pixel_values)} pixel-value entries for {len(seqs)} sequences")
        return [None if px is None else image_rows(self.vision, s, px, f"prompt[{i}]")
                for i, (s, px) in enumerate(zip(seqs, pixel_values))]

    def prepare(self, prompt: str, images: Sequence | None = None, pan_and_scan: bool = False) -> tuple[list[int], np.ndarray]:
        """A prompt and its images (paths, bytes or PIL images) -> (token ids, pixel values [n, 3, S, S]),
        as transformers' Gemma3Processor makes them. Each `<start_of_image>` in the prompt marks where an
        image goes; a prompt without one gets the images at its start."""
        from .multimodal import prepare_prompt
        if self.vision is None:
            raise ValueError(f"{self.path}: images need a multimodal Gemma 3 checkpoint with a vision tower; "
                             "this model has none")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return prepare_prompt(self.tokenizer, self.vision.config, prompt, list(images or []), pan_and_scan)

    # ---- text level ----
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def _prompt_ids(self, prompt: str, i: int | None = None) -> list[int]:
        what = "prompt" if i is None else f"prompt[{i}]"
        if not isinstance(prompt, str):
            raise TypeError(f"{what} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"{what} is empty")
        # A prompt that already starts with <bos> (chat template) gets no second one.
        return self.tokenizer.encode(prompt, add_bos=not prompt.startswith("<bos>"))

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False, images: Sequence | None = None,
                 pan_and_scan: bool = False) -> str | list[str] | Iterator[str]:
        """Continue a prompt (or each of a list, decoded as a batch). Greedy when temperature is 0.
        Stops at <eos>, <end_of_turn>, any stop string (not included) or max_new_tokens.
        stream=True (single prompt) yields text pieces as they decode.
        images (multimodal checkpoints): paths, bytes or PIL images; for a list of prompts, one list of
        images per prompt. See prepare() for where they go; pan_and_scan adds crops of wide/tall images."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(max_new_tokens, float(temperature), top_k, float(top_p), seed, stops)
        params.validate()
        if images is not None:
            return self._generate_with_images(prompt, images, pan_and_scan, params, stream)
        if isinstance(prompt, str):
            ids = [self._prompt_ids(prompt)]
            if stream:
                return self._stream(ids[0], params)
            return self._generate_batch(ids, params)[0].text()
        if stream:
            raise ValueError("stream=True takes a single prompt, not a list")
        prompts = list(prompt)
        if not prompts:
            raise ValueError("prompt list is empty")
        ids = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        return [s.text() for s in self._generate_batch(ids, params)]

    def _generate_with_images(self, prompt, images, pan_and_scan: bool, params: SamplingParams, stream: bool):
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("prompt list is empty")
        per = [images] if single else list(images)
        if single and (isinstance(images, (str, bytes)) or not isinstance(images, Sequence)):
            per = [[images]]  # a single image for a single prompt
        if len(per) != len(prompts):
            raise ValueError(f"images: {len(per)} image lists for {len(prompts)} prompts (give one list per prompt)")
        per = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in per]
        ids, pxs = [], []
        for i, (p, im) in enumerate(zip(prompts, per)):
            if not isinstance(p, str) or not p:
                raise ValueError(f"prompt[{i}] must be a non-empty string")
            a, px = self.prepare(p, list(im or []), pan_and_scan)
            ids.append(a)
            pxs.append(px if len(px) else None)
        if stream:
            if not single:
                raise ValueError("stream=True takes a single prompt, not a list")
            return self._stream(ids[0], params, pxs)
        out = [s.text() for s in self._generate_batch(ids, params, pxs)]
        return out[0] if single else out

    def chat(self, messages: Sequence[Mapping], images: Sequence | None = None, pan_and_scan: bool = False,
             **kw) -> str | Iterator[str]:
        """Reply to a conversation (list of {'role', 'content'}) using Gemma's chat template. Content is a
        string, or (multimodal checkpoints) a list of parts as in transformers' chat templates:
        {"type": "text", "text": ...} and {"type": "image", "image": path_or_PIL}. Images may instead be
        given as `images=` with a `<start_of_image>` in the text for each."""
        from .multimodal import chat_images
        messages, found = chat_images(messages)
        if found and images:
            raise ValueError("chat: give images either as content parts or as images=, not both")
        images = found or images
        if images:
            return self.generate(format_chat(messages), images=images, pan_and_scan=pan_and_scan, **kw)
        return self.generate(format_chat(messages), **kw)

    # ---- the decode loop ----
    def _stream(self, ids: list[int], params: SamplingParams, pixel_values: Sequence | None = None) -> Iterator[str]:
        yield from self._loop([ids], params, stream=True, pixel_values=pixel_values)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        pixel_values: Sequence | None = None) -> list[Seq]:
        seqs: list[Seq] = []
        for b0 in range(0, len(prompts), self.max_batch):
            chunk = prompts[b0:b0 + self.max_batch]
            px = None if pixel_values is None else list(pixel_values[b0:b0 + self.max_batch])
            out: list[Seq] = []
            for _ in self._loop(chunk, params, stream=False, first_index=b0, result=out, pixel_values=px):
                pass
            seqs.extend(out)
        return seqs

    def _loop(self, prompts: list[list[int]], params: SamplingParams, stream: bool, first_index: int = 0,
              result: list[Seq] | None = None, pixel_values: Sequence | None = None) -> Iterator[str]:
        arrays = [self._check_ids(p, f"prompt[{first_index + i}]") for i, p in enumerate(prompts)]
        tv = time.perf_counter()
        mm = self._image_rows(arrays, pixel_values)  # the vision encoder runs here
        vision_s = time.perf_counter() - tv
        seqs = [Seq(self.tokenizer, list(p), params, self.stop_ids) for p in prompts]
        if result is not None:
            result.extend(seqs)
        if params.max_new_tokens == 0:
            return
        B = len(seqs)
        slots = list(range(B))
        base_seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        seeds = [(base_seed + first_index + i) & 0xFFFFFFFFFFFFFFFF for i in range(B)]
        temp = np.full(B, params.temperature, np.float32)
        top_k = np.full(B, params.top_k, np.int32)
        top_p = np.full(B, params.top_p, np.float32)
        seeds_a = np.array(seeds, np.uint64)
        t0 = time.perf_counter()
        nxt = self._prefill_sample(slots, arrays, mm, temp, top_k, top_p, seeds_a)
        t1 = time.perf_counter()
        self.last_stats = {"prompt_tokens": sum(len(a) for a in arrays), "prefill_s": t1 - t0,
                           "generated_tokens": 0, "decode_s": 0.0, "vision_s": vision_s}
        lengths = [len(a) for a in arrays]  # tokens in each sequence's cache
        active = list(range(B))
        rows, decoded = [nxt], False  # sampled ids of `active`, a row per step; from decode steps (vs the prefill)
        chunk = self.decode_chunk
        if chunk < 1 or chunk > 32 or chunk & (chunk - 1):
            raise ValueError(f"decode_chunk must be a power of two from 1 to 32, got {chunk}")
        while True:
            for row in rows:
                for i, tok in zip(active, row):
                    if seqs[i].done:  # stopped at an earlier step of this chunk: the rest is dropped
                        continue
                    if decoded:
                        lengths[i] += 1  # the step that sampled tok brought the token before it into the cache
                    piece = seqs[i].push(int(tok))
                    if not seqs[i].done and lengths[i] >= self.max_context:
                        piece += seqs[i].finish("context")
                    if stream and piece:
                        yield piece
            active = [i for i in active if not seqs[i].done]
            self.last_stats["generated_tokens"] = sum(len(q.generated) for q in seqs)
            self.last_stats["decode_s"] = time.perf_counter() - t1
            if not active:
                return
            # The next decode steps of the sequences still running: the engine samples, only ids come back. As many
            # as all of them may still take (tokens left, cache room), in powers of two (a graph each).
            idx = np.array(active)
            n = min(chunk, min(params.max_new_tokens - len(seqs[i].generated) for i in active),
                    min(self.max_context - lengths[i] for i in active))
            while n & (n - 1):
                n &= n - 1
            a_slots = np.array([slots[i] for i in active], np.int32)
            a_last = np.array([seqs[i].generated[-1] for i in active], np.int32)
            a_count = np.array([len(seqs[i].generated) for i in active], np.uint64)
            # fewer rows than n where the steps would cross the cluster attention's key limit; n = 1 is forward_sample
            rows = list(self.engine.decode_steps(a_slots, a_last, temp[idx], top_k[idx], top_p[idx], seeds_a[idx],
                                                 a_count, n))
            decoded = True
