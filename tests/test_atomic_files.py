"""Files mixtral writes appear whole or not at all: a full disk or a failure part-way leaves the old file (or none)
and no half-written one, and feedback lines from many tabs never interleave (fault-injecting writers)."""

import errno
import json
import os
import threading

import pytest

from conftest import make_hf_model, save_hf_model

from mixtral.paths import append_line, atomic_path, write_atomic


def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "config.json"
    write_atomic(target, '{"old": true}\n')
    with pytest.raises(OSError), atomic_path(target) as partial:
        partial.write_bytes(b'{"new": tr')  # half of the new file, then the disk is full
        _disk_full()
    assert target.read_text() == '{"old": true}\n' and sorted(os.listdir(tmp_path)) == ["config.json"]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return save_hf_model(make_hf_model(seed=5), tmp_path_factory.mktemp("small"), with_tokenizer=True)


def test_quantize_save_and_gguf_export_leave_no_half_files_on_a_full_disk(small_dir, tmp_path, monkeypatch):
    import gguf

    from mixtral import load, quantize_checkpoint, weights

    def half_then_full(source, args, spec, dtype, path, progress):
        path.write_bytes(b"\0" * 1000)
        _disk_full()

    monkeypatch.setattr(quantize_checkpoint, "_write", half_then_full)
    with pytest.raises(OSError):
        quantize_checkpoint.quantize_checkpoint(small_dir, tmp_path / "q", bits=8, progress=False)
    assert os.listdir(tmp_path / "q") == []
    monkeypatch.undo()

    model, tokenizer = load(small_dir, dtype="float32", progress=False, pack=False)
    weights.save_checkpoint(model, tmp_path / "saved")
    before = (tmp_path / "saved" / "model.safetensors").read_bytes()

    def save_half(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        _disk_full()

    monkeypatch.setattr(weights, "save_file", save_half)
    with pytest.raises(OSError):
        weights.save_checkpoint(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").read_bytes() == before  # the old one, whole
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors"]

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _disk_full)
    with pytest.raises(OSError):
        weights.export_gguf(model, tokenizer, tmp_path / "out.gguf", "q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "saved"]


def test_feedback_lines_are_whole_under_concurrency_and_absent_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "feedback.jsonl"
    lock = threading.Lock()  # as FeedbackLog serializes its clicks

    def click(n):
        for i in range(50):
            with lock:
                append_line(path, json.dumps({"tab": n, "click": i, "text": "x" * (100 * n)}))

    threads = [threading.Thread(target=click, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and all(json.loads(line)["text"] == "x" * (100 * json.loads(line)["tab"])
                                     for line in lines)
    size = path.stat().st_size
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # disk full part-way
    with pytest.raises(OSError, match="short write"):
        append_line(path, json.dumps({"tab": 99, "text": "y" * 1000}))
    monkeypatch.undo()
    assert path.stat().st_size == size and path.read_text().endswith("}\n")  # cut back: no half line
