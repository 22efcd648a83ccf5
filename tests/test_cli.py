"""The `mixtral` command as a user runs it: real subprocesses, real files, exit codes and messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_hf_model, save_hf_model

from mixtral import load
from mixtral.generate import generate_step
from mixtral.sampling import Sampler, SamplingParams


def run_cli(*args, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "mixtral", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_info_preset_prints_the_published_numbers():
    out = run_cli("info", "--preset", "mixtral-8x7b")
    assert out.returncode == 0, out.stderr
    assert "46,702,792,704" in out.stdout and "12,879,925,248" in out.stdout and "93.4 GB" in out.stdout
    data = json.loads(run_cli("info", "--preset", "mixtral-8x7b", "--json").stdout)
    assert data["total_params"] == 46_702_792_704 and data["active_params"] == 12_879_925_248
    assert data["kv_cache_bytes_per_token_bf16"] == 128 * 1024
    from mixtral.kernels import native_lib

    assert data["cpu_kernels"].startswith("ours" if native_lib.available() else "fbgemm")
    assert "CPU kernels: " in out.stdout


def test_info_prints_a_small_models_sizes_in_megabytes():
    out = run_cli("info")  # the shipped model: 14M parameters, 28 MB in bf16
    assert out.returncode == 0, out.stderr
    data = json.loads(run_cli("info", "--json").stdout)
    bf16_mb = data["weights_gb"]["bf16"] * 1000
    assert f"bf16 {bf16_mb:,.1f} MB" in out.stdout and "0.0 GB" not in out.stdout and 20 < bf16_mb < 40


def test_info_counts_match_a_real_model(tiny_chat_model):
    data = json.loads(run_cli("info", str(tiny_chat_model), "--json").stdout)
    model, _ = load(tiny_chat_model, dtype="float32", progress=False)
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    data = json.loads(run_cli("info", str(tiny_chat_model / "config.json"), "--json").stdout)
    assert data["total_params"] == sum(p.numel() for p in model.parameters())


def test_generate_json_matches_the_library(tiny_chat_model):
    out = run_cli("generate", "--model", str(tiny_chat_model), "--dtype", "float32", "--prompt", "Who goes there?",
                  "--temperature", "0", "--max-new-tokens", "10", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"text", "token_ids", "prompt_token_ids", "finish_reason"}
    model, tokenizer = load(tiny_chat_model, dtype="float32", progress=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who goes there?"}])
    assert result["prompt_token_ids"] == prompt and prompt.count(1) == 1
    steps = generate_step(model, [prompt], [Sampler(SamplingParams(temperature=0))], 10)
    expected = [step[0][0] for step in steps]
    n = len(result["token_ids"])
    assert result["token_ids"] == expected[:n]
    assert result["finish_reason"] == ("eos_token" if n < 10 else "length")


def test_chat_reads_piped_stdin(tiny_chat_model):
    out = run_cli("chat", "--model", str(tiny_chat_model), "--max-new-tokens", "5", "--temperature", "0",
                  stdin="Who goes there?\n/reset\nNay, answer me.\n")
    assert out.returncode == 0, out.stderr
    assert "conversation cleared" in out.stdout
    assert "Traceback" not in out.stderr


def _corrupt(kind, src, dst):
    shutil.copytree(src, dst)
    if kind == "missing-config":
        (dst / "config.json").unlink()
    elif kind == "truncated":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "unknown-model-type":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4"}))
    elif kind == "bin-only":
        (dst / "model.safetensors").unlink()
        (dst / "pytorch_model.bin").write_bytes(b"not really a pickle")
    elif kind == "wrong-shape":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
    return dst


EXPECTED = {
    "missing-config": "config.json not found",
    "truncated": "truncated or corrupted",
    "unknown-model-type": "unsupported model_type 'llama4'",
    "bin-only": "safetensors only",
    "wrong-shape": "has shape",
    "missing-shard": "missing",
    "no-such-dir": "not found",
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    return save_hf_model(make_hf_model(), out, with_tokenizer=True, max_shard_size="100KB")


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_model_directories_give_one_line_errors(kind, tiny_chat_model, sharded, tmp_path):
    if kind == "missing-shard":
        target = tmp_path / "m"
        shutil.copytree(sharded, target)
        sorted(target.glob("model-*.safetensors"))[1].unlink()
    elif kind == "no-such-dir":
        target = tmp_path / "nowhere"
    else:
        target = _corrupt(kind, tiny_chat_model, tmp_path / "m")
    out = run_cli("generate", "--model", str(target), "--prompt", "hi", "--max-new-tokens", "2")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixtral: error: "), out.stderr
    assert EXPECTED[kind] in lines[0]


def test_bad_sampling_parameter_is_a_clear_error(tiny_chat_model):
    out = run_cli("generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--temperature", "nan")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "temperature" in out.stderr and out.stderr.startswith("mixtral: error:")


def test_hub_id_not_cached_offline_says_how_to_get_it(tmp_path):
    env_home = {"HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mixtral", "info", "mistralai/Mixtral-8x7B-Instruct-v0.1"],
                         capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **env_home})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "not in the local Hugging Face cache" in out.stderr and "hf download" in out.stderr


def test_a_hub_id_is_found_in_the_local_cache(tmp_path, tiny_chat_model):
    """A model in the huggingface_hub cache layout is found by its id, without any network."""
    repo = tmp_path / "hub" / "models--someone--tiny-mixtral"
    shutil.copytree(tiny_chat_model, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    out = subprocess.run([sys.executable, "-m", "mixtral", "generate", "--model", "someone/tiny-mixtral", "--prompt",
                          "hi", "--max-new-tokens", "3", "--temperature", "0", "--json"],
                         capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.returncode == 0, out.stderr
    direct = run_cli("generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "3",
                     "--temperature", "0", "--json")
    assert json.loads(out.stdout) == json.loads(direct.stdout)


@pytest.mark.parametrize("entry,message", [
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "unreadable entry"),
    ({"dtype": "F32", "shape": "22", "data_offsets": [0, 4]}, "unreadable entry"),
    ({"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 4]}, "wrong size"),  # refused, not allocated
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "outside the file"),
    ({"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}, "does not read"),
])
def test_malformed_safetensors_headers_are_clear_errors(tmp_path, entry, message):
    import struct

    from mixtral.errors import MixtralError
    from mixtral.weights import _read_tensors

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(MixtralError, match=message):
        list(_read_tensors([path], progress=False))


def test_importing_mixtral_shortens_openmps_spin_unless_the_user_chose():
    """OpenMP reads GOMP_SPINCOUNT when torch loads it: `import mixtral` sets a short spin first (see __init__),
    so that a busy neighbour process does not stall every parallel region; a value the user set stays."""
    import os

    code = "import os, mixtral, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "7"}, capture_output=True,
                            text=True, timeout=120)
    assert ours.stdout.strip() == "10000" and theirs.stdout.strip() == "7", ours.stderr + theirs.stderr


def _with_generation_config(folder, cfg) -> object:
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return folder


def test_sampling_flags_override_the_models_generation_config(tmp_path):
    from mixtral.cli import _sampling_params, build_parser
    from mixtral.errors import MixtralError

    def params(model_dir, *flags):
        return _sampling_params(build_parser().parse_args(["generate", "-p", "x", *flags]), model_dir)

    assert params(tmp_path) == SamplingParams()  # no generation_config.json: mixtral's defaults
    folder = _with_generation_config(tmp_path / "m", {"do_sample": False, "temperature": 0.5, "top_k": 40,
                                                      "min_p": 0.1, "top_p": None, "max_new_tokens": 7})
    p = params(folder)
    assert (p.do_sample, p.temperature, p.top_k, p.min_p, p.top_p, p.max_new_tokens) == (False, 0.5, 40, 0.1, 1.0, 7)
    p = params(folder, "--temperature", "0.9", "--top-k", "3", "--seed", "5", "--stop", "a", "--stop", "b",
               "--max-new-tokens", "9", "--repetition-penalty", "1.2")
    assert (p.do_sample, p.temperature, p.top_k, p.seed, p.stop, p.max_new_tokens, p.repetition_penalty, p.min_p) == (
        True, 0.9, 3, 5, ("a", "b"), 9, 1.2, 0.1)  # a temperature > 0 turns sampling back on
    assert params(folder, "--temperature", "0").greedy
    with pytest.raises(MixtralError, match="invalid JSON"):
        params(_with_generation_config(tmp_path / "bad", "{not json"))
    with pytest.raises(MixtralError, match="top_p"):
        params(_with_generation_config(tmp_path / "range", {"top_p": 0}))


def test_a_hub_id_is_looked_up_once_per_command(tiny_chat_model, monkeypatch, capsys):
    """The commands resolve --model once and hand the directory on: one Hugging Face cache lookup per load."""
    import mixtral.loading
    import mixtral.server
    import mixtral.ui
    from mixtral.cli import main

    lookups = []
    monkeypatch.setattr(mixtral.loading, "_from_hub_cache", lambda repo_id: lookups.append(repo_id) or tiny_chat_model)
    served = []
    monkeypatch.setattr(mixtral.server, "run", lambda engine, model_id, *a, **kw: served.append(model_id))
    monkeypatch.setattr(mixtral.ui, "run", lambda *a, **kw: None)
    hub = ["--model", "someone/tiny-mixtral", "--dtype", "float32"]
    for argv in (["generate", *hub, "-p", "hi", "--max-new-tokens", "2", "--json"], ["serve", *hub], ["ui", *hub],
                 ["ui", *hub, "--endpoint", "http://127.0.0.1:9"], ["info", "someone/tiny-mixtral"]):
        lookups.clear()
        assert main(argv) == 0, argv
        assert lookups == ["someone/tiny-mixtral"], argv
    assert served == ["someone/tiny-mixtral"]  # a Hub id names itself
    capsys.readouterr()


@pytest.mark.parametrize("command,hidden", [("serve", "fastapi"), ("serve", "uvicorn"), ("ui", "gradio"),
                                            ("ui", "openai")])
def test_a_front_end_without_its_extra_says_what_to_install(command, hidden, monkeypatch, capsys, tmp_path):
    from mixtral.cli import main

    monkeypatch.setitem(sys.modules, hidden, None)  # as if it were not installed
    assert main([command, "--model", str(tmp_path / "missing")]) == 2  # said before the model is looked for
    err = capsys.readouterr().err
    assert err.startswith(f"mixtral: error: mixtral {command} needs {hidden}") and "Traceback" not in err
    assert f"pip install 'mixtral[{command}]'" in err


def test_chat_and_generate_need_neither_extra(tiny_chat_model):
    """`pip install mixtral` without [serve] or [ui]: the library and the terminal commands never import them."""
    hide = "import sys\nfor name in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'gradio', 'openai'):\n" \
           "    sys.modules[name] = None\n"
    code = hide + (f"from mixtral.cli import main\nsys.exit(main(['generate', '--model', {str(tiny_chat_model)!r}, "
                   "'-p', 'hi', '--max-new-tokens', '2', '--temperature', '0']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", hide + "from mixtral.cli import main\nsys.exit(main(['serve']))"],
                         capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "pip install 'mixtral[serve]'" in out.stderr and "Traceback" not in out.stderr
