"""Turning one step's logits into the next token id.

`SamplingParams` is the validated, immutable set of knobs a client can turn (temperature, top-k/top-p/min-p/
typical-p truncation, repetition/frequency/presence penalties, seed, stop strings, length). A `Sampler` is made
per sequence from it and owns that sequence's random generator, so a fixed seed reproduces the same tokens.

The building blocks are pure functions on 1-D float32 logits; each returns a new tensor in which removed
entries are `-inf`. Their semantics follow the Hugging Face `transformers` logits processors (ties at the top-k
boundary are kept; every filter keeps at least the most probable token).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import MixtralError

__all__ = [
    "Sampler",
    "SamplingParams",
    "apply_frequency_presence",
    "apply_repetition_penalty",
    "min_p_filter",
    "top_k_filter",
    "top_p_filter",
    "typical_filter",
]

_NEG_INF = float("-inf")
_MAX_SEED = 2**63
Ids = Sequence[int] | Tensor  # token ids: a list/tuple of ints or an integer tensor


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each next token. Every field is validated on construction (`MixtralError` if invalid).

    temperature: 0 means greedy; otherwise logits are divided by it (0 <= t <= 100).
    top_k: keep the k most probable tokens (0 = off). top_p: nucleus sampling mass in (0, 1] (1 = off).
    min_p: keep tokens with prob >= min_p * max prob, in [0, 1) (0 = off).
    typical_p: locally typical sampling mass in (0, 1] (1 = off).
    repetition_penalty: CTRL-style penalty over prompt + generated ids (> 0, 1 = off).
    frequency_penalty / presence_penalty: OpenAI-style penalties over generated ids, each in [-2, 2].
    do_sample: False forces greedy decoding. seed: 0 <= seed < 2**63, or None for a random one.
    stop: strings that end generation. max_new_tokens: upper bound on generated tokens (>= 1).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    do_sample: bool = True
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        self._check_float("temperature", lambda v: 0.0 <= v <= 100.0, "a finite number in [0, 100]")
        self._check_int("top_k", lambda v: v >= 0, "an integer >= 0 (0 = off)")
        self._check_float("top_p", lambda v: 0.0 < v <= 1.0, "a finite number in (0, 1]")
        self._check_float("min_p", lambda v: 0.0 <= v < 1.0, "a finite number in [0, 1)")
        self._check_float("typical_p", lambda v: 0.0 < v <= 1.0, "a finite number in (0, 1]")
        self._check_float("repetition_penalty", lambda v: v > 0.0, "a finite number > 0")
        self._check_float("frequency_penalty", lambda v: -2.0 <= v <= 2.0, "a finite number in [-2, 2]")
        self._check_float("presence_penalty", lambda v: -2.0 <= v <= 2.0, "a finite number in [-2, 2]")
        if not isinstance(self.do_sample, bool):
            raise MixtralError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.seed is not None:
            self._check_int("seed", lambda v: 0 <= v < _MAX_SEED, "an integer in [0, 2**63) or null")
        self._check_int("max_new_tokens", lambda v: v >= 1, "an integer >= 1")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop  # one string, as OpenAI allows
        if not isinstance(stop, (list, tuple)) or not all(isinstance(item, str) and item for item in stop):
            raise MixtralError(f"stop must be a list of non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    def _check_float(self, name: str, ok, allowed: str) -> None:
        value = getattr(self, name)
        try:
            good = _is_real(value) and math.isfinite(value) and ok(float(value))
        except OverflowError:  # an int too large for a float
            good = False
        if not good:
            raise MixtralError(f"{name} must be {allowed}, got {value!r}")
        object.__setattr__(self, name, float(value))

    def _check_int(self, name: str, ok, allowed: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or not ok(int(value)):
            raise MixtralError(f"{name} must be {allowed}, got {value!r}")
        object.__setattr__(self, name, int(value))

    @property
    def greedy(self) -> bool:
        """True when decoding picks the argmax (temperature 0 or do_sample False)."""
        return self.temperature == 0.0 or not self.do_sample

    def replace(self, **changes) -> SamplingParams:
        """Return a validated copy with the given fields changed."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise MixtralError(f"unknown sampling parameter(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, model_dir, defaults: SamplingParams | None = None, **overrides) -> SamplingParams:
        """The settings a model asks for: `defaults` (default: `SamplingParams()`), replaced by what the model's
        generation_config.json says (temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens,
        do_sample; nulls skipped), replaced by `overrides` (None skipped, so unset options pass as they are).

        An overriding temperature > 0 turns sampling on, even where the file says do_sample false. model_dir
        None or without the file: no file. Raises MixtralError for a file that is not a JSON object and for
        any value out of range.
        """
        import json
        from pathlib import Path

        values = {}
        path = None if model_dir is None else Path(model_dir) / "generation_config.json"
        if path is not None and path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise MixtralError(f"{path}: invalid JSON ({exc})") from None
            if not isinstance(cfg, dict):
                raise MixtralError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
            keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "do_sample")
            values = {key: cfg[key] for key in keys if cfg.get(key) is not None}
        given = {key: value for key, value in overrides.items() if value is not None}
        values.update(given)
        temperature = given.get("temperature")
        if "do_sample" not in given and _is_real(temperature) and temperature > 0:
            values["do_sample"] = True
        return (cls() if defaults is None else defaults).replace(**values)


