"""One sequence's token ids -> text deltas, with the stop rules every front end shares (the library's
generate functions and the serving engine alike): EOS token, stop strings, token budget."""

from __future__ import annotations

from .sampling import SamplingParams
from .tokenizer import StreamingDetokenizer, Tokenizer


class TextTracker:
    """Ids of one sequence -> text deltas, with the stop rules: EOS token, stop strings, token budget.

    Text that could be the start of a stop string is held back until it is known not to be one, so a stop
    string never reaches the client; the text ends just before it.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_ids: set[int] | None = None):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stop = params.stop
        self.max_new_tokens = params.max_new_tokens
        self.eos_ids = set(eos_ids if eos_ids is not None else tokenizer.eos_ids)
        self.pending = ""
        self.text = ""  # everything emitted so far
        self.n_tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        """Take the next token; return the text that is now safe to show. Sets `finish_reason` when done."""
        self.n_tokens += 1
        if token_id in self.eos_ids:
            self.finish_reason = "eos_token"
            return self._emit(self.pending + self.detok.flush())
        self.pending += self.detok.add(token_id)
        for stop in self.stop:
            if (at := self.pending.find(stop)) >= 0:
                self.finish_reason = "stop_sequence"
                return self._emit(self.pending[:at])
        if self.n_tokens >= self.max_new_tokens:
            self.finish_reason = "length"
            return self._emit(self.pending + self.detok.flush())
        hold = max((n for stop in self.stop for n in range(1, len(stop)) if self.pending.endswith(stop[:n])),
                   default=0)
        ready, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return self._emit(ready)

    def _emit(self, text: str) -> str:
        if self.finish_reason:
            self.pending = ""
        self.text += text
        return text
