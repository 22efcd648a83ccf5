"""Serving a model laid out like Mixtral-8x22B-Instruct (v3 tokenizer: [INST] and [/INST] are control tokens;
a chat template without a system role): the OpenAI chat route, the TGI text routes and the web app's TGI
backend all run the ids the engine encodes, which are mistral-common's."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import TOKENIZER_V3
from test_tokenizer import _reference
from test_ui import THREE_TURNS, collect, recorded_server

from mixtral import generate
from mixtral.sampling import SamplingParams
from mixtral.ui.backends import ChatSettings, TGIBackend


@pytest.fixture(scope="module")
def served(tiny_chat_model_v3):
    """`mixtral serve`'s app for the v3 model on loopback, recording request bodies."""
    with recorded_server(tiny_chat_model_v3, "tiny-mixtral-v3") as server:
        yield server


def greedy(served, ids, n):
    return generate(served.model, served.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=n))


def test_the_engine_encodes_chats_as_mistral_common(served):
    tok = served.tokenizer
    assert tok.chat_format == "v3" and tok.chat_template is not None and tok.vocab_size == 32768
    ids = tok.apply_chat_template(THREE_TURNS)
    assert ids == _reference(MistralTokenizer.from_file(str(TOKENIZER_V3)), THREE_TURNS)
    assert ids.count(3) == ids.count(4) == 3  # [INST] ... [/INST] per user turn, as single control ids


def test_openai_chat_route_runs_the_engine_ids(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny-mixtral-v3", messages=THREE_TURNS, temperature=0,
                                           max_tokens=6)
    ids = served.tokenizer.apply_chat_template(THREE_TURNS)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == greedy(served, ids, 6)


def test_tgi_routes_read_the_prompt_text_as_the_engine_ids(served):
    tok = served.tokenizer
    ids = tok.apply_chat_template(THREE_TURNS)
    text = tok.chat_prompt_text(THREE_TURNS)
    assert text.startswith("<s>[INST] Who goes there?[/INST] A friend to this ground.</s>[INST] And liegemen")
    assert text.endswith("[INST] You are a terse herald.\n\nStand, ho! Who is there?[/INST]")
    # The spacing of Mixtral-8x22B's published template, spaces around every control token, means the same.
    spaced = ("<s> [INST] Who goes there? [/INST] A friend to this ground. </s> [INST] And liegemen to the Dane? "
              "[/INST] Give you good night. </s> [INST] You are a terse herald.\n\nStand, ho! Who is there? [/INST]")
    for prompt in (text, spaced):
        tokens = httpx.post(f"{served.url}/tokenize", json={"inputs": prompt}, timeout=30).json()
        assert [t["id"] for t in tokens] == ids
        assert all(prompt[t["start"]:t["stop"]] == t["text"] for t in tokens)
        assert [t["text"] for t in tokens if t["id"] in (3, 4)] == ["[INST]", "[/INST]"] * 3
    body = {"inputs": text, "parameters": {"max_new_tokens": 6, "details": True}}
    reply = httpx.post(f"{served.url}/generate", json=body, timeout=60).json()
    assert reply["generated_text"] == greedy(served, ids, 6)


def test_web_app_tgi_backend_sends_what_the_engine_encodes(served):
    backend = TGIBackend(served.url, served.tokenizer)
    served.bodies.clear()
    text, turn = asyncio.run(collect(backend, THREE_TURNS, ChatSettings(temperature=0, max_new_tokens=5)))
    ids = served.tokenizer.apply_chat_template(THREE_TURNS)
    (body,) = served.bodies
    assert turn.prompt_ids == ids and body["inputs"] == served.tokenizer.chat_prompt_text(THREE_TURNS)
    tokens = httpx.post(f"{served.url}/tokenize", json={"inputs": body["inputs"]}, timeout=30).json()
    assert [t["id"] for t in tokens] == ids  # what the server ran
    assert text == greedy(served, ids, 5)


def test_sampled_replies_never_show_control_tokens(served):
    """A random model samples control ids now and then ([INST], [TOOL_CALLS], [control_8], ...: 750 of the
    32,768): they are special tokens in the details, and no part of the reply text."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "do_sample": True, "temperature": 1.5,
                                              "seed": 7, "details": True}}
    reply = httpx.post(f"{served.url}/generate", json=body, timeout=120).json()
    tokens = reply["details"]["tokens"]
    control = [t for t in tokens if t["special"]]
    assert control and all(served.tokenizer.is_special(t["id"]) for t in control)
    ids = [t["id"] for t in tokens]
    assert reply["generated_text"] == served.tokenizer.decode(ids)
    assert not any(t["text"] in reply["generated_text"] for t in control)
