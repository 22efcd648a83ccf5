"""The web app without a browser: settings cleaning, history -> chat, prompt fitting, the three backends against
a real `mixtral serve` (the prompt a TGI server receives, Stop reaching the server), the engine's routing pass,
the expert heatmap and the memory planner. The browser tests are in test_ui_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import serve_in_thread

from mixtral import generate, load
from mixtral.config import preset
from mixtral.engine import Engine
from mixtral.sampling import SamplingParams
from mixtral.server import create_app
from mixtral.ui.backends import (
    ERROR_MARK,
    ChatSettings,
    LocalBackend,
    OpenAIBackend,
    TGIBackend,
    Turn,
    chat_messages,
    clean_settings,
    fit_prompt,
    openai_base_url,
)

THREE_TURNS = [
    {"role": "system", "content": "You are a terse herald."},
    {"role": "user", "content": "Who goes there?"},
    {"role": "assistant", "content": "A friend to this ground."},
    {"role": "user", "content": "And liegemen to the Dane?"},
    {"role": "assistant", "content": "Give you good night."},
    {"role": "user", "content": "Stand, ho! Who is there?"},
]


def recording(app, bodies: list):
    """Wrap an ASGI app so that the JSON body of every POST is appended to `bodies` (what clients really sent)."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        chunks: list[bytes] = []

        async def receive_and_record():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    bodies.append(json.loads(b"".join(chunks)))
            return message

        return await app(scope, receive_and_record, send)

    return wrapped


@contextlib.contextmanager
def recorded_server(model_dir, model_id: str):
    """`mixtral serve`'s app (engine with 4 slots) for `model_dir` on loopback, recording request bodies."""
    model, tokenizer = load(model_dir, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch_size=4)
    bodies: list = []
    try:
        with serve_in_thread(recording(create_app(engine, model_id), bodies)) as url:
            yield SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer, bodies=bodies)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    """The server for the tiny v1 model; its engine also serves as a local backend."""
    with recorded_server(tiny_chat_model, "tiny-mixtral") as served:
        yield served


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


async def collect(backend, messages, settings, turn=None):
    turn = turn or Turn()
    return "".join([delta async for delta in backend.stream(messages, settings, turn)]), turn


def test_clean_settings_clamps_what_backends_refuse_and_says_so():
    settings, notes = clean_settings("  Be brief. ", 3.5, 10_000, 0, -1, -1, max_new_limit=500)
    assert settings == ChatSettings("Be brief.", 2.0, 500, 0.01, 0.5, None)
    assert len(notes) == 4 and any("temperature 3.5" in n for n in notes) and any("top-p 0" in n for n in notes)
    settings, notes = clean_settings("", "hot", None, float("nan"), 1.3, 2**64 + 5)
    assert settings.temperature == ChatSettings().temperature and settings.top_p == ChatSettings().top_p
    assert settings.max_new_tokens == ChatSettings().max_new_tokens and settings.repetition_penalty == 1.3
    assert settings.seed == (2**64 + 5) % 2**63 and len(notes) == 3
    assert clean_settings(None, 0, 7.6, 1, 1, 42.0) == (ChatSettings("", 0.0, 8, 1.0, 1.0, 42), [])


def test_chat_messages_from_gradio_history():
    history = [
        {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": [{"type": "text", "text": "A friend "}, {"type": "text", "text": "here."}]},
        {"role": "user", "content": "Say more."},
        {"role": "assistant", "content": "part" + "\n\n" + ERROR_MARK + "the server is gone"},  # left out
        {"role": "user", "content": "Stopped before any text"},  # unanswered: left out
    ]
    assert chat_messages(history, "Again?", "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": "A friend here."},
        {"role": "user", "content": "Again?"},
    ]


