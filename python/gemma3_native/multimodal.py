"""Multimodal prompts: images -> pixel values -> image embeddings placed on the prompt's
<image_soft_token> positions, with the facts the prefill needs (which rows take which embedding, and
which runs of soft tokens attend to each other bidirectionally).

The text side follows transformers' Gemma3Processor: each `<start_of_image>` placeholder of the prompt
becomes `\\n\\n<start_of_image>` + mm_tokens_per_image x `<image_soft_token>` + `<end_of_image>\\n\\n`
(with Pan & Scan: "Here is the original image ... and here are some crops to help you see better ..."
and one such sequence per crop). The three image pieces are written as the config's token ids, not
looked up in tokenizer.model: Gemma 3's `<image_soft_token>` (262144) is an added token beyond the
SentencePiece vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .images import expand_prompt, preprocess

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
_PIECES = re.compile(f"({re.escape(BOI)}|{re.escape(EOI)}|{re.escape(SOFT)})")


@dataclass
class ImageRows:
    """One sequence's image inputs for the prefill."""
    embeds: np.ndarray          # [n_soft, hidden] float32, in position order
    rows: np.ndarray            # [n_soft] int32: positions of the soft tokens
    blocks: list[tuple[int, int]]  # maximal runs [start, end) of soft tokens: bidirectional attention

    def chunk_end(self, p: int, end: int) -> int:
        """Moves a chunk end so that no block is split: back to the block's start, or (for a chunk that
        starts at the block) forward to its end."""
        for s, e in self.blocks:
            if s < end < e:
                return s if s > p else e
        return end

    def for_chunk(self, p: int, n: int):
        """(embeds, rows relative to p, extent) of the chunk [p, p + n): extent = the last position each
        token sees (its own, or the end of its image block)."""
        extent = np.arange(p, p + n, dtype=np.int32)
        for s, e in self.blocks:
            if s < p + n and e > p:
                extent[max(s, p) - p:min(e, p + n) - p] = e - 1
        sel = (self.rows >= p) & (self.rows < p + n)
        return self.embeds[sel], (self.rows[sel] - p).astype(np.int32), extent


def soft_token_blocks(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    is_img = np.concatenate([[False], np.asarray(ids) == image_token_id, [False]])
    d = np.diff(is_img.astype(np.int8))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


def encode_with_images(tokenizer, text: str, vision_config, add_bos: bool) -> list[int]:
    """Tokenize an expanded prompt: the image pieces become the config's ids, the rest goes through the
    tokenizer (special tokens such as <start_of_turn> included)."""
    ids_of = {BOI: vision_config.boi_token_id, EOI: vision_config.eoi_token_id, SOFT: vision_config.image_token_id}
    out: list[int] = [tokenizer.bos_id] if add_bos else []
    for part in _PIECES.split(text):
        if not part:
            continue
        if part in ids_of:
            out.append(ids_of[part])
        else:
            out.extend(tokenizer.encode(part, add_bos=False))
    return out


def prepare_prompt(tokenizer, vision_config, text: str, images: Sequence[Any], pan_and_scan: bool = False,
                   max_pixels: int | None = None) -> tuple[list[int], np.ndarray]:
    """A text prompt and its images -> (token ids with the image sequences, pixel values [n, 3, S, S]),
    the pair transformers' Gemma3Processor produces (input_ids, pixel_values)."""
    processed = [preprocess(im, vision_config.image_size, pan_and_scan, max_pixels) for im in images]
    expanded = expand_prompt(text, [p.num_crops for p in processed], vision_config.mm_tokens_per_image, BOI, SOFT, EOI)
    ids = encode_with_images(tokenizer, expanded, vision_config, add_bos=not expanded.startswith("<bos>"))
    S = vision_config.image_size
    px = np.concatenate([p.pixel_values for p in processed]) if processed else np.zeros((0, 3, S, S), np.float32)
    return ids, px


def image_rows(vision, ids: np.ndarray, pixel_values: np.ndarray, what: str) -> ImageRows | None:
    """Runs the vision encoder on one sequence's pixel values and places the embeddings on its soft tokens."""
    c = vision.config
    n_soft = int(np.count_nonzero(ids == c.image_token_id))
    px = np.asarray(pixel_values, dtype=np.float32)
    if px.ndim != 4 or px.shape[1:] != (c.num_channels, c.image_size, c.image_size):
        raise ValueError(f"{what}: pixel values must be [n, {c.num_channels}, {c.image_size}, {c.image_size}], "
                         f"got {list(px.shape)}")
    if n_soft != px.shape[0] * c.mm_tokens_per_image:
        raise ValueError(f"{what}: {n_soft} image tokens for {px.shape[0]} image(s) of {c.mm_tokens_per_image} tokens")
    if px.shape[0] == 0:
        return None
    emb = vision.forward(np.ascontiguousarray(px)).reshape(n_soft, c.text_hidden_size)
    rows = np.nonzero(ids == c.image_token_id)[0].astype(np.int32)
    return ImageRows(emb, rows, soft_token_blocks(ids, c.image_token_id))


def chat_images(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[Any]]:
    """Messages whose content is a list of parts, as in transformers' chat templates
    ({"type": "image", "image": path_or_PIL} -- or "url" / "path" -- and {"type": "text", "text": ...}),
    -> messages with string content holding a <start_of_image> per image (Gemma 3's chat template:
    parts concatenated, texts trimmed), and the images in order."""
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "content" not in m:
            out.append(m)
            continue
        content = m["content"]
        if isinstance(content, str):
            out.append(dict(m))
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"chat: message {i} content must be a string or a list of parts")
        if m.get("role") == "system":
            # the template takes the first part's text
            texts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            out.append({**m, "content": texts[0] if texts else ""})
            continue
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "text":
                parts.append(str(p.get("text", "")).strip())
            elif kind == "image":
                src = next((p[k] for k in ("image", "path", "url") if p.get(k) is not None), None)
                if src is None:
                    raise ValueError(f"chat: message {i} part {j}: an image part needs 'image', 'path' or 'url'")
                images.append(src)
                parts.append(BOI)
            else:
                raise ValueError(f"chat: message {i} part {j}: type must be 'text' or 'image'")
        out.append({**m, "content": "".join(parts)})
    return out, images
