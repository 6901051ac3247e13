"""Multimodal Gemma 3 against transformers (float32, CPU, eager attention) on random tiny configs:
the SigLIP tower against SiglipVisionModel, the projected image features, and whole prompts with one
and two images (bidirectional attention inside each image, window 8 text layers) against
Gemma3ForConditionalGeneration, plus 32 greedy tokens.

Tolerances (float32 against float32):
- vision tower and image features: relative (Frobenius) error <= 1e-5;
- logits: max |difference| <= 1e-4 (logits of order 1-10), as tests/test_model_vs_transformers.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3_native as g3
from gemma3_native import model as model_mod
from gemma3_native.chat import format_chat
from gemma3_native.safetensors_io import load_file, save_file

from conftest import BOI_ID, EOI_ID, IMAGE_TOKEN_ID, make_hf_mm_model, save_checkpoint

LOGIT_ATOL = 1e-4
VISION_RTOL = 1e-5


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def images(seed: int, sizes=((90, 70), (40, 50))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def hf_logits(hf, ids, px) -> np.ndarray:
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        return hf(input_ids=ids_t, pixel_values=None if px is None else torch.from_numpy(px),
                  token_type_ids=(ids_t == IMAGE_TOKEN_ID).long()).logits[0].double().numpy()


def hf_greedy(hf, ids, px, n: int) -> list[int]:
    """transformers' own incremental path: the prompt with its images once (bidirectional image blocks),
    then one token at a time through its KV cache."""
    ids_t = torch.tensor([ids])
    out = []
    with torch.no_grad():
        r = hf(input_ids=ids_t, pixel_values=torch.from_numpy(px), token_type_ids=(ids_t == IMAGE_TOKEN_ID).long(),
               use_cache=True)
        for _ in range(n):
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            r = hf(input_ids=torch.tensor([[nxt]]), past_key_values=r.past_key_values, use_cache=True)
    return out


@pytest.fixture(scope="module")
def mm(tiny_mm_checkpoint):
    hf, d = tiny_mm_checkpoint
    return hf, g3.load(d, dtype="float32", max_batch=3), d


# ---- the vision tower ----

@pytest.mark.parametrize("vision", [
    {},                                                                   # 4 heads of 12, 4x4 patch grid
    dict(hidden_size=144, num_attention_heads=2, intermediate_size=100, image_size=42),  # SigLIP's head_dim 72
])
def test_vision_tower_and_features_vs_transformers(vision, tmp_path, tokenizer_model):
    hf = make_hf_mm_model(seed=1, vision_overrides=vision, mm_tokens_per_image=1 if vision else 4)
    ours = g3.load(save_checkpoint(hf, tmp_path / "ck", tokenizer_model), dtype="float32")
    c = ours.vision.config
    assert c.head_dim == (72 if vision else 12)
    px = np.random.default_rng(2).uniform(-1, 1, (3, 3, c.image_size, c.image_size)).astype(np.float32)
    with torch.no_grad():
        ref_tower = hf.model.vision_tower(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
        ref_feat = hf.model.get_image_features(torch.from_numpy(px)).pooler_output.numpy()
    tower, feat = ours.vision.encode(px), ours.vision.forward(px)
    print(f"tower rel err {rel(tower, ref_tower):.2e}, features rel err {rel(feat, ref_feat):.2e}")
    assert tower.shape == ref_tower.shape and feat.shape == ref_feat.shape
    assert rel(tower, ref_tower) <= VISION_RTOL
    assert rel(feat, ref_feat) <= VISION_RTOL


def test_bf16_checkpoint_vision_stays_bf16(mm, tmp_path, tokenizer_model):
    """A bf16 checkpoint keeps its vision matrices in bf16; features equal transformers' float32 run on
    the same rounded weights (both compute in float32)."""
    import copy
    hf, _, _ = mm
    m16 = copy.deepcopy(hf).to(torch.bfloat16)
    d = save_checkpoint(m16, tmp_path / "bf16", tokenizer_model)
    ours = g3.load(d)
    assert ours.vision.weight_dtype == "bfloat16" and ours.engine.weight_dtype == "bfloat16"
    ref_model = m16.float()
    px = np.random.default_rng(5).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model.model.get_image_features(torch.from_numpy(px)).pooler_output.numpy()
    assert rel(ours.vision.forward(px), ref) <= VISION_RTOL


@pytest.mark.parametrize("tower,proj", [("vision_tower.vision_model.", "multi_modal_projector."),
                                        ("model.vision_tower.vision_model.", "model.multi_modal_projector."),
                                        ("model.vision_tower.", "model.multi_modal_projector.")])
def test_vision_tensor_name_layouts(mm, tmp_path, tokenizer_model, tower, proj):
    """Hub checkpoints, transformers 4.5x and 5 saves (the fixture is a transformers 5 save: vision_tower.*)."""
    _, ours, src = mm
    tensors = load_file(src / "model.safetensors")
    out = {}
    for k, t in tensors.items():
        k2 = (tower + k[len("vision_tower."):] if k.startswith("vision_tower.") else
              proj + k[len("multi_modal_projector."):] if k.startswith("multi_modal_projector.") else k)
        out[k2] = (t.dtype, np.array(t.data))
    assert any(k.startswith(tower) for k in out)
    d = tmp_path / "ck"
    d.mkdir()
    save_file(d / "model.safetensors", out)
    shutil.copy(src / "config.json", d / "config.json")
    shutil.copy(tokenizer_model, d / "tokenizer.model")
    alt = g3.load(d, dtype="float32")
    px = np.random.default_rng(4).uniform(-1, 1, (1, 3, 56, 56)).astype(np.float32)
    assert np.array_equal(alt.vision.forward(px), ours.vision.forward(px))


# ---- whole prompts ----

@pytest.mark.parametrize("prompt,n_images", [("Describe this image.", 1),
                                            ("Compare <start_of_image> with <start_of_image> please.", 2)])
def test_prompt_logits_vs_transformers(mm, prompt, n_images):
    hf, ours, _ = mm
    ims = images(seed=n_images)[:n_images]
    ids, px = ours.prepare(prompt, ims)
    assert ids.count(IMAGE_TOKEN_ID) == 4 * n_images and ids.count(BOI_ID) == n_images == ids.count(EOI_ID)
    assert ids[0] == 2 and len(ids) > 2 * 8  # <bos>; longer than twice the text window
    ref = hf_logits(hf, ids, px)
    got = ours.forward(ids, pixel_values=px)
    err = np.abs(got - ref).max()
    print(f"{n_images} image(s): max |logit err| = {err:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert err <= LOGIT_ATOL
    # the bidirectional image blocks matter: a causal-only oracle differs
    causal = hf(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px)).logits[0].detach().double().numpy()
    assert np.abs(got - causal).max() > 100 * LOGIT_ATOL


@pytest.fixture(scope="module")
def hf_processor(tokenizer_model, tmp_path_factory):
    """transformers' Gemma3Processor on the tiny tokenizer (GemmaTokenizer with the image pieces declared)
    and the Pillow image processor at the tiny image size."""
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    d = tmp_path_factory.mktemp("hf_tok")
    shutil.copy(tokenizer_model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"}}))
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (BOI_ID, EOI_ID, IMAGE_TOKEN_ID)
    return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}), tokenizer=tok,
                           image_seq_length=4)


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_prompt_ids_and_pixels_equal_gemma3_processor(mm, hf_processor, pan_and_scan):
    _, ours, _ = mm
    ims = images(seed=12, sizes=((800, 300), (120, 90), (260, 700)))
    chat = ("<bos><start_of_turn>user\nCompare <start_of_image> and\n<start_of_image>, then <start_of_image>."
            "<end_of_turn>\n<start_of_turn>model\n")
    for text, kw in (("Look: <start_of_image> <start_of_image> <start_of_image> ok", {}),
                     (chat, {"add_special_tokens": False})):  # apply_chat_template tokenizes without adding <bos>
        ref = hf_processor(text=[text], images=[ims], do_pan_and_scan=pan_and_scan, return_tensors="np", **kw)
        ids, px = ours.prepare(text, ims, pan_and_scan=pan_and_scan)
        assert ids == ref["input_ids"][0].tolist()
        assert px.shape == ref["pixel_values"].shape and np.abs(px - ref["pixel_values"]).max() == 0.0
        assert px.shape[0] == (3 + 3 + 2 if pan_and_scan else 3)


def test_pan_and_scan_prompt_logits_vs_transformers(mm):
    hf, ours, _ = mm
    wide = images(seed=7, sizes=((800, 300),))
    ids, px = ours.prepare("What is this?", wide, pan_and_scan=True)
    assert px.shape[0] == 4  # the whole image + 3 crops
    # as Gemma3Processor words it (decode drops the image pieces, leaving their newlines)
    assert ours.tokenizer.decode(ids).startswith("Here is the original image \n\n\n\n and here are some crops")
    assert ids.count(IMAGE_TOKEN_ID) == 4 * 4
    assert np.abs(ours.forward(ids, pixel_values=px) - hf_logits(hf, ids, px)).max() <= LOGIT_ATOL


def test_greedy_32_tokens_vs_transformers(mm):
    hf, ours, _ = mm
    for n_images, prompt in ((1, "She sells"), (2, "<start_of_image> and <start_of_image>: the quick brown fox")):
        ids, px = ours.prepare(prompt, images(seed=10 + n_images)[:n_images])
        want = hf_greedy(hf, ids, px, 32)
        got = ours.generate_ids([ids], pixel_values=[px], max_new_tokens=32, ignore_eos=True)[0]
        assert got == want


def test_chunked_prefill_never_splits_an_image(mm, monkeypatch):
    _, ours, _ = mm
    ids, px = ours.prepare("<start_of_image> then <start_of_image> done", images(seed=3))
    whole = ours.forward(ids, pixel_values=px)
    ids2, px2 = ours.prepare("Only <start_of_image>.", images(seed=4)[:1])
    whole2 = ours.forward([ids, ids2], pixel_values=[px, px2])
    for chunk in (5, 3, 1):  # chunks shorter than an image (4 soft tokens): an image goes whole
        monkeypatch.setattr(model_mod, "PREFILL_CHUNK", chunk)
        assert np.abs(ours.forward(ids, pixel_values=px) - whole).max() <= 1e-5
        # a batch shares each chunk's budget: images still go whole
        for got, want in zip(ours.forward([ids, ids2], pixel_values=[px, px2]), whole2):
            assert np.abs(got - want).max() <= 1e-5


def test_batch_with_different_image_counts_equals_each_alone(mm):
    _, ours, _ = mm
    ims = images(seed=5)
    prompts = ["Describe.", "<start_of_image> versus <start_of_image>", "No image here."]
    per = [[ims[0]], ims, []]
    batched = ours.generate(prompts, images=per, max_new_tokens=10)
    alone = [ours.generate(p, images=im, max_new_tokens=10) for p, im in zip(prompts, per)]
    assert batched == alone
    assert "".join(ours.generate(prompts[1], images=per[1], max_new_tokens=10, stream=True)) == alone[1]
    assert alone[2] == ours.generate(prompts[2], max_new_tokens=10)  # no images: the text path
    # one image per prompt may be given bare; a single prompt may take a bare image
    assert ours.generate(prompts[:1] + prompts[2:], images=[ims[0], None], max_new_tokens=10) == [alone[0], alone[2]]
    assert ours.generate(prompts[0], images=ims[0], max_new_tokens=10) == alone[0]
    # logits too, bitwise: nothing in a row depends on its batch-mates
    pre = [ours.prepare(p, im) for p, im in zip(prompts, per)]
    outs = ours.forward([i for i, _ in pre], pixel_values=[px if len(px) else None for _, px in pre])
    for (i, px), o in zip(pre, outs):
        assert np.array_equal(o, ours.forward(i, pixel_values=px if len(px) else None))


def test_chat_with_image_parts(mm, tmp_path):
    _, ours, _ = mm
    im = images(seed=6)[0]
    path = tmp_path / "cat.png"
    im.save(path)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": str(path)},
                                             {"type": "text", "text": "  What is this?  "}]}]
    want_prompt = "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n"
    from gemma3_native.multimodal import chat_images
    msgs, found = chat_images(messages)
    assert format_chat(msgs) == want_prompt and found == [str(path)]
    got = ours.chat(messages, max_new_tokens=8)
    assert got == ours.generate(want_prompt, images=[im], max_new_tokens=8)
    assert got == ours.chat([messages[0], {"role": "user", "content": "<start_of_image>What is this?"}], images=[path],
                            max_new_tokens=8)
    ids, _ = ours.prepare(want_prompt, [im])
    assert ids.count(2) == 1  # the template's <bos> only


def test_cli_generate_with_image(mm, tmp_path):
    _, ours, d = mm
    p = tmp_path / "a.png"
    images(seed=8)[0].save(p)
    r = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "generate", "--model", str(d), "--dtype", "float32",
                        "-n", "8", "--image", str(p), "Describe."], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ours.generate("Describe.", images=[p], max_new_tokens=8) + "\n"
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "generate", "--model", str(d), "--image", str(bad),
                        "Describe."], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not an image" in r.stderr


# ---- errors and text-only checkpoints ----

def test_image_errors(mm, tiny_checkpoints):
    _, ours, _ = mm
    ims = images(seed=9)
    with pytest.raises(ValueError, match="placeholder"):
        ours.generate("one <start_of_image> only", images=ims)
    with pytest.raises(ValueError, match="image lists for"):
        ours.generate(["a", "b"], images=[ims[0]])
    with pytest.raises(g3.ImageError):
        ours.generate("Describe.", images=[Image.new("RGB", (0, 0))])
    ids, px = ours.prepare("Describe.", ims[:1])
    with pytest.raises(ValueError, match="image tokens"):
        ours.forward(ids, pixel_values=np.concatenate([px, px]))
    with pytest.raises(ValueError, match="no pixel values"):
        ours.forward(ids)
    text_only = g3.load(tiny_checkpoints["gemma3"][1], dtype="float32")
    assert text_only.vision is None
    with pytest.raises(ValueError, match="no vision tower|vision tower"):
        text_only.generate("Describe.", images=ims[:1])


def test_multimodal_config_without_vision_tensors_runs_text(mm, tmp_path, tokenizer_model):
    hf, ours, src = mm
    tensors = {k: (t.dtype, np.array(t.data)) for k, t in load_file(src / "model.safetensors").items()
               if not k.startswith(("vision_tower.", "multi_modal_projector."))}
    d = tmp_path / "text_only"
    d.mkdir()
    save_file(d / "model.safetensors", tensors)
    shutil.copy(src / "config.json", d / "config.json")
    shutil.copy(tokenizer_model, d / "tokenizer.model")
    m = g3.load(d, dtype="float32")
    assert m.vision is None
    ids = ours.encode("The quick brown fox")
    assert np.array_equal(m.forward(ids), ours.forward(ids))
    assert np.abs(m.forward(ids) - hf_logits(hf, ids, None)).max() <= LOGIT_ATOL


def test_real_4b_vision_names_and_shapes():
    """Gemma 3 4B's real config, built by transformers on the meta device (no weights): every vision tower
    and projector tensor maps to an engine name with the shape the engine expects (layer 0 stands for all)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from gemma3_native import _native as core
    from gemma3_native.weights import vision_name
    real = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}
    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024, "query_pre_attn_scalar": 256}
    config = Gemma3Config(text_config=text, vision_config=real)
    with torch.device("meta"):
        hf = Gemma3ForConditionalGeneration(config)
    v = core.VisionConfig()  # its defaults are Gemma 3's SigLIP; one layer keeps the allocation small
    v.num_layers, v.text_hidden_size = 1, 2560
    expected = core.VisionEncoderCpu(v, "bfloat16").expected_weights()
    seen = {}
    for name, p in hf.state_dict().items():
        if "vision_tower" not in name and "multi_modal_projector" not in name:
            continue
        ours = vision_name(name)
        assert ours is not None, name
        if ".layers." in ours and ".layers.0." not in ours:
            continue
        seen[ours] = list(p.shape)
    assert seen == {k: list(s) for k, s in expected.items()}


