"""Weight-only int8/int4 quantization: error bounds, kernels against the dequantize reference, whole models,
both MoE paths, quantized checkpoints, the CLI and the errors a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, save_hf_model
from torch import nn

from mixtral import experts
from mixtral import quantize as Q
from mixtral import torch_lowbit
from mixtral.cli import main
from mixtral.config import load_config
from mixtral.errors import MixtralError
from mixtral.generate import generate_step
from mixtral.loading import load, load_model
from mixtral.model import Embedding, MoE
from mixtral.sampling import Sampler, SamplingParams
from mixtral.weights import load_weights, save_quantized

SETTINGS = [(8, None), (4, 32), (4, 64)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random transformers Mixtral: hidden 64, experts 96 wide (not a multiple of 64: int4-g64 pads)."""
    out = tmp_path_factory.mktemp("tiny_quant")
    return save_hf_model(make_hf_model(seed=3), out)


def _load(path, dtype=torch.float32):
    return load_weights(path, load_config(path), dtype, progress=False)


def _dequantized_copy(plain, quantized):
    """`plain` with every weight replaced by what the quantized model's weights dequantize to."""
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Q.QuantLinear):
                parent_name, _, attr = name.rpartition(".")
                parent = plain.get_submodule(parent_name) if parent_name else plain
                target = getattr(parent, attr)
                target = target.weight if isinstance(target, nn.Linear) else target
                target.copy_(module.dequantize(dtype=target.dtype))
    return plain


# ---- quantize / dequantize reference ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 64), (7, 13), (3, 5, 40)])
def test_int8_error_is_at_most_half_a_step_per_channel(shape):
    w = torch.randn(shape, generator=_gen()) * 0.05
    w[..., 1, :] = 0.0  # an all-zero row
    qweight, scales = Q.quantize_weight(w, 8)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == shape[:-1]
    err = (Q.dequantize_weight(qweight, scales, 8, None, shape[-1]) - w).abs()
    assert (err <= scales.float()[..., None] / 2 * (1 + 1e-5)).all()
    assert qweight.abs().max() <= 127


