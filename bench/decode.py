"""Decode benchmark: our engine at fp32, bf16, int8, int4 and transformers' MixtralForCausalLM at fp32, bf16,
side by side in one run, on the same weights.

For each engine and precision, a fresh subprocess loads the model (so peak RSS while loading means something),
warms up, then times a prefill of a `--prompt-tokens` prompt and `--new-tokens` greedy decode steps at batch 1
(no EOS stop), `--repeat` times, and reports the best. The bandwidth bound is (bytes of weights one decode
token reads) / (measured read bandwidth of a large tensor); each engine's fraction of it says how close batch-1
decode gets to the memory wall.

    python bench/decode.py --config small            # random weights written once to a temp dir (bf16)
    python bench/decode.py --model DIR --json        # an existing checkpoint
    mixtral bench --config mixtral-8x7b --device cuda  # full Mixtral-8x7B shapes, random bf16 on the GPU
    python bench/decode.py --config small --llama-bench /path/to/llama-bench   # llama.cpp rows too

With `--llama-bench PATH`, llama.cpp joins the table on the same checkpoint: it is converted once to a bf16 GGUF
(llama.cpp's convert_hf_to_gguf.py, found above the binary or given by `--llama-convert`), quantized to Q8_0 and
Q4_0 (llama-quantize, found next to the binary or given by `--llama-quantize`) in a temporary directory deleted
afterwards, and `llama-bench -t THREADS -p PROMPT_TOKENS -n NEW_TOKENS -r REPEAT` is run on each file: rows
"llama.cpp bf16", "int8" (Q8_0) and "int4" (Q4_0) with its prefill (pp) and decode (tg) tokens/s, which are the
mean of its `--repeat` runs (ours are the best) and whose decode starts from an empty context (ours after the
prompt). The random `--config` checkpoints get the shipped model's tokenizer.model (same 32000 vocabulary) for
the converter. A step that fails puts its error in those rows; the rest of the table is unaffected. A
llama-bench killed by a signal is run again with `--repack 0` (kernels column "repack=0"): on AMX Xeons the
repacked Q8_0/Q4_0 path of llama-cpp-python 0.3.36's llama.cpp segfaults, and its plain kernels do not.

Configs: tiny (hidden 128, 2 layers: a smoke test), small (hidden 512, ffn 1792, 8 layers, 8/2 heads),
medium (hidden 1024, ffn 3584, 16 layers, 16/4 heads), all with 8 experts top-2 and vocab 32000;
mixtral-8x7b (GPU only, no files; fp32 runs are skipped: they do not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [("ours", "fp32"), ("ours", "bf16"), ("ours", "int8"), ("ours", "int8+head"), ("ours", "int4"),
        ("hf", "fp32"), ("hf", "bf16")]  # int8+head: lm_head in int8 too (as llama.cpp's Q8_0 does)
# also available: ours:fp16 (an fp16 copy of the weights, packed like bf16), and exact:<precision> (ours with
# prompts on our exact fp32 kernels too, not oneDNN's bf16 GEMMs: kernels/prompt.py)
CONFIGS = {  # ModelArgs fields; all have 8 experts top-2 and vocab 32000
    "tiny": dict(dim=128, hidden_dim=448, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32),
    "small": dict(dim=512, hidden_dim=1792, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64),
    "medium": dict(dim=1024, hidden_dim=3584, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=64),
}
GPU_ONLY = "mixtral-8x7b"


def model_args(config: str):
    from mixtral.config import ModelArgs, preset

    if config == GPU_ONLY:
        return preset(config)
    return ModelArgs(**CONFIGS[config], n_experts=8, top_k=2, vocab_size=32000, max_seq_len=4096)


def write_random_checkpoint(args, out_dir: Path, seed: int = 0) -> Path:
    """Random bf16 weights in Hugging Face layout (config.json + model.safetensors), readable by both engines."""
    import torch
    from safetensors.torch import save_file

    from mixtral.model import Transformer
    from mixtral.weights import hf_state_dict

    with torch.device("meta"):
        names = hf_state_dict(Transformer(args))  # names and shapes only
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in names.items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
    config = args.to_hf_config()
    config["torch_dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def random_model_on_device(args, precision: str, device: str, group_size: int | None, pack: bool = True,
                           exact: bool = False):
    """Our Transformer with random bf16 weights made directly on `device` (no files), then quantized (and on the
    CPU set up for the fastest kernels, as `load` does)."""
    import torch

    from mixtral import kernels
    from mixtral.model import Transformer
    from mixtral.quantize import quantize_model

    default = torch.get_default_dtype()
    torch.set_default_dtype({"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16))
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    base, _, head = precision.partition("+")
    if base in ("int8", "int4"):
        quantize_model(model, 8 if base == "int8" else 4, group_size, lm_head=head == "head")
    if pack:
        kernels.prepare(model, exact=exact)
    return model.eval()


# ---- measurements inside one worker process --------------------------------------------------------------

def peak_rss_mb(field: str = "VmHWM") -> float:
    """The process's peak resident set size so far (VmHWM; or the current one, VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def checkpoint_mb(model_dir: str | None) -> float | None:
    """Bytes of the checkpoint's safetensors files, in MB (None without files)."""
    if not model_dir:
        return None
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 1e6