def test_vision_config_defaults_and_validation():
    from gemma3_native.config import ConfigError, spec_from_dict
    text = {"model_type": "gemma3_text", "vocab_size": 416, "hidden_size": 72, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 8, "query_pre_attn_scalar": 24, "max_position_embeddings": 512}
    real = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}
    v = spec_from_dict({"model_type": "gemma3", "text_config": text, "vision_config": real}).vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.head_dim, v.intermediate_size, v.patch_size, v.image_size) == \
        (1152, 27, 16, 72, 4304, 14, 896)
    assert (v.layer_norm_eps, v.mm_tokens_per_image, v.pool_kernel, v.num_patches) == (pytest.approx(1e-6), 256, 4, 4096)
    assert (v.boi_token_id, v.eoi_token_id, v.image_token_id, v.text_hidden_size) == (255999, 256000, 262144, 72)
    assert spec_from_dict({"model_type": "gemma3", "text_config": text}).vision is None
    with pytest.raises(ConfigError, match="perfect square"):
        spec_from_dict({"model_type": "gemma3", "text_config": text, "vision_config": real, "mm_tokens_per_image": 200})
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        spec_from_dict({"model_type": "gemma3", "text_config": text, "vision_config": dict(real, image_size=900)})


def test_cli_chat_with_image(mm, tmp_path):
    """`gemma3 chat --image`: the images go with the first user turn, before its text."""
    _, ours, d = mm
    p = tmp_path / "a.png"
    images(seed=8)[0].save(p)
    r = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "chat", "--model", str(d), "--dtype", "float32",
                        "--device", "cpu", "-n", "6", "--image", str(p)], input="What is this?\nAnd now?\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first = [{"role": "user", "content": [{"type": "image", "image": str(p)}, {"type": "text", "text": "What is this?"}]}]
    a = ours.chat(first, max_new_tokens=6)
    b = ours.chat(first + [{"role": "model", "content": a}, {"role": "user", "content": "And now?"}], max_new_tokens=6)
    assert r.stdout == a + "\n" + b + "\n"
    text_only = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "chat", "--model", str(d), "--device", "cpu",
                                "--image", str(tmp_path / "missing.png")], input="Hi\n", capture_output=True, text=True,
                               timeout=120)
    assert text_only.returncode == 2 and "missing.png" in text_only.stderr
