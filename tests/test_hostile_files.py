"""Checkpoint files written to hurt: each is refused with one line, before any large allocation or long loop."""

import json
import shutil
import struct
import time

import pytest

from conftest import make_hf_model, save_hf_model

from mixtral import load
from mixtral.errors import MixtralError
from mixtral.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=2), tmp_path_factory.mktemp("good"), with_tokenizer=True)


def _copy(good, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(good, out)
    return out


def _refused(call, match):
    started = time.time()
    with pytest.raises(MixtralError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value) and time.time() - started < 30
    return str(caught.value)


@pytest.mark.parametrize("key,value", [("vocab_size", 10**12), ("num_hidden_layers", 10**6),
                                       ("hidden_size", 10**9), ("intermediate_size", 10**11),
                                       ("num_local_experts", 10**7), ("num_attention_heads", 10**8)])
def test_a_config_far_larger_than_its_weights_is_refused_before_building_anything(good, tmp_path, key, value):
    folder = _copy(good, tmp_path, key)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    if key == "num_attention_heads":
        config["head_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    _refused(lambda: load(folder, progress=False), "does not match|must|divisible")


def test_huge_tokenizer_and_config_files_are_not_read(good, tmp_path):
    folder = _copy(good, tmp_path, "huge")
    with open(folder / "tokenizer.model", "r+b") as f:  # sparse: a gigabyte that takes no disk
        f.truncate(2**30)
    _refused(lambda: load_tokenizer(folder), "too large for a tokenizer file")
    (folder / "tokenizer.model").unlink()
    with open(folder / "tokenizer.json", "wb") as f:
        f.truncate(2**30)
    _refused(lambda: load_tokenizer(folder), "too large for a tokenizer file")
    shutil.copy(good / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer.json").unlink()
    with open(folder / "config.json", "r+b") as f:
        f.truncate(2**30)
    _refused(lambda: load(folder, progress=False), "too large for a config.json")


def test_overlapping_tensors_are_refused(tmp_path):
    from mixtral.weights import stored_tensors

    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    _refused(lambda: stored_tensors(path), "overlap")