def kernels_of(model) -> str:
    """Which runner our model runs on: "native" (kernels/native.py), "fbgemm" (kernels/fbgemm.py) or "torch"."""
    from mixtral import kernels

    return kernels.runner(model).name


def active_bytes(model) -> int:
    """Bytes of weights one decode token reads in our model: every layer's attention, norms and router, top_k
    of its experts, the final norm and lm_head (one embedding row is negligible). Scales included."""
    from mixtral.kernels.fbgemm import PackedLinear

    def nbytes(module_or_tensor) -> int:
        if hasattr(module_or_tensor, "element_size"):
            return module_or_tensor.numel() * module_or_tensor.element_size()
        tensors = list(module_or_tensor.parameters()) + list(module_or_tensor.buffers())
        packed = [m.nbytes() for m in module_or_tensor.modules() if isinstance(m, PackedLinear)]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(packed)

    total = nbytes(model.norm) + nbytes(model.lm_head)
    for block in model.layers:
        total += nbytes(block.attn) + nbytes(block.attn_norm) + nbytes(block.ffn_norm)
        ffn = block.ffn
        if hasattr(ffn, "router"):
            weights = [getattr(ffn, name, None) for name in ("w1", "w2", "w3")]
            experts = sum(nbytes(w) for w in weights if w is not None)
            total += nbytes(ffn.router) + experts * ffn.top_k // ffn.w2.shape[0]
        else:
            total += nbytes(ffn)
    return total


