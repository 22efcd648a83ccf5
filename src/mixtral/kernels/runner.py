"""The Runner interface: how a prepared model runs a forward pass and a decode step, and the torch reference.

Callers (generate.py, engine.py, eval, bench) step a runner and never branch on what is behind it:
- `forward(input_ids, ...)`: Transformer.forward's arguments and result ((B, T, V) logits);
- `decode_step(cache, tokens, positions, rows, routing)`: one new token for each of B sequences -> a `Step`:
  the (B, V) logits, each row's log-normalizer (a token's log-prob is its logit minus it) and, where the runner
  computed it on the way, each row's greedy choice;
- `step_of(logits)`: the same for logits the caller already has (the last prompt position after a prefill);
- `feed(cache, inputs, starts, rows)`: several tokens for each of B sequences (a prompt's rest, or one decode
  token) in one pass where the runner can (`feeds`) -> a `Step` of each sequence's last token;
- `prefix_cache(budget)`: a prefix cache for the model's KV caches.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Step:
    """One decode step's results. `logits` (B, V) may be the runner's own buffer: valid until its next step."""

    logits: torch.Tensor
    lse: list[float]  # per row: log(sum(exp(logits)))
    best: list[int] | None = None  # per row: the argmax (NaN never chosen), when the runner computed it
    values: object = None  # the logits as a numpy array (the same memory), for reads that are no torch op

    def logit(self, row: int, token: int) -> float:
        if self.values is not None:
            return float(self.values[row, token])
        return float(self.logits[row, token])

    def logprob(self, row: int, token: int) -> float:
        """The model's log-probability of `token` in row `row` (before any sampling filter)."""
        return self.logit(row, token) - self.lse[row]


def log_normalizers(logits: torch.Tensor) -> list[float]:
    """log(sum(exp(row))) of each row of (B, V) logits, computed in fp64 by the C kernels where they are loaded
    (fp32 CPU logits: a log-softmax of the whole row costs a visible part of a small model's decode step), else by
    torch; NaN for a row with a NaN or +inf, as log-softmax gives."""
    from . import native_lib

    if logits.dtype == torch.float32 and native_lib.will_run(logits.device):
        return native_lib.logsumexp(logits).tolist()
    lse = torch.logsumexp(logits.float(), dim=-1)
    return torch.where(lse == float("inf"), float("nan"), lse).tolist()


class Runner:
    """The reference runner: the model's own torch code (with whatever modules quantize.py or fbgemm.py swapped
    in). Subclasses run the same passes their own way."""

    name = "torch"

    def __init__(self, model):
        self._model = weakref.ref(model)  # a model may hold its runner: no reference cycle

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("this runner's model is gone")
        return model


    def forward(self, input_ids, input_pos=None, cache=None, n_keys=None, logits_at=None, routing=None,
                slots=None) -> torch.Tensor:
        return self.model(input_ids, input_pos, cache, n_keys, logits_at, routing, slots)

    def decode_step(self, cache, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int] | None = None,
                    routing: list | None = None) -> Step:
        """tokens[b] at positions[b] of cache row rows[b] (default 0..B-1) -> a Step."""
        device = self.model.device
        slots = None if rows is None else torch.tensor(list(rows), device=device)
        pos = torch.tensor(list(positions), device=device)[:, None]  # (B, 1)
        logits = self.model(torch.tensor(list(tokens), device=device)[:, None], pos, cache,
                            n_keys=max(positions) + 1, routing=routing, slots=slots)[:, -1]  # (B, V)
        return self.step_of(logits)

    def step_of(self, logits: torch.Tensor) -> Step:
        return Step(logits, log_normalizers(logits))

    def feeds(self, cache, tokens: int) -> bool:
        """Whether `feed` runs `tokens` prompt tokens of a sequence in the pass of other sequences' decode tokens,
        each token's numbers its own whatever runs beside it. Here: never."""
        return False

    def feed(self, cache, inputs: Sequence[Sequence[int]], starts: Sequence[int], rows: Sequence[int]) -> Step:
        """inputs[b] (token ids) at positions starts[b], starts[b] + 1, ... of cache row rows[b], for each of B
        sequences, in one pass -> a Step of each sequence's last token; for sequences whose count `feeds` takes."""
        raise NotImplementedError("this runner prefills each prompt in a pass of its own")

    def prefix_cache(self, budget_bytes: int):
        """A prefix cache (prefix_cache.py) for KV caches of this runner's model (a split model's runner makes one
        that its other ranks follow)."""
        from ..prefix_cache import PrefixCache

        return PrefixCache(budget_bytes)
