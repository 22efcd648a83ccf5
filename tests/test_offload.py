"""Expert offloading: a model whose experts stay on disk, read into an expert cache as the layers need them, gives
bit-identical logits and greedy tokens to the same checkpoint loaded whole (which test_parity holds against
transformers), for plain bf16 and fp32-loaded checkpoints and for `mixtral quantize` int8 and int4 ones; with a
cache so small that every step misses, with speculative prefetch on and off; a budget too small fails before
loading, with the minimum; a file that goes bad mid-run fails the pass that needs it and nothing else."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_hf_model, save_hf_model

from mixtral import kernels, memory_plan
from mixtral.config import load_config
from mixtral.errors import MixtralError
from mixtral.kv_cache import KVCache
from mixtral.loading import load_model
from mixtral.offloading import load_offloaded
from mixtral.quantize_checkpoint import quantize_checkpoint
from mixtral.weights import read_quantization

pytestmark = pytest.mark.skipif(not kernels.will_run_native("cpu"), reason="offloading runs on our C kernels")

PROMPT = [1, 5, 9, 200, 3, 17, 42]
STEPS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One bf16 Mixtral (4 layers of 4 experts, top-2) and its int8 and int4 quantizations."""
    root = tmp_path_factory.mktemp("offload")
    bf16 = save_hf_model(make_hf_model(seed=5, num_hidden_layers=4).to(torch.bfloat16), root / "bf16",
                         with_tokenizer=True)
    return {"bf16": bf16, "int8": quantize_checkpoint(bf16, root / "int8", 8, None, progress=False),
            "int4": quantize_checkpoint(bf16, root / "int4", 4, 32, progress=False)}


def offloaded(path, dtype: str, slots: int, prefetch: bool = True):
    """The checkpoint with its experts on disk and `slots` of them cached."""
    args = load_config(path)
    dtype = getattr(torch, dtype)
    plan = memory_plan.plan(args, read_quantization(path), dtype, 1 << 40, runtime=0, bandwidth=(1.0, 10.0))
    return load_offloaded(path, args, read_quantization(path), dtype, dataclasses.replace(plan, slots=slots),
                          prefetch=prefetch, progress=False)


def run(model, steps: int = STEPS):
    """Prompt logits, then greedy decode steps: (prompt logits, [step logits], [tokens])."""
    cache = KVCache(model.args, 1, len(PROMPT) + steps + 1, model.activation_dtype)
    ids = torch.tensor([PROMPT])
    prompt_logits = model(ids, torch.arange(len(PROMPT))[None], cache, n_keys=len(PROMPT))[0, -1].clone()
    runner = kernels.runner(model)
    token, logits, tokens = int(prompt_logits.argmax()), [], []
    for position in range(len(PROMPT), len(PROMPT) + steps):
        tokens.append(token)
        step = runner.decode_step(cache, [token], [position])
        logits.append(step.logits[0].clone())
        token = step.best[0]
    return prompt_logits, logits, tokens


@pytest.mark.parametrize("kind,dtype", [("bf16", "bfloat16"), ("bf16", "float32"), ("int8", "bfloat16"),
                                        ("int4", "bfloat16")])
@pytest.mark.parametrize("prefetch", [True, False])
def test_bit_identical_to_the_whole_model_while_missing_every_step(checkpoints, kind, dtype, prefetch):
    whole = load_model(checkpoints[kind], dtype=dtype, progress=False)
    want = run(whole)
    args = whole.args
    model = offloaded(checkpoints[kind], dtype, slots=args.n_experts, prefetch=prefetch)  # one layer's worth
    store = kernels.runner(model).store
    cache = KVCache(args, 1, len(PROMPT) + STEPS + 1, model.activation_dtype)
    model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, n_keys=len(PROMPT))
    misses = store.stats.summary()["misses"]
    for position in range(len(PROMPT), len(PROMPT) + 3):  # each decode step reads experts from disk again
        kernels.runner(model).decode_step(cache, [3], [position])
        assert store.stats.summary()["misses"] > misses
        misses = store.stats.summary()["misses"]
    got = run(model)
    assert torch.equal(got[0], want[0])
    assert got[2] == want[2]
    for ours, theirs in zip(got[1], want[1]):
        assert torch.equal(ours, theirs)
    summary = store.stats.summary()
    assert summary["bytes_read"] > 0 and 0 <= summary["hit_rate"] < 1
    if prefetch:
        assert 0 <= summary["prefetch_recall"] <= 1 and 0 <= summary["prefetch_precision"] <= 1
    else:
        assert summary["prefetch_recall"] is None and store.stats.prefetch_reads == 0