def measure_bandwidth(device: str, megabytes: int) -> float:
    """Read bandwidth in GB/s: the best of a few full reductions over a large fp32 tensor. On the CPU the tensor
    is put on 2 MiB pages where the OS allows, as our engine puts its weights (a read on 4 KiB pages measured
    ~19 GB/s here against ~29 GB/s on 2 MiB pages), so the bound is what the memory can deliver."""
    import torch

    data = torch.ones(megabytes * 250_000, dtype=torch.float32, device=device)
    if data.device.type == "cpu":
        from mixtral.kernels import native_lib

        if native_lib.available():
            native_lib.library().mx_hugepages(data.data_ptr(), data.nbytes, 1)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(opts, precision: str, exact: bool = False) -> dict:
    import torch

    from mixtral import kernels, quantize  # noqa: F401  (imported here, not while loading)
    from mixtral.kernels import native_lib
    from mixtral.generate import generate_step
    from mixtral.loading import load_model
    from mixtral.sampling import Sampler, SamplingParams

    native_lib.available()  # the kernel library is loaded and probed once per process, whatever the checkpoint
    baseline = peak_rss_mb("VmRSS")
    start = time.perf_counter()
    if opts.model:
        base, plus, head = precision.partition("+")
        quantize = {"int8": "int8", "int4": f"int4-g{opts.group_size}"}.get(base)
        quantize = quantize and quantize + plus + head
        dtype = {"fp32": "float32", "fp16": "float16"}.get(precision, "bfloat16")
        model = load_model(opts.model, dtype=dtype, device=opts.device, progress=False, quantize=quantize,
                           pack=opts.pack, max_memory=opts.max_memory,
                           context=opts.prompt_tokens + opts.new_tokens if opts.max_memory else None, exact=exact)
    else:
        model = random_model_on_device(model_args(opts.config), precision, opts.device, opts.group_size, opts.pack,
                                       exact)
    sync(opts.device)
    result = {"load_s": time.perf_counter() - start, "peak_rss_load_mb": peak_rss_mb(),
              "load_rss_growth_mb": peak_rss_mb() - baseline, "active_bytes": active_bytes(model),
              "kernels": kernels_of(model)}
    prompt = prompt_ids(opts, model.args.vocab_size)
    if opts.compile:  # measured, not the default: see the README (graph breaks at the experts)
        model = torch.compile(model, dynamic=True)

    def timed(n_new: int) -> list[float]:
        times = [time.perf_counter()]
        for _ in generate_step(model, [prompt], [Sampler(SamplingParams(temperature=0))], n_new):
            times.append(time.perf_counter())  # each step ends in a host sync (the sampled token id)
        return times

    with torch.inference_mode():
        timed(3)  # warm-up: allocations, kernel checks, a full-size prefill
        runs = [timed(opts.new_tokens + 1) for _ in range(opts.repeat)]
    result["prefill_tok_s"] = max(len(prompt) / (t[1] - t[0]) for t in runs)
    result["decode_tok_s"] = max(opts.new_tokens / (t[-1] - t[1]) for t in runs)
    return result


def run_hf(opts, precision: str) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    baseline = peak_rss_mb("VmRSS")
    start = time.perf_counter()
    if opts.model:
        model = MixtralForCausalLM.from_pretrained(opts.model, dtype=dtype).to(opts.device)
    else:
        config = MixtralConfig(**model_args(opts.config).to_hf_config())
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(opts.device):
                model = MixtralForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    model.eval()
    model.generation_config.eos_token_id = None  # always the requested number of tokens
    model.generation_config.pad_token_id = 0
    sync(opts.device)
    result = {"load_s": time.perf_counter() - start, "peak_rss_load_mb": peak_rss_mb(),
              "load_rss_growth_mb": peak_rss_mb() - baseline}
    ids = torch.tensor([prompt_ids(opts, model.config.vocab_size)], device=opts.device)

    def generate_s(n_new: int) -> float:
        sync(opts.device)
        begin = time.perf_counter()
        model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        sync(opts.device)
        return time.perf_counter() - begin

    def prefill_s() -> float:
        sync(opts.device)
        begin = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        sync(opts.device)
        return time.perf_counter() - begin

    with torch.inference_mode():
        generate_s(3)  # warm-up
        result["prefill_tok_s"] = max(ids.shape[1] / prefill_s() for _ in range(opts.repeat))
        # decode steps alone: the difference between generating 1 + N tokens and 1 token (same prefill)
        result["decode_tok_s"] = max(opts.new_tokens / (generate_s(opts.new_tokens + 1) - generate_s(1))
                                     for _ in range(opts.repeat))
    return result


def prompt_ids(opts, vocab_size: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab_size, (opts.prompt_tokens,), generator=gen).tolist()


def worker(opts) -> int:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    engine, precision = opts.worker.split(":")
    if engine == "hf":
        result = run_hf(opts, precision)
    else:
        result = run_ours(opts, precision, exact=engine == "exact")
    if opts.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))
    return 0


# ---- the parent: one subprocess per run, then the table ---------------------------------------------------

