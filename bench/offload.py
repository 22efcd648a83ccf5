"""Expert offloading under real memory limits: ours against llama.cpp, side by side in one run, on the same shapes.

Writes an int4 checkpoint of random weights in `mixtral quantize`'s format straight to disk (streamed: never whole
in memory) and, when a `llama-bench` binary is given, a GGUF of the same shapes in Q4_0 (bench/random_gguf.py).
Then, for each memory limit, runs each engine in a fresh process inside a memory cgroup (cgroup v1, as root: the
kernel enforces the limit and charges the page cache too) after dropping the page cache, and reports decode
tokens/s at batch 1 (`--new-tokens` decode steps after a `--prompt-tokens` prompt, each fed a random token, as
llama-bench does), the cgroup's peak memory, and
for ours the expert cache's hit rate, prefetch recall and precision, bytes read per token, and the planner's
predicted tokens/s (memory_plan.py). Our process gets `--max-memory` = the limit minus `--headroom`. A cgroup's
peak is its limit whenever the files do not fit (the page cache fills it); our process's own peak RSS is given too.

    python bench/offload.py --shape medium --limits 1100MiB 900MiB --llama-bench /path/to/llama-bench
    python bench/offload.py --shape 8x7b --limits 20GiB 12GiB 6GiB --dir /disk/with/50GB --llama-bench ...

Shapes: medium (hidden 1024, ffn 3584, 16 layers, 16/4 heads: 0.8 GB at int4) and 8x7b (hidden 4096, ffn 14336,
32 layers, 32/8 heads: 24 GB at int4), both 8 experts top-2, vocab 32000. The files are deleted at the end unless
`--keep`. Nothing here runs in CI (it needs root, minutes, and up to 50 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import llama_env  # noqa: E402  (llama-bench without the short OpenMP spin `import mixtral` sets)

SHAPES = {
    "medium": dict(dim=1024, hidden_dim=3584, n_layers=16, n_heads=16, n_kv_heads=4),
    "8x7b": dict(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8),
}
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def model_args(shape: str):
    from mixtral.config import ModelArgs

    return ModelArgs(**SHAPES[shape], n_experts=8, top_k=2, vocab_size=32000, max_seq_len=4096)


# ---- our checkpoint: random int4, written tensor by tensor ------------------------------------------------

def write_int4_checkpoint(shape: str, out: Path, group_size: int = 64, seed: int = 0) -> Path:
    """A `mixtral quantize`-format int4 checkpoint of random weights (the output head int8, as `+head` makes it;
    llama.cpp's is Q4_0), with the shipped model's tokenizer.
    Codes are uniform in -7..7 (zero mean, so routing is not skewed); each scale makes a row's product with a
    unit input about unit-sized, so activations stay finite through every layer."""
    from tqdm.auto import tqdm

    from mixtral import quantize
    from mixtral.loading import default_model_path
    from mixtral.quantize_checkpoint import _layout, _quantized_on_meta
    from mixtral.weights import safetensors_header

    args = model_args(shape)
    spec = quantize.spec(4, group_size, lm_head=True)  # the head: int8
    layout = _layout(_quantized_on_meta(args, spec), spec, torch.bfloat16)
    prefix, _, _ = safetensors_header(layout, {"format": "pt", "quantization": quantize.METHOD})
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    step = 64 << 20  # bytes generated at a time
    with open(out / "model.safetensors", "wb") as f:
        f.write(prefix)
        for name, (dtype, dims) in tqdm(layout.items(), desc=f"Writing a random int4 {shape} checkpoint",
                                        unit="tensor"):
            count = math.prod(dims)
            for start in range(0, count, step // dtype.itemsize):
                n = min(step // dtype.itemsize, count - start)
                if name == "lm_head.qweight":  # int8, -127..127
                    chunk = torch.randint(-127, 128, (n,), dtype=torch.int8, generator=generator)
                elif name == "lm_head.scales":  # int8 codes have std 73
                    chunk = torch.full((n,), 1 / (73 * math.sqrt(args.dim)), dtype=torch.bfloat16)
                elif name.endswith(".qweight"):  # nibbles 1..15: zero-mean codes (see random_gguf.py)
                    low, high = (torch.randint(1, 16, (n,), dtype=torch.uint8, generator=generator) for _ in "lh")
                    chunk = low | (high << 4)
                elif name.endswith(".scales"):  # codes are -8..7 (std 4.6): scale so a row sums to ~1
                    k = args.hidden_dim if ".w2." in name or name.endswith("wo.scales") else args.dim
                    chunk = torch.full((n,), 1 / (4.6 * math.sqrt(k)), dtype=torch.bfloat16)
                elif "norm" in name:
                    chunk = torch.ones(n, dtype=torch.bfloat16)
                else:  # embedding, router, head
                    chunk = (torch.randn(n, generator=generator) * (1.0 if "embed" in name else 0.02)).to(dtype)
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
    config = args.to_hf_config()
    config["torch_dtype"] = "bfloat16"
    config["quantization"] = spec
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(default_model_path() / "tokenizer.model", out / "tokenizer.model")
    return out


# ---- one run of ours, in this process (the child) ------------------------------------------------------

def child(model_dir: str, max_memory: str | None, prompt_tokens: int, new_tokens: int, prefetch: bool) -> dict:
    started = time.perf_counter()
    context = prompt_tokens + new_tokens + 1  # the KV cache this run needs (llama-bench sizes its own so too)
    from mixtral import kernels, memory_plan
    from mixtral.config import load_config
    from mixtral.kv_cache import KVCache
    from mixtral.loading import load_model
    from mixtral.weights import read_quantization

    args = load_config(model_dir)
    planned = None
    if max_memory is not None:
        plan = memory_plan.plan(args, read_quantization(model_dir), torch.bfloat16, memory_plan.parse_size(max_memory),
                                context)
        planned = {"slots": plan.slots, "tokens_per_s": plan.tokens_per_s, "hit_rate": plan.hit_rate,
                   "bytes_read_per_token": plan.bytes_read_per_token, "offload": plan.offload}
    model = load_model(model_dir, progress=False, max_memory=max_memory, context=context)
    loaded = time.perf_counter()
    store = getattr(kernels.runner(model), "store", None)
    if store is not None and not prefetch:
        store.set_prefetch(False)
    # like llama-bench: a prompt, then each step feeds a random token (greedy decoding of random weights repeats
    # a token or two, whose experts would all stay cached: no test of a cache)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab_size, (1, prompt_tokens), generator=generator)
    cache = KVCache(args, 1, context, model.activation_dtype)
    with torch.inference_mode():
        model(prompt, torch.arange(prompt_tokens)[None], cache, n_keys=prompt_tokens,
              logits_at=torch.tensor([prompt_tokens - 1]))
        first = time.perf_counter()
        before = store.stats.summary() if store else None
        runner = kernels.runner(model)
        for position in range(prompt_tokens, prompt_tokens + new_tokens):
            token = int(torch.randint(3, args.vocab_size, (1,), generator=generator))
            runner.decode_step(cache, [token], [position])
    done = time.perf_counter()
    import resource

    result = {"load_s": loaded - started, "first_token_s": first - started,
              "decode_tok_s": new_tokens / (done - first), "planned": planned,
              "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if store is not None:
        after = store.stats.summary()
        result["store"] = after
        result["slots"] = store.n_slots
        steps = max(1, after["passes"] - before["passes"])
        result["bytes_read_per_token"] = (after["bytes_read"] - before["bytes_read"]) / steps
    return result


# ---- the cgroup ---------------------------------------------------------------------------------------

class Cgroup:
    def __init__(self, name: str, limit: int):
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def run(self, command: list[str], timeout: float, env: dict | None = None
            ) -> tuple[subprocess.CompletedProcess, int, int]:
        """Run `command` inside the cgroup after dropping the page cache; (result, peak bytes, failcnt)."""
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        (self.path / "memory.max_usage_in_bytes").write_text("0")
        (self.path / "memory.failcnt").write_text("0")
        wrapped = ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *command]
        try:
            done = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            done = subprocess.CompletedProcess(wrapped, 124, exc.stdout or "", exc.stderr or "")
        peak = int((self.path / "memory.max_usage_in_bytes").read_text())
        fails = int((self.path / "memory.failcnt").read_text())
        return done, peak, fails

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_ours(cgroup: Cgroup | None, model_dir: Path, max_memory: str | None, opts, prefetch: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(model_dir), "--prompt-tokens", str(opts.prompt_tokens),
               "--new-tokens", str(opts.new_tokens)] + (["--max-memory", max_memory] if max_memory else []) + (
               [] if prefetch else ["--no-prefetch"])
    if cgroup is None:
        done, peak, fails = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout), None, None
    else:
        done, peak, fails = cgroup.run(command, opts.timeout)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200], "peak": peak,
                "failcnt": fails}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "peak": peak, "failcnt": fails}


def run_llama(cgroup: Cgroup | None, binary: str, gguf: Path, opts, repack: bool) -> dict:
    """llama-bench's decode test. By default llama.cpp repacks Q4_0 weights into anonymous memory (a faster
    layout, not evictable); `--repack 0` keeps them in the memory-mapped file, which the page cache streams."""
    command = [binary, "-m", str(gguf), "-t", str(opts.threads), "-p", "0", "-n", str(opts.new_tokens), "-r", "1",
               "-o", "json"] + ([] if repack else ["--repack", "0"])
    timeout = opts.llama_timeout or opts.timeout
    if cgroup is None:
        done, peak, fails = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                           env=llama_env()), None, None
    else:
        done, peak, fails = cgroup.run(command, timeout, env=llama_env())
    if done.returncode == 124:
        return {"error": f"not done after {timeout:.0f} s", "peak": peak, "failcnt": fails}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200], "peak": peak,
                "failcnt": fails}
    runs = json.loads(done.stdout)
    return {"decode_tok_s": runs[0]["avg_ts"], "peak": peak, "failcnt": fails}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="medium")
    p.add_argument("--limits", nargs="+", default=["1100MiB", "900MiB"], help="memory cgroup limits")
    p.add_argument("--headroom", default="64MiB", help="our --max-memory is the limit minus this")
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"), help="llama.cpp's llama-bench binary")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the written files")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--llama-timeout", type=float, default=None, help="seconds per llama.cpp run (default --timeout)")
    p.add_argument("--no-unlimited", action="store_true", help="skip the run without a limit")
    p.add_argument("--prefetch", choices=["on", "off", "both"], default="both")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        print(json.dumps(child(opts.child, opts.max_memory, opts.prompt_tokens, opts.new_tokens, not opts.no_prefetch)))
        return 0
    from mixtral import memory_plan

    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        print("this benchmark needs root and a cgroup-v1 memory controller at /sys/fs/cgroup/memory", file=sys.stderr)
        return 2
    work = Path(opts.dir or tempfile.mkdtemp(prefix="mixtral-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    ours_dir, gguf = work / f"{opts.shape}-int4", work / f"{opts.shape}-q4_0.gguf"
    rows = []
    try:
        if not (ours_dir / "model.safetensors").exists():
            write_int4_checkpoint(opts.shape, ours_dir)
        if opts.llama_bench and not gguf.exists():
            from random_gguf import write_random_q4_0

            a = model_args(opts.shape)
            write_random_q4_0(gguf, n_layers=a.n_layers, dim=a.dim, ffn_dim=a.hidden_dim, n_heads=a.n_heads,
                              n_kv_heads=a.n_kv_heads, n_experts=8, top_k=2, vocab=a.vocab_size)
        sizes = {"ours": (ours_dir / "model.safetensors").stat().st_size,
                 "llama.cpp": gguf.stat().st_size if gguf.exists() else None}
        print(f"files: ours {_mib(sizes['ours'])}, llama.cpp {_mib(sizes['llama.cpp'])}", file=sys.stderr)
        prefetch_modes = {"on": [True], "off": [False], "both": [True, False]}[opts.prefetch]
        limits = ([] if opts.no_unlimited else [None]) + opts.limits
        for limit in limits:
            cgroup = Cgroup(f"mixtral-bench-{os.getpid()}", memory_plan.parse_size(limit)) if limit else None
            try:
                row = {"limit": limit or "none"}
                budget = None
                if limit:
                    budget = str(memory_plan.parse_size(limit) - memory_plan.parse_size(opts.headroom))
                for prefetch in prefetch_modes if limit else [True]:
                    key = "ours" if prefetch else "ours_no_prefetch"
                    row[key] = run_ours(cgroup, ours_dir, budget, opts, prefetch)
                    print(f"{row['limit']} {key}: {json.dumps(row[key])}", file=sys.stderr)
                if opts.llama_bench:
                    for key, repack in (("llama.cpp", True), ("llama.cpp mmap", False)):
                        row[key] = run_llama(cgroup, opts.llama_bench, gguf, opts, repack)
                        print(f"{row['limit']} {key}: {json.dumps(row[key])}", file=sys.stderr)
                rows.append(row)
            finally:
                if cgroup:
                    cgroup.remove()
    finally:
        if not opts.keep:  # what this run wrote (a --dir of the caller's keeps everything else)
            shutil.rmtree(ours_dir, ignore_errors=True)
            gguf.unlink(missing_ok=True)
            if not opts.dir:
                shutil.rmtree(work, ignore_errors=True)
    if opts.json:
        print(json.dumps({"shape": opts.shape, "rows": rows, "cpu": _cpu()}, indent=2))
        return 0
    print(f"\n{opts.shape} int4 (ours) vs Q4_0 (llama.cpp), batch 1, {opts.new_tokens} tokens after a "
          f"{opts.prompt_tokens}-token prompt, {opts.threads} threads; {_cpu()}")
    print("| limit | ours tok/s | no prefetch | llama.cpp tok/s | llama.cpp --repack 0 | ours / best llama.cpp | "
          "ours peak (RSS) | llama.cpp peaks | hit rate | recall / precision | read/token | planned tok/s | "
          "first token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, off = row.get("ours", {}), row.get("ours_no_prefetch", {})
        llama, mapped = row.get("llama.cpp", {}), row.get("llama.cpp mmap", {})
        store = ours.get("store") or {}
        best = max((r.get("decode_tok_s") or 0 for r in (llama, mapped)), default=0)
        ratio = ours["decode_tok_s"] / best if ours.get("decode_tok_s") and best else None
        cells = [row["limit"], _tps(ours), _tps(off), _tps(llama), _tps(mapped), f"{ratio:.2f}x" if ratio else "-",
                 f"{_mib(ours.get('peak'))} ({_mib(ours.get('max_rss'))})",
                 f"{_mib(llama.get('peak'))} / {_mib(mapped.get('peak'))}",
                 f"{store['hit_rate']:.0%}" if store.get("hit_rate") is not None else "-",
                 (f"{store['prefetch_recall']:.0%} / {store['prefetch_precision']:.0%}"
                  if store.get("prefetch_recall") is not None else "-"),
                 _mib(ours.get("bytes_read_per_token")) if "bytes_read_per_token" in ours else "-",
                 f"{ours['planned']['tokens_per_s']:.2f}" if (ours.get("planned") or {}).get("tokens_per_s") else "-",
                 f"{ours['first_token_s']:.1f} s" if "first_token_s" in ours else "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


def _tps(result: dict) -> str:
    if not result:
        return "-"
    if "error" in result:
        return f"failed ({result['error'][:60]})"
    return f"{result['decode_tok_s']:.2f}"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
