"""Bad requests get the right 4xx and JSON error body (never a 500) and the server serves the next one;
overload, API keys (never logged), and `mixtral serve` as a real process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from huggingface_hub import InferenceClient
from conftest import serve_in_thread
from test_server import CHAT, served  # noqa: F401  (served is a fixture)

from mixtral.engine import Engine
from mixtral.server import create_app

TGI, CHAT_URL, COMPLETIONS = "/generate", "/v1/chat/completions", "/v1/completions"


def tgi(**parameters):
    return {"inputs": "Who goes there?", "parameters": parameters}


def chat(**fields):
    return {"model": "tiny-mixtral", "messages": CHAT, **fields}


LONG_PROMPT = "hello " * 400  # about 400 tokens; the server takes 256
CASES = [
    # (name, route, body: dict or raw bytes, status, text expected in the message)
    ("malformed json", TGI, b'{"inputs": "hi",', 400, "not valid JSON"),
    ("empty body", TGI, b"", 400, "empty"),
    ("not an object", TGI, b"[1, 2]", 422, "JSON object"),
    ("inputs wrong type", TGI, {"inputs": 5}, 422, "inputs"),
    ("parameters wrong type", TGI, {"inputs": "hi", "parameters": [1]}, 422, "parameters"),
    ("temperature a string", TGI, tgi(temperature="hot"), 422, "temperature"),
    ("temperature a bool", TGI, tgi(temperature=True), 422, "temperature"),
    ("missing inputs", TGI, {"parameters": {}}, 422, "inputs"),
    ("empty inputs", TGI, {"inputs": ""}, 422, "`inputs` cannot be empty"),
    ("temperature 0", TGI, tgi(temperature=0), 422, "`temperature` must be strictly positive"),
    ("temperature -1", TGI, tgi(temperature=-1), 422, "`temperature` must be strictly positive"),
    ("temperature NaN", TGI, b'{"inputs": "hi", "parameters": {"temperature": NaN}}', 422, "NaN"),
    ("temperature Infinity", TGI, b'{"inputs": "hi", "parameters": {"temperature": 1e999}}', 422, "finite"),
    ("temperature 1e308", TGI, tgi(temperature=1e308), 422, "temperature"),
    ("top_p 0", TGI, tgi(top_p=0), 422, "`top_p` must be > 0.0 and < 1.0"),
    ("top_p 1.0", TGI, tgi(top_p=1.0), 422, "`top_p` must be > 0.0 and < 1.0"),
    ("typical_p 1.0", TGI, tgi(typical_p=1.0), 422, "`typical_p`"),
    ("top_k -5", TGI, tgi(top_k=-5), 422, "`top_k` must be strictly positive"),
    ("repetition_penalty 0", TGI, tgi(repetition_penalty=0), 422, "`repetition_penalty`"),
    ("frequency_penalty 3", TGI, tgi(frequency_penalty=3), 422, "`frequency_penalty`"),
    ("max_new_tokens 0", TGI, tgi(max_new_tokens=0), 422, "`max_new_tokens` must be strictly positive"),
    ("max_new_tokens 1e9", TGI, tgi(max_new_tokens=10**9), 422, "must be <= 512"),
    ("max_new_tokens a float", TGI, tgi(max_new_tokens=5.0), 422, "max_new_tokens"),
    ("5 stop sequences", TGI, tgi(stop=list("abcde")), 422, "`stop` supports up to 4 stop sequences. Given: 5"),
    ("empty stop string", TGI, tgi(stop=[""]), 422, "stop"),
    ("seed too large", TGI, tgi(seed=2**64, do_sample=True), 422, "seed"),
    ("top_n_tokens 6", TGI, tgi(top_n_tokens=6), 422, "`top_n_tokens`"),
    ("best_of 2", TGI, tgi(best_of=2), 422, "`best_of`"),
    ("watermark", TGI, tgi(watermark=True), 422, "`watermark`"),
    ("grammar", TGI, tgi(grammar={"type": "json", "value": {}}), 422, "`grammar`"),
    ("adapter", TGI, tgi(adapter_id="lora"), 422, "`adapter_id`"),
    ("truncate 0", TGI, tgi(truncate=0), 422, "`truncate`"),
    ("decoder details when streaming", "/generate_stream", tgi(decoder_input_details=True), 422,
     "`decoder_input_details` == true is not supported when streaming tokens"),
    ("prompt over max-input-tokens", TGI, {"inputs": LONG_PROMPT}, 422, "`inputs` must have less than 256 tokens"),
    ("prompt over the character cap", TGI, {"inputs": "a" * 5000}, 422, "characters"),
    ("20 MB body", TGI, {"inputs": "a" * (20 * 1024 * 1024)}, 413, "larger than the limit"),
    ("lone surrogate", TGI, b'{"inputs": "hi \\ud800 there"}', 400, "surrogate"),
    ("invalid UTF-8", TGI, b'{"inputs": "hi \xff\xfe there"}', 400, "UTF-8"),
    ("tokenize empty", "/tokenize", {"inputs": ""}, 422, "cannot be empty"),
    ("unknown route", "/nope", {"inputs": "hi"}, 404, "no route"),
    ("stream on root, bad temperature", "/", {"inputs": "hi", "stream": True, "parameters": {"temperature": 0}}, 422,
     "`temperature`"),
    # OpenAI
    ("oa malformed json", CHAT_URL, b'{"messages": [', 400, "not valid JSON"),
    ("oa messages wrong type", CHAT_URL, {"messages": "hi"}, 422, "messages"),
    ("oa missing messages", CHAT_URL, {"model": "m"}, 422, "messages"),
    ("oa empty messages", CHAT_URL, {"messages": []}, 422, "messages"),
    ("oa max_tokens a string", CHAT_URL, chat(max_tokens="5"), 422, "max_tokens"),
    ("oa temperature -1", CHAT_URL, chat(temperature=-1), 400, "temperature"),
    ("oa temperature 3", CHAT_URL, chat(temperature=3), 400, "temperature"),
    ("oa temperature NaN", CHAT_URL, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "NaN"),
    ("oa temperature 1e308", CHAT_URL, chat(temperature=1e308), 400, "temperature"),
    ("oa top_p 0", CHAT_URL, chat(top_p=0), 400, "top_p"),
    ("oa top_k -5", CHAT_URL, chat(top_k=-5), 400, "top_k"),
    ("oa min_p 1", CHAT_URL, chat(min_p=1.0), 400, "min_p"),
    ("oa max_tokens 0", CHAT_URL, chat(max_tokens=0), 400, "max_tokens"),
    ("oa max_tokens 1e9", CHAT_URL, chat(max_tokens=10**9), 400, "maximum context length"),
    ("oa 5 stops", CHAT_URL, chat(stop=list("abcde")), 400, "stop"),
    ("oa n 2", CHAT_URL, chat(n=2), 400, "n must be 1"),
    ("oa long prompt", CHAT_URL, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "at most 256"),
    ("oa 20 MB", CHAT_URL, {"messages": [{"role": "user", "content": "a" * (20 * 1024 * 1024)}]}, 413, "limit"),
    ("oa lone surrogate", CHAT_URL, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "surrogate"),
    ("oa invalid UTF-8", CHAT_URL, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
    ("oa tool role", CHAT_URL, {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("oa two user turns", CHAT_URL, {"messages": [{"role": "user", "content": "a"}] * 2}, 400, "alternate"),
    ("oa tools", CHAT_URL, chat(tools=[{"type": "function"}]), 400, "tools"),
    ("oa logit_bias", CHAT_URL, chat(logit_bias={"5": 1.0}), 400, "logit_bias"),
    ("oa two prompts", COMPLETIONS, {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("oa bad token id", COMPLETIONS, {"prompt": [1, 99999999]}, 400, "token ids"),
    ("oa unknown route", "/v1/nope", {}, 404, "no route"),
    ("oa unknown model", "/v1/models/gpt-4", None, 404, "does not exist"),
]


def _send(url: str, route: str, body):
    if body is None:
        return httpx.get(url + route, timeout=60)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + route, content=content, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("name, route, body, status, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_json_4xx_and_the_server_carries_on(served, name, route, body, status, fragment):  # noqa: F811
    response = _send(served.url, route, body)
    assert response.status_code == status, response.text
    error = response.json()
    if route.startswith("/v1"):
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
        message = error["error"]["message"]
    else:
        assert set(error) == {"error", "error_type"}
        message = error["error"]
        if status == 422:
            assert error["error_type"] == "validation" and message.startswith("Input validation error: ")
    assert fragment in message
    ok = httpx.post(served.url + TGI, json=tgi(max_new_tokens=1), timeout=60)
    assert ok.status_code == 200 and set(ok.json()) == {"generated_text"}


def test_method_not_allowed_is_json(served):  # noqa: F811
    response = httpx.get(served.url + TGI)
    assert response.status_code == 405 and response.json()["error_type"] == "validation"


def test_overload_refuses_the_third_request_and_finishes_the_first_two(tiny_chat_model, served):  # noqa: F811
    import openai

    engine = Engine(served.model, served.tokenizer, max_batch_size=2, max_queue=2)
    try:
        with serve_in_thread(create_app(engine, "small")) as url:
            started = [threading.Event(), threading.Event()]
            results = [None, None]

            def stream(i):
                body = tgi(max_new_tokens=300, details=True)
                with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as response:
                    for line in response.iter_lines():
                        if line.startswith("data:"):
                            started[i].set()
                            results[i] = json.loads(line[5:])

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            assert all(event.wait(60) for event in started)
            third = httpx.post(url + TGI, json=tgi(max_new_tokens=5), timeout=60)
            assert third.status_code == 429
            assert third.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert third.headers["retry-after"] == "1"  # a hint clients (and TGI's own router) act on
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="small", messages=CHAT, max_tokens=5)
            for thread in threads:
                thread.join(120)
            assert all(r["details"]["finish_reason"] == "length" and r["details"]["generated_tokens"] == 300
                       for r in results)
            assert engine.stats()["requests"]["rejected"] == 2
            assert 'mixtral_requests_total{outcome="rejected"} 2.0' in httpx.get(url + "/metrics").text
            assert httpx.post(url + TGI, json=tgi(max_new_tokens=2), timeout=60).status_code == 200
    finally:
        engine.close()


def test_api_key_is_required_and_never_logged(served, caplog):  # noqa: F811
    import openai
    from huggingface_hub import InferenceClient

    key = "s3cret-key-do-not-log"
    caplog.set_level(logging.INFO)
    with serve_in_thread(create_app(served.engine, "tiny-mixtral", api_key=key)) as url:
        for path in ("/health", "/info", "/metrics", "/docs"):
            assert httpx.get(url + path).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            response = httpx.post(url + TGI, json=tgi(max_new_tokens=2), headers=headers)
            assert response.status_code == 401 and response.json()["error_type"] == "authentication"
        response = httpx.post(url + CHAT_URL, json=chat(max_tokens=2), headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + TGI, json=tgi(max_new_tokens=2), headers={"Authorization": f"Bearer {key}"}
                          ).status_code == 200
        assert InferenceClient(url, token=key).text_generation("Who goes there?", max_new_tokens=3)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert client.chat.completions.create(model="m", messages=CHAT, max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert '"POST /generate HTTP/1.1" 401' in caplog.text  # the access log is on ...
    assert key not in caplog.text and "wrong" not in caplog.text  # ... and shows no header


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mixtral_serve_runs_a_server_on_loopback(tiny_chat_model):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mixtral", "serve", "--model", str(tiny_chat_model), "--dtype",
                                "float32", "--port", str(port), "--max-batch-size", "2", "--max-total-tokens", "128"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None and time.time() < deadline, "mixtral serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["model_id"] == tiny_chat_model.name and info["max_total_tokens"] == 128
        assert info["max_input_tokens"] == 64
        reply = httpx.post(f"http://127.0.0.1:{port}/generate", json=tgi(max_new_tokens=3), timeout=60)
        assert reply.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output and "Traceback" not in output


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random Mixtral big enough that 400 tokens take seconds here (hidden 512, 4 layers, 32,000 tokens)."""
    from conftest import make_hf_model, save_hf_model

    model = make_hf_model(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, seed=4)
    return save_hf_model(model, tmp_path_factory.mktemp("slow"), with_tokenizer=True)


