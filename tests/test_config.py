"""Reading config.json: both rope layouts, presets, and clear errors for impossible values."""

from __future__ import annotations

import pytest

from mixtral.config import ModelArgs, preset
from mixtral.errors import MixtralError

BASE = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def test_old_and_new_rope_keys_and_unknown_keys():
    old = ModelArgs.from_hf_config({**BASE, "rope_theta": 5e5, "some_future_key": [1, 2]})
    new = ModelArgs.from_hf_config({**BASE, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.head_dim == 16 and old.n_experts == 8 and old.top_k == 2


def test_dense_mistral_and_sliding_window():
    args = ModelArgs.from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert not args.is_moe and args.sliding_window == 4096


def test_round_trip_through_hf_config():
    args = preset("mixtral-8x22b")
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 66}, "divisible"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"num_experts_per_tok": 9}, "between 1 and"),
    ({"model_type": "bert"}, "unsupported model_type"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"vocab_size": "many"}, "vocab_size"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
])
def test_impossible_configs_are_refused(change, message):
    with pytest.raises(MixtralError, match=message):
        ModelArgs.from_hf_config({**BASE, **change})


def test_missing_keys_and_unknown_preset():
    with pytest.raises(MixtralError, match="hidden_size"):
        ModelArgs.from_hf_config({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(MixtralError, match="unknown preset"):
        preset("mixtral-8x9b")
