"""Weights repacked for the CPU's fbgemm kernels (kernels/fbgemm.py, the fallback when our C kernels cannot
run) against transformers and the unpacked model."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy as _greedy, make_hf_model, save_hf_model
from torch import nn

from mixtral import experts, kernels
from mixtral.kernels import fbgemm
from mixtral import quantize as Q
from mixtral.errors import MixtralError
from mixtral.loading import load_model
from mixtral.weights import save_checkpoint

pytestmark = pytest.mark.skipif(not fbgemm.fp16_available(), reason="no fbgemm kernels on this CPU")


@pytest.fixture(autouse=True)
def fbgemm_only(monkeypatch):
    """These tests are about the fbgemm packing, which our own kernels (kernels/native.py) take precedence over."""
    monkeypatch.setenv("MIXTRAL_NATIVE", "0")


def test_packed_bf16_model_matches_transformers_in_fp32(bf16_pair):
    path, reference = bf16_pair
    model = load_model(path, dtype="bfloat16", progress=False)
    assert kernels.runner(model).name == "fbgemm"
    assert model.dtype == torch.bfloat16 and model.activation_dtype == torch.float32
    first = model.layers[0]
    assert isinstance(first.attn, fbgemm.PackedAttention) and not hasattr(first.attn, "wq")
    assert isinstance(first.attn.wqkv, fbgemm.PackedLinear) and isinstance(first.attn.wo, fbgemm.PackedLinear)
    ids = torch.randint(3, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = model(ids), reference(ids).logits
    # bf16 values are exact in fp16, so the packed model computes what fp32 does with these weights
    assert (ours - theirs).abs().max() < 1e-4
    expected = reference.generate(ids[:2, :5], max_new_tokens=24, do_sample=False)[:, 5:].tolist()
    assert _greedy(model, ids[:2, :5].tolist(), 24) == expected  # through the KV cache, batched


def test_packed_beats_bf16_arithmetic(bf16_pair):
    path, reference = bf16_pair
    packed = load_model(path, dtype="bfloat16", progress=False)
    plain = load_model(path, dtype="bfloat16", progress=False, pack=False)
    assert not getattr(plain, "packed", False)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        truth = reference(ids).logits
        packed_error = (packed(ids).float() - truth).abs().max()
        plain_error = (plain(ids).float() - truth).abs().max()
    assert packed_error < plain_error / 10


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return save_hf_model(make_hf_model(seed=6, hidden_size=128, intermediate_size=192), out)


def test_packed_int8_is_close_to_weight_only_int8(int8_dir):
    packed = load_model(int8_dir, dtype="float32", progress=False, quantize="int8")
    plain = load_model(int8_dir, dtype="float32", progress=False, quantize="int8", pack=False)
    assert packed.layers[0].ffn.w1.kind == "int8" and packed.layers[0].ffn.w3 is None  # w1|w3 as one
    assert isinstance(plain.layers[0].ffn.w1, Q.QuantLinear)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), Q.kernels_disabled():
        reference = plain(ids)  # exact dequantized weights, fp32 activations
        got = packed(ids)
    # the same int8 weights; only the activations are rounded to 7 bits (~1% per matmul, compounding over the
    # layers of this peaked random model and flipping a router's near-ties now and then). The quality that
    # matters, perplexity of the trained shipped model, is measured by bench/quality.py.
    error = (got - reference).abs().mean() / reference.abs().mean()
    agree = (got.argmax(-1) == reference.argmax(-1)).float().mean()
    assert error <= 0.25 and agree >= 0.8
    # the packed weights read back as exactly the int8 codes and scales that were quantized
    for name in ("w1", "w3", "w2"):
        codes, scales = getattr(plain.layers[1].ffn, name).canonical()
        weight = Q.dequantize_weight(codes, scales, 8, None, codes.shape[-1])
        rows = {"w1": slice(0, 192), "w3": slice(192, 384), "w2": slice(None)}[name]
        stored = packed.layers[1].ffn.w2 if name == "w2" else packed.layers[1].ffn.w1
        assert torch.equal(stored.dequantize()[:, rows], weight)


@pytest.mark.parametrize("rows", [1, 40])
def test_int8_kernel_error_is_that_of_7_bit_activations(rows):
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(384, 128, generator=gen) * 0.1, torch.randn(rows, 128, generator=gen)
    x[::3] *= 50  # rows of very different magnitudes are each quantized on their own range
    codes, scales = Q.quantize_weight(weight, 8)
    reference = x @ Q.dequantize_weight(codes, scales, 8, None, 128).T
    got = fbgemm.int8_linear(x, fbgemm.pack_int8(codes, scales.float()))
    row_error = (got - reference).abs().mean(dim=1) / reference.abs().mean(dim=1)
    assert row_error.max() < 0.02  # a 7-bit step over each row's range: ~1.1% for Gaussian rows


def test_both_moe_paths_agree_on_a_packed_model(int8_dir):
    for options in (dict(dtype="bfloat16"), dict(dtype="float32", quantize="int8")):
        model = load_model(int8_dir, progress=False, **options)
        x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
        for block in model.layers:
            _, expert_ids, weights = block.ffn.route(x)
            assert torch.equal(experts.direct(x, expert_ids, weights, block.ffn.w1, block.ffn.w3, block.ffn.w2),
                               experts.grouped(x, expert_ids, weights, block.ffn.w1, block.ffn.w3, block.ffn.w2))


def test_packed_model_refuses_to_be_saved_or_quantized(int8_dir, tmp_path):
    model = load_model(int8_dir, dtype="bfloat16", progress=False)
    with pytest.raises(MixtralError, match="pack=False"):
        save_checkpoint(model, tmp_path / "out")
    with pytest.raises(MixtralError, match="pack=False"):
        Q.quantize_model(model, 8)
    assert not fbgemm.pack_model(model)  # packing twice changes nothing
    with pytest.raises(MixtralError, match="cannot be moved or cast"):
        model.to(torch.float64)
    assert model.compute_dtype == torch.float32 and kernels.runner(model).name == "fbgemm"  # still as it was


def test_fp32_models_are_not_packed(int8_dir):
    model = load_model(int8_dir, dtype="float32", progress=False)
    assert kernels.runner(model).name == "torch" and model.activation_dtype == torch.float32


def test_a_partly_packed_model_computes_in_fp32(int8_dir, monkeypatch):
    """When a weight cannot be packed (here: no fp16 kernel, so the bf16 lm_head stays), it joins the fp32
    activations instead of failing on a dtype mismatch."""
    monkeypatch.setitem(fbgemm._checked, "fp16", False)
    model = load_model(int8_dir, dtype="bfloat16", progress=False, quantize="int8")
    assert kernels.runner(model).name == "fbgemm"
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    plain = load_model(int8_dir, dtype="float32", progress=False, quantize="int8", pack=False)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), Q.kernels_disabled():
        got, reference = model(ids), plain(ids)
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_the_cache_hands_back_only_the_positions_attended(int8_dir):
    from mixtral.config import load_config
    from mixtral.kv_cache import KVCache

    args = load_config(int8_dir)
    cache = KVCache(args, batch_size=4, max_seq_len=256, dtype=torch.float32)
    k = torch.randn(2, args.n_kv_heads, 1, args.head_dim)
    keys, values = cache.update(0, torch.tensor([[4], [2]]), k, -k, n_keys=5, slots=torch.tensor([3, 1]))
    assert keys.shape == (2, args.n_kv_heads, 5, args.head_dim)
    assert keys.untyped_storage().nbytes() == keys.numel() * 4  # the rows' 5 positions, not all 256
    assert torch.equal(keys[0, :, 4], k[0, :, 0]) and torch.equal(values[1, :, 2], -k[1, :, 0])