def bytes_per_token_plain(args, precision: str) -> int:
    """Bytes one decode token reads at fp32/bf16 (the same for both engines): see `active_bytes`."""
    from mixtral.memory import count_params

    counts = count_params(args)
    per_layer = counts.attention_per_layer + counts.router_per_layer + counts.norms_per_layer
    params = counts.n_layers * (per_layer + counts.top_k * counts.expert) + counts.final_norm
    params += counts.lm_head or counts.embedding  # a tied lm_head reads the embedding matrix
    return params * (4 if precision == "fp32" else 2)


def spawn(opts, run: tuple[str, str], model_dir: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ":".join(run), "--device", opts.device,
           "--prompt-tokens", str(opts.prompt_tokens), "--new-tokens", str(opts.new_tokens),
           "--group-size", str(opts.group_size), "--repeat", str(opts.repeat)]
    cmd += ["--model", model_dir] if model_dir else ["--config", opts.config]
    cmd += ["--threads", str(opts.threads)] if opts.threads else []
    cmd += [] if opts.pack else ["--no-pack"]
    cmd += ["--compile"] if opts.compile else []
    cmd += ["--max-memory", opts.max_memory] if opts.max_memory else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:200]}"}


# ---- llama.cpp (optional): the same checkpoint converted to GGUF, timed by its own llama-bench ------------------

LLAMA_TYPES = [("bf16", None), ("int8", "Q8_0"), ("int4", "Q4_0")]  # our precision name, llama-quantize type


def find_llama_tool(llama_bench: str, name: str) -> Path | None:
    """`name` next to llama-bench, or in a folder above it (the binary may be a symlink into a build tree)."""
    here = Path(llama_bench)
    folders = [here.parent, *here.resolve().parents]
    return next((f / name for f in folders if (f / name).is_file()), None)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return f"exit {proc.returncode}: {(lines or ['no output'])[-1][:200]}"


def llama_env() -> dict:
    """The environment llama-bench runs in: ours less the short OpenMP spin (GOMP_SPINCOUNT) that `import
    mixtral` sets (README, Quantization and speed), so that llama.cpp runs with its own defaults: its OpenMP
    threads wait between many small ops, and with the short spin they fall asleep each time (the "tiny" model's
    Q8_0 decoded at ~47 tok/s instead of ~2,000-3,000 here). A value the user chose is kept."""
    env = dict(os.environ)
    if env.get("GOMP_SPINCOUNT") == "10000":  # the value mixtral/__init__.py sets when none was set
        del env["GOMP_SPINCOUNT"]
    return env


