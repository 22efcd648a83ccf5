"""The continuous-batching engine: same tokens as the library whatever runs beside a request, cancellation,
back-pressure, failures that stay with their own request, statistics."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from mixtral import generate, kernels, load
import mixtral.engine as engine_module
from mixtral.engine import Engine, Overloaded
from mixtral.errors import MixtralError
from mixtral.generate import stream_generate
from mixtral.kernels.native import PROMPT_ROWS_MAX
from mixtral.sampling import SamplingParams

PROMPTS = ["To be", "Now is the winter of our discontent", "O", "Friends, Romans, countrymen, lend me your ears",
           "Who goes there?", "A horse! a horse! my kingdom for a horse!"]


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float32-torch"])
def loaded(tiny_chat_model, request):
    """fp32 and bf16 on the CPU kernels (kernels/native.py, else kernels/fbgemm.py), and fp32 on plain torch ops
    (pack=False)."""
    dtype, _, plain = request.param.partition("-")
    return load(tiny_chat_model, dtype=dtype, progress=False, pack=not plain)


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16)
    yield engine
    engine.close()


def run(handle, timeout=60):
    events = list(handle.events(timeout=timeout))
    return [e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events), events[-1]


def test_greedy_batched_equals_alone_and_library(engine, loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    lengths = [5, 17, 9, 12, 3, 20]  # rows finish at different steps; 6 requests > 3 slots: some wait
    alone = [run(engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n))) for p, n in zip(prompts, lengths)]
    handles = [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    together = [run(h) for h in handles]
    for (ids_a, text_a, _), (ids_b, text_b, last_b), prompt, n in zip(alone, together, prompts, lengths):
        assert ids_a == ids_b and text_a == text_b
        assert text_a == generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=n))
        assert last_b.finish_reason == "length" and last_b.generated_tokens == n == len(ids_b)
        assert last_b.prompt_tokens == len(prompt) and last_b.seed is None
    stats = engine.stats()
    assert stats["requests"]["finished"] == 12 and stats["tokens_generated"] == 2 * sum(lengths)
    assert stats["active"] == 0 and stats["queue_time_seconds"]["count"] == 12
    first, queued = stats["time_to_first_token_seconds"], stats["queue_time_seconds"]
    assert first["count"] == 12 and first["sum"] > queued["sum"]  # admission comes before the first token


def test_short_prompts_ride_in_the_decode_pass_with_their_own_numbers(engine, loaded, monkeypatch):
    """On our kernels a short prompt rides in the pass of the running requests' decode tokens (no pass of its own),
    each of its tokens computed as a decode row: its tokens and log-probs are the same, bit for bit, as alone."""
    model, tokenizer = loaded
    rides = engine.runner.feeds(engine.cache, 8)
    assert rides == (engine.runner.name == "native")  # (torch's runner prefills each prompt in a pass of its own)
    passes, real_feed = [], engine.runner.feed

    def feed(cache, inputs, starts, rows):
        passes.append([len(ids) for ids in inputs])
        return real_feed(cache, inputs, starts, rows)

    monkeypatch.setattr(engine.runner, "feed", feed)
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS[:5]]
    lengths = [4, 9, 14, 6, 11]  # 5 requests, 3 slots: the last two start while the others decode

    def logprobs(events):
        return [e.logprob for e in events if e.token_id is not None]

    alone = []
    for p, n in zip(prompts, lengths):
        alone.append([e for e in engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n)).events(60)])
    assert passes == ([[len(p)] for p in prompts] if rides else [])  # alone: each prompt a pass of its own
    passes.clear()
    handles = [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    together = [list(h.events(60)) for h in handles]
    with pytest.raises(ValueError if rides else NotImplementedError):  # more tokens than a pass of decode rows takes
        real_feed(engine.cache, [[5] * (PROMPT_ROWS_MAX + 1), [5]], [0, 0], [0, 1])
    if not rides:
        assert passes == []
        return
    for a, b in zip(alone, together):
        assert [e.token_id for e in a] == [e.token_id for e in b] and logprobs(a) == logprobs(b)
    assert any(1 in sizes and max(sizes) > 1 for sizes in passes), passes  # a prompt beside decode tokens
    assert sum(size for sizes in passes for size in sizes if size > 1) == sum(map(len, prompts))


def test_seeded_sampling_and_stop_rules_match_the_library(engine, loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Who goes there?", add_bos=True)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_new_tokens=24)
    library = list(stream_generate(model, tokenizer, prompt, params))
    others = [engine.submit(tokenizer.encode(p, add_bos=True), SamplingParams(temperature=1.0, max_new_tokens=30))
              for p in PROMPTS[:2]]
    ids, text, last = run(engine.submit(prompt, params))
    assert ids == [e.token_id for e in library] and text == "".join(e.text for e in library)
    assert last.seed == 42
    # a stop string taken from the middle of that text ends it there, as in the library
    stop = text[len(text) // 2: len(text) // 2 + 3]
    ids_stop, text_stop, last_stop = run(engine.submit(prompt, params.replace(stop=(stop,))))
    library_stop = list(stream_generate(model, tokenizer, prompt, params.replace(stop=(stop,))))
    assert last_stop.finish_reason == "stop_sequence" == library_stop[-1].finish_reason
    assert text_stop == "".join(e.text for e in library_stop) and stop not in text_stop
    for handle in others:  # sampled without a seed beside it: they end normally (an EOS may be drawn)
        assert run(handle)[2].finish_reason in ("length", "eos_token")


def test_chunked_prefill_gives_the_same_tokens(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode(" ".join(PROMPTS), add_bos=True)
    assert len(prompt) > 30
    engine = Engine(model, tokenizer, max_batch_size=2, prefill_chunk=7)
    try:
        ids, text, _ = run(engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=10)))
    finally:
        engine.close()
    assert text == generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=10))


def test_a_request_gets_the_same_numbers_alone_or_beside_others(loaded):
    """Batch invariance (README): a prompt is cut into chunks at multiples of prefill_chunk whatever is prefilled
    beside it, so its first token's numbers are the same alone or not, on every path; on the CPU kernels every
    decode row is computed as at batch 1, so the whole seeded reply and its log-probs are identical too."""
    model, tokenizer = loaded
    prompt = tokenizer.encode(" ".join(PROMPTS[1:4]), add_bos=True)
    other = tokenizer.encode(PROMPTS[1], add_bos=True)  # 9 tokens: its second chunk leaves part of a step's budget
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=16)
    engine = Engine(model, tokenizer, max_batch_size=3, prefill_chunk=7)
    try:
        alone = list(engine.submit(prompt, params).events(timeout=60))
        beside = [engine.submit(other, SamplingParams(temperature=1.0, seed=1, max_new_tokens=20)),
                  engine.submit(prompt, params)]
        together = list(beside[1].events(timeout=60))
        run(beside[0])
    finally:
        engine.close()
    assert alone[0].token_id == together[0].token_id and alone[0].logprob == together[0].logprob
    if kernels.runner(model).name == "native":
        assert [(e.token_id, e.logprob) for e in alone] == [(e.token_id, e.logprob) for e in together]


def test_cancel_frees_the_slot_at_the_next_step(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1)
    try:
        prompt = tokenizer.encode("To be", add_bos=True)
        long = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=400))
        events = long.events(timeout=30)
        first = [next(events) for _ in range(3)]
        long.cancel()
        rest = list(events)
        assert rest[-1].error_type == "cancelled" and first[-1].generated_tokens == 3
        # stopped within a few steps: a step of this tiny model is ~0.3 ms, so the reader, which shares the GIL with
        # the worker, may see the cancel land some steps after the third event; never near the 400 asked for
        assert rest[-1].generated_tokens <= 40
        _, _, last = run(engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=4)))  # the slot is free
        assert last.finish_reason == "length"
        assert engine.stats()["requests"]["cancelled"] == 1
    finally:
        engine.close()


def test_overload_is_refused_and_counted(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2)
    try:
        prompt = tokenizer.encode("O", add_bos=True)
        # long enough that neither can finish between these submissions (20 tokens once did, on a quiet machine)
        handles = [engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=200)) for _ in range(2)]
        with pytest.raises(Overloaded, match="overloaded"):
            engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=20))
        assert all(run(h)[2].finish_reason == "length" for h in handles)
        assert engine.stats()["requests"] == {"finished": 2, "cancelled": 0, "failed": 0, "rejected": 1}
        run(engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=2)))  # room again
    finally:
        engine.close()


def test_invalid_submissions(engine, loaded):
    _, tokenizer = loaded
    with pytest.raises(MixtralError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(MixtralError, match="max_total_tokens"):
        engine.submit([1] * 500, SamplingParams(max_new_tokens=20))
    with pytest.raises(MixtralError, match="token ids"):
        engine.submit([1, 10**6], SamplingParams(max_new_tokens=2))


def test_a_failing_request_fails_alone(engine, loaded, monkeypatch):
    model, tokenizer = loaded
    poison = tokenizer.encode("poison", add_bos=True)
    real_forward = engine._forward_decode

    def forward(rows, riders=()):  # a decode pass that breaks whenever the poisoned prompt is in it
        if any(r.prompt_ids == poison for r in [*rows, *riders]):
            raise RuntimeError("simulated device error")
        return real_forward(rows, riders)

    monkeypatch.setattr(engine, "_forward_decode", forward)
    good = [tokenizer.encode(p, add_bos=True) for p in PROMPTS[:2]]
    expected = [generate(model, tokenizer, p, SamplingParams(temperature=0, max_new_tokens=8)) for p in good]
    handles = [engine.submit(p, SamplingParams(temperature=0, max_new_tokens=8)) for p in (good[0], poison, good[1])]
    results = [run(h) for h in handles]
    assert results[1][2].error_type == "generation" and "simulated device error" in results[1][2].error
    assert results[1][2].finish_reason is None
    assert [results[0][1], results[2][1]] == expected
    # a sampler that raises also fails only its own request, and the worker lives on
    monkeypatch.setattr(engine, "_forward_decode", real_forward)
    real_sampler = engine_module.Sampler

    class Broken:  # a sampler that divides by zero (and does not take the greedy choice the step computed)
        picks_argmax = False

        def __call__(self, *args):
            return 1 / 0

    def sampler(params):  # the request with seed 666 gets the broken sampler
        return Broken() if params.seed == 666 else real_sampler(params)

    monkeypatch.setattr(engine_module, "Sampler", sampler)
    bad = engine.submit(good[0], SamplingParams(temperature=0, max_new_tokens=8, seed=666))
    assert "ZeroDivisionError" in run(bad)[2].error
    assert run(engine.submit(good[1], SamplingParams(temperature=0, max_new_tokens=8)))[1] == expected[1]
    assert engine.alive and engine.stats()["requests"]["failed"] == 2


def test_async_events_logprobs_and_alternatives(engine, loaded):
    model, tokenizer = loaded
    prompt = tokenizer.encode("Who goes there?", add_bos=True)

    async def consume():
        handle = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=5), top_n=3, prompt_logprobs=True)
        return [event async for event in handle.aevents()]

    events = asyncio.run(consume())
    ids = [e.token_id for e in events]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + ids])).float(), dim=-1)[0]
    expected = logprobs[len(prompt) - 1: -1].gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([e.logprob for e in events]), expected, atol=1e-4)
    assert all(len(e.top_tokens) == 3 and e.top_tokens[0][0] == e.token_id for e in events)  # greedy = best
    prompt_lp = events[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
    wanted = logprobs[: len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(prompt_lp[1:]), wanted, atol=1e-4)


def test_an_abandoned_async_reader_cancels(engine, loaded):
    _, tokenizer = loaded
    prompt = tokenizer.encode("To be", add_bos=True)

    async def read_two():
        handle = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=400))
        async for event in handle.aevents():
            if event.generated_tokens == 2:
                break
        return handle

    handle = asyncio.run(read_two())
    assert handle.cancelled
    deadline = time.time() + 30
    while engine.stats()["requests"]["cancelled"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["requests"]["cancelled"] == 1 and engine.stats()["active"] == 0


def test_close_ends_waiting_requests(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1)
    prompt = tokenizer.encode("O", add_bos=True)
    handles = [engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=300)) for _ in range(3)]
    engine.close()
    assert not engine.alive
    assert all(list(h.events(timeout=10))[-1].done for h in handles)
    with pytest.raises(MixtralError, match="closed"):
        engine.submit(prompt, SamplingParams())
