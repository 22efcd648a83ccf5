"""Prefix reuse (prefix_cache.py): a prompt that starts like an earlier sequence prefills only the rest, and gets the
tokens and log-probs that prefilling all of it gives. The reference is the same engine without the cache."""

from __future__ import annotations

import pytest
import torch

from mixtral import load
from mixtral.engine import Engine
from mixtral.errors import MixtralError
from mixtral.generate import stream_generate
from mixtral.prefix_cache import MIN_TOKENS, PrefixCache
from mixtral.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module", params=["bfloat16", "float32-torch"])
def loaded(tiny_chat_model, request):
    """bf16 weights on our exact fp32 kernels, and fp32 on plain torch ops."""
    dtype, _, plain = request.param.partition("-")
    return load(tiny_chat_model, dtype=dtype, progress=False, pack=not plain, exact=True)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine, prompt, params=GREEDY):
    events = list(engine.submit(prompt, params).events(timeout=120))
    assert events[-1].error is None, events[-1].error
    return [e.token_id for e in events], [e.logprob for e in events], events[-1].cached_tokens


@pytest.fixture
def engines(loaded):
    model, tokenizer = loaded
    made = [Engine(model, tokenizer, max_batch_size=2, prefill_chunk=32, prefix_cache_bytes=size)
            for size in (64 << 20, 0)]
    yield made
    for engine in made:
        engine.close()


def _same(result, reference):
    assert result[0] == reference[0]
    assert max(abs(a - b) for a, b in zip(result[1], reference[1])) < 1e-4


def test_the_next_turn_reuses_the_conversation_and_answers_the_same(engines):
    cached, plain = engines
    first = _ids(70, 1)
    tokens, _, reused = _run(cached, first)
    assert reused == 0
    follow = first + tokens + _ids(9, 2)  # the reply (its last token never fed) and a new message
    result = _run(cached, follow)
    assert result[2] == len(first) + len(tokens) - 1  # everything the first request's row held
    _same(result, _run(plain, follow))
    assert _run(plain, follow)[2] == 0
    stats = cached.stats()["prefix_cache"]
    assert stats["hits"] == 1 and stats["hit_tokens"] == result[2] and stats["entries"] == 1  # the turn superseded


def test_an_identical_prompt_still_runs_its_last_token(engines):
    cached, plain = engines
    prompt = _ids(40, 3)
    _run(cached, prompt)
    result = _run(cached, prompt)
    assert result[2] == len(prompt) - 1
    _same(result, _run(plain, prompt))


def test_a_prefix_ending_anywhere_and_a_cached_sequence_longer_than_the_prompt(engines):
    cached, plain = engines
    long = _ids(90, 4)
    _run(cached, long)
    shorter = long[:37]  # the cached sequence is longer than this prompt: all but its last token reused
    result = _run(cached, shorter)
    assert result[2] == 36
    _same(result, _run(plain, shorter))
    diverging = long[:53] + _ids(20, 5)  # shares 53 tokens, then differs (mid-way through any block size)
    result = _run(cached, diverging)
    assert result[2] == 53
    _same(result, _run(plain, diverging))


def test_a_request_cancelled_mid_prefill_leaves_only_what_it_computed(engines, monkeypatch):
    cached, plain = engines
    prompt = _ids(150, 6)
    original = cached._prefill
    handles = []

    def prefill_then_cancel(request):  # cancel after the second chunk of 32
        done = original(request)
        if request.prefilled >= 64:
            handles[0].cancel()
        return done

    monkeypatch.setattr(cached, "_prefill", prefill_then_cancel)
    handles.append(cached.submit(prompt, GREEDY))
    events = list(handles[0].events(timeout=120))
    assert events[-1].error_type == "cancelled"
    monkeypatch.setattr(cached, "_prefill", original)
    result = _run(cached, prompt)
    assert 64 <= result[2] < len(prompt) - 1  # what the cancelled request had prefilled, no more
    _same(result, _run(plain, prompt))


def test_eviction_within_the_budget_never_touches_a_running_sequence(loaded):
    model, tokenizer = loaded
    per_token = 2 * model.args.n_layers * model.args.n_kv_heads * model.args.head_dim * 4
    budget = 100 * per_token  # one sequence of up to 100 positions
    with_cache = Engine(model, tokenizer, max_batch_size=2, prefix_cache_bytes=budget)
    plain = Engine(model, tokenizer, max_batch_size=2)
    try:
        a = _ids(60, 7)
        _run(with_cache, a)
        long_reply = SamplingParams(temperature=0, max_new_tokens=30)
        b = a + _ids(5, 8)
        running = with_cache.submit(b, long_reply)  # starts from a's entry
        other = _run(with_cache, _ids(70, 9))  # its entry evicts a's while b runs
        events = list(running.events(timeout=120))
        assert events[-1].cached_tokens == 60
        reference = list(plain.submit(b, long_reply).events(timeout=120))
        assert [e.token_id for e in events] == [e.token_id for e in reference]
        assert other[2] == 0
        stats = with_cache.stats()["prefix_cache"]
        assert stats["evictions"] >= 1 and stats["bytes"] <= budget
    finally:
        with_cache.close()
        plain.close()


