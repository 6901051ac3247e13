"""Generation parameters, stop conditions and the per-sequence state of the decode loop."""
from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False   # run to max_new_tokens (tests, benchmarks)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")


class Sequence:
    """One prompt's progress: generated ids, stop detection and streamed text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = set() if params.ignore_eos else stop_ids
        self.decoder = StreamDecoder(tokenizer)
        self.generated: list[int] = []
        self.done = False
        self.finish_reason: str | None = None
        self.text_end: int | None = None  # where a stop string cut the text

    def _hold(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def push(self, token: int) -> str:
        """Record a sampled token; returns the text that can be shown now."""
        if token in self.stop_ids:
            self.done, self.finish_reason = True, "stop"
            return self.decoder.flush()
        self.generated.append(token)
        self.decoder.ids.append(token)
        text = self.decoder.text()
        if self.params.stop:
            cut = min((i for i in (text.find(s, max(0, self.decoder.emitted - len(s))) for s in self.params.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.done, self.finish_reason, self.text_end = True, "stop", cut
                return self.decoder.flush(cut)
        self.decoder.ids.pop()
        out = self.decoder.push(token, hold=self._hold(text))
        if len(self.generated) >= self.params.max_new_tokens:
            self.done, self.finish_reason = True, "length"
            out += self.decoder.flush()
        return out

    def finish(self, reason: str) -> str:
        self.done, self.finish_reason = True, reason
        return self.decoder.flush()

    def text(self) -> str:
        t = self.decoder.text()
        return t if self.text_end is None else t[: self.text_end]
