"""One model over two processes started by torchrun (gloo on this CPU): the same numbers as one process and as
transformers, through the library, `mixtral generate`, two "nodes", `mixtral serve` with real clients, and a rank
killed mid-stream."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import torch

from conftest import make_hf_model, save_hf_model
from mixtral.config import load_config
from mixtral.distributed import Shard
from mixtral.generate import generate_step
from mixtral.memory import per_rank
from mixtral.errors import MixtralError
from mixtral.sampling import Sampler, SamplingParams

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    """A random Mixtral (4 heads, 2 key/value heads, 4 experts, untied head) with the real v1 tokenizer."""
    model = make_hf_model(vocab_size=32000, hidden_size=64, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, seed=3, tie_word_embeddings=False)
    return save_hf_model(model, tmp_path_factory.mktemp("split"), with_tokenizer=True), model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, nproc: int = 2, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), *args], capture_output=True,
                         text=True, env={**ENV, **(env or {})}, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


LOGITS_SCRIPT = """
import sys, torch
from mixtral import distributed
from mixtral.generate import generate_step
from mixtral.sampling import Sampler, SamplingParams
from mixtral.kernels import prompt
distributed.init()
quantize = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None
pack = sys.argv[4] != "torch" if len(sys.argv) > 4 else True
dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
prompt_ids = [int(t) for t in sys.argv[6].split(",")] if len(sys.argv) > 6 else [1, 415, 2936, 9060, 285, 1142,
                                                                                  28723, 851, 349, 264]
model = distributed.load_shard(sys.argv[1], dtype, progress=False, quantize=quantize, pack=pack)
runs = "torch" if model.runner is None else model.runner.name  # what runs this rank's passes
gemm_experts = []  # per MoE layer a prompt's GEMMs ran for (kernels/prompt.py): its experts, and the ones that ran
experts, one_expert, ran = prompt.experts, prompt.one_expert, []
def counted(layer, *rest):
    ran.clear()
    status = experts(layer, *rest)
    gemm_experts.append((layer.first, layer.held, sorted(ran)))
    return status
def counting(layer, rows, local, *rest, **named):
    ran.append(local)
    return one_expert(layer, rows, local, *rest, **named)
prompt.experts, prompt.one_expert = counted, counting
if distributed.rank() == 0:
    distributed.lead(model)
    ids = torch.tensor([prompt_ids])
    logits = model(ids)
    steps = generate_step(model, [ids[0].tolist()], [Sampler(SamplingParams(temperature=0))], 12)
    tokens = [step[0][0] for step in steps]
    other = ids[0, :5].tolist()[::-1]  # a second sequence, decoded beside the first and alone
    greedy = [Sampler(SamplingParams(temperature=0)) for _ in range(2)]
    together = [[s[0] for s in step] for step in generate_step(model, [ids[0].tolist(), other], greedy, 6)]
    alone = [step[0][0] for step in generate_step(model, [other], greedy[:1], 6)]
    params = sum(p.numel() for p in model.parameters())  # (a tied head is one parameter)
    torch.save({"logits": logits, "tokens": torch.tensor(tokens), "params": params, "runs": runs,
                "gemm_experts": gemm_experts, "together": together, "alone": alone}, sys.argv[2])
    distributed.finish(distributed.leader())
else:
    distributed.follow(model)
    distributed.finish()
