"""Multimodal Gemma 3 on the CUDA engine (image embeddings on the soft-token rows, bidirectional image
blocks in the prefill attention) against transformers' Gemma3ForConditionalGeneration and the CPU engine,
on random tiny configs (conftest.make_hf_mm_model; prompts from tests/test_multimodal.py).

Tolerances, as tests/test_cuda_model.py:
- float32 load (CUDA text engine in float32, the float32 tower on the CPU) vs transformers float32:
  max |logit diff| <= 2e-4; greedy ids identical to the CPU engine and to transformers;
- bf16 load (CUDA vision encoder + bf16 CUDA engine) vs transformers float32 on the same bf16-rounded
  weights: ||diff|| / ||ref|| <= 3e-2 over all logits; the tensor-core and generic attention paths of
  one engine within 1e-2 of each other; greedy: every one of 32 tokens within 0.1 x rms(logits) of
  transformers' best logit at that step (teacher-forced on our ids; bf16 rounding may swap near-ties)."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemma3_native as g3
from gemma3_native import model as model_mod

from conftest import IMAGE_TOKEN_ID, make_hf_mm_model, save_checkpoint
from test_multimodal import hf_greedy, hf_logits, images

try:
    from gemma3_native import _cuda
    HAVE_GPU = _cuda.device_count() > 0
except ImportError:
    _cuda = None
    HAVE_GPU = False

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]

PROMPTS = [("Describe this image.", 1), ("Compare <start_of_image> with <start_of_image> please.", 2)]


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def mm_gpu(tiny_mm_checkpoint, tmp_path_factory, tokenizer_model):
    """(transformers float32, its bf16-rounded float32 twin, our float32 CUDA model, our bf16 CUDA model,
    the float32 checkpoint dir)."""
    hf, d32 = tiny_mm_checkpoint
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    d16 = save_checkpoint(hf16, tmp_path_factory.mktemp("mm_bf16"), tokenizer_model)
    ref16 = copy.deepcopy(hf16).float()  # float32 arithmetic on the bf16-rounded weights
    f32 = g3.load(d32, device="cuda", dtype="float32", max_batch=3)
    b16 = g3.load(d16, device="cuda", max_batch=3)
    return hf, ref16, f32, b16, d32


def test_auto_device_takes_the_gpu_for_images(mm_gpu, tiny_mm_checkpoint):
    _, _, f32, b16, d32 = mm_gpu
    m = g3.load(d32)
    assert m.device == "cuda" and isinstance(m.engine, _cuda.CudaEngine)
    assert isinstance(m.vision, g3._native.VisionEncoderCpu)  # a float32 tower stays on the CPU
    assert b16.device == "cuda" and isinstance(b16.vision, _cuda.CudaVisionEncoder)
    assert b16.engine.weight_dtype == "bfloat16"
    assert g3.load(d32, device="cpu").device == "cpu"


@pytest.mark.parametrize("prompt,n_images", PROMPTS)
def test_fp32_logits_vs_transformers(mm_gpu, prompt, n_images):
    hf, _, f32, _, _ = mm_gpu
    ids, px = f32.prepare(prompt, images(seed=n_images)[:n_images])
    ref = hf_logits(hf, ids, px)
    got = f32.forward(ids, pixel_values=px)
    err = np.abs(got - ref).max()
    print(f"{n_images} image(s): fp32 max |logit err| {err:.3g}")
    assert err <= 2e-4
    causal = hf(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px)).logits[0].detach().double().numpy()
    assert np.abs(got - causal).max() > 100 * 2e-4  # the bidirectional blocks are in effect


@pytest.mark.parametrize("prompt,n_images", PROMPTS)
def test_bf16_logits_vs_transformers(mm_gpu, prompt, n_images):
    _, ref16, _, b16, _ = mm_gpu
    ids, px = b16.prepare(prompt, images(seed=n_images)[:n_images])
    ref = hf_logits(ref16, ids, px)
    got = b16.forward(ids, pixel_values=px)
    print(f"{n_images} image(s): bf16 relative logit error {rel(got, ref):.3g}")
    assert rel(got, ref) <= 3e-2
    # the same without the image blocks (a causal-only oracle) is far off
    causal = ref16(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px)).logits[0].detach().double().numpy()
    assert rel(got, causal) > 3 * rel(got, ref)


def test_tensor_core_prefill_with_image_blocks(tmp_path, tokenizer_model):
    """Text head_dim 128 (the tensor-core prefill kernel) and 16-token images, placed so that image blocks
    straddle the kernel's 64-query tiles; the prompt is 3 x the window 8 and more."""
    hf = make_hf_mm_model(seed=5, text_overrides=dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1,
                                                      query_pre_attn_scalar=128), mm_tokens_per_image=16)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    d = save_checkpoint(hf16, tmp_path / "ck", tokenizer_model)
    ref16 = copy.deepcopy(hf16).float()
    ours = g3.load(d, device="cuda")
    text = "The quick brown fox jumps over the lazy dog. " * 2
    ids, px = ours.prepare(text + "<start_of_image> and " + text + " then <start_of_image>, " + text,
                           images(seed=6)[:2])
    blocks = [i for i in range(1, len(ids)) if ids[i] == IMAGE_TOKEN_ID and ids[i - 1] != IMAGE_TOKEN_ID]
    print(f"prompt {len(ids)} tokens, image blocks start at {blocks}")
    assert len(ids) > 128 and len(blocks) == 2
    assert any(b // 64 != (b + 15) // 64 for b in blocks)  # a block straddles two query tiles
    ref = hf_logits(ref16, ids, px)
    got = ours.forward(ids, pixel_values=px)
    print(f"tensor cores: bf16 relative logit error {rel(got, ref):.3g}")
    assert rel(got, ref) <= 3e-2
    ours.engine.attention_path = 1
    try:
        alt = ours.forward(ids, pixel_values=px)
    finally:
        ours.engine.attention_path = 0
    assert rel(alt, got) <= 1e-2


def test_fp32_greedy_32_tokens_equal_cpu_and_transformers(mm_gpu):
    hf, _, f32, _, d32 = mm_gpu
    cpu = g3.load(d32, device="cpu", dtype="float32")
    for n_images, prompt in ((1, "She sells"), (2, "<start_of_image> and <start_of_image>: the quick brown fox")):
        ids, px = f32.prepare(prompt, images(seed=10 + n_images)[:n_images])
        got = f32.generate_ids([ids], pixel_values=[px], max_new_tokens=32, ignore_eos=True)[0]
        assert got == cpu.generate_ids([ids], pixel_values=[px], max_new_tokens=32, ignore_eos=True)[0]
        assert got == hf_greedy(hf, ids, px, 32)


def test_bf16_greedy_32_tokens_near_transformers_argmax(mm_gpu):
    _, ref16, _, b16, _ = mm_gpu
    for n_images, prompt in ((1, "She sells"), (2, "<start_of_image> and <start_of_image>: the quick brown fox")):
        ids, px = b16.prepare(prompt, images(seed=10 + n_images)[:n_images])
        got = b16.generate_ids([ids], pixel_values=[px], max_new_tokens=32, ignore_eos=True)[0]
        assert len(got) == 32
        ref = hf_logits(ref16, ids + got[:-1], px)[len(ids) - 1:]  # teacher-forced on our ids
        for step, (tok, row) in enumerate(zip(got, ref)):
            tol = 0.1 * float(np.sqrt(np.mean(row ** 2)))
            assert row[tok] >= row.max() - tol, f"step {step}: chose {tok} ({row[tok]:.3f}), best {row.argmax()} " \
                                                f"({row.max():.3f})"


def test_chunked_prefill_and_batches(mm_gpu, monkeypatch):
    _, _, f32, _, _ = mm_gpu
    ims = images(seed=5)
    ids, px = f32.prepare("<start_of_image> then <start_of_image> done", ims)
    whole = f32.forward(ids, pixel_values=px)
    for chunk in (5, 3, 1):  # an image goes whole in a chunk
        monkeypatch.setattr(model_mod, "PREFILL_CHUNK", chunk)
        assert np.abs(f32.forward(ids, pixel_values=px) - whole).max() <= 1e-4
    monkeypatch.undo()
    prompts = ["Describe.", "<start_of_image> versus <start_of_image>", "No image here."]
    per = [[ims[0]], ims, []]
    batched = f32.generate(prompts, images=per, max_new_tokens=10)
    alone = [f32.generate(p, images=im, max_new_tokens=10) for p, im in zip(prompts, per)]
    assert batched == alone


def test_cuda_engine_extras_errors(mm_gpu):
    _, _, f32, _, _ = mm_gpu
    e = f32.engine
    H = f32.config.hidden_size
    e.reset_all()
    toks = np.array([2, 5, 6], np.int32)
    with pytest.raises(IndexError, match="outside the batch"):
        e.forward(np.array([0], np.int32), np.array([3], np.int32), toks, False,
                  embeds=np.zeros((1, H), np.float32), embed_rows=np.array([3], np.int32))
    with pytest.raises(ValueError, match="embeds must be"):
        e.forward(np.array([0], np.int32), np.array([3], np.int32), toks, False,
                  embeds=np.zeros((1, H + 1), np.float32), embed_rows=np.array([1], np.int32))
    with pytest.raises(ValueError, match="extent"):
        e.forward(np.array([0], np.int32), np.array([3], np.int32), toks, False, extent=np.zeros(2, np.int32))


def test_cli_chat_with_image_on_gpu(mm_gpu, tmp_path):
    _, _, _, b16, _ = mm_gpu
    p = tmp_path / "a.png"
    images(seed=8)[0].save(p)
    d = b16.path
    r = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "chat", "--model", str(d), "-n", "6", "--image",
                        str(p)], input="What is this?\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    want = b16.chat([{"role": "user", "content": [{"type": "image", "image": str(p)},
                                                  {"type": "text", "text": "What is this?"}]}], max_new_tokens=6)
    assert r.stdout == want + "\n"