def run_llama(opts, model_dir: str | None, threads: int) -> list[dict]:
    """One row per entry of LLAMA_TYPES: llama-bench's prefill and decode tokens/s on `model_dir` as a GGUF."""
    rows = [{"engine": "llama.cpp", "precision": precision, "gguf_type": kind or "BF16"}
            for precision, kind in LLAMA_TYPES]

    def fail(message: str) -> list[dict]:
        for row in rows:
            row.setdefault("error", message)
        return rows

    if not model_dir:
        return fail("needs checkpoint files (--model DIR or a CPU --config)")
    if not os.access(opts.llama_bench, os.X_OK):
        return fail(f"not an executable: {opts.llama_bench}")
    convert = opts.llama_convert or find_llama_tool(opts.llama_bench, "convert_hf_to_gguf.py")
    quantize = opts.llama_quantize or find_llama_tool(opts.llama_bench, "llama-quantize")
    if not convert:
        return fail("convert_hf_to_gguf.py not found above llama-bench; give --llama-convert PATH")
    with tempfile.TemporaryDirectory(prefix="mixtral-bench-gguf-") as tmp:
        bf16 = Path(tmp) / "model-bf16.gguf"
        proc = subprocess.run([sys.executable, str(convert), model_dir, "--outtype", "bf16", "--outfile", str(bf16)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not bf16.is_file():
            return fail("convert_hf_to_gguf.py: " + last_line(proc))
        for row, (_, kind) in zip(rows, LLAMA_TYPES):
            gguf = bf16
            if kind:
                if not quantize:
                    row["error"] = "llama-quantize not found next to llama-bench; give --llama-quantize PATH"
                    continue
                gguf = Path(tmp) / f"model-{kind.lower()}.gguf"
                proc = subprocess.run([str(quantize), str(bf16), str(gguf), kind], capture_output=True, text=True)
                if proc.returncode != 0:
                    row["error"] = "llama-quantize: " + last_line(proc)
                    continue
            row["gguf_mb"] = gguf.stat().st_size / 1e6
            command = [opts.llama_bench, "-m", str(gguf), "-t", str(threads), "-p", str(opts.prompt_tokens),
                       "-n", str(opts.new_tokens), "-r", str(opts.repeat), "-o", "json"]
            proc = subprocess.run(command, capture_output=True, text=True, env=llama_env())
            if proc.returncode < 0:  # killed by a signal: on AMX Xeons this build's repacked Q8_0/Q4_0 path
                # (ggml_backend_amx_mul_mat) segfaults; its plain kernels still run, so measure those and say so
                proc = subprocess.run(command + ["--repack", "0"], capture_output=True, text=True, env=llama_env())
                row["kernels"] = "repack=0"
            if proc.returncode != 0:
                row["error"] = "llama-bench: " + last_line(proc)
                continue
            try:
                tests = json.loads(proc.stdout)
                row["prefill_tok_s"] = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"])
                row["decode_tok_s"] = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"])
                row["threads"] = tests[0]["n_threads"]
            except (ValueError, KeyError, StopIteration, IndexError) as exc:
                row.pop("prefill_tok_s", None)
                row["error"] = f"llama-bench output not understood: {type(exc).__name__} {exc}"[:200]
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    print(f"config {report['config']} on {report['device']}, {report['threads']} threads; prompt "
          f"{report['prompt_tokens']} tokens, decode {report['new_tokens']} tokens at batch 1 (greedy); "
          f"{'' if report['pack'] else 'ours on plain torch ops (--no-pack); '}"
          f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s")
    weights = report.get("checkpoint_mb")
    print(f"checkpoint {weights:,.0f} MB of safetensors; 'load MB' is how much the resident set grew while "
          f"loading (peak minus before; after the imports and our kernel library's one-time load)" if weights
          else "no checkpoint files (weights made on the device)")
    head = (f"{'engine':<16}{'kernels':<9}{'load s':>8}{'load MB':>9}{'x ckpt':>8}{'prefill tok/s':>15}"
            f"{'decode tok/s':>14}{'vs hf bf16':>12}{'MB/token':>10}{'bound tok/s':>13}{'of bound':>10}")
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        name = f"{r['engine']} {r['precision']}"
        if "error" in r:
            print(f"{name:<16}  {r['error']}")
            continue
        growth = r.get("load_rss_growth_mb")  # the llama.cpp rows have only the tokens/s (and the ratio)
        ratio = r.get("decode_vs_hf_bf16")
        active = r.get("active_bytes")
        print(f"{name:<16}{r.get('kernels', 'torch' if growth is not None else '-'):<9}"
              f"{fmt(r.get('load_s'), '.2f'):>8}{fmt(growth, ',.0f'):>9}"
              f"{fmt(growth / weights if weights and growth is not None else None, '.2f'):>8}"
              f"{r['prefill_tok_s']:>15,.1f}"
              f"{r['decode_tok_s']:>14,.2f}{fmt(ratio, '.2f') + ('x' if ratio else ''):>12}"
              f"{fmt(active and active / 1e6, ',.1f'):>10}{fmt(r.get('bound_tok_s'), ',.1f'):>13}"
              f"{fmt(r.get('fraction_of_bound'), '.0%'):>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral bench", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="checkpoint directory (HF layout, safetensors)")
    source.add_argument("--config", default=None, choices=[*CONFIGS, GPU_ONLY], help="random weights of this shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size (default 64)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per engine; the best is reported (this machine is shared and noisy)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--runs", default=",".join(f"{e}:{p}" for e, p in RUNS),
                        help="comma-separated engine:precision list (default: all of them)")
    parser.add_argument("--no-pack", dest="pack", action="store_false",
                        help="ours: plain torch ops, neither our own kernels nor fbgemm (kernels/)")
    parser.add_argument("--compile", action="store_true",
                        help="ours: torch.compile the model (compile time is part of the warm-up, not the timings)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the bandwidth probe tensor")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="with --model: our runs load with this memory budget (experts that do not fit are "
                             "read from disk: README, Models larger than memory); bench/offload.py compares "
                             "that with llama.cpp under memory cgroups")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="also time llama.cpp on the same checkpoint (GGUF bf16, Q8_0, Q4_0) with this llama-bench")
    parser.add_argument("--llama-quantize", default=None, metavar="PATH",
                        help="llama.cpp's llama-quantize (default: the one next to --llama-bench)")
    parser.add_argument("--llama-convert", default=None, metavar="PATH",
                        help="llama.cpp's convert_hf_to_gguf.py (default: found in a folder above --llama-bench)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts)
    if not opts.model and not opts.config:
        parser.error("give --model DIR or --config NAME")
    if opts.config == GPU_ONLY and not opts.device.startswith("cuda"):
        parser.error(f"--config {GPU_ONLY} builds random weights on the GPU; use it with --device cuda")

    import torch

    from mixtral.config import load_config

    if opts.threads:
        torch.set_num_threads(opts.threads)
    runs = [tuple(item.split(":")) for item in opts.runs.split(",")]
    tmp = None
    if opts.config and opts.config != GPU_ONLY:
        tmp = Path(tempfile.mkdtemp(prefix=f"mixtral-bench-{opts.config}-"))
        write_random_checkpoint(model_args(opts.config), tmp)
        if opts.llama_bench:  # llama.cpp's converter needs a tokenizer; the shipped model's has the same vocabulary
            from mixtral.loading import default_model_path

            shutil.copy(default_model_path() / "tokenizer.model", tmp / "tokenizer.model")
    model_dir = opts.model or (str(tmp) if tmp else None)
    weights_mb = checkpoint_mb(model_dir)
    args = load_config(model_dir) if model_dir else model_args(opts.config)
    try:
        bandwidth = measure_bandwidth(opts.device, opts.bandwidth_mb)
        results = []
        for engine, precision in runs:
            if opts.config == GPU_ONLY and precision == "fp32":
                results.append({"engine": engine, "precision": precision, "error": "skipped: fp32 does not fit"})
                continue
            result = {"engine": engine, "precision": precision, **spawn(opts, (engine, precision), model_dir)}
            if "error" not in result:
                result.setdefault("active_bytes", bytes_per_token_plain(args, precision))
                result["bound_tok_s"] = bandwidth * 1e9 / result["active_bytes"]
                result["fraction_of_bound"] = result["decode_tok_s"] / result["bound_tok_s"]
            results.append(result)
            print(f"  {engine} {precision}: {result.get('decode_tok_s', result.get('error'))}", file=sys.stderr)
        if opts.llama_bench:
            for result in run_llama(opts, model_dir, opts.threads or torch.get_num_threads()):
                results.append(result)
                print(f"  llama.cpp {result['precision']}: {result.get('decode_tok_s', result.get('error'))}",
                      file=sys.stderr)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    reference = next((r for r in results if r["engine"] == "hf" and r["precision"] == "bf16" and "error" not in r),
                     None)
    for r in results:
        if reference and "error" not in r:
            r["decode_vs_hf_bf16"] = r["decode_tok_s"] / reference["decode_tok_s"]
            r["prefill_vs_hf_bf16"] = r["prefill_tok_s"] / reference["prefill_tok_s"]
    report = {"config": opts.config or opts.model, "device": opts.device,
              "threads": opts.threads or torch.get_num_threads(), "prompt_tokens": opts.prompt_tokens,
              "new_tokens": opts.new_tokens, "group_size": opts.group_size, "pack": opts.pack,
              "compile": opts.compile, "checkpoint_mb": weights_mb,
              "bandwidth_gb_s": bandwidth,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results}
    if opts.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