"""


def native_kernels_run_here() -> bool:
    from mixtral.kernels import will_run_native

    return will_run_native(torch.device("cpu"))


def two_ranks_run_as_one_process(model_path, tmp_path):
    """Two ranks on `model_path` (torch's low-bit kernels off there and here: their bf16 products are taken for some
    widths only) against one process on the same file, as loaded (the reference path, dequantized weights): logits
    within 1e-4, the same 12 greedy tokens. Returns rank 0's results and the one process's model."""
    from mixtral import load
    from mixtral.quantize import kernels_disabled

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(LOGITS_SCRIPT))
    torchrun(str(script), str(model_path), str(tmp_path / "out.pt"), env={"MIXTRAL_TORCH_LOWBIT": "0"})
    got = torch.load(tmp_path / "out.pt")
    assert got["runs"] == ("native" if native_kernels_run_here() else "torch")
    one, _ = load(model_path, dtype="float32", pack=False, progress=False)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723, 851, 349, 264]])
    with torch.no_grad(), kernels_disabled():
        want = one(ids)
        steps = generate_step(one, [ids[0].tolist()], [Sampler(SamplingParams(temperature=0))], 12)
    assert got["logits"].shape == want.shape
    assert (got["logits"] - want).abs().max().item() < 1e-4
    assert got["tokens"].tolist() == [step[0][0] for step in steps]
    return got, one


@pytest.mark.parametrize("runs", ["native", "torch"])
def test_two_ranks_give_transformers_logits_and_greedy_tokens(split_model, tmp_path, runs):
    """On our C kernels (each rank's passes op by op, its parts of attention and of the MoE block summed over the
    ranks; the one-expert decode path and the grouped one both leave out the other rank's experts) and on the
    torch code: within 1e-4 of transformers' fp32 logits, its greedy tokens."""
    model_dir, reference = split_model
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(LOGITS_SCRIPT))
    torchrun(str(script), str(model_dir), str(tmp_path / "out.pt"), "none", runs)
    got = torch.load(tmp_path / "out.pt")
    assert got["runs"] == (runs if native_kernels_run_here() else "torch")
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723, 851, 349, 264]])
    with torch.no_grad():
        want = reference(ids).logits
        greedy = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert (got["logits"] - want).abs().max().item() < 1e-4
    assert got["tokens"].tolist() == greedy.tolist()
    assert got["params"] == per_rank(load_config(model_dir), 2)["params"]  # what `mixtral info --ranks 2` says
    # a batched decode step (two rows): each sequence's tokens as decoded alone
    assert [row[0] for row in got["together"]] == got["tokens"].tolist()[:6]
    assert [row[1] for row in got["together"]] == got["alone"]


@pytest.mark.parametrize("quantize", ["int8", "int4-g32+head"])
def test_two_ranks_quantized_as_they_load_are_as_close_as_one_process_quantized(split_model, tmp_path, quantize):
    """Each rank quantizes its part: q/k/v and experts exactly as one process does, o with per-row scales over its
    own columns. Held to one process's own quantization error against transformers fp32 (at most 1.5x, + 1e-3)."""
    from mixtral import load

    model_dir, reference = split_model
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(LOGITS_SCRIPT))
    torchrun(str(script), str(model_dir), str(tmp_path / "out.pt"), quantize)
    split = torch.load(tmp_path / "out.pt")["logits"]
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723, 851, 349, 264]])
    one, _ = load(model_dir, dtype="float32", quantize=quantize, pack=False, progress=False)
    with torch.no_grad():
        want = reference(ids).logits
        one_error = (one(ids) - want).abs().max().item()
    split_error = (split - want).abs().max().item()
    assert 0 < split_error <= 1.5 * one_error + 1e-3, (split_error, one_error)


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int8")])
def test_two_ranks_prompt_gemms_on_their_own_experts_are_as_close_as_one_process(split_model, tmp_path, dtype,
                                                                                  quantize, monkeypatch):
    """A 40-token prompt with bf16 or int8 weights on the prompt path's GEMMs (kernels/prompt.py, whichever this CPU
    takes; MIXTRAL_PROMPT=gemm: on any CPU, and for weights this small): each rank runs them for its own two
    experts only (the tokens routed to the other rank's add nothing there) and its part of attention; summed over
    the ranks, as close to transformers' fp32 logits as one process on the same path (at most 1.5x its error,
    + 1e-3)."""
    from mixtral import load
    from mixtral.kernels import prompt

    monkeypatch.setenv("MIXTRAL_PROMPT", "gemm")
    model_dir, reference = split_model
    ids = torch.randint(3, 32000, (1, 40), generator=torch.Generator().manual_seed(5))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(LOGITS_SCRIPT))
    torchrun(str(script), str(model_dir), str(tmp_path / "out.pt"), quantize, "native", dtype,
             ",".join(map(str, ids[0].tolist())), env={"MIXTRAL_PROMPT": "gemm"})
    got = torch.load(tmp_path / "out.pt")
    assert got["runs"] == ("native" if native_kernels_run_here() else "torch")
    gemms = native_kernels_run_here() and prompt.unavailable_reason() is None
    # rank 0 holds experts 0 and 1 of 4; both layers, for the prompt, generate's prefill of it and the batched
    # prefill of it beside a second sequence: each of its two experts ran (every expert gets tokens), none of the
    # other rank's
    assert got["gemm_experts"] == ([(0, 2, [0, 1])] * 6 if gemms else [])
    one, _ = load(model_dir, dtype=dtype, quantize=None if quantize == "none" else quantize, progress=False)
    with torch.no_grad():
        want = reference(ids).logits
        one_error = (one(ids).float() - want).abs().max().item()
    split_error = (got["logits"].float() - want).abs().max().item()
    assert 0 < split_error <= 1.5 * one_error + 1e-3, (split_error, one_error)


