"""Shared fixtures: a small SentencePiece tokenizer trained on the fly, and random tiny Gemma
checkpoints written by transformers itself (the oracle), in float32."""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Gemma is a family of open models.",
    "def add(a, b):\n    return a + b\n", "In 1969, 12 astronauts began to walk on the Moon.",
    "Attention is all you need; sliding windows keep memory small.", "naïve café déjà vu — 東京 नमस्ते",
    "for i in range(10):\n\tprint(i * i)", "She sells sea shells by the sea shore.",
] * 20


# Multimodal Gemma 3's image pieces, as control symbols (ids 6, 7, 8: after <start_of_turn>, <end_of_turn>).
IMAGE_PIECES = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
BOI_ID, EOI_ID, IMAGE_TOKEN_ID = 6, 7, 8


def _train_tokenizer(path: Path) -> None:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>", *IMAGE_PIECES],
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", minloglevel=2)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    _train_tokenizer(p)
    return p


# Prompts of the real-270M tests (CPU float32 and GPU bf16 against transformers).
REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Question: What is 12 times 12?\nAnswer:",
]

VOCAB = 416  # > the tokenizer's 400 pieces, as real Gemma 3 configs exceed their tokenizer

TINY_CONFIGS = {
    # Gemma 3: 5 local + 1 global + 1 local, window 8, GQA 3:1, QK-norm, two RoPE bases, linear scaling
    "gemma3": dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=72, intermediate_size=96,
                   num_hidden_layers=7, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                   sliding_window=8, query_pre_attn_scalar=24, max_position_embeddings=512,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
    # Gemma 2: alternating local/global, both soft-caps small enough to bite
    "gemma2": dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=8,
                   query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   max_position_embeddings=512),
    # Gemma 1: all global, multi-query, no post norms, 1/sqrt(head_dim)
    "gemma": dict(model_type="gemma", vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=12, max_position_embeddings=512),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers model of a tiny config with random weights of a useful scale (norm weights
    random too, so that the (1 + w) convention is exercised)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(TINY_CONFIGS[kind])
    cfg.update(overrides)
    mt = cfg.pop("model_type")
    config = AutoConfig.for_model(mt, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.eval()
    return model


def save_checkpoint(model, directory: Path, tokenizer_model: Path, dtype=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    m = model if dtype is None else model.to(dtype)
    m.save_pretrained(directory, safe_serialization=True)
    if Path(tokenizer_model).resolve() != (directory / "tokenizer.model").resolve():
        shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tokenizer_model):
    """kind -> (transformers model, checkpoint dir), built once per session."""
    out = {}
    for kind in TINY_CONFIGS:
        model = make_hf_model(kind)
        d = save_checkpoint(model, tmp_path_factory.mktemp(kind), tokenizer_model)
        out[kind] = (model, d)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(random.SystemRandom().randrange(2**32))


# ---- multimodal Gemma 3 (vision tower + projector + the tiny gemma3 text model) ----
# SigLIP: 56 px images in 14 px patches (a 4x4 grid), hidden 48 in 4 heads of 12, 2 layers;
# projector: mm_tokens_per_image 4, so 2x2 average pooling.
TINY_VISION = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, image_size=56, patch_size=14, vision_use_head=False)
TINY_MM = dict(mm_tokens_per_image=4, boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_TOKEN_ID)


def randomize_(model, seed: int) -> None:
    """Random weights of a useful scale in place: vectors (norms, biases) N(0, 0.3^2), matrices N(0, 1/fan_in);
    the position table N(0, 1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if "mm_input_projection" not in name else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make_hf_mm_model(seed: int = 0, text_overrides: dict | None = None, vision_overrides: dict | None = None,
                     **mm_overrides):
    """A random tiny Gemma3ForConditionalGeneration (float32, eager attention)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = dict(TINY_CONFIGS["gemma3"], **(text_overrides or {}))
    vision = dict(TINY_VISION, **(vision_overrides or {}))
    config = Gemma3Config(text_config=text, vision_config=vision, **dict(TINY_MM, **mm_overrides))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(config)
    randomize_(model, seed)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_mm_checkpoint(tmp_path_factory, tokenizer_model):
    """(transformers Gemma3ForConditionalGeneration, checkpoint dir), built once per session."""
    model = make_hf_mm_model()
    d = save_checkpoint(model, tmp_path_factory.mktemp("gemma3_mm"), tokenizer_model)
    return model, d