def _serve(model_dir, *options) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "mixtral", "serve", "--model", str(model_dir), "--port",
                                str(port), "--max-total-tokens", "512", *options], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        assert process.poll() is None and time.time() < deadline, "mixtral serve did not start"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)


def _stream_in_thread(url: str, route: str, body: dict) -> tuple[threading.Thread, threading.Event, list]:
    first, events = threading.Event(), []

    def run():
        with httpx.stream("POST", url + route, json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    first.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert first.wait(60)
    return thread, first, events


def test_a_stop_signal_drains_running_requests_refuses_new_ones_and_exits_0(slow_model):
    process, url = _serve(slow_model, "--shutdown-timeout", "120")
    try:
        thread, _, events = _stream_in_thread(url, "/generate_stream", tgi(max_new_tokens=400, details=True))
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        assert httpx.post(url + TGI, json=tgi(max_new_tokens=2), timeout=10).status_code == 503
        late = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "unhealthy"
        assert thread.is_alive()  # the running request was not cut short ...
        thread.join(120)
        last = json.loads(events[-1])
        assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 400
        output = process.communicate(timeout=60)[0]  # ... and the process ends by itself once it is done
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "stopping: new requests get 503" in output and "Traceback" not in output


def test_requests_still_running_at_the_shutdown_timeout_end_with_a_shutdown_error(slow_model):
    process, url = _serve(slow_model, "--shutdown-timeout", "0.5")
    try:
        tgi_thread, _, tgi_events = _stream_in_thread(url, "/generate_stream", tgi(max_new_tokens=400))
        openai_thread, _, openai_events = _stream_in_thread(url, "/v1/chat/completions",
                                                            chat(max_tokens=400, stream=True))
        process.send_signal(signal.SIGTERM)
        tgi_thread.join(60)
        openai_thread.join(60)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert json.loads(tgi_events[-1]) == {"error": "the server is shutting down", "error_type": "shutdown"}
    assert openai_events[-1] == "[DONE]"
    error = json.loads(openai_events[-2])["error"]
    assert error["code"] == "shutdown" and "shutting down" in error["message"]
    assert process.returncode == 0, output


def test_mixtral_serve_reports_a_missing_model_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mixtral", "serve", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "mixtral: error:" in out.stderr and "Traceback" not in out.stderr


def test_a_failure_while_generating_is_reported_in_each_protocol(served, monkeypatch):  # noqa: F811
    from huggingface_hub.errors import GenerationError

    engine = Engine(served.model, served.tokenizer, max_batch_size=2)
    real_forward, calls = engine._forward_decode, {"n": 0}

    def forward(rows, riders=()):  # every decode step after the third fails (a pass with the prompt only is none)
        calls["n"] += bool(rows)
        if calls["n"] > 3:
            raise RuntimeError("simulated device error")
        return real_forward(rows, riders)

    monkeypatch.setattr(engine, "_forward_decode", forward)
    try:
        with serve_in_thread(create_app(engine, "failing")) as url:
            with httpx.stream("POST", url + "/generate_stream", json=tgi(max_new_tokens=20), timeout=60) as response:
                events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
            assert len(events) == 5 and all("token" in e for e in events[:4])
            assert events[-1]["error_type"] == "generation" and "simulated device error" in events[-1]["error"]
            calls["n"] = 0
            client = InferenceClient(url)  # kept in a variable: the stream closes when the client is collected
            with pytest.raises(GenerationError, match="simulated device error"):
                for _ in client.text_generation("Who goes there?", max_new_tokens=20, stream=True):
                    pass
            calls["n"] = 0
            reply = httpx.post(url + TGI, json=tgi(max_new_tokens=20), timeout=60)
            assert reply.status_code == 424 and reply.json()["error_type"] == "generation"
            calls["n"] = 0
            with httpx.stream("POST", url + CHAT_URL, json=chat(max_tokens=20, stream=True), timeout=60) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            assert "simulated device error" in json.loads(lines[-2][5:])["error"]["message"]
            calls["n"] = 0
            reply = httpx.post(url + CHAT_URL, json=chat(max_tokens=20), timeout=60)
            assert reply.status_code == 500 and "simulated device error" in reply.json()["error"]["message"]
            assert engine.alive and engine.stats()["requests"]["failed"] == 5
            engine.close()  # a stopped engine: unhealthy, and requests get 503 rather than hanging
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            assert httpx.post(url + TGI, json=tgi(max_new_tokens=2)).status_code == 503
    finally:
        engine.close()


def test_mixtral_serve_hands_server_run_an_engine_and_plain_values(tiny_chat_model, monkeypatch):
    """`mixtral serve` loads the model, builds the engine from its options and passes typed values to
    `server.run` (no Namespace); the engine is closed when the server stops."""
    import mixtral.server
    from mixtral.cli import main

    calls = []
    monkeypatch.setattr(mixtral.server, "run", lambda *a, **kw: calls.append((a, kw)))
    assert main(["serve", "--model", str(tiny_chat_model), "--dtype", "float32", "--port", "8999",
                 "--max-batch-size", "3", "--max-concurrent-requests", "5", "--max-total-tokens", "100",
                 "--max-input-tokens", "60", "--api-key", "k", "--max-body-bytes", "1000",
                 "--allowed-hosts", "a.lan,b.lan", "--cors-allow-origin", "https://x.example"]) == 0
    (engine, model_id, host, port), limits = calls[-1]
    assert (model_id, host, port) == (tiny_chat_model.name, "127.0.0.1", 8999)
    assert (engine.max_batch_size, engine.max_queue, engine.max_total_tokens) == (3, 5, 100)
    assert limits == {"max_input_tokens": 60, "api_key": "k", "max_body_bytes": 1000, "max_prompt_chars": None,
                      "allowed_hosts": ("a.lan", "b.lan"), "cors_allow_origins": ("https://x.example",),
                      "shutdown_timeout": 30.0}
    assert not engine.alive


def test_a_rebinding_page_and_a_simple_cross_site_post_are_refused(served):  # noqa: F811
    """DNS rebinding: a page that pointed its own name at 127.0.0.1 sends `Host: <its name>`; a cross-site form or
    `fetch` without preflight can only send text/plain, a form or multipart. Neither reaches the engine."""
    before = served.engine.stats()["requests"]
    port = served.url.rsplit(":", 1)[1]
    for path in ("/generate", "/info", "/health", "/v1/models"):
        response = httpx.request("POST" if path == "/generate" else "GET", served.url + path, json=tgi(),
                                 headers={"Host": f"evil.example:{port}"}, timeout=30)
        assert response.status_code == 421, path
        assert "evil.example" in (response.json()["error"]["message"] if path.startswith("/v1")
                                  else response.json()["error"])
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST.", "10.1.2.3"):
        assert httpx.get(served.url + "/health", headers={"Host": host}, timeout=30).status_code == 200, host
    body = json.dumps(tgi(max_new_tokens=3))
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        for route in (TGI, "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"):
            response = httpx.post(served.url + route, content=body, headers=headers, timeout=30)
            assert response.status_code == 415, (route, content_type)
            error = response.json()["error"]
            assert "application/json" in (error["message"] if route.startswith("/v1") else error)
    assert served.engine.stats()["requests"] == before  # nothing was submitted
    for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.api+json"):
        response = httpx.post(served.url + TGI, content=body, headers={"Content-Type": content_type}, timeout=60)
        assert response.status_code == 200, content_type
    # the seed's client code and the openai client send JSON and a loopback Host: unchanged, they still work
    assert InferenceClient(served.url).text_generation("Who goes there?", max_new_tokens=3)
    import openai

    reply = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x").chat.completions.create(
        model="tiny-mixtral", messages=CHAT, max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_allowed_hosts_and_cors_origins_are_opt_in(served):  # noqa: F811
    from mixtral.errors import MixtralError

    origin = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in httpx.get(served.url + "/info", headers=origin).headers
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    assert httpx.options(served.url + TGI, headers=preflight).status_code >= 400  # no CORS: no preflight passes
    app = create_app(served.engine, "tiny", allowed_hosts=("my.box",), cors_allow_origins=("https://app.example",))
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/info", headers={"Host": "my.box:80"}).status_code == 200
        assert httpx.get(url + "/info", headers={"Host": "other.box"}).status_code == 421
        allowed = httpx.options(url + TGI, headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = httpx.options(url + TGI, headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in refused.headers
    with serve_in_thread(create_app(served.engine, "tiny", allowed_hosts=("*",))) as url:
        assert httpx.get(url + "/info", headers={"Host": "anything.example"}).status_code == 200
    with pytest.raises(MixtralError, match="name the origins"):
        create_app(served.engine, "tiny", api_key="k", cors_allow_origins=("*",))


def test_a_request_that_waits_past_max_queue_time_ends_with_a_clear_503(slow_model):
    from concurrent.futures import ThreadPoolExecutor

    from mixtral import load

    model, tokenizer = load(slow_model, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue_time=0.3)
    try:
        with serve_in_thread(create_app(engine, "slow")) as url:
            thread, _, events = _stream_in_thread(url, "/generate_stream", tgi(max_new_tokens=480, details=True))

            def streamed():
                with httpx.stream("POST", url + "/generate_stream", json=tgi(max_new_tokens=5), timeout=60) as r:
                    return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]

            with ThreadPoolExecutor(3) as pool:  # all three wait at once, while the first request runs
                waited = pool.submit(httpx.post, url + TGI, json=tgi(max_new_tokens=5), timeout=60)
                reply = pool.submit(httpx.post, url + "/v1/chat/completions", json=chat(max_tokens=5), timeout=60)
                stream = pool.submit(streamed)
                waited, reply, stream = waited.result(), reply.result(), stream.result()
            assert thread.is_alive()  # refused while the first still runs
            assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
            assert "longer than the server's limit of 0.3 s" in waited.json()["error"]
            assert reply.status_code == 503 and reply.json()["error"]["code"] == "queue_timeout"
            assert stream == [{"error": stream[0]["error"], "error_type": "queue_timeout"}]
            thread.join(120)
            assert json.loads(events[-1])["details"]["generated_tokens"] == 480
            assert engine.stats()["requests"]["rejected"] == 3
    finally:
        engine.close()
