"""Tests for mixtral.sampling: parameter validation, each filter/penalty against hand-built distributions and
against the transformers logits processors, seeding, and the sampler's empirical distribution."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from mixtral.errors import MixtralError
from mixtral.sampling import (
    Sampler,
    SamplingParams,
    apply_frequency_presence,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

try:  # the reference implementation; only the comparison tests need it
    import transformers.generation.logits_process as hf
except ImportError:  # pragma: no cover
    hf = None
needs_hf = pytest.mark.skipif(hf is None, reason="transformers is not installed")

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
HAND = torch.tensor(PROBS).log()
SEEDS = [0, 1, 2, 3]


def kept(logits: torch.Tensor) -> set[int]:
    assert not torch.isnan(logits).any()
    return set(torch.nonzero(~torch.isneginf(logits)).flatten().tolist())


def random_logits(seed: int, vocab: int = 1000, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same kept set, identical kept values, everything else -inf."""
    ref = ref.reshape(-1)
    assert kept(ours) == kept(ref)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
    finite = ~torch.isneginf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- hand-built


def test_top_k_keeps_exactly_the_best():
    assert kept(top_k_filter(HAND, 2)) == {0, 1}
    assert kept(top_k_filter(HAND, 1)) == {0}
    assert kept(top_k_filter(HAND, 0)) == set(range(5))
    assert kept(top_k_filter(HAND, 99)) == set(range(5))
    out = top_k_filter(HAND, 3)
    assert torch.equal(out[:3], HAND[:3]) and out is not HAND


def test_top_p_smallest_set_reaching_p():
    assert kept(top_p_filter(HAND, 0.7)) == {0, 1}
    assert kept(top_p_filter(HAND, 0.71)) == {0, 1, 2}
    assert kept(top_p_filter(HAND, 0.5)) == {0}
    assert kept(top_p_filter(HAND, 1e-9)) == {0}
    assert kept(top_p_filter(HAND, 1.0)) == set(range(5))
    shuffled = HAND[torch.tensor([3, 0, 4, 2, 1])]  # order of the vocabulary does not matter
    assert kept(top_p_filter(shuffled, 0.7)) == {1, 4}


def test_min_p_relative_to_max():
    assert kept(min_p_filter(HAND, 0.3)) == {0, 1, 2}  # probs >= 0.15
    assert kept(min_p_filter(HAND, 0.5)) == {0}
    assert kept(min_p_filter(HAND, 0.0)) == set(range(5))
    assert kept(min_p_filter(HAND, 0.99)) == {0}


def test_typical_hand():
    # entropy of PROBS ~ 1.39 nats; |-log p - H| ranks 0.2 (1.61), 0.15 (1.90), 0.5 (0.69), ...
    assert kept(typical_filter(HAND, 0.1)) == {1}
    assert kept(typical_filter(HAND, 0.3)) == {1, 2}
    assert kept(typical_filter(HAND, 1.0)) == set(range(5))


def test_sampler_filters_hand():
    def process(**kw):
        return Sampler(SamplingParams(seed=0, **kw)).process(HAND)

    assert kept(process(top_k=2)) == {0, 1}
    assert kept(process(top_p=0.7)) == {0, 1}
    assert kept(process(top_p=0.71)) == {0, 1, 2}
    assert kept(process(min_p=0.3)) == {0, 1, 2}
    assert kept(process(top_k=4, top_p=0.71, min_p=0.35)) == {0, 1}


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(do_sample=False, top_k=3)])
def test_greedy_picks_argmax(params):
    assert params.greedy
    logits = HAND[torch.tensor([3, 0, 4, 2, 1])]
    assert Sampler(params)(logits, [], []) == 1
    assert Sampler(params)(torch.tensor([1.0, 3.0, 3.0, 2.0])) == 1  # ties: lowest index
    # penalties still apply in greedy mode
    pen = params.replace(repetition_penalty=10.0)
    assert Sampler(pen)(torch.tensor([3.0, 2.0, 1.0]), [0], []) == 1
    assert not SamplingParams().greedy


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, PROBS),
        ({"top_p": 0.71}, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        ({"top_k": 2}, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        ({"min_p": 0.3, "temperature": 2.0}, None),
    ],
)
def test_empirical_frequencies(kw, expected):
    params = SamplingParams(seed=1234, **kw)
    if expected is None:  # temperature 2: probs ∝ sqrt(p) over {0, 1, 2} (min_p applies after temperature)
        w = torch.tensor(PROBS).sqrt()
        w[w < 0.3 * w.max()] = 0
        expected = (w / w.sum()).tolist()
    sampler = Sampler(params)
    n = 4000
    counts = Counter(sampler(HAND, [], []) for _ in range(n))
    for token, p in enumerate(expected):
        if p == 0:
            assert counts[token] == 0
        else:
            assert abs(counts[token] / n - p) < 0.03, (token, counts[token] / n, p)


# ---------------------------------------------------------------------------------------------- vs transformers