@pytest.mark.parametrize("bits, group, head", [(8, None, False), (4, 32, True)])
def test_a_checkpoint_quantized_on_disk_is_split_as_stored_and_runs_as_one_process(split_model, tmp_path, bits,
                                                                                     group, head):
    """`mixtral quantize` output under torchrun: each rank reads its rows of the codes and scales (o's columns: int8
    with its whole per-row scales, int4 cut at a group boundary), so the two ranks hold exactly the weights one
    process holds: the same logits up to the order of the summed parts, the same greedy tokens. torch's low-bit
    kernels (bf16 activations, taken for some widths only: o is half as wide on a rank) are off on both sides."""
    from mixtral.quantize_checkpoint import quantize_checkpoint

    model_dir, _ = split_model
    quantized = quantize_checkpoint(model_dir, tmp_path / "q", bits, group, lm_head=head, progress=False)
    _, one = two_ranks_run_as_one_process(quantized, tmp_path)
    assert (one.quantization["bits"], one.quantization["lm_head"]) == (bits, head)


def test_a_quantized_checkpoint_that_does_not_split_as_stored_is_refused(split_model, tmp_path, monkeypatch):
    """Rank 0 of 2 of int4 in groups of 64: o's 32 columns per rank are half a group, refused before any tensor is
    read. --quantize on a quantized checkpoint is refused unless it asks for what is stored (as in one process)."""
    from mixtral import distributed
    from mixtral.quantize_checkpoint import quantize_checkpoint

    model_dir, _ = split_model
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    g64 = quantize_checkpoint(model_dir, tmp_path / "g64", 4, 64, progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "read_stored", lambda *args: pytest.fail("a tensor was read"))
        with pytest.raises(MixtralError, match=r"columns \[0, 32\) on this rank do not start and end at a "
                                               r"boundary of its int4 groups of 64"):
            distributed.load_shard(g64, progress=False)
        with pytest.raises(MixtralError, match="already quantized .* cannot be re-quantized to 'int8'"):
            distributed.load_shard(g64, progress=False, quantize="int8")
    int8 = quantize_checkpoint(model_dir, tmp_path / "int8", 8, progress=False)
    assert distributed.load_shard(int8, progress=False, quantize="int8").quantization["bits"] == 8


def test_a_gguf_file_whose_q8_0_blocks_do_not_split_at_their_groups_is_refused(tmp_path, monkeypatch):
    """Rank 0 of 2 of a Q8_0 file whose o projection is 96 columns wide (6 heads of 16): 48 columns per rank cut
    its blocks of 32, refused before any tensor is read; with --quantize int4-g16 (the file's values quantized
    again, in groups that 48 columns hold whole) it loads."""
    from mixtral import distributed
    from mixtral.loading import load_model, load_tokenizer
    from mixtral.weights import export_gguf

    model = make_hf_model(vocab_size=32000, hidden_size=96, intermediate_size=64, num_attention_heads=6,
                          num_key_value_heads=2, num_local_experts=2, seed=12)
    plain = save_hf_model(model, tmp_path / "plain", with_tokenizer=True)
    out = export_gguf(load_model(plain, dtype="float32", pack=False, progress=False), load_tokenizer(plain),
                      tmp_path / "x-q8_0.gguf", "q8_0", progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "_gguf_part", lambda *args: pytest.fail("a tensor was read"))
        with pytest.raises(MixtralError, match=r"layers\.0\.attn\.wo\.weight: its columns \[0, 48\) on this rank do "
                                               r"not start and end at a boundary of its Q8_0 blocks of 32"):
            distributed.load_shard(out, progress=False)
    assert distributed.load_shard(out, progress=False, quantize="int4-g16").layers[0].attn.wo.bits == 4


