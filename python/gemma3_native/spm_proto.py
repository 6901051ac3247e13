"""Build a SentencePiece ``tokenizer.model`` from a GGUF file's vocabulary.

A llama.cpp GGUF keeps a SentencePiece vocabulary as three parallel arrays
(``tokenizer.ggml.tokens|scores|token_type``) plus the special token ids. This module turns
them back into the serialized ``sentencepiece.ModelProto`` that ``tokenizer.model`` holds, so
that ``sentencepiece.SentencePieceProcessor(model_proto=...)`` (and our C++ tokenizer) can load it.

The protobuf is written by hand (the wire format is tiny: varints, length-delimited strings and
fixed32 floats), so neither ``protobuf`` nor ``sentencepiece_model_pb2`` is needed; field numbers
are those of sentencepiece's ``sentencepiece_model.proto``. ``decode_model_proto`` reads one back
for inspection and tests.

Gemma's settings (the ones that change how text is encoded):

* model type BPE with ``byte_fallback``: unknown characters become ``<0xXX>`` byte pieces;
* normalizer "identity" (no NFKC), ``add_dummy_prefix`` false (no leading ``▁``),
  ``remove_extra_whitespaces`` false, ``escape_whitespaces`` true (space -> ``▁``);
* trainer flags as Gemma's own model has them (``split_digits``, ``allow_whitespace_only_pieces``,
  ...). They only matter for training, but are kept so the file reads like Gemma's.

Piece types. The GGUF token types are SentencePiece's own numbers (1 NORMAL, 2 UNKNOWN, 3 CONTROL,
4 USER_DEFINED, 5 UNUSED, 6 BYTE), but llama.cpp's converter changed two things that we undo:

* every token that transformers' ``tokenizer_config.json`` listed as special became CONTROL, so
  ``<start_of_turn>``, ``<mask>``, ``<unusedN>`` ... are CONTROL in the GGUF. SentencePiece never
  matches a CONTROL piece in text, while transformers (the reference) does. They are written as
  USER_DEFINED, which SentencePiece matches whole in the input text, so
  ``"<start_of_turn>user"`` encodes to ``[105, 2364]``. Only ``<pad>``, ``<eos>`` and ``<bos>``
  (the ids the GGUF names) stay CONTROL: those are the ones a caller adds by id, and that decoding
  drops. ``<unk>`` becomes UNKNOWN (SentencePiece needs exactly one).
* user-defined whitespace runs were stored with real spaces (``"  "``); SentencePiece matches
  user-defined pieces against the escaped text, so they are spelled with ``▁`` again, and made
  NORMAL pieces: transformers forms them by BPE merges (40 spaces -> 16 + 24), not by greedy
  matching (31 + 9).

Scores: a NORMAL piece's score is minus its id. SentencePiece's BPE merges the pair whose result
scores highest; transformers ranks a merge by the position of the token it forms, so this makes the
two agree (Gemma's own scores already decrease with the id, except for the whitespace runs above).

Known difference from transformers' tokenizer: literal ``<bos>``, ``<eos>``, ``<pad>`` and ``<unk>``
in the input text are matched by transformers but, being CONTROL / UNKNOWN, not by SentencePiece.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TYPE_NAMES = {NORMAL: "NORMAL", UNKNOWN: "UNKNOWN", CONTROL: "CONTROL",
              USER_DEFINED: "USER_DEFINED", UNUSED: "UNUSED", BYTE: "BYTE"}
# TrainerSpec.ModelType
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4

SPACE = "\u2581"  # ▁, SentencePiece's escaped space


class TokenizerModelError(ValueError):
    """The GGUF vocabulary cannot be turned into a SentencePiece model."""


# ---------------------------------------------------------------- protobuf wire format (writer)

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _f_int(field: int, value: int) -> bytes:          # int32 / enum / bool
    return _key(field, 0) + _varint(int(value))


def _f_bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _f_str(field: int, value: str) -> bytes:
    return _f_bytes(field, value.encode("utf-8"))


def _f_float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


# Field numbers from sentencepiece_model.proto
_PIECE_FIELDS = {"piece": 1, "score": 2, "type": 3}
_MODEL_FIELDS = {"pieces": 1, "trainer_spec": 2, "normalizer_spec": 3, "denormalizer_spec": 5}
_TRAINER_FIELDS = {
    "model_prefix": 2, "model_type": 3, "vocab_size": 4, "character_coverage": 10,
    "max_sentence_length": 18, "max_sentencepiece_length": 20,
    "split_by_unicode_script": 21, "split_by_whitespace": 22, "split_by_number": 23,
    "treat_whitespace_as_suffix": 24, "split_digits": 25, "allow_whitespace_only_pieces": 26,
    "vocabulary_output_piece_score": 32, "hard_vocab_limit": 33, "use_all_vocab": 34,
    "byte_fallback": 35, "unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43,
    "unk_surface": 44, "unk_piece": 45, "bos_piece": 46, "eos_piece": 47, "pad_piece": 48,
}
_TRAINER_KINDS = {  # how each field above is encoded
    "model_prefix": "str", "unk_surface": "str", "unk_piece": "str", "bos_piece": "str",
    "eos_piece": "str", "pad_piece": "str", "character_coverage": "float",
}
_NORMALIZER_FIELDS = {"name": 1, "precompiled_charsmap": 2, "add_dummy_prefix": 3,
                      "remove_extra_whitespaces": 4, "escape_whitespaces": 5,
                      "normalization_rule_tsv": 6}


def _encode_message(values: Mapping[str, Any], fields: Mapping[str, int],
                    kinds: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in values.items():
        if value is None:
            continue
        num = fields[name]
        kind = kinds.get(name, "int")
        if kind == "str":
            out += _f_str(num, value)
        elif kind == "bytes":
            out += _f_bytes(num, value)
        elif kind == "float":
            out += _f_float(num, value)
        else:
            out += _f_int(num, value)
    return bytes(out)


def encode_model_proto(pieces: Sequence[tuple[str, float, int]], trainer_spec: Mapping[str, Any],
                       normalizer_spec: Mapping[str, Any]) -> bytes:
    """Serialize a ModelProto: pieces as (piece, score, type), specs as field-name -> value."""
    out = bytearray()
    for piece, score, ptype in pieces:
        body = _f_str(1, piece) + _f_float(2, score) + _f_int(3, ptype)
        out += _f_bytes(_MODEL_FIELDS["pieces"], body)
    out += _f_bytes(_MODEL_FIELDS["trainer_spec"],
                    _encode_message(trainer_spec, _TRAINER_FIELDS, _TRAINER_KINDS))
    out += _f_bytes(_MODEL_FIELDS["normalizer_spec"],
                    _encode_message(normalizer_spec, _NORMALIZER_FIELDS,
                                    {"name": "str", "normalization_rule_tsv": "str",
                                     "precompiled_charsmap": "bytes"}))
    return bytes(out)


# ---------------------------------------------------------------- protobuf wire format (reader)

def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise TokenizerModelError("truncated protobuf varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i
        if shift > 70:
            raise TokenizerModelError("malformed protobuf varint")


def _iter_fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            if i + n > len(buf):
                raise TokenizerModelError("truncated protobuf field")
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise TokenizerModelError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _signed32(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _decode_message(buf: bytes, fields: Mapping[str, int], kinds: Mapping[str, str]) -> dict:
    by_num = {num: name for name, num in fields.items()}
    out: dict[str, Any] = {}
    for num, _wire, value in _iter_fields(buf):
        name = by_num.get(num, f"field_{num}")
        kind = kinds.get(name, "int")
        if kind == "str":
            out[name] = bytes(value).decode("utf-8")
        elif kind == "bytes":
            out[name] = bytes(value)
        elif kind == "float":
            out[name] = struct.unpack("<f", value)[0]
        else:
            out[name] = _signed32(value) if isinstance(value, int) else value
    return out


def decode_model_proto(data: bytes) -> dict:
    """Read a serialized ModelProto back: {"pieces": [(piece, score, type)], "trainer_spec": {...},
    "normalizer_spec": {...}}. Only the fields this module writes are named; enough to inspect
    Gemma's (or our) tokenizer.model without protobuf."""
    pieces: list[tuple[str, float, int]] = []
    out: dict[str, Any] = {"pieces": pieces, "trainer_spec": {}, "normalizer_spec": {}}
    for num, _wire, value in _iter_fields(data):
        if num == 1:
            p = {"piece": "", "score": 0.0, "type": NORMAL}
            for f, _w, v in _iter_fields(value):
                if f == 1:
                    p["piece"] = bytes(v).decode("utf-8")
                elif f == 2:
                    p["score"] = struct.unpack("<f", v)[0]
                elif f == 3:
                    p["type"] = v
            pieces.append((p["piece"], p["score"], p["type"]))
        elif num == 2:
            out["trainer_spec"] = _decode_message(value, _TRAINER_FIELDS, _TRAINER_KINDS)
        elif num == 3:
            out["normalizer_spec"] = _decode_message(
                value, _NORMALIZER_FIELDS,
                {"name": "str", "normalization_rule_tsv": "str", "precompiled_charsmap": "bytes"})
    return out


