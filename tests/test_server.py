"""The HTTP server as clients see it: real uvicorn servers on free ports, the real huggingface_hub and openai
clients, many streams at once, clients that hang up."""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from conftest import serve_in_thread

from mixtral import generate, load
from mixtral.engine import Engine
from mixtral.sampling import SamplingParams
from mixtral.server import create_app
from mixtral.server.common import encode_text

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who goes there?"}]


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """One engine (4 slots, 32 requests at most) behind one server; context 512, 256 prompt tokens at most."""
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch_size=4, max_queue=32)
    app = create_app(engine, "tiny-mixtral")
    with serve_in_thread(app) as url:
        yield SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer, app=app)
    engine.close()


def greedy(served, prompt_ids, n):
    return generate(served.model, served.tokenizer, prompt_ids, SamplingParams(temperature=0, max_new_tokens=n))


def sse_events(response) -> list:
    return [json.loads(line[5:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data:")]


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_inference_client_seed_code_streams_the_same_text_as_generate(served):
    from huggingface_hub import InferenceClient

    client = InferenceClient(served.url)  # the seed's code, only the URL changed
    prompt = "Who goes there?"
    kwargs = dict(temperature=0.9, max_new_tokens=64, top_p=0.95, repetition_penalty=1.0, do_sample=True, seed=42)
    streamed, last = [], None
    for response in client.text_generation(prompt, **kwargs, stream=True, details=True, return_full_text=False):
        if not response.token.special:
            streamed.append(response.token.text)
        last = response
    body = {"inputs": prompt, "parameters": {**kwargs, "details": True}}
    reply = httpx.post(f"{served.url}/generate", json=body, timeout=60).json()
    assert "".join(streamed) == reply["generated_text"] == last.generated_text
    assert last.details.finish_reason == reply["details"]["finish_reason"] == "length"
    assert last.details.generated_tokens == 64 and last.details.seed == 42
    assert last.details.input_length == len(served.tokenizer.encode(prompt, add_bos=True))
    output = client.text_generation(prompt, **kwargs, details=True)  # not streamed, with details
    assert output.generated_text == reply["generated_text"]
    assert [t.id for t in output.details.tokens] == [t["id"] for t in reply["details"]["tokens"]]
    assert output.details.seed == 42 and output.details.generated_tokens == 64
    assert client.text_generation(prompt, **kwargs) == reply["generated_text"]  # plain text
    different = client.text_generation(prompt, **{**kwargs, "seed": 43})
    assert different != reply["generated_text"]


def test_tgi_root_generate_and_details(served):
    prompt = "Now is the winter"
    ids = encode_text(served.tokenizer, prompt)
    expected = greedy(served, ids, 12)
    reply = httpx.post(served.url, json={"inputs": prompt, "parameters": {"max_new_tokens": 12}}, timeout=60)
    assert reply.status_code == 200 and reply.json() == [{"generated_text": expected}]
    full = httpx.post(f"{served.url}/generate", timeout=60, json={"inputs": prompt, "parameters": {
        "max_new_tokens": 12, "details": True, "decoder_input_details": True, "return_full_text": True,
        "top_n_tokens": 2}}).json()
    assert full["generated_text"] == prompt + expected
    details = full["details"]
    assert details["seed"] is None and details["finish_reason"] == "length" and details["generated_tokens"] == 12
    assert [p["id"] for p in details["prefill"]] == ids and details["prefill"][0]["logprob"] is None
    tops = zip(details["top_tokens"], details["tokens"])
    assert all(len(top) == 2 and top[0]["id"] == token["id"] for top, token in tops)
    truncated = httpx.post(f"{served.url}/generate", timeout=60, json={"inputs": prompt, "parameters": {
        "max_new_tokens": 4, "truncate": 3, "details": True, "decoder_input_details": True}}).json()
    assert [p["id"] for p in truncated["details"]["prefill"]] == ids[-3:]
    with httpx.stream("POST", served.url, json={"inputs": prompt, "stream": True, "parameters": {
            "max_new_tokens": 12}}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert "[DONE]" not in events and [e["index"] for e in events] == list(range(12))
    assert all(set(e) == {"index", "token", "generated_text", "details"} for e in events)
    assert events[-1]["generated_text"] == expected and events[-1]["details"] is None
    assert all(e["generated_text"] is None for e in events[:-1])


def test_info_health_metrics_tokenize_docs(served):
    info = httpx.get(f"{served.url}/info").json()
    assert info["model_id"] == "tiny-mixtral" and info["max_total_tokens"] == 512
    assert info["max_input_tokens"] == 256 and info["max_concurrent_requests"] == 32 and info["max_best_of"] == 1
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.content == b""
    metrics = httpx.get(f"{served.url}/metrics").text
    for name in ("mixtral_requests_total", "mixtral_generated_tokens_total", "mixtral_queue_time_seconds_bucket",
                 "mixtral_time_per_token_seconds_count", "mixtral_active_requests",
                 "mixtral_time_to_first_token_seconds_count"):
        assert name in metrics
    text = "Hello wörld, good night 🙂"
    tokens = httpx.post(f"{served.url}/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == encode_text(served.tokenizer, text)
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in tokens)
    assert httpx.get(f"{served.url}/docs").status_code == 200
    paths = httpx.get(f"{served.url}/openapi.json").json()["paths"]
    assert {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"} <= set(paths)


def test_openai_client_chat_completions_and_models(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    prompt_ids = served.tokenizer.apply_chat_template(CHAT)
    expected = greedy(served, prompt_ids, 10)
    reply = client.chat.completions.create(model="tiny-mixtral", messages=CHAT, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == len(prompt_ids) + 10
    assert len(choice.logprobs.content) == 10 and all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny-mixtral", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == 10
    seeded = [client.chat.completions.create(model="x", messages=CHAT, max_tokens=8, seed=7, temperature=1.0,
                                             top_p=0.9, extra_body={"top_k": 50, "min_p": 0.01,
                                                                    "repetition_penalty": 1.1})
              for _ in range(2)]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-mixtral"]
    assert client.models.retrieve("tiny-mixtral").id == "tiny-mixtral"


def test_openai_client_completions(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    prompt = "Friends, Romans, countrymen"
    ids = encode_text(served.tokenizer, prompt)
    expected = greedy(served, ids, 9)
    reply = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=9, temperature=0, logprobs=2)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason == "length" and len(reply.choices[0].logprobs.token_logprobs) == 9
    stream = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=9, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 9
    echoed = client.completions.create(model="tiny-mixtral", prompt=[ids], max_tokens=9, temperature=0, echo=True)
    assert echoed.choices[0].text == served.tokenizer.decode(ids) + expected


def test_eos_and_split_characters_stream_like_tgi(served):
    """A model forced to answer "Hello", four byte tokens of one emoji, " world", then EOS."""
    tok = served.tokenizer
    hello, world = tok.encode("Hello")[0], tok.encode("Hello world")[-1]
    emoji = [3 + byte for byte in "🙂".encode()]  # the byte-fallback tokens <0x00>.. start at id 3
    assert [tok.id_to_piece(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    chain = [hello, *emoji, world, tok.eos_id]
    after = dict(zip(chain, chain[1:]))
    after[encode_text(tok, "Who goes there?")[-1]] = hello
    after[tok.apply_chat_template(CHAT)[-1]] = hello

    class Scripted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.args = inner, inner.args
            self.dtype, self.device, self.activation_dtype = inner.dtype, inner.device, inner.activation_dtype

        def forward(self, input_ids, input_pos=None, cache=None, n_keys=None, logits_at=None, routing=None,
                    slots=None):
            logits = self.inner(input_ids, input_pos, cache, n_keys, logits_at, routing, slots)
            rows = torch.arange(input_ids.shape[0])
            last = input_ids[rows, logits_at][:, None] if logits_at is not None else input_ids
            for b, t in zip(*torch.nonzero(torch.ones_like(last, dtype=torch.bool), as_tuple=True)):
                if int(last[b, t]) in after:
                    logits[b, t, after[int(last[b, t])]] = 1e4
            return logits

    engine = Engine(Scripted(served.model), tok, max_batch_size=2)
    try:
        with serve_in_thread(create_app(engine, "scripted")) as url:
            body = {"inputs": "Who goes there?", "parameters": {"max_new_tokens": 20, "details": True}}
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
                events = sse_events(response)
            texts = [e["token"]["text"] for e in events]
            assert texts == ["Hello", "", "", "", "🙂", " world", "</s>"]
            assert [e["token"]["special"] for e in events] == [False] * 6 + [True]
            assert events[-1]["generated_text"] == "Hello🙂 world"
            assert events[-1]["details"]["finish_reason"] == "eos_token"
            assert events[-1]["details"]["generated_tokens"] == 7
            reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, timeout=60).json()
            assert reply["choices"][0]["message"]["content"] == "Hello🙂 world"
            assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 7
    finally:
        engine.close()


def _tgi_stream(url, prompt, n):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as response:
        events = sse_events(response)
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    return events[-1]["generated_text"]


def _chat_stream(url, prompt, n):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=n, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sixteen_concurrent_streams_equal_each_alone(served):
    words = "To be or not to be that is the question whether tis nobler in the mind to suffer".split()
    jobs = [(_tgi_stream if i % 2 else _chat_stream, " ".join(words[: 1 + i % 9]), 6 + (5 * i) % 23)
            for i in range(16)]
    alone = [fn(served.url, prompt, n) for fn, prompt, n in jobs]
    before = served.engine.stats()["steps"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: job[0](served.url, job[1], job[2]), jobs))
    assert together == alone
    assert served.engine.stats()["steps"] - before < sum(n for _, _, n in jobs)  # rows really shared steps


def test_a_client_that_hangs_up_is_cancelled_and_others_continue(served):
    engine = served.engine
    before = engine.stats()
    other_result = {}

    def other():
        other_result["text"] = _tgi_stream(served.url, "Who goes there?", 40)

    thread = threading.Thread(target=other)
    thread.start()
    body = {"inputs": "To be", "parameters": {"max_new_tokens": 450}}
    with httpx.stream("POST", f"{served.url}/generate_stream", json=body, timeout=60) as response:
        data_lines = (line for line in response.iter_lines() if line.startswith("data:"))
        received = list(itertools.islice(data_lines, 3))
    assert len(received) == 3  # then the connection is closed mid-stream
    wait_for(lambda: engine.stats()["requests"]["cancelled"] > before["requests"]["cancelled"])
    thread.join(120)
    assert other_result["text"] == greedy(served, encode_text(served.tokenizer, "Who goes there?"), 40)
    after = engine.stats()
    assert after["tokens_generated"] - before["tokens_generated"] < 40 + 100  # far fewer than 450
    # a non-streamed request whose client gives up is cancelled too: each step slowed by 5 ms, so that 450 tokens
    # outlast the client's 0.5 s however fast the kernels decode the tiny model
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{served.url}/generate", json=body, timeout=0.5)
        wait_for(lambda: engine.stats()["requests"]["cancelled"] >= after["requests"]["cancelled"] + 1)
        wait_for(lambda: engine.stats()["active"] == 0)
    finally:
        slow.remove()
    metrics = httpx.get(f"{served.url}/metrics").text
    cancelled = [line for line in metrics.splitlines()
                 if line.startswith('mixtral_requests_total{outcome="cancelled"}')]
    assert float(cancelled[0].split()[-1]) >= 2