def test_one_expert_per_rank_a_tied_head_quantized_and_an_uneven_vocabulary_split_as_one_process(tmp_path):
    """2 experts over 2 ranks (a token's top-2 spans both), a tied embedding with its head quantized on disk
    (+head, int4 elsewhere) and a vocabulary of 32,001 rows (the last rank's slice one row shorter, padded for the
    gather): logits within 1e-4 of one process on the same checkpoint, the same greedy tokens."""
    from mixtral.quantize_checkpoint import quantize_checkpoint

    model = make_hf_model(vocab_size=32001, hidden_size=64, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=2, seed=8, tie_word_embeddings=True)
    plain = save_hf_model(model, tmp_path / "plain", with_tokenizer=True)
    quantized = quantize_checkpoint(plain, tmp_path / "q", 4, 32, lm_head=True, progress=False)
    got, _ = two_ranks_run_as_one_process(quantized, tmp_path)
    assert got["logits"].shape[-1] == 32001


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "f16"])
def test_a_gguf_file_is_split_as_one_process_holds_it(tmp_path, kind):
    """A GGUF file under torchrun: each rank reads each tensor whole, one at a time, and keeps its part, held as one
    process holds the file (Q4_0: int4 in groups of 32 with the file's codes and fp16 scales, the keys, values and
    output projection it stores in Q8_0 as int8; Q4_1: the same with an offset per group, cut as the scales are;
    Q8_0 as int8 with the file's codes and a scale per group of 32, cut as group scales are; F16 as floats): logits
    within 1e-4 of one process on the same file, the same greedy tokens."""
    from gguf import GGMLQuantizationType as T
    from test_gguf import export_retyped

    from mixtral.loading import load_model, load_tokenizer
    from mixtral.weights import export_gguf

    model = make_hf_model(vocab_size=32000, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, seed=11, tie_word_embeddings=False)
    plain = save_hf_model(model, tmp_path / "plain", with_tokenizer=True)
    model, tokenizer = load_model(plain, dtype="float32", pack=False, progress=False), load_tokenizer(plain)
    out = tmp_path / f"x-{kind}.gguf"
    out = (export_retyped(model, tokenizer, out, {"*": T.Q4_1}) if kind == "q4_1"
           else export_gguf(model, tokenizer, out, kind, progress=False))
    _, one = two_ranks_run_as_one_process(out, tmp_path)
    if kind.startswith("q4"):
        assert one.layers[0].attn.wq.bits == 4 and one.layers[0].attn.wk.bits == 8 and one.lm_head.bits == 8
        assert (one.layers[0].attn.wo.offsets is not None) == (kind == "q4_1")
    if kind != "f16":  # the Q8_0 matrices (q4: keys, values and the output projection) keep their scale per 32
        assert one.layers[0].attn.wk.scale_group == 32 and one.lm_head.scale_group == 32


def test_torchrun_generate_equals_one_process(split_model):
    model_dir, _ = split_model
    command = ["-m", "mixtral", "generate", "--model", str(model_dir), "--dtype", "float32", "--prompt",
               "Who goes there?", "--temperature", "0", "--max-new-tokens", "24", "--json"]
    one = subprocess.run([sys.executable, *command, "--no-pack"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*command)
    assert json.loads(two.stdout.strip().splitlines()[-1]) == json.loads(one.stdout.strip().splitlines()[-1])
    assert two.stdout.count('"token_ids"') == 1  # only rank 0 prints


def test_two_nodes_rendezvous_on_loopback(split_model):
    """`--nnodes 2`: two torchrun launchers (one process each) meet at a c10d rendezvous on 127.0.0.1."""
    model_dir, _ = split_model
    endpoint = f"127.0.0.1:{free_port()}"
    command = ["-m", "mixtral", "generate", "--model", str(model_dir), "--dtype", "float32", "--prompt", "Hello",
               "--temperature", "0", "--max-new-tokens", "8", "--json"]
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mixtral-test",
                               *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for n in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    one = subprocess.run([sys.executable, *command, "--no-pack"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    printed = [out for out, _ in outputs if '"token_ids"' in out]
    assert len(printed) == 1 and json.loads(printed[0].strip().splitlines()[-1]) == json.loads(
        one.stdout.strip().splitlines()[-1])


def test_a_split_that_does_not_divide_is_refused_with_what_to_do():
    with pytest.raises(MixtralError, match="do not split evenly over 3 ranks"):
        Shard(0, 3).even(8, "experts")
    assert [Shard(r, 3).vocab(10) for r in range(3)] == [(0, 4), (4, 8), (8, 10)]


def _serve(*launcher, model_dir, port, timeout: float = 20) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "-m", "mixtral", "serve", "--model", str(model_dir), "--dtype", "float32",
                             "--port", str(port), "--max-total-tokens", "512", "--dist-timeout", str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)


def _wait_healthy(process, url: str) -> None:
    deadline = time.time() + 180
    while True:
        assert process.poll() is None and time.time() < deadline, "mixtral serve did not start"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)


def _replies(url: str) -> list[str]:
    """Streamed greedy replies through the seed's InferenceClient code and the openai client."""
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    client = InferenceClient(url)
    tgi = "".join(client.text_generation("[INST] Who goes there? [/INST]", max_new_tokens=20, stream=True,
                                         do_sample=False))
    openai = OpenAI(base_url=url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What news from the court, and how fares the king tonight?"}]
    chunks = openai.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0, stream=True)
    first = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And the queen?"}]
    second = openai.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0)
    return [tgi, first, second.choices[0].message.content, second.usage.prompt_tokens_details.cached_tokens > 16]


