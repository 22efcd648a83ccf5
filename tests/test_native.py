"""Our own CPU kernels (kernels/native*.py, kernels/csrc/cpu_kernels.c) against torch's fp32 matmul and
transformers' Mixtral."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import greedy as _greedy, make_hf_model, save_hf_model

from mixtral import kernels
from mixtral.kernels import native_lib, native_weights
from mixtral import quantize as Q
from mixtral.loading import load_model

pytestmark = pytest.mark.skipif(not native_lib.available(), reason=f"native kernels: {native_lib.unavailable_reason()}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- one matmul, every weight format --------------------------------------------------------------------

def _quantized(dense, name: str):
    """A QuantLinear: "int8", "int4-g64", "int4-g32-fp16" (fp16 scales, as a GGUF file's Q4_0 blocks are held),
    "int4-g32-offsets" (fp16 scales and group offsets, as its Q4_K and Q4_1 blocks are) or "int8-g32" (codes and an
    fp16 scale per 32 columns, as its Q8_0 blocks are: made by gguf.quants' own Q8_0 quantizer)."""
    if name == "int8-g32":
        from gguf import GGMLQuantizationType, quants

        from mixtral.gguf_file import Q8Blocks

        blocks = Q8Blocks.of(quants.quantize(dense.numpy(), GGMLQuantizationType.Q8_0))
        weight = Q.QuantLinear.from_weight(dense, 8, pack=False)
        weight.qweight, weight.scales = blocks.codes, blocks.held()
        assert weight.scale_group == 32 and torch.equal(weight.dequantize(), blocks.dequantize())
        return weight
    bits, group = (8, None) if name == "int8" else (4, int(name.split("-")[1][1:]))
    weight = Q.QuantLinear.from_weight(dense, bits, group, pack=False)
    if name.endswith(("-fp16", "-offsets")):  # values a bf16 scale cannot hold, and negative ones, as Q4_0 has
        sign = 1 - 2 * (torch.arange(weight.scales.numel()) % 3 == 0).view(weight.scales.shape)
        weight.scales = (weight.scales.float() * 1.001 * sign).half()
    if name.endswith("-offsets"):  # a group's minimum: of the order of its range, either sign
        weight.offsets = (torch.randn(weight.scales.shape, generator=_gen(weight.scales.numel())) * 8
                          * weight.scales.float().abs()).half()
    return weight


def _weights(n, k, experts=2):
    dense = torch.randn(experts, n, k, generator=_gen(n * k)) * 0.05
    names = ["int8", "int4-g16", "int4-g32", "int4-g64", "int4-g128", "int4-g32-fp16", "int4-g32-offsets"]
    names += ["int8-g32"] if k % 32 == 0 else []  # (Q8_0 blocks: whole groups of 32)
    return {"fp32": dense, "bf16": dense.bfloat16(), "fp16": dense.half(), **{n: _quantized(dense, n) for n in names}}


def _integer_product(x: torch.Tensor, span: int, weight, expert: int) -> torch.Tensor:
    """What the integer kernels compute of x (M, K) @ W_expert^T for a stacked QuantLinear: activations rounded to
    16 bits per span of columns times the codes' part, and the exact activations times the group offsets' part."""
    dense = weight.dequantize(expert).float()
    if weight.offsets is None:
        return _rounded_to_16_bits(x, span) @ dense.T
    offsets = weight.offsets[expert].float().repeat_interleave(weight.group_size, -1)[:, :weight.in_features]
    return _rounded_to_16_bits(x, span) @ (dense - offsets).T + x @ offsets.T


def _rounded_to_16_bits(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the integer kernels make of a (1, K) activation: int16 with one fp32 scale per span of `block`
    columns (256 for int8; one group for int4)."""
    blocks = torch.nn.functional.pad(x, (0, -x.shape[-1] % block)).view(-1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 32767
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((blocks / scale).round() * scale).view(1, -1)[:, :x.shape[-1]]


@pytest.mark.parametrize("rows", [1, 3, 70])  # batch-1 decode; a few sequences; a prompt (over 64 rows)
@pytest.mark.parametrize("n,k", [(37, 200), (64, 1100), (8, 48), (13, 1056)])  # odd row counts, K past one
# 1024-column tile; 1056 = 33 groups of 32
def test_linear_equals_fp32_matmul_of_the_dequantized_weight(rows, n, k):
    """Exact fp32 products, except int8 and int4 (groups of 32 or more) at one row: activations rounded to
    16 bits per span of columns, then integer products."""
    x = torch.randn(rows, k, generator=_gen(rows))
    for name, weight in _weights(n, k).items():
        dense = (weight.dequantize() if isinstance(weight, Q.QuantLinear) else weight).float()
        integer = rows == 1 and name != "int4-g16" and name.startswith("int")
        span = 256 if name == "int8" else int(name.split("-")[1][1:]) if integer else 0
        wanted = _integer_product(x, span, weight, 1) if integer else x @ dense[1].T  # expert 1 of 2
        if integer:  # and the rounding is far below the weights' own (int8: ~1e-2 here)
            assert torch.allclose(wanted, x @ dense[1].T, rtol=1e-4, atol=2e-4)
        got = native_lib.NativeWeight(weight).linear(x, expert=1)
        assert torch.allclose(got, wanted, rtol=1e-5, atol=1e-5), name
        out = torch.ones(rows, n + 3)  # into a wider buffer, added to what is there
        native_lib.NativeWeight(weight).linear(x, expert=1, out=out[:, 2:2 + n], accumulate=True)
        assert torch.allclose(out[:, 2:2 + n], wanted + 1, rtol=1e-5, atol=1e-5), name
        assert torch.equal(out[:, :2], torch.ones(rows, 2)) and torch.equal(out[:, -1], torch.ones(rows)), name


def test_logsumexp_equals_torchs_including_infinities_and_nan():
    gen = _gen(11)
    rows = torch.randn(6, 32003, generator=gen) * 8  # not a multiple of 8 wide: the scalar tail too
    rows[1] -= 200.0  # every exp(x) underflows in fp32 without the max taken out
    rows[2, ::3] = float("-inf")
    rows[3, 5] = float("nan")
    rows[4, 32001] = float("inf")  # in the tail
    rows[5] = float("-inf")
    got, wanted = native_lib.logsumexp(rows), torch.logsumexp(rows.double(), dim=-1)
    assert torch.allclose(got[:3], wanted[:3], rtol=1e-7, atol=1e-6)
    # torch: NaN for a row with a NaN; log-softmax of a row with +inf or all -inf is NaN, which x - lse keeps
    assert got[3].isnan() and wanted[3].isnan()
    assert (rows[4] - got[4]).isnan().any() and torch.log_softmax(rows[4], -1).isnan().any()
    assert (rows[5] - got[5]).isnan().all() and torch.log_softmax(rows[5], -1).isnan().all()


def test_argmax_is_the_samplers_greedy_choice_including_ties_infinities_and_nan():
    from mixtral.sampling import Sampler, SamplingParams

    gen = _gen(12)
    rows = torch.randn(8, 32003, generator=gen)
    rows[1, 100] = rows[1, 7000] = 50.0  # a tie: the first one
    rows[2, 3] = float("nan")  # a NaN is never chosen...
    rows[2, 900] = 60.0  # ...the largest of the rest is
    rows[3, 32002] = 70.0  # in the scalar tail
    rows[4, 17] = float("inf")
    rows[5] = float("-inf")  # nothing above -inf: the first entry, as torch.argmax of the masked row
    rows[6] = float("nan")
    rows[6, 31000] = -5.0
    rows[7, :] = 0.0
    rows[7, ::2] = -0.0  # +0 and -0 are equal: the first
    wanted = torch.argmax(rows.masked_fill(rows.isnan(), float("-inf")), dim=-1)
    assert native_lib.argmax(rows).tolist() == wanted.tolist() == [int(wanted[0]), 100, 900, 32002, 17, 0, 31000, 0]
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy.picks_argmax and [greedy(row) for row in rows] == wanted.tolist()
    assert not Sampler(SamplingParams(temperature=0, repetition_penalty=1.2)).picks_argmax
    assert not Sampler(SamplingParams(temperature=0.7)).picks_argmax


def test_huge_pages_keep_the_weights_as_they_were():
    weight = torch.randn(3 << 20, generator=_gen(7))  # 12 MiB: at least four whole 2 MiB pages inside
    before = weight.clone()
    advised = native_lib.library().mx_hugepages(weight.data_ptr(), weight.numel() * 4, 1)
    assert advised in (0, *range(4 << 20, (12 << 20) + 1, 2 << 20))  # whole pages inside it, or none (THP off)
    assert torch.equal(weight, before)


def test_int4_layout_of_torchs_kernel_is_read_back_as_canonical():
    dense = torch.randn(64, 128, generator=_gen(3)) * 0.05
    layer = Q.QuantLinear.from_weight(dense, 4, 32)  # packed for torch's int4 kernel where it exists
    reference = layer.dequantize()
    x = torch.randn(2, 128, generator=_gen(4))
    assert torch.allclose(native_lib.NativeWeight(layer).linear(x), x @ reference.T, rtol=1e-5, atol=1e-5)


# ---- whole models ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_bf16_model_matches_transformers_in_fp32(bf16_pair):
    path, reference = bf16_pair
    model = load_model(path, dtype="bfloat16", progress=False, exact=True)  # prompts too on the exact kernels
    assert kernels.runner(model).name == "native"
    assert model.dtype == torch.bfloat16 and model.activation_dtype == torch.float32
    assert model.layers[0].attn.wq.weight.dtype == torch.bfloat16  # the weights stay as loaded: one copy
    ids = torch.randint(3, 256, (3, 17), generator=_gen(0))
    with torch.inference_mode():
        ours, theirs = model(ids), reference(ids).logits
    assert (ours - theirs).abs().max() < 1e-4  # bf16 weights are exact in fp32: the same numbers as fp32
    expected = reference.generate(ids[:2, :5], max_new_tokens=24, do_sample=False)[:, 5:].tolist()
    assert _greedy(model, ids[:2, :5].tolist(), 24) == expected  # decode steps through the KV cache, batched
    for threads in (1, 2):  # batch 1 (its own kernels): one thread; two threads, each taking one whole expert
        with _threads(threads):
            assert _greedy(model, ids[:1, :5].tolist(), 24) == expected[:1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return save_hf_model(make_hf_model(seed=6, hidden_size=128, intermediate_size=192), out)


@pytest.mark.parametrize("setting", ["int8", "int4-g32+head"])
def test_quantized_model_equals_fp32_with_its_dequantized_weights(tiny_dir, setting):
    from test_quantize import _dequantized_copy

    model = load_model(tiny_dir, dtype="float32", progress=False, quantize=setting, exact=True)
    assert kernels.runner(model).name == "native" and isinstance(model.layers[0].ffn.w1, Q.QuantLinear)
    assert model.layers[0].ffn.w1.layout == "canonical"  # read as stored, never rearranged for torch's kernel
    plain = load_model(tiny_dir, dtype="float32", progress=False, pack=False)
    reference = _dequantized_copy(plain, load_model(tiny_dir, dtype="float32", progress=False, quantize=setting,
                                                    pack=False))
    ids = torch.randint(3, 256, (2, 11), generator=_gen(2))
    with torch.inference_mode():
        assert torch.allclose(model(ids), reference(ids), atol=1e-4)
        assert _greedy(model, ids[:, :4].tolist(), 12) == _greedy(reference, ids[:, :4].tolist(), 12)
        for row in ids[:, :4].tolist():  # batch 1: activations rounded to 16 bits, the same tokens
            assert _greedy(model, [row], 12) == _greedy(reference, [row], 12)


def test_routing_is_reported_as_the_reference_routes(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", progress=False)
    plain = load_model(tiny_dir, dtype="float32", progress=False, pack=False)
    ids = torch.randint(3, 256, (2, 9), generator=_gen(5))
    ours, theirs = [], []
    with torch.inference_mode():
        model(ids, routing=ours)
        plain(ids, routing=theirs)
    assert len(ours) == len(theirs) == model.args.n_layers
    for a, b in zip(ours, theirs):
        assert torch.equal(a.expert_ids, b.expert_ids)
        assert torch.allclose(a.weights, b.weights, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)


def test_decode_checks_cache_indices_and_takes_any_integer_positions(tiny_dir):
    from mixtral.kv_cache import KVCache

    model = load_model(tiny_dir, dtype="float32", progress=False)
    plain = load_model(tiny_dir, dtype="float32", progress=False, pack=False)
    ids = torch.randint(3, 256, (1, 6), generator=_gen(8))
    with torch.inference_mode():
        caches = [KVCache(m.args, 2, 8, torch.float32) for m in (model, plain)]
        for m, cache in zip((model, plain), caches):
            m(ids[:, :5], cache=cache, n_keys=5)
        step = [m(ids[:, 5:], torch.tensor([[5]], dtype=torch.int32), cache, n_keys=6)
                for m, cache in zip((model, plain), caches)]
        assert torch.allclose(step[0], step[1], atol=1e-4)
        for m, cache in zip((model, plain), caches):  # where torch's indexing raises, so do the kernels
            with pytest.raises(IndexError):
                m(ids[:, :1], torch.tensor([[8]]), cache, n_keys=8)
            with pytest.raises(IndexError):
                m(ids[:, :1], torch.tensor([[5]]), cache, n_keys=6, slots=torch.tensor([5]))
            with pytest.raises(IndexError):  # a token outside the vocabulary: the embedding's lookup
                m(torch.tensor([[m.args.vocab_size]]), torch.tensor([[5]]), cache, n_keys=6)


def test_a_decoders_step_reports_its_logits_normalizer_and_greedy_choice(tiny_dir):
    from mixtral.kv_cache import KVCache

    model = load_model(tiny_dir, dtype="bfloat16", progress=False, exact=True)  # the C side widens the bf16 embedding
    plain = load_model(tiny_dir, dtype="bfloat16", progress=False, pack=False).float()  # the same values in fp32
    prompts = torch.randint(3, 256, (3, 6), generator=_gen(13))
    with torch.inference_mode():
        caches = [KVCache(m.args, 4, 12, torch.float32) for m in (model, plain)]
        slots = torch.tensor([3, 0, 2])  # any rows of the cache, in any order
        for m, cache in zip((model, plain), caches):
            m(prompts, cache=cache, n_keys=6, slots=slots)
        decoder = kernels.runner(model).session(caches[0])
        tokens, positions = [5, 77, 200], [6, 6, 6]
        logits = decoder.step(tokens, positions, slots.tolist())
        wanted = plain(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], caches[1], n_keys=7,
                       slots=slots)[:, -1]
        assert torch.allclose(logits, wanted, atol=1e-4)
        assert decoder.best == torch.argmax(logits, dim=-1).tolist()
        assert torch.allclose(torch.tensor(decoder.lse, dtype=torch.float64), torch.logsumexp(logits.double(), -1),
                              rtol=0, atol=1e-6)
        assert [decoder.logit(row, 9) for row in range(3)] == logits[:, 9].tolist()
        routing = []
        again = decoder.step(tokens[:1], [7], [3], routing=routing)  # one row; the router's choices reported
        assert again.shape == (1, model.args.vocab_size) and len(routing) == model.args.n_layers
        assert routing[0].expert_ids.shape == (1, 1, model.args.top_k)
        before = [t.clone() for t in caches[0].keys + caches[0].values]
        best = decoder.best
        for bad in ({"tokens": [5, -1]}, {"positions": [8, 12]}, {"rows": [0, 4]}, {"tokens": [5, 256]}):
            step = {"tokens": [5, 6], "positions": [8, 8], "rows": [0, 1], **bad}  # row 0 is fine, row 1 not
            with pytest.raises(IndexError):
                decoder.step(step["tokens"], step["positions"], step["rows"])
        assert all(torch.equal(a, b) for a, b in zip(before, caches[0].keys + caches[0].values))  # nothing written
        assert decoder.best == best
        with pytest.raises(IndexError):  # more sequences than the cache has rows
            decoder.step([5] * 5, [8] * 5)
        bf16_cache = KVCache(model.args, 4, 12, torch.bfloat16)
        with pytest.raises(ValueError, match="fp32"):  # the C side writes fp32: never into anything else
            kernels.runner(model).session(bf16_cache)


@pytest.mark.parametrize("setting", ["float32", "bfloat16", "int8", "int4-g32+head"])
def test_a_decode_rows_numbers_do_not_depend_on_the_rows_beside_it(tiny_dir, setting):
    """Each row of a batched decode step is computed exactly as at batch 1 (same kernel, same order of summation),
    so a sequence gets bit-identical logits alone or beside others, in any cache row (README: batch invariance)."""
    from mixtral.kv_cache import KVCache

    dtype, quantize = (setting, None) if setting in ("float32", "bfloat16") else ("bfloat16", setting)
    model = load_model(tiny_dir, dtype=dtype, progress=False, quantize=quantize)
    assert kernels.runner(model).name == "native"
    prompts = [torch.randint(3, 256, (n,), generator=_gen(20 + n)).tolist() for n in (9, 4, 13, 6)]

    def decode(placed: list[tuple[int, int]], steps: int = 4) -> list[torch.Tensor]:
        """The first sequence's logits over `steps` steps, with the others decoding beside it; `placed` lists
        (prompt, cache row) pairs; each prompt is prefilled alone into its row."""
        cache = KVCache(model.args, 4, 32, torch.float32)
        for prompt, row in placed:
            ids = prompts[prompt]
            model(torch.tensor([ids]), cache=cache, n_keys=len(ids), slots=torch.tensor([row]))
        rows = [row for _, row in placed]
        out = []
        for step in range(steps):
            tokens = [(17 * step + 5 * prompt) % 256 for prompt, _ in placed]
            positions = [len(prompts[prompt]) + step for prompt, _ in placed]
            out.append(kernels.runner(model).decode_step(cache, tokens, positions, rows).logits[0].clone())
        return out

    with torch.inference_mode():
        alone = decode([(0, 0)])
        for placed in ([(0, 2)], [(0, 0), (1, 1)], [(0, 3), (3, 0), (2, 1)], [(0, 1), (1, 0), (2, 2), (3, 3)]):
            assert all(torch.equal(a, b) for a, b in zip(alone, decode(placed))), placed


def test_generation_on_the_decoder_equals_generation_on_torch(tiny_dir):
    from mixtral.generate import generate_step
    from mixtral.sampling import Sampler, SamplingParams

    model = load_model(tiny_dir, dtype="float32", progress=False)
    plain = load_model(tiny_dir, dtype="float32", progress=False, pack=False)
    prompts = [[1, 40, 41, 42], [1, 90]]
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3)]  # one row each
    runs = [list(generate_step(m, prompts, [Sampler(p) for p in settings], 12)) for m in (model, plain)]
    assert [[t for t, _ in step] for step in runs[0]] == [[t for t, _ in step] for step in runs[1]]
    for ours, theirs in zip(*runs):
        assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(ours, theirs))


def test_forward_hooks_still_run_on_every_decode_step(tiny_dir):
    from mixtral.generate import generate_step
    from mixtral.sampling import Sampler, SamplingParams

    model = load_model(tiny_dir, dtype="float32", progress=False)
    greedy = [Sampler(SamplingParams(temperature=0))]
    plain = [t for [(t, _)] in generate_step(model, [[1, 40, 41]], greedy, 6)]
    for module in (model, model.embed):  # the model's own hooks, and its embedding's (which a step used to call)
        calls = []
        handle = module.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            tokens = [t for [(t, _)] in generate_step(model, [[1, 40, 41]], greedy, 6)]
        finally:
            handle.remove()
        assert tokens == plain and len(calls) == 6  # the prompt, then 5 decode steps


def test_decode_follows_a_caches_tensors_when_they_are_replaced(tiny_dir):
    import dataclasses

    from mixtral.kv_cache import KVCache

    model = load_model(tiny_dir, dtype="float32", progress=False)
    ids = torch.randint(3, 256, (1, 6), generator=_gen(10))
    with torch.inference_mode():
        cache = KVCache(model.args, 1, 8, torch.float32)
        model(ids[:, :5], cache=cache, n_keys=5)
        first = model(ids[:, 5:], torch.tensor([[5]]), cache, n_keys=6)  # the C side now knows these tensors
        kept = first.clone()
        old = cache.keys + cache.values
        cache.keys, cache.values = [t.clone() for t in cache.keys], [t.clone() for t in cache.values]
        for t in cache.keys + cache.values:
            t[:, :, 5] = 0.0
        for t in old:
            t[:, :, 5] = 123.0  # must stay: the next step writes position 5 of the new tensors
        again = model(ids[:, 5:], torch.tensor([[5]]), cache, n_keys=6)
        assert torch.equal(first, again) and torch.equal(first, kept)  # and model() gave a tensor of its own
        assert all((t[:, :, 5] == 123.0).all() for t in old)
        assert all((t[:, :, 5] != 0.0).any() for t in cache.keys + cache.values)
        short = KVCache(dataclasses.replace(model.args, n_layers=model.args.n_layers - 1), 1, 8, torch.float32)
        with pytest.raises(ValueError, match="layers"):
            model(ids[:, :1], torch.tensor([[0]]), short, n_keys=1)


def test_nan_in_the_activations_is_not_hidden():
    x = torch.randn(1, 96, generator=_gen(9))
    x[0, 5] = float("nan")
    for name, weight in _weights(16, 96).items():
        out = native_lib.NativeWeight(weight).linear(x, expert=0)
        assert torch.isnan(out).all(), name  # as in fp32: every output row meets the NaN


def test_weights_move_into_one_huge_page_buffer_and_still_save(tmp_path):
    from mixtral.weights import save_checkpoint

    model = load_model(None, dtype="bfloat16", progress=False)  # the shipped model: tied embeddings
    assert kernels.runner(model).name == "native" and model.lm_head.weight is model.embed.weight
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    ids = torch.tensor([[1, 415, 2936, 28705, 28804]])
    with torch.inference_mode():
        before = model(ids)
        assert torch.equal(before, load_model(save_checkpoint(model, tmp_path), dtype="bfloat16",
                                              progress=False)(ids))


def test_a_weight_held_elsewhere_keeps_its_values_when_the_model_moves_to_huge_pages():
    model = load_model(None, dtype="bfloat16", progress=False, pack=False)  # plain torch: not moved yet
    held = model.layers[0].ffn.w1  # another reference: its pages must not be given back as they are copied
    expected = held.detach().clone()
    moved = native_weights.move_to_huge_pages(model)
    assert torch.equal(held, expected)
    if moved:
        assert model.layers[0].ffn.w1 is not held and torch.equal(model.layers[0].ffn.w1, expected)


def test_moving_or_casting_the_model_returns_it_to_torch(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", progress=False)
    ids = torch.randint(3, 256, (1, 6), generator=_gen(6))
    with torch.inference_mode():
        before = model(ids)
        model.to(torch.float64).to(torch.float32)  # new tensors: the kernels' pointers would be stale
        assert kernels.runner(model).name == "torch" and model.compute_dtype is None
        assert torch.allclose(model(ids), before, atol=1e-5)
        assert kernels.prepare(model).name == "native"  # prepared again, though a torch runner was handed out
        assert kernels.runner(model).name == "native" and torch.allclose(model(ids), before, atol=1e-5)


def test_turned_off_by_the_environment(tiny_dir, monkeypatch):
    monkeypatch.setenv("MIXTRAL_NATIVE", "0")
    model = load_model(tiny_dir, dtype="float32", progress=False)
    assert getattr(model, "native", None) is None


def test_a_failed_build_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="compiling cpu_kernels.c failed"):
        native_lib._build()
    assert not list(tmp_path.iterdir())  # nothing half-written is left in the cache


def test_a_library_built_from_another_versions_source_is_refused(tmp_path, monkeypatch):
    """The C structures the Python side fills (weight_t, store_t, layer_t) are checked by size before any call: a
    source whose structures differ (bench/decode_batch.py --compare builds any) is refused, not misread."""
    monkeypatch.setenv("MIXTRAL_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "cpu_kernels.c"
    text = native_lib.SOURCE.read_text()
    assert text.count("    int64_t scale_fmt;") == 1
    source.write_text(text.replace("    int64_t scale_fmt;", "    int64_t scale_fmt, added;"))
    monkeypatch.setattr(native_lib, "SOURCE", source)
    with pytest.raises(RuntimeError, match="another version's source"):
        native_lib._load()


def test_the_cached_library_is_keyed_on_the_compiler(tmp_path, monkeypatch):
    """A library built by another compiler (or another version of it) is never loaded in place of this one's."""
    monkeypatch.setenv("MIXTRAL_CACHE_DIR", str(tmp_path / "cache"))
    wrapper = tmp_path / "other-cc"
    wrapper.write_text('#!/bin/sh\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    first = native_lib._build()
    monkeypatch.setenv("CC", str(wrapper))
    second = native_lib._build()
    assert first != second and first.exists() and second.exists()


@pytest.mark.parametrize("name,k", [
    ("int8", 200), ("int8", 1100),  # a tail past the last block of 32; spans of 8 blocks and a short last one
    ("int4-g32", 32 * 9), ("int4-g32", 32 * 11),  # four groups a 512-bit load, then one or three left
    ("int4-g64", 64 * 7), ("int4-g64", 64 * 1030 + 5),  # an odd group left; scales multiplied 512 groups at a time
    ("int4-g128", 128 * 3 + 40), ("int4-g256", 256 * 2), ("int4-g32-fp16", 32 * 11), ("int4-g64-fp16", 64 * 7),
    ("int4-g32-offsets", 32 * 11), ("int4-g64-offsets", 64 * 7), ("int8-g32", 32 * 3), ("int8-g32", 32 * 37),
    ("int8-g32", 32 * 601)])  # Q8_0 blocks: two groups a 512-bit load, the last of an odd number alone; 512 at a time
def test_integer_decode_rows_are_the_same_on_either_vector_width_alone_or_batched(name, k):
    """The int8 and int4 decode kernels have an AVX2 and an AVX-512 form, and the batched form unpacks a weight row
    once for up to four activation rows. Every form must give every row the same numbers, bit for bit (integer
    sums, then the same fp32 steps), near the fp32 product with the activation rounded to 16 bits."""
    lib = native_lib.library()
    was = int(native_lib.avx512_rows())
    dense = torch.randn(2, 9, k, generator=_gen(k)) * 0.05
    quantized = _quantized(dense, name)
    weight = native_lib.NativeWeight(quantized)
    x = torch.randn(9, k, generator=_gen(k + 1))
    x[3, : k // 2] *= 1e-3  # rows of different scales in one batch
    results = []
    try:
        for avx512 in (0, 1):
            if lib.mx_use_avx512(avx512) != avx512:
                continue  # no AVX-512 here (this CPU, or MIXTRAL_AVX512=0)
            alone = torch.cat([weight.linear(x[m:m + 1], expert=1, per_row=True) for m in range(9)])
            batched = weight.linear(x, expert=1, per_row=True)  # rows 4 + 4 + 1
            pairs = weight.linear(x[:6], expert=1, per_row=True)  # 4 + 2
            assert torch.equal(alone, batched) and torch.equal(alone[:6], pairs), avx512
            results.append(alone)
    finally:
        lib.mx_use_avx512(was)
    assert all(torch.equal(results[0], other) for other in results[1:])
    span = quantized.scale_group or 256  # int8's spans of 256 columns, or its groups
    wanted = torch.cat([_integer_product(x[m:m + 1], span, quantized, 1) for m in range(9)])
    assert torch.allclose(results[0], wanted, rtol=1e-5, atol=5e-5)  # (int32 span sums to fp32: ~2^-24 of each)


@pytest.mark.parametrize("k", [32, 200, 1100])
def test_bf16_decode_rows_are_the_same_alone_or_batched(k):
    """bf16 decode rows on the 512-bit kernel take four weight rows at a time, read in memory order for the first
    activation rows and side by side from the cache for the others (two activation rows at a time): every row gets
    the numbers it gets alone, bit for bit, near the float64 product. 10 weight rows leave a partial last four; k =
    200 and 1100 a tail past the last 32 columns; 11 activation rows take every way of reading."""
    lib = native_lib.library()
    was = int(native_lib.avx512_rows())
    weight = (torch.randn(2, 10, k, generator=_gen(k)) * 0.05).bfloat16()
    native = native_lib.NativeWeight(weight)
    x = torch.randn(11, k, generator=_gen(k + 1))
    x[3] *= 1e-3  # rows of different scales in one batch
    try:
        for avx512 in (0, 1):
            if lib.mx_use_avx512(avx512) != avx512:
                continue  # no AVX-512 here (this CPU, or MIXTRAL_AVX512=0)
            alone = torch.cat([native.linear(x[m:m + 1], expert=1, per_row=True) for m in range(11)])
            for rows in (2, 3, 5, 11):
                assert torch.equal(native.linear(x[:rows], expert=1, per_row=True), alone[:rows]), (avx512, rows)
            wanted = (x.double() @ weight[1].double().T).float()
            assert torch.allclose(alone, wanted, rtol=1e-5, atol=1e-5 * wanted.abs().max()), avx512
    finally:
        lib.mx_use_avx512(was)


def test_an_expert_layer_of_mixed_formats_decodes_alike_on_one_thread_or_two(tiny_dir):
    """A GGUF file can hold an expert layer's gate projections in one format and its up projections in another
    (int8 beside int4): each gets its x prepared for its own kernel. A batch-1 step on two threads (whole experts per
    thread, one x prepared for both when their formats agree) must give what one thread gives (each weight alone)."""
    from mixtral.kv_cache import KVCache

    model = load_model(tiny_dir, dtype="bfloat16", quantize="int4-g32", pack=False, progress=False)
    for layer in model.layers:
        layer.ffn.w1 = Q.QuantLinear.from_weight(layer.ffn.w1.dequantize(), 8, pack=False)
    assert kernels.prepare(model).name == "native"
    prompt = torch.randint(3, 256, (1, 7), generator=_gen(31))
    was = torch.get_num_threads()
    logits = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cache = KVCache(model.args, 1, 16, torch.float32)
            with torch.inference_mode():
                model(prompt, cache=cache, n_keys=7)
                logits.append(kernels.runner(model).decode_step(cache, [42], [7], [0]).logits[0].clone())
    finally:
        torch.set_num_threads(was)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g64", "int4-g32-fp16", "int4-g32-offsets", "int8-g32"])
def test_prompt_widening_rounds_each_code_times_its_scale_to_the_nearest_bf16(name):
    """What the prompt path's bf16 GEMMs read of an int8/int4 weight (kernels/prompt.py, mx_to_bf16): rows of one
    expert, each weight's exact value rounded to the nearest bf16, as torch rounds it."""
    from mixtral.kernels import prompt

    k = 224 if name == "int8-g32" else 200  # (whole groups of 32)
    quantized = _quantized(torch.randn(2, 40, k, generator=_gen(3)) * 0.05, name)
    got = prompt._widen(native_lib.NativeWeight(quantized), 1, 3, torch.empty(30, k, dtype=torch.bfloat16))
    assert torch.equal(got, quantized.dequantize(1)[3:33].to(torch.bfloat16))


@pytest.mark.parametrize("avx512", [0, 1])
def test_bf16_decode_rows_on_either_vector_width_match_fp32_and_do_not_depend_on_the_batch(tiny_dir, avx512):
    """The bf16 one-row kernel has an AVX2 and an AVX-512 form (the latter where the CPU has it; mx_use_avx512 says
    whether it took): each matches fp32 and gives a row the same numbers alone or in a batch."""
    from mixtral.kernels import native_lib
    from mixtral.kv_cache import KVCache

    lib = native_lib.library()
    was = int(native_lib.avx512_rows())
    try:
        if lib.mx_use_avx512(avx512) != avx512:
            pytest.skip("no AVX-512 here (this CPU, or MIXTRAL_AVX512=0)")
        model = load_model(tiny_dir, dtype="bfloat16", progress=False, exact=True)
        plain = load_model(tiny_dir, dtype="bfloat16", progress=False, pack=False).float()
        prompts = torch.randint(3, 256, (3, 6), generator=_gen(21))
        with torch.inference_mode():
            caches = [KVCache(m.args, 3, 12, torch.float32) for m in (model, plain)]
            for m, cache in zip((model, plain), caches):
                m(prompts, cache=cache, n_keys=6)
            decoder = kernels.runner(model).session(caches[0])
            batch = decoder.step([5, 77, 200], [6, 6, 6]).clone()
            alone = decoder.step([77], [6], [1]).clone()
            wanted = plain(torch.tensor([5, 77, 200])[:, None], torch.tensor([6, 6, 6])[:, None], caches[1],
                           n_keys=7)[:, -1]
        assert torch.allclose(batch, wanted, atol=1e-4)
        assert torch.equal(alone[0], batch[1])
    finally:
        lib.mx_use_avx512(was)


def test_avx512_off_takes_an_avx2_only_cpus_paths():
    """MIXTRAL_AVX512=0 (how `make test` runs the kernels' tests as on a CPU without AVX-512): in a fresh process no
    AVX-512 or AMX flag is seen, none of our AVX-512 kernels is chosen, prompts stay on the exact kernels, and
    `mixtral info` says so."""
    import os
    import subprocess
    import sys

    code = ("from mixtral.kernels import native_lib, prompt; lib = native_lib.library(); "
            "print(sorted(f for f in native_lib.cpu_flags() if f.startswith(('avx512', 'amx')))); "
            "print(native_lib.avx512_rows(), prompt._our_kernels(), prompt._our_attention()); "
            "print(lib.mx_use_avx512(1), lib.mx_bf16_supported(), lib.mx_vnni_supported()); "  # (the C side's own
            "print(prompt.unavailable_reason())")                                              # checks: mx_to_bf16)
    env = {**os.environ, "MIXTRAL_AVX512": "0"}
    env.pop("MIXTRAL_PROMPT", None)
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=120).stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "False {'vnni': False, 'bf16': False} False"
    assert lines[2] == "0 0 0"
    assert "MIXTRAL_AVX512=0" in lines[3]
    info = subprocess.run([sys.executable, "-m", "mixtral", "info"], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout
    assert "AVX2 kernels, compiled on first use); prompts: our C kernels (exact fp32)" in info


@pytest.mark.parametrize("window,head_dim", [(None, 32), (9, 32), (None, 128)])  # window 9: each token sees its
def test_a_short_prompt_after_a_cached_prefix_is_one_c_call_and_matches_transformers(  # last 9; Dh as Mixtral's
        tmp_path, monkeypatch, window, head_dim):
    """A chat turn's new tokens after its reused prefix (a prompt too short for the GEMMs): every token a row of its
    sequence's cache row, one C call (DecodeSession.prompt), logits only where asked. Two sequences at once, in
    rows 3 and 1 of the cache, against transformers' logits of the whole sequences."""
    from transformers import AutoModelForCausalLM

    from mixtral.kernels import native
    from mixtral.kv_cache import KVCache

    path = save_hf_model(make_hf_model(seed=8, hidden_size=128, intermediate_size=192, sliding_window=window,
                                       head_dim=head_dim), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, dtype="float32", progress=False)
    calls = []
    prompt = native.DecodeSession.prompt
    monkeypatch.setattr(native.DecodeSession, "prompt", lambda self, *a, **k: calls.append(len(a[0])) or
                        prompt(self, *a, **k))
    P, T = 40, 11
    ids = torch.randint(3, 256, (2, P + T), generator=_gen(9))
    with torch.inference_mode():
        expected = reference(ids).logits
        theirs_routing = reference(ids, output_router_logits=True).router_logits
        cache = KVCache(model.args, 4, 64, torch.float32)
        slots = torch.tensor([3, 1])
        model(ids[:, :P], torch.arange(P).expand(2, P), cache, n_keys=P, slots=slots, logits_at=torch.tensor([0, 0]))
        assert calls == []  # the prefix: a prompt of 40 tokens takes the ordinary path
        fresh = KVCache(model.args, 2, 64, torch.float32)  # rows 0 and 1 when no slots are named
        assert (model(ids[:, :5], cache=fresh, n_keys=5) - expected[:, :5]).abs().max() < 1e-4
        assert calls == [10]
        calls.clear()
        routing = []
        positions = torch.arange(P, P + T).expand(2, T)
        ours = model(ids[:, P:], positions, cache, n_keys=P + T, slots=slots, routing=routing)
        assert calls == [2 * T]
        assert ours.shape == (2, T, 256) and (ours - expected[:, P:]).abs().max() < 1e-4
        for layer, theirs in zip(routing, theirs_routing):  # transformers: (B * (P + T), E) router logits
            theirs = theirs.view(2, P + T, -1)[:, P:]
            assert layer.logits.shape == theirs.shape and (layer.logits - theirs).abs().max() < 1e-4
            assert torch.equal(layer.expert_ids, theirs.topk(2, dim=-1).indices)
        # the same tokens again, in the same places, asking for one position per sequence
        last = model(ids[:, P:], positions, cache, n_keys=P + T, slots=slots, logits_at=torch.tensor([T - 1, 4]))
        assert last.shape == (2, 1, 256)
        assert (last[0, 0] - expected[0, -1]).abs().max() < 1e-4
        assert (last[1, 0] - expected[1, P + 4]).abs().max() < 1e-4
        from_the_end = model(ids[:, P:], positions, cache, n_keys=P + T, slots=slots, logits_at=torch.tensor([-1, 4]))
        assert torch.equal(from_the_end, last)  # a negative index counts from the end, as x[b, t] does
        with pytest.raises(IndexError):
            model(ids[:, P:], positions, cache, n_keys=P + T, slots=slots, logits_at=torch.tensor([T, 0]))
        # and the cache holds what the ordinary path writes: a next token continues both sequences as transformers
        nxt = torch.randint(3, 256, (2, 1), generator=_gen(10))
        step = model(nxt, torch.full((2, 1), P + T), cache, n_keys=P + T + 1, slots=slots)
        assert (step[:, 0] - reference(torch.cat([ids, nxt], 1)).logits[:, -1]).abs().max() < 1e-4