def test_fit_prompt_drops_oldest_exchanges_then_lowers_max_new_tokens(server):
    tokenizer = server.tokenizer
    full = tokenizer.apply_chat_template(THREE_TURNS)
    newest = tokenizer.apply_chat_template([THREE_TURNS[0], THREE_TURNS[-1]])
    notes: list[str] = []
    ids, kept, settings = fit_prompt(tokenizer, THREE_TURNS, ChatSettings(max_new_tokens=50), len(full) + 49,
                                     None, notes)
    assert kept == [THREE_TURNS[0], *THREE_TURNS[3:]] and ids == tokenizer.apply_chat_template(kept)
    assert settings.max_new_tokens == 50 and "oldest exchange left out" in notes[0]
    notes = []
    ids, kept, settings = fit_prompt(tokenizer, THREE_TURNS, ChatSettings(max_new_tokens=50), len(newest) + 10,
                                     None, notes)
    assert ids == newest and settings.max_new_tokens == 10 and "lowered from 50 to 10" in notes[-1]
    with pytest.raises(Exception, match="too long"):
        fit_prompt(tokenizer, THREE_TURNS, ChatSettings(), len(newest), None, [])


def test_tgi_prompt_for_three_turns_with_system_is_the_engine_encoding_decoded(server):
    """What a TGI endpoint receives: the chat in the model's format as text, one BOS, the system prompt where
    the engine puts it (before the first user message); encoded again it is exactly the engine's ids."""
    backend = TGIBackend(server.url, server.tokenizer)
    assert backend.context == server.engine.max_total_tokens  # limits read from GET /info
    server.bodies.clear()
    text, turn = asyncio.run(collect(backend, THREE_TURNS, ChatSettings(temperature=0, max_new_tokens=5)))
    engine_ids = server.tokenizer.apply_chat_template(THREE_TURNS)
    (body,) = server.bodies
    prompt = body["inputs"]
    assert prompt == server.tokenizer.decode(engine_ids, skip_special=False)
    assert prompt.count("<s>") == 1
    assert prompt.startswith("<s>[INST] You are a terse herald.\n\nWho goes there? [/INST]")
    assert server.tokenizer.encode(prompt, parse_special=True) == engine_ids
    assert body["stream"] is True and body["parameters"]["do_sample"] is False
    assert "temperature" not in body["parameters"] or body["parameters"]["temperature"] is None  # TGI refuses 0
    expected = generate(server.model, server.tokenizer, engine_ids, SamplingParams(temperature=0, max_new_tokens=5))
    assert text == expected and len(turn.token_ids) == 5 and turn.finish_reason == "length"


@pytest.mark.parametrize("kind", ["local", "tgi", "openai"])
def test_every_backend_streams_the_same_greedy_reply(server, kind):
    backend = {"local": lambda: LocalBackend(server.engine),
               "tgi": lambda: TGIBackend(server.url, server.tokenizer),
               "openai": lambda: OpenAIBackend(server.url)}[kind]()  # a bare address gets /v1
    messages = THREE_TURNS[:1] + THREE_TURNS[-1:]
    text, turn = asyncio.run(collect(backend, messages, ChatSettings(temperature=0, max_new_tokens=8, top_p=1.0)))
    ids = server.tokenizer.apply_chat_template(messages)
    assert text == generate(server.model, server.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=8))
    assert turn.finish_reason == "length" and turn.chunks >= 2


@pytest.mark.parametrize("kind", ["local", "tgi", "openai"])
def test_closing_the_stream_early_cancels_the_request_where_it_runs(server, kind):
    """The Stop button closes the chat function's generator; that must end generation in the engine, also
    behind a server (the closed HTTP stream is a client disconnect)."""
    backend = {"local": lambda: LocalBackend(server.engine),
               "tgi": lambda: TGIBackend(server.url, server.tokenizer),
               "openai": lambda: OpenAIBackend(server.url + "/v1")}[kind]()
    engine = server.engine
    before = engine.stats()["requests"]["cancelled"]
    slow = engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))

    async def stop_after_two_chunks():
        turn = Turn()
        stream = backend.stream(THREE_TURNS[-1:], ChatSettings(temperature=0, max_new_tokens=400), turn)
        async for _ in stream:
            if turn.chunks >= 2:
                break
        await stream.aclose()
        return turn

    try:
        turn = asyncio.run(stop_after_two_chunks())
        wait_for(lambda: engine.stats()["requests"]["cancelled"] == before + 1 and engine.stats()["active"] == 0)
    finally:
        slow.remove()
    assert turn.finish_reason == "stopped"
    assert engine.stats()["tokens_generated"] < 400 * 10  # nowhere near the asked-for length


