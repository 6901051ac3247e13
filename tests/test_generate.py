"""Generation behaviour on a tiny random Gemma 3: greedy determinism, seeds, stop strings, streaming,
chat template, and the multi-byte-safe stream decoder."""
from __future__ import annotations

import subprocess
import sys

import pytest

import gemma3_native as g3
from gemma3_native.chat import format_chat
from gemma3_native.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return g3.load(tiny_checkpoints["gemma3"][1], dtype="float32")


def test_seed_reproducible_and_seeds_differ(model):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)
    a = model.generate("The quick brown", seed=11, **kw)
    assert a == model.generate("The quick brown", seed=11, **kw)
    others = {model.generate("The quick brown", seed=s, **kw) for s in range(12, 16)}
    assert len(others - {a}) >= 3


def test_greedy_ignores_seed(model):
    assert model.generate("Gemma", max_new_tokens=10, seed=1) == model.generate("Gemma", max_new_tokens=10, seed=2)


def test_stop_string_cuts_and_stream_agrees(model):
    full = model.generate("She sells", max_new_tokens=30)
    assert len(full) >= 6
    stop = full[3:6]
    cut = full[: full.find(stop)]
    assert model.generate("She sells", max_new_tokens=30, stop=stop) == cut
    pieces = list(model.generate("She sells", max_new_tokens=30, stop=[stop, "\x00never"], stream=True))
    assert "".join(pieces) == cut
    assert "".join(model.generate("She sells", max_new_tokens=30, stream=True)) == full


def test_stream_never_splits_a_character(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    text = "日本語 ünïcödé 🎉 ok"  # mostly absent from the tokenizer's corpus: byte-fallback pieces
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text)  # several byte tokens per character, so the test bites
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_in_text_and_chat_template(model):
    tok = model.tokenizer
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == tok.start_of_turn_id and ids[-1] == tok.end_of_turn_id
    prompt = format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello "},
                          {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}])
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
                      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tok.encode(prompt).count(tok.bos_id) == 2  # encode() adds one; generate() does not for a <bos> prompt
    assert model._prompt_ids(prompt).count(tok.bos_id) == 1
    assert isinstance(model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5), str)


def test_end_of_turn_stops_generation(model):
    """Force <end_of_turn> to be the greedy choice by checking the loop's stop handling directly."""
    from gemma3_native.generate import SamplingParams, Sequence
    s = Sequence(model.tokenizer, [2], SamplingParams(max_new_tokens=10), model.stop_ids)
    s.push(model.tokenizer.encode("ab", add_bos=False)[0])
    s.push(model.tokenizer.end_of_turn_id)
    assert s.done and s.finish_reason == "stop" and model.tokenizer.end_of_turn_id not in s.generated


def test_context_limit_stops_generation(tiny_checkpoints):
    m = g3.load(tiny_checkpoints["gemma3"][1], dtype="float32", max_context=12)
    ids = m.generate_ids([[2, 5, 6, 7, 8]], max_new_tokens=50, ignore_eos=True)[0]
    assert len(ids) == 12 - 5 + 1  # the last token is sampled from the final position's logits


def test_cli_generate_and_errors(tiny_checkpoints):
    d = tiny_checkpoints["gemma3"][1]
    r = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "generate", "--model", str(d), "-n", "5",
                        "--stats", "The quick"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "generate", "--model", str(d / "nope"), "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such model" in bad.stderr and "Traceback" not in bad.stderr
    chat = subprocess.run([sys.executable, "-m", "gemma3_native.cli", "chat", "--model", str(d), "-n", "4"],
                          input="hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