# ---------------------------------------------------------------------------------------------- building blocks


def _ids_tensor(ids: Ids, vocab_size: int) -> Tensor:  # 1-D int64 on the CPU, ids outside the vocab dropped
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    return t[(t >= 0) & (t < vocab_size)]


def apply_repetition_penalty(logits: Tensor, ids: Ids, penalty: float) -> Tensor:
    """CTRL/HF repetition penalty: for each distinct id seen, a positive logit is divided by `penalty` and a
    negative one multiplied by it. Other logits are unchanged."""
    ids = _ids_tensor(ids, logits.shape[-1])
    if penalty == 1.0 or ids.numel() == 0:
        return logits.clone()
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    seen[ids.to(logits.device)] = True
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: Tensor, ids: Ids, frequency: float, presence: float) -> Tensor:
    """OpenAI penalties: `logit -= frequency * count + presence * (count > 0)`, counts taken over `ids`."""
    ids = _ids_tensor(ids, logits.shape[-1])
    if (frequency == 0.0 and presence == 0.0) or ids.numel() == 0:
        return logits.clone()
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(device=logits.device, dtype=logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _top_p_sorted(sorted_logits: Tensor, p: float) -> Tensor:
    """top-p on logits already sorted in descending order."""
    if p >= 1.0:
        return sorted_logits
    # Drop a token when it and everything less probable hold <= 1 - p; summing from the small end (as
    # HF does) keeps the tail mass accurate in float32.
    tail_mass = sorted_logits.softmax(-1).flip(0).cumsum(0).flip(0)
    drop = tail_mass <= 1.0 - p
    drop[0] = False
    return sorted_logits.masked_fill(drop, _NEG_INF)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the `k` highest logits (plus any tied with the k-th); k <= 0 or k >= vocab means no filtering."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    return logits.masked_fill(logits < torch.topk(logits, k).values[-1], _NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability is >= `p`."""
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = logits.sort(descending=True, stable=True)
    out = torch.empty_like(logits)
    out[order] = _top_p_sorted(sorted_logits, p)
    return out


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep tokens whose probability is >= `p` times the largest probability."""
    if p <= 0.0:
        return logits.clone()
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), _NEG_INF)  # the most probable token always stays


def typical_filter(logits: Tensor, p: float) -> Tensor:
    """Locally typical filter (HF `TypicalLogitsWarper`): rank tokens by |-log prob - entropy| and keep the
    best-ranked ones until their probability mass reaches `p`."""
    if p >= 1.0:
        return logits.clone()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp * logp.exp()).nansum()
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = shifted.sort(stable=True)
    cumulative = logits[order].softmax(-1).cumsum(-1)
    last = int((cumulative < p).sum().clamp(max=logits.shape[-1] - 1))
    drop = shifted > sorted_shifted[last]
    drop[order[0]] = False
    return logits.masked_fill(drop, _NEG_INF)


# ---------------------------------------------------------------------------------------------- the sampler


class Sampler:
    """Chooses next tokens for one sequence, with its own seeded `torch.Generator`.

    Call it with the step's logits (shape [vocab], any float dtype, any device), the prompt ids and the ids
    generated so far; it returns the next token id. Work happens in float32 on the CPU so that a given seed
    gives the same tokens whatever device produced the logits. `seed_used` is the seed actually in effect
    (drawn from the OS when `params.seed` is None) so it can be reported back to the client.
    """

    def __init__(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Sampler needs SamplingParams, got {type(params).__name__}")
        self.params = params
        self.seed_used: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed_used)

    def _penalised(self, logits: Tensor, prompt_ids: Ids, generated_ids: Ids) -> Tensor:
        p = self.params
        x = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        x = x.masked_fill(torch.isnan(x), _NEG_INF)  # a NaN logit is never chosen
        frequency_or_presence = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        if p.repetition_penalty != 1.0 or frequency_or_presence:
            generated = _ids_tensor(generated_ids, x.numel())
            if p.repetition_penalty != 1.0:
                seen = torch.cat([_ids_tensor(prompt_ids, x.numel()), generated])
                x = apply_repetition_penalty(x, seen, p.repetition_penalty)
            if frequency_or_presence:
                x = apply_frequency_presence(x, generated, p.frequency_penalty, p.presence_penalty)
        return x

    def _candidates(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Temperature and filters on penalised logits `x`. Returns the surviving tokens' logits and their ids
        (None: all of `x`, in order). Only the survivors of top-k are processed further, and only top-p sorts."""
        p = self.params
        best = int(x.argmax())
        x = x / p.temperature
        ids = None
        if 0 < p.top_k < x.numel():
            ids = torch.nonzero(x >= torch.topk(x, p.top_k).values[-1]).flatten()  # ties with the k-th stay
            x = x[ids]
        x = typical_filter(x, p.typical_p) if p.typical_p < 1.0 else x
        if p.top_p < 1.0:
            x, order = x.sort(descending=True, stable=True)
            ids = order if ids is None else ids[order]
            x = _top_p_sorted(x, p.top_p)
        x = min_p_filter(x, p.min_p) if p.min_p > 0.0 else x
        if not math.isfinite(float(x.max())):  # NaN propagates through max; +inf; or everything -inf
            # Degenerate input (all -inf, +inf, or overflow from a tiny temperature): fall back to the argmax.
            return torch.zeros(1), torch.tensor([best])
        keep = torch.nonzero(~torch.isneginf(x)).flatten()
        if keep.numel() < x.numel():  # drop filtered tokens: multinomial then works on far fewer entries
            x, ids = x[keep], keep if ids is None else ids[keep]
        return x, ids

    def process(self, logits: Tensor, prompt_ids: Ids = (), generated_ids: Ids = ()) -> Tensor:
        """Return the final float32 logits [vocab] that sampling draws from (filtered entries are -inf).

        Penalties are applied first; in greedy mode that is all. Otherwise the logits are divided by the
        temperature and filtered by top-k, typical-p, top-p and min-p, in that order. Never contains NaN;
        when sampling, at least one entry is finite (degenerate input keeps only the argmax).
        """
        x = self._penalised(logits, prompt_ids, generated_ids)
        if self.params.greedy:
            return x
        values, ids = self._candidates(x)
        if ids is None:
            return values
        out = torch.full_like(x, _NEG_INF)
        out[ids] = values
        return out

    @property
    def picks_argmax(self) -> bool:
        """Whether this sampler's choice is just the argmax of the logits (greedy, no penalties), NaN counted as
        -inf and the first maximum on ties: a caller that already has that index may use it instead of calling."""
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and p.frequency_penalty == p.presence_penalty == 0.0

    def __call__(self, logits: Tensor, prompt_ids: Ids = (), generated_ids: Ids = ()) -> int:
        """Return the next token id for this sequence."""
        if self.picks_argmax:
            # one pass over the vocabulary: decode steps are short (numpy's argmax of a 32k-entry fp32 row on the
            # CPU: ~6 us; torch's: ~50-80 us). Both return the first maximum, or the first NaN.
            cpu_fp32 = logits.device.type == "cpu" and logits.dtype == torch.float32
            best = int(logits.detach().numpy().argmax() if cpu_fp32 else logits.argmax())
            if not math.isnan(float(logits.reshape(-1)[best])):  # argmax picks a NaN when there is one
                return best
        x = self._penalised(logits, prompt_ids, generated_ids)
        if self.params.greedy:
            return int(x.argmax())
        values, ids = self._candidates(x)
        pick = int(torch.multinomial(values.softmax(-1), 1, generator=self.generator))
        return pick if ids is None else int(ids[pick])
