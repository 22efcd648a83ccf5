"""Training: a short CPU run lowers held-out loss, exports a checkpoint transformers loads, and resumes."""

from __future__ import annotations

import pytest
import torch

from mixtral import load
from mixtral.config import ModelArgs
from mixtral.data import load_split, prepare
from mixtral.train import (TrainConfig, linear_cross_entropy, load_balancing_loss, reply_chars_tensor,
                           reply_nats_per_char, train)

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=64, n_experts=4, top_k=2,
                 vocab_size=32000, max_seq_len=256, tie_embeddings=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(out, plays=["julius_caesar", "macbeth"], progress=False)
    return out


def _val_nats(model, data_dir):
    ids, mask, meta = load_split(data_dir, "val")
    return reply_nats_per_char(model, ids, mask, reply_chars_tensor(ids, mask, meta), max_tokens=4000)["nats_per_char"]


def test_short_run_lowers_heldout_loss_and_exports_a_real_mixtral(data_dir, tmp_path):
    from transformers import MixtralForCausalLM

    from mixtral.cli import export_shipped

    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup=10, eval_every=1000, ckpt_every=1000,
                      dropout=0.0)
    untrained = train(TINY, cfg.__class__(**{**cfg.__dict__, "steps": 0}), data_dir, tmp_path / "run0", log=str)
    trained = train(TINY, cfg, data_dir, tmp_path / "run", log=str)
    before, after = _val_nats(untrained, data_dir), _val_nats(trained, data_dir)
    assert after < before - 1.0, (before, after)

    out = export_shipped(trained, tmp_path / "export")
    model, tokenizer = load(out, dtype="float32", progress=False)
    reference = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Who goes there?"}])])
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() < 1e-4


def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, warmup=2, eval_every=1000, ckpt_every=2, dropout=0.0)
    straight = train(TINY, cfg, data_dir, tmp_path / "straight", log=str)
    logs = []
    interrupted = TrainConfig(**{**cfg.__dict__, "time_limit_min": 0.0})  # stops after its first step
    train(TINY, interrupted, data_dir, tmp_path / "resumed", log=logs.append)
    assert any("time limit" in m for m in logs)
    # a kill after the checkpoint's rename and before state.json's leaves an older state.json beside it: the
    # state inside the checkpoint is the one that counts
    (tmp_path / "resumed" / "state.json").write_text('{"step": 0, "history": []}')
    logs.clear()
    resumed = train(TINY, cfg, data_dir, tmp_path / "resumed", log=logs.append)
    assert any("resumed" in m and "step 1" in m for m in logs)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_balancing_loss_is_per_layer():
    """Two layers unbalanced in opposite directions are balanced when pooled, but not per layer."""
    from mixtral.model import Routing

    logits = torch.tensor([[4.0, 0, 0, 0]] * 8)
    ids = torch.tensor([[0, 1]] * 8)
    mirror = torch.tensor([[0, 0, 0, 4.0]] * 8)
    layers = [Routing(logits[None], ids[None], torch.ones(1, 8, 2)),
              Routing(mirror[None], torch.tensor([[3, 2]] * 8)[None], torch.ones(1, 8, 2))]
    even = Routing(torch.zeros(1, 8, 4), torch.tensor([[0, 1], [2, 3]] * 4)[None], torch.ones(1, 8, 2))
    assert load_balancing_loss(layers, 4) > 1.5 * load_balancing_loss([even, even], 4)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_cross_entropy_matches_torch(chunk):
    """Loss and both gradients equal F.cross_entropy on the full logits, for chunks that do and do not divide N,
    including an upstream gradient other than 1 and a weight shared with another use (tied embeddings)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(150, 16, generator=gen, requires_grad=True)
    w = torch.randn(300, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (150,), generator=gen)
    extra = torch.randn(300, 16, generator=gen)

    ref = torch.nn.functional.cross_entropy(h @ w.T, targets)
    (2.5 * ref + (w * extra).sum()).backward()
    ref_h, ref_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None

    ours = linear_cross_entropy(h, w, targets, chunk=chunk)
    (2.5 * ours + (w * extra).sum()).backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(h.grad, ref_h, atol=1e-6)
    assert torch.allclose(w.grad, ref_w, atol=1e-5)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h, w, targets[:-1])
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, targets, chunk=0)


def test_chunked_cross_entropy_under_autocast_and_no_grad():
    """Inside bf16 autocast its loss and gradients are still fp32's (the train loop's setting); under no_grad it
    gives the same loss, with nothing to differentiate."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(40, 8, generator=gen, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=gen)
    ref = torch.nn.functional.cross_entropy(h @ w.T, targets)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, targets, chunk=16)
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, atol=1e-5)
    ours.backward()
    assert torch.allclose(h.grad, ref_h, atol=1e-6) and torch.allclose(w.grad, ref_w, atol=1e-6)
    with torch.no_grad():
        measured = linear_cross_entropy(h, w, targets, chunk=16)
    assert not measured.requires_grad and torch.allclose(measured, ref, atol=1e-5)


def test_heldout_measure_equals_one_conversation_at_a_time(data_dir):
    """Batching conversations by length (with padding) gives the summed reply NLL and routing counts of scoring
    each conversation on its own with F.cross_entropy."""
    from mixtral.model import Transformer
    from mixtral.train import init_weights

    torch.manual_seed(0)
    model = Transformer(TINY)
    init_weights(model, seed=3)
    model.eval()
    ids, mask, _ = load_split(data_dir, "val")
    counts = torch.zeros(TINY.n_layers, TINY.n_experts, dtype=torch.long)
    ours = reply_nats_per_char(model, ids, mask, max_tokens=3000, routing_counts=counts, batch_tokens=600)

    starts = (ids == 1).nonzero().flatten().tolist() + [len(ids)]
    nll, n_reply, seen, ref_counts = 0.0, 0, 0, torch.zeros_like(counts)
    for s, e in zip(starts[:-1], starts[1:]):
        routing = []
        with torch.no_grad():
            logits = model(ids[None, s:e], routing=routing)[0]
        token_nll = torch.nn.functional.cross_entropy(logits[:-1], ids[s + 1:e], reduction="none")
        keep = mask[s + 1:e]
        nll += float(token_nll[keep].sum())
        n_reply += int(keep.sum())
        for layer, r in enumerate(routing):
            ref_counts[layer] += torch.bincount(r.expert_ids.flatten(), minlength=TINY.n_experts)
        seen += e - s
        if seen >= 3000:
            break
    assert ours["reply_tokens"] == n_reply and ours["tokens_seen"] == seen
    assert ours["nll"] == pytest.approx(nll, rel=1e-5)
    assert torch.equal(counts, ref_counts)