def test_prompt_logprobs_requests_prefill_everything(engines):
    cached, _ = engines
    prompt = _ids(50, 10)
    _run(cached, prompt)
    events = list(cached.submit(prompt, GREEDY, prompt_logprobs=True).events(timeout=120))
    assert events[-1].cached_tokens == 0 and len(events[0].prompt_logprobs) == len(prompt)


def test_the_cache_alone_keeps_its_budget_and_skips_short_sequences(loaded):
    from mixtral.kv_cache import KVCache

    model, _ = loaded
    cache = KVCache(model.args, 1, 256, model.activation_dtype)
    for layer in range(model.args.n_layers):
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
    per_token = 2 * model.args.n_layers * model.args.n_kv_heads * model.args.head_dim * cache.keys[0].element_size()
    prefix = PrefixCache(150 * per_token)
    assert not prefix.store(_ids(MIN_TOKENS - 1, 1), cache, 0)
    assert prefix.store(_ids(100, 1), cache, 0) and not prefix.store(_ids(200, 2), cache, 0)  # over the budget
    assert prefix.store(_ids(80, 3), cache, 0)  # evicts the first
    assert prefix.stats()["evictions"] == 1 and prefix.stats()["bytes"] == 80 * per_token
    fresh = KVCache(model.args, 1, 256, model.activation_dtype)
    assert prefix.load(_ids(80, 3) + [5], fresh, 0) == 80
    assert torch.equal(fresh.keys[0][0, :, :80], cache.keys[0][0, :, :80])
    assert prefix.load(_ids(100, 1), fresh, 0) == 0  # evicted


def test_the_terminal_chat_path_reuses_the_last_turn(loaded):
    model, tokenizer = loaded
    prefix = PrefixCache(64 << 20)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    chat = [{"role": "user", "content": "Good morrow, my lord. What news from the court, and of the king's health?"}]
    first = tokenizer.apply_chat_template(chat)
    events = list(stream_generate(model, tokenizer, first, params, prefix=prefix))
    reply = "".join(e.text for e in events).strip() or "Aye."
    second = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": reply},
                                                   {"role": "user", "content": "And what of the queen?"}])
    reused = list(stream_generate(model, tokenizer, second, params, prefix=prefix))
    fresh = list(stream_generate(model, tokenizer, second, params))
    assert reused[-1].cached_tokens >= len(first) - 1 and fresh[-1].cached_tokens == 0
    assert [e.token_id for e in reused] == [e.token_id for e in fresh]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(reused, fresh)) < 1e-4


def test_the_server_reports_cached_tokens_and_counts_them(loaded):
    import httpx
    import openai
    from conftest import serve_in_thread

    from mixtral.server import create_app

    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=2, prefix_cache_bytes=64 << 20)
    try:
        with serve_in_thread(create_app(engine, "tiny")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            messages = [{"role": "system", "content": "Speak as the players at the Globe do, in verse or in prose."},
                        {"role": "user", "content": "Good morrow, my lord. What news from the court of the king?"}]
            first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
            assert first.usage.prompt_tokens_details.cached_tokens == 0
            messages += [{"role": "assistant", "content": first.choices[0].message.content or "Aye."},
                         {"role": "user", "content": "And of the queen?"}]
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
            usage = chunks[-1].usage
            assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
            metrics = httpx.get(f"{url}/metrics").text
            hit = next(line for line in metrics.splitlines() if line.startswith("mixtral_prefix_cache_hit_tokens"))
            assert float(hit.split()[-1]) == usage.prompt_tokens_details.cached_tokens
            assert "mixtral_prefix_cache_bytes" in metrics
    finally:
        engine.close()


def test_the_commands_take_the_prefix_cache_setting():
    from mixtral.cli import build_parser, load_options, prefix_cache_bytes

    parse = build_parser().parse_args
    assert prefix_cache_bytes(parse(["serve"])) == 512 << 20
    assert prefix_cache_bytes(parse(["serve", "--prefix-cache-memory", "0"])) == 0
    assert prefix_cache_bytes(parse(["serve", "--prefix-cache-memory", "0GiB"])) == 0
    with pytest.raises(MixtralError):
        prefix_cache_bytes(parse(["serve", "--prefix-cache-memory", "lots"]))
    assert prefix_cache_bytes(parse(["chat", "--prefix-cache-memory", "64MiB"])) == 64 << 20
    assert prefix_cache_bytes(parse(["ui", "--max-memory", "1GiB"])) == 64 << 20  # a 16th of the budget
    args = parse(["serve", "--max-memory", "2GiB", "--prefix-cache-memory", "1GiB"])
    assert load_options(args).max_memory == 1 << 30  # the rest is the model's
    assert prefix_cache_bytes(parse(["generate", "--prompt", "x"])) == 0