@pytest.mark.parametrize("group_size,in_features", [(32, 64), (64, 64), (32, 100), (16, 24)])
def test_int4_error_is_at_most_half_a_step_per_group(group_size, in_features):
    w = torch.randn(2, 32, in_features, generator=_gen(1))
    w[0, 3, :group_size] *= 100  # one group with a large range must not hurt the others
    qweight, scales = Q.quantize_weight(w, 4, group_size)
    n_groups = -(-in_features // group_size)
    assert qweight.dtype == torch.uint8 and qweight.shape == (2, 32, n_groups * group_size // 2)
    assert scales.shape == (2, 32, n_groups)
    err = (Q.dequantize_weight(qweight, scales, 4, group_size, in_features) - w).abs()
    step = scales.float().repeat_interleave(group_size, dim=-1)[..., :in_features]
    assert (err <= step / 2 * (1 + 1e-5)).all()
    assert scales[0, 3, 0] > 10 and scales[0, 4, 0] < 1  # scales stay per row and group
    assert n_groups == 1 or scales[0, 3, -1] < 1


@pytest.mark.parametrize("bits", [8, 4])
def test_a_large_weight_is_quantized_in_steps_of_rows_with_the_same_result(bits, monkeypatch):
    w = torch.randn(300, 128, generator=torch.Generator().manual_seed(5))
    whole = Q.quantize_weight(w, bits, 32 if bits == 4 else None)
    monkeypatch.setattr(Q, "QUANTIZE_STEP", 128 * 7)  # 7 rows per step: the last step is short
    layer = Q.QuantLinear.from_weight(w, bits, 32 if bits == 4 else None, pack=False)
    assert torch.equal(layer.qweight, whole[0]) and torch.equal(layer.scales, whole[1])


@pytest.mark.parametrize("block", [32, 64])
def test_cpu_int4_layouts_round_trip(block):
    codes = torch.randint(0, 16, (2, 128, 96), generator=_gen(2), dtype=torch.uint8)
    packed = torch_lowbit.cpu_int4_layout(codes, block)
    assert packed.shape == (2, 128, 48) and torch.equal(torch_lowbit.cpu_int4_codes(packed, block), codes)


def test_int4_layout_is_the_one_torch_packs_on_this_cpu():
    codes = torch.randint(0, 16, (128, 96), generator=_gen(3), dtype=torch.int32)
    block = torch_lowbit.int4_block()
    if block is None:  # neither of our layouts: the int4 kernel must be off, and weights stay canonical
        assert not Q.kernel_available(torch.device("cpu"), 4)
        assert Q.QuantLinear.from_weight(torch.randn(128, 64), 4, 32).layout == "canonical"
        return
    torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).reshape(128, 48)
    assert torch.equal(torch_lowbit.cpu_int4_layout(codes, block), torch_packed)
    weight = torch.randn(128, 96, generator=_gen(4))
    layer = Q.QuantLinear.from_weight(weight, 4, 32)
    assert layer.layout == "cpu-int4" and layer.block == block
    assert torch.equal(layer.canonical()[0], Q.quantize_weight(weight, 4, 32)[0])  # read back exactly


# ---- one layer: kernels and fallbacks against the reference --------------------------------------------

@pytest.mark.parametrize("bits,group_size", SETTINGS)
@pytest.mark.parametrize("out_features,in_features", [(64, 128), (48, 40), (32, 13)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quant_linear_matches_dequantized_weight(bits, group_size, out_features, in_features, rows):
    weight = torch.randn(out_features, in_features, generator=_gen(4)) * 0.1
    layer = Q.QuantLinear.from_weight(weight, bits, group_size)
    x = torch.randn(2, rows, in_features, generator=_gen(5))
    expected = x @ layer.dequantize().T
    got = layer(x)
    assert got.shape == (2, rows, out_features) and got.dtype == torch.float32
    # the kernels round activations to bfloat16; the fallback is exact
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    with Q.kernels_disabled():
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.equal(layer(x), layer(x))  # deterministic


def test_kernels_are_used_where_they_apply():
    capability = torch.backends.cpu.get_cpu_capability()
    block = torch_lowbit.int4_block()
    if capability in ("AVX2", "AVX512"):  # the CPUs this project runs on: both torch kernels pass their probe
        assert Q.kernel_available(torch.device("cpu"), 8) and Q.kernel_available(torch.device("cpu"), 4)
        assert block == (64 if capability == "AVX512" else 32)
    if block:
        assert Q.QuantLinear.from_weight(torch.randn(block, 64), 4, 32).layout == "cpu-int4"
        assert Q.QuantLinear.from_weight(torch.randn(block + 16, 64), 4, 32).layout == "canonical"  # N % block
    assert Q.QuantLinear.from_weight(torch.randn(64, 64), 4, 16).layout == "canonical"  # no kernel for 16
    lanes = {"AVX2": 8, "AVX512": 16}.get(capability, 64)
    for width in (8, 16, 24, 32, 40, 64, 4096, 14336, 4104):  # the rule: a multiple of the vector's fp32 lanes
        layer = Q.QuantLinear.from_weight(torch.randn(16, width), 8)
        if width % lanes:
            assert not layer._use_kernel(torch.randn(1, width)), width
        if width % 64 == 0 and capability in ("AVX2", "AVX512"):
            assert layer._use_kernel(torch.randn(1, width)), width


def test_dangerous_widths_run_in_a_child_without_crashing_and_match_the_fallback():
    """Every width from 8 to 128 (the ones torch's AVX-512 int8 kernel crashes or miscomputes on included), 1, 3
    and 40 rows, int8 and int4, through QuantLinear in a child process: it must survive, and each result must
    match the exact fallback's within the kernels' bf16 tolerance (the fallback's own within 1e-5)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "torch_lowbit.py"
    for bits in (8, 4):
        done = subprocess.run([sys.executable, str(bench), "--child", str(bits)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"int{bits} child died (exit {done.returncode}): {done.stderr[-2000:]}"
        cases = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(cases) == 16 * 3
        for case in cases:
            assert case["error"] <= (0.01 if case["path"] == "kernel" else 1e-5), case
            if case["rows"] > Q.KERNEL_MAX_ROWS:
                assert case["path"] == "fallback", case


def test_a_probe_that_cannot_run_is_not_remembered(tmp_path, monkeypatch):
    """A child that fails before any case (here: it exits at once) turns the kernels off in this process only:
    nothing is cached, so the next process probes again."""
    child = tmp_path / "child.py"
    child.write_text("import sys\nsys.exit('cannot import torch')\n")
    monkeypatch.setattr(torch_lowbit, "CHILD", child)
    monkeypatch.setattr(torch_lowbit, "_answers", None)
    monkeypatch.setenv("MIXTRAL_CACHE_DIR", str(tmp_path / "cache"))
    assert not torch_lowbit.int8_safe(4096) and "cannot import torch" in torch_lowbit.answers()["reason"]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_crashing_probe_case_is_a_no_and_the_rest_still_run(tmp_path, monkeypatch):
    """The probe's child is restarted after a case kills it; that case, and only that one, is refused."""
    child = tmp_path / "child.py"
    child.write_text("import ctypes, json, sys\n"
                     "for case in json.loads(sys.stdin.read()):\n"
                     "    print('start', case['id'], flush=True)\n"
                     "    if case['id'] == 'int8/32': ctypes.string_at(0)  # a segfault, as torch's kernel gives\n"
                     "    value = 64 if case['kind'] == 'layout' else 0.001\n"
                     "    print('done', case['id'], json.dumps(value), flush=True)\n")
    monkeypatch.setattr(torch_lowbit, "CHILD", child)
    found = torch_lowbit.probe()
    assert found["cases"]["int8/32"] == "crash" and found["int8"]["32"] is False
    assert found["int8"]["64"] is True and found["int4_block"] == 64 and found["int4"]["256/64"] is True


# ---- whole models ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_quantized_logits_close_to_unquantized_and_equal_to_reference(tiny_dir, bits, group_size):
    ids = torch.randint(3, 256, (2, 12), generator=_gen(6))
    plain = _load(tiny_dir)
    expected = plain(ids)
    model = Q.quantize_model(_load(tiny_dir), bits, group_size)
    got = model(ids)
    # Stated tolerance (random tiny model, whose logits amplify weight noise): relative L2 error of the
    # logits <= 5% for int8, <= 50% for int4 (its weights alone carry ~10% relative error).
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (0.05 if bits == 8 else 0.5), rel
    if bits == 8:
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    # against the reference path: the unquantized model code running on the dequantized weights
    reference = _dequantized_copy(_load(tiny_dir), model)(ids)
    with Q.kernels_disabled():
        assert torch.allclose(model(ids), reference, atol=1e-5)
    # the kernels round activations to bf16, which can flip a near-tie in the router for a token or two
    per_position = (got - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert (per_position < 0.02).float().mean() >= 0.9


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_both_moe_paths_equal_the_reference_with_quantized_experts(tiny_dir, bits, group_size):
    model = Q.quantize_model(_load(tiny_dir), bits, group_size)
    reference = _dequantized_copy(_load(tiny_dir), model)
    x = torch.randn(5, 64, generator=_gen(7))
    for moe, ref_moe in zip((b.ffn for b in model.layers), (b.ffn for b in reference.layers)):
        assert isinstance(moe, MoE) and isinstance(moe.w1, Q.QuantLinear)
        _, expert_ids, weights = moe.route(x)
        quantized, dequantized = (moe.w1, moe.w3, moe.w2), (ref_moe.w1, ref_moe.w3, ref_moe.w2)
        expected = experts.grouped(x, expert_ids, weights, *dequantized)
        assert torch.allclose(experts.gathered(x, expert_ids, weights, *dequantized), expected, atol=1e-5)
        with Q.kernels_disabled():
            assert torch.allclose(experts.grouped(x, expert_ids, weights, *quantized), expected, atol=1e-5)
        assert torch.allclose(experts.gathered(x, expert_ids, weights, *quantized), expected, atol=1e-5)
        kernel = experts.grouped(x, expert_ids, weights, *quantized)
        assert (kernel - expected).abs().max() <= 0.02 * expected.abs().max()


def test_router_norms_and_embedding_stay_unquantized(tiny_dir):
    model = Q.quantize_model(_load(tiny_dir, torch.bfloat16), 4, 32)
    for block in model.layers:
        assert type(block.ffn.router) is nn.Linear and block.ffn.router.weight.dtype == torch.bfloat16
        assert isinstance(block.attn_norm.weight, nn.Parameter) and isinstance(block.ffn_norm.weight, nn.Parameter)
        assert all(isinstance(getattr(block.attn, n), Q.QuantLinear) for n in ("wq", "wk", "wv", "wo"))
    assert type(model.lm_head) is nn.Linear and type(model.embed) is Embedding
    assert model.quantization == {"bits": 4, "group_size": 32, "method": Q.METHOD, "lm_head": False}
    routing = []
    model(torch.tensor([[5, 6, 7]]), routing=routing)
    assert routing[0].logits.dtype == torch.float32  # routing still computed in fp32


def test_quantized_bf16_model_generates(tiny_dir):
    model = load_model(tiny_dir, dtype="bfloat16", progress=False, quantize="int4-g32")
    assert model.dtype == torch.bfloat16 and model.layers[0].ffn.w2.bits == 4
    steps = list(generate_step(model, [[5, 6, 7, 8]], [Sampler(SamplingParams(temperature=0))], 6))
    assert len(steps) == 6
    model8 = load_model(tiny_dir, dtype="float32", progress=False, quantize="int8", pack=False)
    assert model8.layers[1].attn.wo.bits == 8


# ---- checkpoints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,lm_head", [(8, None, True), (4, 32, False), (4, 64, True)])
def test_saved_checkpoint_loads_to_identical_logits(tiny_dir, tmp_path, bits, group_size, lm_head):
    model = Q.quantize_model(_load(tiny_dir), bits, group_size, lm_head=lm_head)
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"bits": bits, "group_size": group_size, "method": "mixtral-weight-only",
                                      "lm_head": lm_head}
    loaded = load_model(tmp_path, dtype="float32", progress=False, pack=False)  # as stored (kernels.py repacks)
    assert loaded.quantization == model.quantization
    assert type(loaded.lm_head) is (Q.QuantLinear if lm_head else nn.Linear)
    ids = torch.randint(3, 256, (2, 9), generator=_gen(8))
    assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded(ids[:, :1]), model(ids[:, :1]))  # the decode-sized kernel path too
    with pytest.raises(MixtralError, match="already quantized"):
        load_model(tmp_path, progress=False, quantize="int8" if bits == 4 else "int4")


def test_tied_embeddings_survive_save_and_load(tmp_path):
    src = save_hf_model(make_hf_model(seed=4, tie_word_embeddings=True), tmp_path / "src")
    model = Q.quantize_model(_load(src), 8)
    save_quantized(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q", dtype="float32", progress=False, pack=False)
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.tensor([[4, 5, 6]])
    assert torch.equal(loaded(ids), model(ids))


def test_cli_quantize_writes_a_loadable_model_with_its_tokenizer(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_chat_model), str(out), "--bits", "4", "--group-size", "32"]) == 0
    assert "int4" in capsys.readouterr().out
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    model, tokenizer = load(out, dtype="float32", progress=False)
    assert model.layers[0].ffn.w1.bits == 4
    assert main(["generate", "-m", str(out), "-p", "hi", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    # quantizing a quantized checkpoint is refused, in one line
    assert main(["quantize", str(out), str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


# ---- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(3, None), (16, None), (4, 48), (4, 0), (4, -32), (4, 2048), (4, True)])
def test_bad_settings_raise_mixtral_error(tiny_dir, bits, group_size):
    model = _load(tiny_dir)
    with pytest.raises(MixtralError, match="bits|group size"):
        Q.quantize_model(model, bits, group_size)
    assert isinstance(model.layers[0].attn.wq, nn.Linear)  # nothing was swapped


def test_head_suffix_quantizes_lm_head_too(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", progress=False, quantize="int4-g32+head", pack=False)
    assert isinstance(model.lm_head, Q.QuantLinear) and model.lm_head.bits == 8
    assert isinstance(model.layers[0].ffn.w1, Q.QuantLinear) and model.layers[0].ffn.w1.bits == 4
    assert model.quantization == {"bits": 4, "group_size": 32, "method": Q.METHOD, "lm_head": True}


def test_more_user_errors(tiny_dir, tmp_path, capsys):
    for text in ("int3", "int8-g32", "int4-gx", "fp8", "int8+tail", "int8+"):
        with pytest.raises(MixtralError, match="quantize must be"):
            load_model(tiny_dir, progress=False, quantize=text)
    with pytest.raises(MixtralError, match="already quantized"):
        Q.quantize_model(Q.quantize_model(_load(tiny_dir), 8), 8)
    with pytest.raises(MixtralError, match="not quantized"):
        save_quantized(_load(tiny_dir), tmp_path / "x")
    assert main(["quantize", str(tiny_dir), str(tmp_path / "y"), "--bits", "3"]) == 2
    assert "bits must be 8 or 4" in capsys.readouterr().err
    config = json.loads((tiny_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "quantization": {"bits": 4, "group_size": 64,
                                                                            "method": "gptq"}}))
    with pytest.raises(MixtralError, match="unsupported quantization"):
        load_model(bad, progress=False)


# ---- the batch-1 decode path ---------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["fp32", "bf16", "int8", "int4-g32"])
def test_single_token_direct_path_equals_grouped_path_exactly(tiny_dir, setting):
    dtype = torch.bfloat16 if setting == "bf16" else torch.float32
    model = load_model(tiny_dir, dtype=dtype, progress=False, quantize=None if setting in ("fp32", "bf16") else setting)
    gen = _gen(9)
    for block in model.layers:
        for _ in range(4):
            x = torch.randn(1, 64, generator=gen).to(dtype)
            _, expert_ids, weights = block.ffn.route(x)
            stacked = (block.ffn.w1, block.ffn.w3, block.ffn.w2)
            direct = experts.direct(x, expert_ids, weights, *stacked)
            assert torch.equal(direct, experts.grouped(x, expert_ids, weights, *stacked))
            assert torch.equal(block.ffn(x[None]), direct[None])  # and forward() takes it for one token