def run_hf(processor, logits: torch.Tensor, input_ids=None) -> torch.Tensor:
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    return processor(ids, logits.clone().unsqueeze(0))[0]


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5, 50, 999, 1000])
def test_top_k_matches_hf(seed, k):
    x = random_logits(seed)
    assert_same(top_k_filter(x, k), run_hf(hf.TopKLogitsWarper(k), x))


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.99])
def test_top_p_matches_hf(seed, p):
    x = random_logits(seed)
    assert_same(top_p_filter(x, p), run_hf(hf.TopPLogitsWarper(p), x))


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.001, 0.05, 0.2, 0.6, 0.95])
def test_min_p_matches_hf(seed, p):
    x = random_logits(seed)
    assert_same(min_p_filter(x, p), run_hf(hf.MinPLogitsWarper(p), x))


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 0.999])
def test_typical_matches_hf(seed, p):
    x = random_logits(seed, scale=1.5)
    assert_same(typical_filter(x, p), run_hf(hf.TypicalLogitsWarper(p), x))


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.1, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    x = random_logits(seed)
    ids = torch.randint(0, 1000, (60,), generator=torch.Generator().manual_seed(seed + 100)).tolist()
    ours = apply_repetition_penalty(x, ids, penalty)
    ref = run_hf(hf.RepetitionPenaltyLogitsProcessor(penalty), x, ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # through the sampler (greedy mode returns the penalised logits), prompt and generated both count
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=penalty))
    torch.testing.assert_close(sampler.process(x, ids[:25], torch.tensor(ids[25:])), ref, rtol=0, atol=0)


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(seed, t):
    x = random_logits(seed)
    assert_same(Sampler(SamplingParams(temperature=t)).process(x), run_hf(hf.TemperatureLogitsWarper(t), x))


@needs_hf
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.8, "top_k": 40, "top_p": 0.9},
        {"temperature": 1.3, "top_k": 200, "typical_p": 0.8, "top_p": 0.95, "min_p": 0.05},
        {"temperature": 0.5, "typical_p": 0.5, "min_p": 0.1, "repetition_penalty": 1.3},
        {"temperature": 1.0, "top_p": 0.6, "min_p": 0.02, "repetition_penalty": 0.8},
    ],
)
def test_full_chain_matches_hf(seed, kw):
    x = random_logits(seed, scale=2.0)
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(**kw)
    chain = [hf.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)]
    chain.append(hf.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(hf.TopKLogitsWarper(params.top_k))
    if params.typical_p < 1:
        chain.append(hf.TypicalLogitsWarper(params.typical_p))
    if params.top_p < 1:
        chain.append(hf.TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        chain.append(hf.MinPLogitsWarper(params.min_p))
    ref = x
    for proc in chain:
        ref = run_hf(proc, ref, ids)
    assert_same(Sampler(params).process(x, ids[:10], ids[10:]), ref)


# ---------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_semantics():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.0])
    out = apply_repetition_penalty(x, [0, 1, 1, 4, 7, -1], 2.0)  # ids outside the vocab are ignored
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.0]
    assert apply_repetition_penalty(x, [0, 1], 0.5).tolist() == [4.0, -1.0, 1.0, -1.0, 0.0]
    assert apply_repetition_penalty(x, [], 2.0).tolist() == x.tolist()
    assert x.tolist() == [2.0, -2.0, 1.0, -1.0, 0.0]  # input untouched


def test_frequency_presence_semantics():
    x = torch.zeros(4)
    out = apply_frequency_presence(x, [1, 1, 2], 0.5, 0.25)
    assert out.tolist() == [0.0, -1.25, -0.75, 0.0]
    assert apply_frequency_presence(x, torch.tensor([3]), -1.0, 0.0).tolist() == [0.0, 0.0, 0.0, 1.0]
    # in the sampler they count generated ids only (not the prompt)
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5))
    assert sampler.process(x, [0, 0, 0], [1, 1, 2]).tolist() == [0.0, -2.5, -1.5, 0.0]


def test_frequency_presence_vs_counter_reference():
    x = random_logits(7, vocab=300)
    ids = torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(7)).tolist()
    ref = x.clone()
    for token, count in Counter(ids).items():
        ref[token] -= 0.7 * count + 1.5
    torch.testing.assert_close(apply_frequency_presence(x, ids, 0.7, 1.5), ref)


# ---------------------------------------------------------------------------------------------- seeding, robustness


def draw(sampler: Sampler, steps: int = 40) -> list[int]:
    out: list[int] = []
    for step in range(steps):
        out.append(sampler(random_logits(step, scale=1.0), [5, 6], out))
    return out


def test_same_seed_same_tokens_different_seed_differs():
    params = SamplingParams(seed=42, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2)
    a, b = draw(Sampler(params)), draw(Sampler(params))
    assert a == b
    assert draw(Sampler(params.replace(seed=43))) != a
    assert Sampler(params).seed_used == 42