def test_backend_errors_become_a_readable_chat_message(server):
    from mixtral.ui.app import make_respond

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cases = [
        (OpenAIBackend(dead), "cannot reach"),
        (OpenAIBackend(server.url), "maximum context length is 512"),  # the server's own words (400)
        (LocalBackend(server.engine), "too long"),  # the prompt alone overflows the context
    ]
    for backend, words in cases:
        respond = make_respond(backend, ChatSettings())
        message = "word " * (server.engine.max_total_tokens + 10) if "too long" in words else "Hi"

        async def run(respond, message):
            return [out async for out in respond(message, [], "", 0.5, 10**5, 0.9, 1.0, -1)]

        outputs = asyncio.run(run(respond, message))
        reply, status = outputs[-1][0], outputs[-1][1]
        assert reply.startswith(ERROR_MARK) and words in reply, reply
        assert "ended by: error" in status


def test_engine_routing_is_a_forward_pass_between_steps(server):
    """Engine.routing returns the router's choices of a plain forward pass, also while other requests decode."""
    ids = server.tokenizer.apply_chat_template(THREE_TURNS)
    reference: list = []
    with torch.inference_mode():
        server.model(torch.tensor([ids]), routing=reference)
    handle = server.engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=64))
    routing = server.engine.routing(ids)
    assert [e.done for e in handle.events(timeout=60)][-1]
    assert len(routing) == server.model.args.n_layers
    for got, want in zip(routing, reference):
        assert got.expert_ids.shape == (1, len(ids), server.model.args.top_k)
        torch.testing.assert_close(got.weights, want.weights)
        assert torch.equal(got.expert_ids, want.expert_ids)
    with pytest.raises(Exception, match="routing needs"):
        server.engine.routing([])


def test_expert_heatmap_and_shares(server):
    from mixtral.ui.experts import expert_shares, expert_view, heatmap_html, share_html

    prompt = server.tokenizer.apply_chat_template(THREE_TURNS[-1:])
    reply = generate(server.model, server.tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=6))
    reply_ids = server.tokenizer.encode(reply)[:6] + [server.tokenizer.eos_id]  # the final EOS is left out
    view = expert_view(server.engine, prompt, reply_ids)
    layers, experts = server.model.args.n_layers, server.model.args.n_experts
    assert view.expert_ids.shape == (layers, len(prompt) + len(reply_ids) - 1, server.model.args.top_k)
    page = heatmap_html(view)
    assert page.count('class="cell"') == layers * len(view.pieces) and "expert" in page and "title=" in page
    shares = expert_shares(view)
    assert shares.shape == (layers, experts) and torch.allclose(shares.sum(1), torch.ones(layers))
    assert share_html(view).count("<tr>") == layers + 1
    assert heatmap_html(view, max_columns=5).count('class="cell"') == layers * 5


def test_memory_plan_for_the_presets():
    from mixtral.ui.memory_view import memory_plan

    plan = memory_plan(preset("mixtral-8x7b"), "Mixtral-8x7B", "bf16", 32768, 1, 80)
    assert "46,702,792,704" in plan and "12,879,925,248" in plan and "93.4 GB" in plan and "4.29 GB" in plan
    assert "Does not fit" in plan and "fit at int8" in plan
    squeezed = memory_plan(preset("mixtral-8x7b"), "Mixtral-8x7B", "int4", 4096, 1, 16)
    assert "Does not fit" in squeezed and "Runs with expert offloading" in squeezed and "of 256 experts" in squeezed
    assert "needs at least" in memory_plan(preset("mixtral-8x7b"), "Mixtral-8x7B", "int4", 4096, 1, 2)
    assert "**Fits**" in memory_plan(preset("mixtral-8x7b"), "Mixtral-8x7B", "int4", 4096, 1, 80)
    assert "**Fits**" in memory_plan(preset("mixtral-8x22b"), "Mixtral-8x22B", "bf16", 65536, 1, 400)