def test_a_cache_that_holds_every_expert_reads_each_once(checkpoints):
    args = load_config(checkpoints["int4"])
    model = offloaded(checkpoints["int4"], "bfloat16", slots=args.n_layers * args.n_experts)
    run(model)
    store = kernels.runner(model).store
    stats = store.stats
    assert stats.demand_reads + stats.prefetch_reads <= args.n_layers * args.n_experts
    first = stats.summary()["bytes_read"]
    run(model)  # everything is cached by now: nothing more is read
    assert stats.summary()["bytes_read"] == first and stats.summary()["hit_rate"] > 0.5


def test_a_budget_too_small_fails_before_loading_and_says_the_minimum(checkpoints):
    with pytest.raises(MixtralError, match=r"too small .* needs at least \d[\d.,]* (MiB|GiB)") as info:
        load_model(checkpoints["int4"], max_memory="1MB", progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(MixtralError, match="memory size"):
        load_model(checkpoints["int4"], max_memory="lots", progress=False)


def test_a_budget_that_holds_everything_loads_the_model_whole(checkpoints):
    model = load_model(checkpoints["int4"], max_memory="64GiB", progress=False)
    assert getattr(kernels.runner(model), "store", None) is None
    model = load_model(checkpoints["bf16"], quantize="int4", max_memory="64GiB", progress=False)  # planned at int4
    assert getattr(kernels.runner(model), "store", None) is None and model.layers[0].ffn.w1.bits == 4


def test_a_file_gone_bad_fails_the_pass_that_needs_it_and_the_process_goes_on(checkpoints, tmp_path):
    import shutil

    copy = shutil.copytree(checkpoints["int4"], tmp_path / "copy")
    model = offloaded(copy, "bfloat16", slots=load_config(copy).n_experts)
    run(model, steps=2)
    weights = copy / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # the second half of the experts is gone
    with pytest.raises(OSError, match="reading expert"):
        for _ in range(3):
            run(model, steps=2)
    weights.write_bytes(good)
    whole = load_model(checkpoints["int4"], dtype="bfloat16", progress=False)
    assert run(model, steps=4)[2] == run(whole, steps=4)[2]  # the next passes are right again


def test_the_planner(checkpoints):
    args = load_config(checkpoints["int4"])
    spec = read_quantization(checkpoints["int4"])
    weights = memory_plan.model_weights(args, spec, torch.bfloat16)
    on_disk = sum(p.nbytes for p in __import__("mixtral.weights", fromlist=["x"]).stored_tensors(
        checkpoints["int4"] / "model.safetensors"))
    # the planner's sizes add up to the checkpoint's (norms are fp32 in memory, bf16 on disk)
    assert abs(weights.resident + weights.experts * weights.expert - on_disk) <= 2 * (2 * args.n_layers + 1) * args.dim
    fixed = dict(runtime=100 << 20, bandwidth=(1.0, 10.0), context=64)
    roomy = memory_plan.plan(args, spec, torch.bfloat16, 1 << 34, **fixed)
    assert not roomy.offload and roomy.fits
    tight = memory_plan.plan(args, spec, torch.bfloat16, roomy.need(args.n_experts + 3), **fixed)
    assert tight.offload and tight.slots == args.n_experts + 3 and tight.fits
    assert tight.bytes_read_per_token > 0 and tight.tokens_per_s < roomy.tokens_per_s
    too_small = memory_plan.plan(args, spec, torch.bfloat16, roomy.need(args.n_experts) - 1, **fixed)
    assert not too_small.fits and "at least" in too_small.describe()
    assert memory_plan.parse_size("12GiB") == 12 << 30 and memory_plan.parse_size("16GB") == 16 * 10**9
    assert memory_plan.parse_size("900MiB") == 900 << 20 and memory_plan.parse_size("2G") == 2 << 30


def test_the_server_runs_an_offloaded_model_in_batches_and_reports_its_cache(tiny_chat_model):
    """Three requests at once through the TGI route of a server whose model's experts are on disk: the texts greedy
    decoding of the whole model gives, and the expert cache's numbers in /metrics."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from conftest import serve_in_thread

    from mixtral import generate, load
    from mixtral.engine import Engine
    from mixtral.sampling import SamplingParams
    from mixtral.server import create_app

    whole, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    prompts = ["Who goes there?", "Tell me a story.", "Why?"]
    want = [generate(whole, tokenizer, tokenizer.encode(p, add_bos=True),
                     SamplingParams(temperature=0, max_new_tokens=12)) for p in prompts]
    model = offloaded(tiny_chat_model, "float32", slots=load_config(tiny_chat_model).n_experts)
    engine = Engine(model, tokenizer, max_batch_size=4)
    try:
        with serve_in_thread(create_app(engine, "offloaded")) as url:
            def ask(prompt):
                body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "do_sample": False}}
                return httpx.post(f"{url}/generate", json=body, timeout=60).json()["generated_text"]

            with ThreadPoolExecutor(3) as pool:
                got = list(pool.map(ask, prompts))
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        engine.close()
    assert got == want
    assert "mixtral_expert_hit_rate{layer=" in metrics and "mixtral_expert_bytes_read_total" in metrics


def test_the_reader_threads_end_with_the_model(checkpoints):
    import gc
    import threading

    def readers() -> int:
        return sum(thread.name.startswith("expert-reader") for thread in threading.enumerate())

    gc.collect()
    before = readers()
    model = offloaded(checkpoints["int4"], "bfloat16", slots=8)
    run(model, steps=1)
    assert readers() > before
    del model
    gc.collect()
    assert readers() == before


def test_the_commands_plan_and_refuse_a_budget_too_small(checkpoints):
    from test_cli import run_cli

    out = run_cli("info", "--preset", "mixtral-8x7b", "--memory", "12GiB", "--quantize", "int4", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["offload"] and plan["fits"] and 8 < plan["slots"] < 256 and plan["experts"] == 256
    assert plan["quantization"]["bits"] == 4 and 0 < plan["hit_rate"] < 1
    out = run_cli("info", "--preset", "mixtral-8x7b", "--memory", "2GiB", "--quantize", "int4")
    assert out.returncode == 1 and "does not fit: it needs at least" in out.stdout
    out = run_cli("chat", "--model", str(checkpoints["int4"]), "--max-memory", "1MB", stdin="hi\n")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "too small" in lines[0] and "at least" in lines[0]
    out = run_cli("generate", "--model", str(checkpoints["int4"]), "--max-memory", "64GiB", "--context", "8",
                  "--raw", "--prompt", "hello there", "--max-new-tokens", "20")
    assert out.returncode == 2 and "exceed the 8-token context" in out.stderr


def test_the_store_hands_out_the_right_bytes_through_misses_read_aheads_and_a_failing_file(tmp_path):
    """The store alone, driven as the C side drives it: after every fetch, each needed expert's slot holds exactly
    that expert's bytes from the file, through 300 random passes of misses, evictions and read-aheads (right and
    wrong guesses); a file cut short fails the fetch that needs a lost expert, and the store goes on after."""
    import ctypes
    import random

    from mixtral.kernels.native_lib import FORMATS
    from mixtral.kernels.offload import ExpertStore, Piece, expert_format

    layers, experts, size = 4, 6, 256  # bytes per weight of one expert (64 fp32 values: 8 x 8)
    path = tmp_path / "experts.bin"
    blob = random.Random(0).randbytes(layers * experts * 3 * size)
    path.write_bytes(blob)
    where = {}
    pieces = {}
    for layer in range(layers):
        for e in range(experts):
            for i, name in enumerate(("w1", "w3", "w2")):
                offset = ((layer * experts + e) * 3 + i) * size
                where[layer, e, name] = offset
                pieces.setdefault((layer, e), []).append(
                    Piece(name, "data", str(path), offset, size, torch.float32, torch.float32))
    formats = {name: expert_format(FORMATS[torch.float32], 8, 8, 0, 4) for name in ("w1", "w3", "w2")}
    store = ExpertStore(pieces, formats, slots=experts + 3, threads=3)
    store._top_k = 2  # what `hook` sets from the layers' top-k (no C hooks here: guesses go to fetch by hand)
    store.set_prefetch(True)

    def check(layer, needed):
        for e in needed:
            for name in ("w1", "w3", "w2"):
                address = store._tables[layer, name, "data"][e]
                assert address and ctypes.string_at(address, size) == blob[where[layer, e, name]:][:size]

    rng = random.Random(1)
    try:
        for step in range(300):
            layer = step % layers
            needed = sorted(rng.sample(range(experts), rng.choice([1, 2, 2, 2, experts])))
            guessed = sorted(rng.sample(range(experts), 2))
            store.fetch(layer, needed, guessed)
            check(layer, needed)
        assert store.stats.summary()["misses"] > 50
        # a pass with no miss reads the next layer's guess ahead, into a free slot; needed next, it is a hit
        cached = [e for e in range(experts) if (0, e) in store._cached and (0, e) not in store._reading]
        absent = [e for e in range(experts) if (1, e) not in store._cached]
        store.fetch(0, cached[:1], absent[:1])
        assert store.stats.prefetch_reads > 0 and (1, absent[0]) in store._cached
        hits = store.stats.summary()["prefetched_hits"]
        store.fetch(1, absent[:1], [])
        check(1, absent[:1])
        assert store.stats.summary()["prefetched_hits"] == hits + 1
        path.write_bytes(blob[: len(blob) // 2])  # layers 2 and 3 are gone
        lost = [e for e in range(experts) if (3, e) not in store._cached]
        with pytest.raises(OSError, match="reading expert"):
            store.fetch(3, lost[:1], [])
        store.fetch(0, [0, 1], [2, 3])  # still there: served as before
        check(0, [0, 1])
        path.write_bytes(blob)
        for step in range(40):
            layer = step % layers
            needed = sorted(rng.sample(range(experts), 2))
            store.fetch(layer, needed, sorted(rng.sample(range(experts), 2)))
            check(layer, needed)
    finally:
        store.close()
