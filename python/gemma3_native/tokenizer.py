"""SentencePiece tokenizer with Gemma's special tokens: control tokens written in text
(`<start_of_turn>`, `<bos>`, ...) become their ids, as transformers' tokenizer does, and decoding
is streamed without ever splitting a multi-byte character."""
from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from .spm_proto import CONTROL, UNKNOWN, USER_DEFINED, decode_model_proto


class TokenizerError(ValueError):
    """tokenizer.model is missing or unreadable."""


class Tokenizer:
    def __init__(self, model: str | Path | bytes):
        self.sp = spm.SentencePieceProcessor()
        try:
            if isinstance(model, bytes):
                self.sp.LoadFromSerializedProto(model)
                self.source = "<bytes>"
            else:
                p = Path(model)
                if not p.is_file():
                    raise TokenizerError(f"{p}: tokenizer.model not found")
                self.sp.Load(str(p))
                self.source = str(p)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model}: not a SentencePiece model ({e})") from None
        n = self.sp.GetPieceSize()
        self.vocab_size = n
        # Control / user-defined pieces spelled like tags are matched in text before SentencePiece runs.
        # (transformers matches these in text too, <bos> and <eos> included)
        self.special: dict[str, int] = {}
        for i, (piece, _score, kind) in enumerate(decode_model_proto(self.sp.serialized_model_proto())["pieces"]):
            if kind in (CONTROL, UNKNOWN, USER_DEFINED) and len(piece) > 2 and piece[0] in "<[" and piece[-1] in ">]":
                self.special[piece] = i
        self._split = (re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")
                       if self.special else None)
        self.bos_id = self._id("<bos>", self.sp.bos_id())
        self.eos_id = self._id("<eos>", self.sp.eos_id())
        self.pad_id = self._id("<pad>", self.sp.pad_id())
        self.start_of_turn_id = self.special.get("<start_of_turn>")
        self.end_of_turn_id = self.special.get("<end_of_turn>")

    def _id(self, piece: str, fallback: int) -> int:
        i = self.sp.PieceToId(piece)
        return i if self.sp.IdToPiece(i) == piece else fallback

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos else []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if not part:
                continue
            if part in self.special:
                ids.append(self.special[part])
            else:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        # Model vocabularies can exceed the tokenizer's (Gemma 3 4B+: 262208 vs 262144); those ids have no text.
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= i < self.vocab_size])

    def piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))


class StreamDecoder:
    """Turns a growing list of ids into text pieces. A piece is released only when it ends on a
    whole character (byte-fallback tokens can carry part of a UTF-8 sequence), and `hold` lets
    the caller keep back a tail that may still turn into a stop string."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already released

    def text(self) -> str:
        return self.tok.decode(self.ids)

    def push(self, token: int, hold: int = 0) -> str:
        self.ids.append(token)
        text = self.text()
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence decodes to U+FFFD: wait for its bytes
            end = len(text.rstrip("\ufffd"))
        end = max(self.emitted, end - hold)
        out = text[self.emitted:end]
        self.emitted = end
        return out

    def flush(self, upto: int | None = None) -> str:
        text = self.text()
        end = len(text) if upto is None else upto
        out = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out
