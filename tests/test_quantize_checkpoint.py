"""`mixtral quantize` writes tensor by tensor: the file equals what quantizing the whole model in memory and saving
it gives (quantize.quantize_model + weights.save_quantized), for every setting and source layout; `load(quantize=)`
quantizes as it reads, to the same model; bad sources are clear errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model, save_hf_model
from safetensors.torch import load_file, save_file

from mixtral import quantize as Q
from mixtral.errors import MixtralError
from mixtral.loading import load_model
from mixtral.quantize_checkpoint import checkpoint_dtype, quantize_checkpoint
from mixtral.weights import save_quantized


def _in_memory(source, out, bits, group_size, lm_head):
    """The reference: the whole model loaded, quantized in memory, saved."""
    dtype = checkpoint_dtype(source) or "bfloat16"
    model = load_model(source, dtype=dtype, progress=False, pack=False)
    Q.quantize_model(model, bits, group_size, lm_head=lm_head)
    return save_quantized(model, out)


def _same_files(a, b):
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert config_a == config_b


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    """A bf16 Mixtral in three shards, experts 96 wide (int4-g64 pads them)."""
    out = tmp_path_factory.mktemp("sharded")
    return save_hf_model(make_hf_model(seed=3).to(torch.bfloat16), out, max_shard_size="60KB")


@pytest.mark.parametrize("bits,group_size,lm_head", [(8, None, False), (4, 32, False), (4, 64, True), (8, None, True)])
def test_streamed_file_equals_quantizing_in_memory(sharded_bf16, tmp_path, bits, group_size, lm_head):
    assert len(list(sharded_bf16.glob("*.safetensors"))) >= 3
    streamed = quantize_checkpoint(sharded_bf16, tmp_path / "streamed", bits, group_size, lm_head, progress=False)
    _same_files(streamed, _in_memory(sharded_bf16, tmp_path / "memory", bits, group_size, lm_head))
    model = load_model(streamed, dtype="float32", progress=False, pack=False)  # and it loads as before
    assert model.layers[0].ffn.w1.bits == bits


@pytest.mark.parametrize("lm_head", [False, True])
def test_a_tied_model_and_transformers_5_fused_experts(tmp_path, lm_head):
    """A tied output projection (quantized from the embedding when asked), and experts saved the way
    transformers 5 holds them in memory (gate_up_proj (E, 2I, D), down_proj (E, D, I)): the same result."""
    source = save_hf_model(make_hf_model(seed=4, tie_word_embeddings=True), tmp_path / "tied")
    reference = _in_memory(source, tmp_path / "memory", 8, None, lm_head)
    tensors = load_file(source / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        w1, w3, w2 = (torch.stack([tensors.pop(f"{prefix}.{e}.{w}.weight") for e in range(4)])
                      for w in ("w1", "w3", "w2"))
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = w2
    save_file(tensors, str(source / "model.safetensors"))
    _same_files(quantize_checkpoint(source, tmp_path / "streamed", 8, None, lm_head, progress=False), reference)


@pytest.mark.parametrize("change,message", [
    ("drop", "missing from the checkpoint"),
    ("extra", "does not have"),
    ("shape", "the config implies"),
])
def test_a_bad_source_is_a_clear_error_and_leaves_no_file(tmp_path, change, message):
    source = save_hf_model(make_hf_model(seed=5), tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    if change == "drop":
        del tensors[name]
    elif change == "extra":
        tensors["model.layers.7.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(MixtralError, match=message):
        quantize_checkpoint(source, tmp_path / "out", 4, 32, progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob(".*"))
    for quantize in (None, "int8"):  # loading reads the checkpoint the same way, and says the same
        with pytest.raises(MixtralError, match=message):
            load_model(source, dtype="float32", progress=False, pack=False, quantize=quantize)


@pytest.mark.parametrize("setting", ["int8", "int4-g32", "int4+head"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_with_quantize_equals_quantizing_the_loaded_model(sharded_bf16, setting, dtype):
    """load(quantize=...) quantizes each tensor as it is read: the same model as loading whole, then quantizing."""
    streamed = load_model(sharded_bf16, dtype=dtype, progress=False, pack=False, quantize=setting)
    whole = load_model(sharded_bf16, dtype=dtype, progress=False, pack=False)
    Q.quantize_model(whole, *Q.parse_quantize(setting))
    ours, theirs = streamed.state_dict(), whole.state_dict()
    assert sorted(ours) == sorted(theirs) and streamed.quantization == whole.quantization
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(streamed(ids), whole(ids))