def test_seed_none_is_random_and_reported():
    s1, s2 = Sampler(SamplingParams()), Sampler(SamplingParams())
    assert isinstance(s1.seed_used, int) and 0 <= s1.seed_used < 2**63
    assert s1.seed_used != s2.seed_used
    assert draw(s1) == draw(Sampler(SamplingParams(seed=s1.seed_used)))


def test_never_nan_and_degenerate_inputs():
    sampler = Sampler(SamplingParams(seed=0, top_p=0.5, min_p=0.5, top_k=3, typical_p=0.2))
    for seed in range(20):
        out = sampler.process(random_logits(seed))
        assert not torch.isnan(out).any() and len(kept(out)) >= 1
    all_masked = torch.full((8,), float("-inf"))
    assert sampler(all_masked) == 0 and not torch.isnan(sampler.process(all_masked)).any()
    with_nan = torch.tensor([float("nan"), 1.0, 5.0, float("nan")])
    assert all(Sampler(SamplingParams(seed=s))(with_nan) in (1, 2) for s in range(20))
    tiny_t = Sampler(SamplingParams(temperature=1e-40, seed=0))  # overflows to inf: falls back to argmax
    assert tiny_t(torch.tensor([1.0, 3.0, -2.0])) == 1
    assert kept(tiny_t.process(torch.tensor([1.0, 3.0, -2.0]))) == {1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_and_large_vocab(dtype):
    x = random_logits(3, vocab=32000).to(dtype)
    sampler = Sampler(
        SamplingParams(
            seed=9,
            top_k=50,
            top_p=0.9,
            min_p=0.01,
            typical_p=0.95,
            repetition_penalty=1.2,
            presence_penalty=0.5,
        )
    )
    out = sampler.process(x, torch.arange(100), list(range(50, 150)))
    assert out.dtype == torch.float32 and out.shape == (32000,)
    assert 1 <= len(kept(out)) <= 50
    token = sampler(x, torch.arange(100), list(range(50, 150)))
    assert token in kept(out)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "0.5"),
        ("temperature", 101.0),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -5),
        ("top_k", 2.5),
        ("top_k", "3"),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("typical_p", 0),
        ("typical_p", 1.01),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1),
        ("repetition_penalty", float("inf")),
        ("frequency_penalty", 3),
        ("presence_penalty", -2.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", 1.0),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", 5),
        ("do_sample", "yes"),
        ("temperature", 10**400),
    ],
)
def test_invalid_params_raise(field, value):
    with pytest.raises(MixtralError) as err:
        SamplingParams(**{field: value})
    msg = str(err.value)
    assert field in msg
    if not isinstance(value, list):
        assert repr(value) in msg
    with pytest.raises(MixtralError, match=field):
        SamplingParams().replace(**{field: value})


def test_error_message_shape():
    with pytest.raises(MixtralError, match=r"^temperature must be a finite number in \[0, 100\], got nan$"):
        SamplingParams(temperature=math.nan)


def test_valid_params_and_normalisation():
    p = SamplingParams(
        temperature=0,
        top_p=1,
        min_p=0,
        frequency_penalty=-2,
        presence_penalty=2,
        stop=["</s>", "\n\n"],
        seed=2**63 - 1,
        max_new_tokens=1,
        top_k=0,
    )
    assert p.stop == ("</s>", "\n\n") and isinstance(p.temperature, float) and p.temperature == 0.0
    assert SamplingParams(temperature=100).temperature == 100.0
    assert SamplingParams(stop="END").stop == ("END",)
    q = p.replace(temperature=0.7)
    assert q.temperature == 0.7 and q.stop == p.stop and p.temperature == 0.0
    with pytest.raises(MixtralError, match="unknown"):
        p.replace(temprature=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    assert SamplingParams() == SamplingParams(stop=[])


def test_from_generation_config_layers_defaults_then_the_file_then_overrides(tmp_path):
    import json

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.5, "top_k": 4, "do_sample": False, "max_new_tokens": None, "typical_p": 0.3,
         "eos_token_id": 2}))
    base = SamplingParams(top_p=0.9, max_new_tokens=10)
    p = SamplingParams.from_generation_config(tmp_path, base)
    assert (p.temperature, p.top_k, p.do_sample, p.top_p, p.max_new_tokens, p.typical_p) == (
        0.5, 4, False, 0.9, 10, 1.0)  # typical_p is not read from the file
    p = SamplingParams.from_generation_config(tmp_path, base, top_k=None, temperature=0.7)
    assert (p.top_k, p.temperature, p.do_sample) == (4, 0.7, True)  # an explicit temperature > 0 samples
    assert SamplingParams.from_generation_config(tmp_path, temperature=0.7, do_sample=False).greedy
    assert SamplingParams.from_generation_config(tmp_path, temperature=0.0).greedy
    assert SamplingParams.from_generation_config(None, seed=3) == SamplingParams(seed=3)
    with pytest.raises(MixtralError, match="unknown sampling parameter"):
        SamplingParams.from_generation_config(None, topk=3)
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(MixtralError, match="JSON object"):
        SamplingParams.from_generation_config(tmp_path)