def test_serve_on_two_ranks_streams_what_one_process_streams(split_model):
    """The same replies through both protocols, and a conversation's next turn reuses the first's keys and values
    on every rank (rank 0's prefix cache sends its loads and stores to the other)."""
    model_dir, _ = split_model
    replies = {}
    for label, launcher in (("one", [sys.executable]), ("two", [*TORCHRUN, "--standalone", "--nproc-per-node", "2"])):
        port = free_port()
        process = _serve(*launcher, model_dir=model_dir, port=port, timeout=3)
        try:
            _wait_healthy(process, f"http://127.0.0.1:{port}")
            time.sleep(5)  # idle for longer than --dist-timeout: the other rank waits for rank 0 as long as it takes
            replies[label] = _replies(f"http://127.0.0.1:{port}")
            # a stop signal to rank 0 drains it like one process; it then stops the other rank, and torchrun exits 0
            os.kill(process.pid if label == "one" else _worker(process.pid, rank=0), signal.SIGTERM)
            output = process.communicate(timeout=120)[0]
            assert process.returncode == 0, output[-3000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert replies["two"] == replies["one"] and all(replies["one"])  # the second turn reused the first (prefix)


def _worker(launcher: int, rank: int) -> int:
    """The pid of the worker torchrun (process `launcher`) started as `rank`."""
    children = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_1_fails_the_stream_and_rank_0_exits_non_zero(split_model, how):
    """Killed: its sockets close and rank 0's next collective fails at once. Hung (SIGSTOP): rank 0's collective
    gives up after --dist-timeout (5 s here)."""
    model_dir, _ = split_model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout = 20 if how == "killed" else 5
    process = _serve(*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", model_dir=model_dir,
                     port=port, timeout=timeout)
    try:
        _wait_healthy(process, url)
        rank1 = _worker(process.pid, rank=1)
        events, stopped = [], None
        with httpx.stream("POST", url + "/generate_stream", json={"inputs": "Hello", "parameters": {
                "max_new_tokens": 400, "do_sample": False}}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 3:
                        os.kill(rank1, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                        stopped = time.time()
        waited = time.time() - stopped
        if how == "hung":
            os.kill(rank1, signal.SIGCONT)  # it finds rank 0 gone and exits too (else torchrun waits to kill it)
        assert 3 <= len(events) < 400 and "error" in events[-1], events[-3:]
        assert waited < 10 if how == "killed" else timeout - 1 < waited < timeout + 15, waited
        output = process.communicate(timeout=90)[0]
        assert process.returncode != 0
        assert "mixtral: error: a rank stopped answering" in output, output[-4000:]  # rank 0's last word, exit 1
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_info_says_what_each_rank_holds_and_other_commands_are_refused_under_torchrun(capsys, monkeypatch):
    from mixtral.cli import main

    assert main(["info", "--preset", "mixtral-8x7b", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 (torchrun): 23,352,053,760 parameters" in out and "64 KiB per token" in out
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["info", "--preset", "mixtral-8x7b"]) == 2
    assert "under torchrun, mixtral runs generate, chat, serve" in capsys.readouterr().err


def test_chat_on_two_ranks_reuses_the_conversation_and_answers_as_one_process(split_model):
    model_dir, _ = split_model
    command = ["-m", "mixtral", "chat", "--model", str(model_dir), "--dtype", "float32", "--temperature", "0",
               "--max-new-tokens", "12", "--verbose"]
    turns = "Who goes there?\nWhat news from the court?\nAnd the queen?\n"
    one = subprocess.run([sys.executable, *command, "--no-pack"], input=turns, capture_output=True, text=True,
                         env=ENV, timeout=300)
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *command], input=turns,
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and len(one.stdout.splitlines()) == 3
    reused = [[int(m) for m in re.findall(r"\((\d+) reused", run.stderr)] for run in (one, two)]
    assert reused[1] == reused[0] and len(reused[0]) == 3 and reused[0][0] == 0 and min(reused[0][1:]) >= 12, reused
