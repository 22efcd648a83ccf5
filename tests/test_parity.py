"""Our model against transformers' MixtralForCausalLM / MistralForCausalLM on the same safetensors files."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, save_hf_model

from mixtral import experts
from mixtral.config import load_config
from mixtral.generate import generate_step
from mixtral.sampling import Sampler, SamplingParams
from mixtral.weights import load_weights

CONFIGS = {
    "gqa-top2-untied": dict(num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False),
    "mha-top1-tied": dict(num_key_value_heads=4, num_experts_per_tok=1, tie_word_embeddings=True),
    "gqa-window-top2": dict(num_key_value_heads=1, sliding_window=6, num_experts_per_tok=2),
    "mha-window-8experts-3layers": dict(num_key_value_heads=4, sliding_window=10, num_local_experts=8,
                                        num_experts_per_tok=2, num_hidden_layers=3, tie_word_embeddings=True),
    "headdim-override": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2),
}


def _pair(tmp_path, model_type="mixtral", **overrides):
    hf = make_hf_model(model_type, **overrides)
    save_hf_model(hf, tmp_path)
    ours = load_weights(tmp_path, load_config(tmp_path), torch.float32, progress=False)
    return hf, ours


def _greedy_ours(model, prompts, n):
    samplers = [Sampler(SamplingParams(temperature=0)) for _ in prompts]
    steps = list(generate_step(model, prompts, samplers, n))
    return [[step[row][0] for step in steps] for row in range(len(prompts))]


@pytest.mark.parametrize("name", list(CONFIGS) + ["mistral-dense"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, name):
    if name == "mistral-dense":
        hf, ours = _pair(tmp_path, "mistral", num_key_value_heads=2, sliding_window=8)
    else:
        hf, ours = _pair(tmp_path, **CONFIGS[name])
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape == (3, 20, 256)
    assert (got - expected).abs().max().item() < 1e-4

    prompt = ids[0, :7]
    with torch.no_grad():
        reference = hf.generate(prompt[None], max_new_tokens=32, do_sample=False)[0, 7:].tolist()
    assert len(reference) == 32
    assert _greedy_ours(ours, [prompt.tolist()], 32)[0] == reference


def test_batch_of_unequal_lengths_equals_each_row_alone(tmp_path):
    hf, ours = _pair(tmp_path, **CONFIGS["gqa-window-top2"])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (5, 17, 1, 11)]
    batched = _greedy_ours(ours, prompts, 16)
    for prompt, got in zip(prompts, batched):
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
        assert got == reference.tolist()


def test_sharded_checkpoint_and_bf16_load(tmp_path):
    hf = make_hf_model(num_local_experts=4)
    save_hf_model(hf, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    args = load_config(tmp_path)
    ours = load_weights(tmp_path, args, torch.float32, progress=False)
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    half = load_weights(tmp_path, args, torch.bfloat16, progress=False)
    assert half.embed.weight.dtype == torch.bfloat16 and half.layers[0].ffn.w1.dtype == torch.bfloat16
    assert (half(ids).float() - hf(ids).logits).abs().max().item() < 0.1


def test_the_embedding_is_initialized_except_on_the_meta_device(monkeypatch):
    """Loading builds the model on the meta device; torch's init there only costs memory (~70 MB of imports)."""
    from mixtral.model import Embedding

    assert 0.5 < Embedding(1000, 8).weight.std() < 1.5  # torch's N(0, 1) init, as nn.Embedding

    def refuse(*args, **kwargs):
        raise AssertionError("the embedding was initialized on the meta device")

    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    with torch.device("meta"):
        Embedding(1000, 8)


def test_router_choices_are_reported_per_token(tmp_path):
    hf, ours = _pair(tmp_path, num_local_experts=4, num_experts_per_tok=2)
    ids = torch.randint(3, 256, (2, 6))
    routing = []
    ours(ids, routing=routing)
    assert len(routing) == 2
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
    for layer, r in enumerate(routing):
        assert r.expert_ids.shape == (2, 6, 2) and r.weights.shape == (2, 6, 2)
        reference_logits = out.router_logits[layer].view(2, 6, -1)
        assert torch.allclose(r.logits, reference_logits, atol=1e-5)
        assert torch.equal(r.expert_ids, reference_logits.topk(2, dim=-1).indices)
        assert torch.allclose(r.weights.sum(-1), torch.ones(2, 6))


def test_moe_paths_agree(tmp_path):
    _, ours = _pair(tmp_path, num_local_experts=4, num_experts_per_tok=2)
    moe = ours.layers[0].ffn
    x = torch.randn(10, 64)
    _, expert_ids, weights = moe.route(x)
    grouped = experts.grouped(x, expert_ids, weights, moe.w1, moe.w3, moe.w2)
    gathered = experts.gathered(x, expert_ids, weights, moe.w1, moe.w3, moe.w2)
    assert (grouped - gathered).abs().max().item() < 1e-5
