"""Generation: the KV cache against full re-scoring, stop rules, seeds, streaming text."""

from __future__ import annotations

import torch
from conftest import make_hf_model, save_hf_model

from mixtral import generate, load, stream_generate
from mixtral.config import load_config
from mixtral.generate import generate_step
from mixtral.stopping import TextTracker
from mixtral.sampling import Sampler, SamplingParams
from mixtral.tokenizer import load_tokenizer, mistral_v1_tokenizer_path
from mixtral.weights import load_weights


def test_cached_logprobs_match_rescoring_without_cache(tmp_path):
    save_hf_model(make_hf_model(num_key_value_heads=2, sliding_window=12), tmp_path)
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, progress=False)
    prompt = torch.randint(3, 256, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = list(generate_step(model, [prompt], [Sampler(SamplingParams(temperature=1.0, seed=5))], 40))
    tokens = [s[0][0] for s in steps]
    cached_logprobs = torch.tensor([s[0][1] for s in steps])
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(full).float(), dim=-1)[0]
    rescored = logprobs[len(prompt) - 1: -1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert len(set(tokens)) > 5  # sampled, so the check covers many different tokens
    assert (rescored - cached_logprobs).abs().max().item() < 1e-4


def test_a_prompt_in_chunks_gives_what_it_gives_in_one_pass(tmp_path, monkeypatch):
    """generate_step prefills a long prompt PREFILL_CHUNK tokens at a time (the memory planner plans for the same
    size): two sequences of different lengths in chunks of 4 against one pass, the same tokens and log-probs."""
    import importlib

    from mixtral import memory_plan

    module = importlib.import_module("mixtral.generate")  # (the package's `generate` is the function)
    assert memory_plan.PROMPT_CHUNK == module.PREFILL_CHUNK
    save_hf_model(make_hf_model(num_key_value_heads=2, sliding_window=12), tmp_path)
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, progress=False)
    prompts = torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(3)).tolist()
    prompts[1] = prompts[1][:10]
    runs = []
    for chunk in (1 << 20, 4):
        monkeypatch.setattr(module, "PREFILL_CHUNK", chunk)
        samplers = [Sampler(SamplingParams(temperature=0)) for _ in prompts]
        runs.append(list(generate_step(model, prompts, samplers, 6)))
    whole, chunked = runs
    assert [[t for t, _ in step] for step in whole] == [[t for t, _ in step] for step in chunked]
    assert max(abs(a[1] - b[1]) for s, c in zip(whole, chunked) for a, b in zip(s, c)) < 1e-4


def test_same_seed_same_text_and_stream_matches_generate(tiny_chat_model):
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_new_tokens=24)
    first = generate(model, tokenizer, "Who goes there?", params)
    assert first == generate(model, tokenizer, "Who goes there?", params)
    other = generate(model, tokenizer, "Who goes there?", params.replace(seed=43))
    assert other != first
    events = list(stream_generate(model, tokenizer, "Who goes there?", params))
    assert "".join(e.text for e in events) == first
    assert events[-1].finish_reason in ("length", "eos_token") and all(e.finish_reason is None for e in events[:-1])
    assert events[-1].generated_tokens == len(events) and events[-1].prompt_tokens == len(
        tokenizer.encode("Who goes there?", add_bos=True))
    assert events[-1].generation_tps > 0 and events[-1].prompt_tps > 0


def test_batched_generate_equals_single(tiny_chat_model):
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompts = ["To be", "Now is the winter of our discontent", "O"]
    assert generate(model, tokenizer, prompts, params) == [generate(model, tokenizer, p, params) for p in prompts]


def _track(tokenizer, text, **params):
    tracker = TextTracker(tokenizer, SamplingParams(**params))
    deltas = []
    for token in tokenizer.encode(text) + [tokenizer.eos_id]:
        deltas.append(tracker.add(token))
        if tracker.finish_reason:
            break
    return deltas, tracker


def test_stop_rules():
    tokenizer = load_tokenizer(mistral_v1_tokenizer_path())
    deltas, tracker = _track(tokenizer, "Hello, world. Ending here", stop=("world.", "xyz"))
    assert tracker.finish_reason == "stop_sequence"
    assert "".join(deltas) == tracker.text == "Hello, "
    assert all("w" not in d for d in deltas)  # the start of the stop string was held back, never sent
    deltas, tracker = _track(tokenizer, "Hello, world. Ending here", stop=("wor", "Hello!"), max_new_tokens=2)
    assert tracker.finish_reason == "length" and tracker.n_tokens == 2
    assert "".join(deltas) == tokenizer.decode(tokenizer.encode("Hello, world.")[:2])  # held text is flushed
    deltas, tracker = _track(tokenizer, "Good night, sweet prince 🙂", stop=("zz",))
    assert tracker.finish_reason == "eos_token" and tracker.text == "Good night, sweet prince 🙂"
    assert "\ufffd" not in "".join(deltas)