# ---------------------------------------------------------------- GGUF vocabulary -> ModelProto

def _get(meta: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return meta[key] if key in meta else default


def _byte_piece_ok(piece: str) -> bool:
    return (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
            and all(c in "0123456789ABCDEF" for c in piece[3:5]))


def gguf_vocab_to_pieces(meta: Mapping[str, Any]) -> tuple[list[tuple[str, float, int]], dict]:
    """The (piece, score, type) list and the special ids for a GGUF SentencePiece vocabulary."""
    model = _get(meta, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerModelError("no tokenizer in the metadata (tokenizer.ggml.model is missing)")
    if model != "llama":
        raise TokenizerModelError(
            f"tokenizer.ggml.model is {model!r}; only SentencePiece vocabularies ('llama', as "
            f"Gemma uses) can be written as tokenizer.model")
    tokens = _get(meta, "tokenizer.ggml.tokens")
    if tokens is None or len(tokens) == 0:
        raise TokenizerModelError("tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    scores = _get(meta, "tokenizer.ggml.scores")
    types = _get(meta, "tokenizer.ggml.token_type")
    if scores is None:
        scores = [0.0] * n
    if types is None:
        types = [NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise TokenizerModelError(
            f"tokenizer arrays differ in length: {n} tokens, {len(scores)} scores, {len(types)} types")

    def special(key: str, default: int | None) -> int | None:
        v = _get(meta, f"tokenizer.ggml.{key}", default)
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < n:
            raise TokenizerModelError(f"tokenizer.ggml.{key} = {v} is outside the vocabulary (size {n})")
        return v

    ids = {
        "unk": special("unknown_token_id", None),
        "bos": special("bos_token_id", None),
        "eos": special("eos_token_id", None),
        "pad": special("padding_token_id", None),
    }
    if ids["unk"] is None:
        found = [i for i in range(n) if int(types[i]) == UNKNOWN]
        if not found:
            raise TokenizerModelError("the vocabulary has no unknown token (SentencePiece needs one)")
        ids["unk"] = found[0]
    keep_control = {ids["bos"], ids["eos"], ids["pad"]} - {None}

    pieces: list[tuple[str, float, int]] = []
    seen: dict[str, int] = {}
    for i in range(n):
        piece = str(tokens[i])
        score = float(scores[i])
        t = int(types[i])
        if i == ids["unk"]:
            t = UNKNOWN
        elif t == UNKNOWN:
            t = CONTROL  # SentencePiece allows a single UNKNOWN piece
        elif t == CONTROL and i not in keep_control:
            t = USER_DEFINED
        elif i in keep_control:
            t = CONTROL
        elif t not in TYPE_NAMES:
            raise TokenizerModelError(f"token {i} ({piece!r}) has unknown token type {t}")
        if t == USER_DEFINED and " " in piece:
            # llama.cpp un-escaped these; SentencePiece wants ▁
            piece = piece.replace(" ", SPACE)
            if not piece.strip(SPACE):
                # A run of spaces: transformers builds these by BPE merges, not as added tokens,
                # so a run longer than the longest piece splits the way the merges go
                # (40 spaces -> 16 + 24, not 31 + 9). As NORMAL pieces SentencePiece does the same.
                t = NORMAL
        if t == NORMAL:
            # BPE merge priority: transformers ranks the merge forming a token by its position in
            # the vocabulary (earlier first), not by the GGUF score. For Gemma both orders agree
            # on ordinary tokens, but the space runs above sit before them (ids 138..167).
            score = -float(i)
        if t == BYTE and not _byte_piece_ok(piece):
            raise TokenizerModelError(f"token {i} is typed BYTE but is {piece!r}, not <0xXX>")
        if not piece:
            raise TokenizerModelError(f"token {i} is empty (SentencePiece pieces cannot be empty)")
        if piece in seen:
            raise TokenizerModelError(
                f"tokens {seen[piece]} and {i} are both {piece!r} (SentencePiece needs unique pieces)")
        seen[piece] = i
        pieces.append((piece, score, t))
    if not any(p[2] == BYTE for p in pieces):
        raise TokenizerModelError("the vocabulary has no <0xXX> byte tokens; Gemma's tokenizer uses byte fallback")
    return pieces, ids


def build_tokenizer_model(meta: Mapping[str, Any]) -> bytes:
    """Serialized SentencePiece ModelProto (the bytes of ``tokenizer.model``) for the GGUF
    metadata ``meta`` (a mapping with the ``tokenizer.ggml.*`` keys). Raises TokenizerModelError."""
    pieces, ids = gguf_vocab_to_pieces(meta)
    name = lambda i: pieces[i][0] if i is not None else None  # noqa: E731
    add_space_prefix = bool(_get(meta, "tokenizer.ggml.add_space_prefix", False))
    trainer_spec = {
        "model_type": BPE,
        "vocab_size": len(pieces),
        "character_coverage": 1.0,
        "max_sentence_length": 4192,
        "max_sentencepiece_length": 16,
        "split_by_unicode_script": True,
        "split_by_whitespace": True,
        "split_by_number": True,
        "treat_whitespace_as_suffix": False,
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "vocabulary_output_piece_score": True,
        "hard_vocab_limit": True,
        "use_all_vocab": False,
        "byte_fallback": True,
        "unk_id": ids["unk"],
        "bos_id": ids["bos"] if ids["bos"] is not None else -1,
        "eos_id": ids["eos"] if ids["eos"] is not None else -1,
        "pad_id": ids["pad"] if ids["pad"] is not None else -1,
        "unk_piece": name(ids["unk"]),
        "bos_piece": name(ids["bos"]),
        "eos_piece": name(ids["eos"]),
        "pad_piece": name(ids["pad"]),
    }
    normalizer_spec = {
        "name": "identity",
        "precompiled_charsmap": b"",
        "add_dummy_prefix": add_space_prefix,
        "remove_extra_whitespaces": False,
        "escape_whitespaces": True,
        "normalization_rule_tsv": "",
    }
    return encode_model_proto(pieces, trainer_spec, normalizer_spec)


__all__ = [
    "TokenizerModelError", "build_tokenizer_model", "gguf_vocab_to_pieces", "encode_model_proto",
    "decode_model_proto", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE", "BPE",
]