def test_openai_base_url_and_cli_options():
    from mixtral.cli import build_parser

    assert openai_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert openai_base_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    args = build_parser().parse_args(["ui", "--endpoint", "http://x:8080", "--port", "7999"])
    assert (args.endpoint, args.port, args.host, args.openai_base_url) == ("http://x:8080", 7999, "127.0.0.1", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ui", "--endpoint", "http://x", "--openai-base-url", "http://y"])


def test_mixtral_ui_hands_ui_run_a_backend_and_plain_values(tiny_chat_model, tmp_path, monkeypatch):
    """`mixtral ui` builds the backend its options ask for and passes typed values to `ui.run` (no Namespace);
    the in-process engine is closed when the page stops."""
    import mixtral.ui
    from mixtral.cli import main

    calls = []
    monkeypatch.setattr(mixtral.ui, "run", lambda backend, host, port, **kw: calls.append((backend, host, port, kw)))
    feedback = str(tmp_path / "feedback.jsonl")
    assert main(["ui", "--model", str(tiny_chat_model), "--dtype", "float32", "--port", "7999",
                 "--max-batch-size", "2", "--feedback-file", feedback, "--allowed-hosts", "chat.lan,box"]) == 0
    backend, host, port, kw = calls[-1]
    assert isinstance(backend, LocalBackend) and (host, port) == ("127.0.0.1", 7999)
    assert kw == {"feedback_file": feedback, "allowed_hosts": ("chat.lan", "box")}
    assert backend.model_dir == tiny_chat_model and backend.engine.max_batch_size == 2
    assert backend.engine.model.dtype == torch.float32 and not backend.engine.alive

    assert main(["ui", "--openai-base-url", "http://127.0.0.1:9", "--openai-model", "m", "--api-key", "k"]) == 0
    backend = calls[-1][0]
    assert isinstance(backend, OpenAIBackend) and (backend.base_url, backend.model, backend.api_key) == (
        "http://127.0.0.1:9/v1", "m", "k")

    assert main(["ui", "--endpoint", "http://127.0.0.1:9", "--model", str(tiny_chat_model), "--host", "0.0.0.0"]) == 0
    backend, host = calls[-1][:2]
    assert isinstance(backend, TGIBackend) and backend.model_dir == tiny_chat_model and host == "0.0.0.0"
    assert backend.engine is None and backend.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_chat_settings_start_from_generation_config_else_the_pages_defaults(tmp_path, caplog):
    from mixtral.loading import default_model_path
    from mixtral.ui.app import generation_defaults

    def write(cfg):
        (tmp_path / "generation_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        return generation_defaults(tmp_path)

    assert generation_defaults(None) == generation_defaults(tmp_path) == ChatSettings()
    shipped = generation_defaults(default_model_path())
    assert (shipped.temperature, shipped.top_p, shipped.max_new_tokens, shipped.repetition_penalty) == (
        0.8, 0.95, 128, 1.0)
    assert write({"temperature": 0.5, "top_k": 3}) == ChatSettings(temperature=0.5)  # top_p stays the page's 0.95
    assert write({"do_sample": False, "temperature": 0.5}).temperature == 0.0
    clamped = write({"temperature": 3.0, "repetition_penalty": 1.1})
    assert (clamped.temperature, clamped.repetition_penalty) == (2.0, 1.1)  # to the page's slider range
    assert write("{not json") == ChatSettings()
    assert write({"temperature": 0.5, "top_p": 0}) == ChatSettings()  # a value SamplingParams refuses
    assert "top_p must be" in caplog.text and "the chat starts from mixtral's settings" in caplog.text


def test_behind_a_reverse_proxy_the_proxys_name_is_an_allowed_origin():
    """A page served through a proxy (https://chat.example -> 127.0.0.1:7860) posts with the proxy's origin: it
    passes once the name is an allowed host, and other sites' pages still do not (the guard on a bare ASGI app;
    tests/test_ui_browser.py runs it in front of the real page)."""
    from starlette.testclient import TestClient

    from mixtral.web_guard import WebAppGuard

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def post(guard, origin: str) -> int:  # (no lifespan: the bare app answers http only)
        client = TestClient(guard, base_url="http://127.0.0.1:7860")
        return client.post("/gradio_api/queue/join", headers={"Origin": origin}).status_code

    proxied = WebAppGuard(app, allowed_hosts=("chat.example",))
    assert post(proxied, "https://chat.example") == 200
    assert post(proxied, "https://evil.example") == 403
    assert post(WebAppGuard(app), "https://chat.example") == 403
    assert post(WebAppGuard(app), "http://127.0.0.1:7860") == 200
