"""Shared fixtures: tiny random checkpoints written by transformers itself (the reference implementation)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from mixtral.tokenizer import mistral_v1_tokenizer_path

TOKENIZER_V1 = mistral_v1_tokenizer_path()
# Mistral's later SentencePiece models, shipped in the same mistral-common package: 32,768 pieces each, with
# instruct control tokens ([INST] = 3, [/INST] = 4, tool tokens after them; v7 adds [SYSTEM_PROMPT]).
TOKENIZER_V2 = TOKENIZER_V1.parent / "mistral_instruct_tokenizer_240216.model.v2"
TOKENIZER_V3 = TOKENIZER_V1.parent / "mistral_instruct_tokenizer_240323.model.v3"  # Mixtral-8x22B's
TOKENIZER_V7 = TOKENIZER_V1.parent / "mistral_instruct_tokenizer_241114.model.v7"


def v3_style_template(user: str = "'[INST] ' + message['content'] + ' [/INST]'",
                      answer: str = "' ' + message['content'] + eos_token") -> str:
    """A chat template in the spirit of Mixtral-8x22B-Instruct's: tool roles and [AVAILABLE_TOOLS] before the
    last user message, but no system role, so a system message is silently left out. `user` and `answer` are
    the Jinja expressions for one user message and one answer (the published templates differ in spacing)."""
    return (
        "{{ bos_token }}{% set user_messages = messages | selectattr('role', 'equalto', 'user') | list %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% if tools and message == user_messages[-1] %}"
        "{{ '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{% endif %}"
        "{{ " + user + " }}"
        "{% elif message['role'] == 'assistant' %}{{ " + answer + " }}"
        "{% elif message['role'] == 'tool_calls' %}{{ '[TOOL_CALLS] ' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'tool_results' %}"
        "{{ '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}"
        "{% endif %}{% endfor %}"
    )


def make_hf_model(model_type: str = "mixtral", seed: int = 0, **overrides):
    """A random transformers Mixtral/Mistral model (fp32, eval mode) with peaked logits (std 0.1 init)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.1,
                    rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    if model_type == "mixtral":
        settings.update(num_local_experts=4, num_experts_per_tok=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    if model_type == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**settings))
    else:
        model = MistralForCausalLM(MistralConfig(**settings))
    model.generation_config.eos_token_id = None  # generate exactly the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_hf_model(model, out_dir: Path, with_tokenizer: bool = False, **save_kwargs) -> Path:
    model.save_pretrained(out_dir, **save_kwargs)
    if with_tokenizer:
        shutil.copy(TOKENIZER_V1, out_dir / "tokenizer.model")
    return out_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random Mixtral with the real v1 tokenizer (vocab 32000): for CLI and generation tests."""
    out = tmp_path_factory.mktemp("tiny_chat")
    model = make_hf_model(vocab_size=32000, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, seed=1)
    return save_hf_model(model, out, with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_chat_model_v3(tmp_path_factory) -> Path:
    """A tiny random Mixtral laid out like Mixtral-8x22B-Instruct: the v3 tokenizer (vocab 32768) as
    tokenizer.model, and a tokenizer_config.json with a chat template in the spirit of the published one."""
    out = tmp_path_factory.mktemp("tiny_chat_v3")
    model = make_hf_model(vocab_size=32768, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, seed=3)
    save_hf_model(model, out)
    shutil.copy(TOKENIZER_V3, out / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": v3_style_template()}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@contextlib.contextmanager
def serve_in_thread(app):
    """Serve an ASGI app with uvicorn on a free loopback port in a background thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="info", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


BF16_CONFIGS = {  # tied/untied, GQA/MHA, a sliding window, and the dense mistral MLP
    "gqa-untied": ("mixtral", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mha-tied-window": ("mixtral", dict(num_key_value_heads=4, tie_word_embeddings=True, sliding_window=6)),
    "mistral-dense": ("mistral", dict(num_key_value_heads=2)),
}


@pytest.fixture(scope="module", params=list(BF16_CONFIGS))
def bf16_pair(request, tmp_path_factory):
    """A bf16 checkpoint written by transformers, and transformers' model of it computing in fp32."""
    from transformers import AutoModelForCausalLM

    model_type, overrides = BF16_CONFIGS[request.param]
    out = tmp_path_factory.mktemp(f"bf16_{request.param}")
    save_hf_model(make_hf_model(model_type, seed=5, **overrides).to(torch.bfloat16), out)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, reference


def greedy(model, prompts, n):
    """Greedy token ids per row from generate_step (prefill, then n decode steps through the KV cache)."""
    from mixtral.generate import generate_step
    from mixtral.sampling import Sampler, SamplingParams

    steps = list(generate_step(model, prompts, [Sampler(SamplingParams(temperature=0)) for _ in prompts], n))
    return [[step[row][0] for step in steps] for row in range(len(prompts))]
