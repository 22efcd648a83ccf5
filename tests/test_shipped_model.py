"""The model shipped inside the package: a real Mixtral checkpoint, balanced experts, and English replies."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from mixtral import load
from mixtral.data import list_plays, load_split, prepare
from mixtral.loading import default_model_path
from mixtral.train import reply_chars_tensor, reply_nats_per_char

SHIPPED = default_model_path()


def test_checkpoint_is_small_and_transformers_gives_the_same_logits():
    from transformers import MixtralForCausalLM

    assert (SHIPPED / "model.safetensors").stat().st_size <= 30 * 1024 * 1024
    ours, tokenizer = load(SHIPPED, dtype="float32", progress=False)
    reference = MixtralForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Who goes there?"}])])
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    prepare(out, plays=["julius_caesar", "macbeth", "twelfth_night"], progress=False)
    return load_split(out, "val")


def test_experts_are_balanced_in_every_layer_on_heldout_text(heldout):
    model, _ = load(SHIPPED, dtype="float32", progress=False)
    ids, mask, meta = heldout
    counts = torch.zeros(model.args.n_layers, model.args.n_experts, dtype=torch.long)
    result = reply_nats_per_char(model, ids, mask, reply_chars_tensor(ids, mask, meta), max_tokens=30_000,
                                 routing_counts=counts)
    share = counts.float() / counts.sum(dim=1, keepdim=True)
    assert share.min() >= 0.05 and share.max() <= 0.25, share
    assert result["nats_per_char"] < 1.6  # far below an untrained model (~3 nats/char)


def test_piped_chat_with_no_flags_answers_in_english():
    out = subprocess.run([sys.executable, "-m", "mixtral", "chat", "--temperature", "0", "--max-new-tokens", "40"],
                         input="Who goes there?\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    words = re.findall(r"[A-Za-z']+", out.stdout)
    assert len(words) >= 3, out.stdout
    corpus = set()
    for path in list_plays().values():
        corpus.update(w.lower() for w in re.findall(r"[A-Za-z']+", path.read_text(encoding="utf-8", errors="ignore")))
    known = sum(w.lower() in corpus for w in words)
    assert known / len(words) >= 0.8, out.stdout
