"""Streaming quantization of a checkpoint larger than the memory it runs in, then running it with a budget.

Writes a plain Hugging Face bf16 checkpoint of random weights at Mixtral-8x7B's widths (hidden 4096, ffn 14336,
32/8 heads, 8 experts, vocab 32000) with `--layers` layers (8 make ~24 GB), streamed, never whole in memory;
then, inside a memory cgroup of `--limit` (cgroup v1, root; the page cache is charged too), runs
`mixtral quantize --bits 4` on it, and `bench/offload.py`'s decode run on the result with `--max-memory` (the limit
minus 64 MiB); reports time, the cgroup's peak and the process's own peak RSS for each.

    python bench/quantize_stream.py --layers 8 --limit 6GiB --dir /disk/with/32GB
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload import Cgroup, SHAPES  # noqa: E402


def write_bf16_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    """A plain bf16 checkpoint (transformers' names, one tensor per expert weight) of random N(0, 0.02) weights."""
    from tqdm.auto import tqdm

    from mixtral.config import ModelArgs
    from mixtral.loading import default_model_path
    from mixtral.model import Transformer
    from mixtral.weights import hf_state_dict, safetensors_header

    args = ModelArgs(**{**SHAPES["8x7b"], "n_layers": layers}, n_experts=8, top_k=2, vocab_size=32000,
                     max_seq_len=4096)
    with torch.device("meta"):
        names = {name: tuple(t.shape) for name, t in hf_state_dict(Transformer(args)).items()}
    prefix, _, size = safetensors_header({name: (torch.bfloat16, shape) for name, shape in names.items()},
                                         {"format": "pt"})
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    step = 32 << 20  # values generated at a time
    with open(out / "model.safetensors", "wb") as f, tqdm(total=size, unit="B", unit_scale=True,
                                                          desc="Writing a random bf16 checkpoint") as bar:
        f.write(prefix)
        for name, shape in names.items():
            count = math.prod(shape)
            for start in range(0, count, step):
                n = min(step, count - start)
                if "norm" in name:
                    chunk = torch.ones(n, dtype=torch.bfloat16)
                else:
                    chunk = (torch.randn(n, generator=generator) * 0.02).to(torch.bfloat16)
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
                bar.update(n * 2)
    config = args.to_hf_config()
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(default_model_path() / "tokenizer.model", out / "tokenizer.model")
    return out


QUANTIZE = """
import json, resource, sys, time
from mixtral.quantize_checkpoint import quantize_checkpoint
start = time.perf_counter()
quantize_checkpoint(sys.argv[1], sys.argv[2], 4, None, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--limit", default="6GiB")
    p.add_argument("--dir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--new-tokens", type=int, default=8)
    opts = p.parse_args(argv)
    from mixtral.memory_plan import parse_size

    work = Path(opts.dir or tempfile.mkdtemp(prefix="mixtral-quantize-"))
    source, target = work / "bf16", work / "int4"
    report = {}
    try:
        start = time.perf_counter()
        if not (source / "model.safetensors").exists():
            write_bf16_checkpoint(source, opts.layers)
        report["bf16_bytes"] = (source / "model.safetensors").stat().st_size
        report["write_seconds"] = time.perf_counter() - start
        limit = parse_size(opts.limit)
        cgroup = Cgroup(f"mixtral-quantize-{opts.layers}", limit)
        try:
            done, peak, fails = cgroup.run([sys.executable, "-c", QUANTIZE, str(source), str(target)], 7200)
            if done.returncode != 0:
                raise SystemExit(f"quantize failed ({done.returncode}): {done.stderr[-500:]}")
            report["quantize"] = {**json.loads(done.stdout.strip().splitlines()[-1]), "cgroup_peak": peak,
                                  "failcnt": fails}
            report["int4_bytes"] = (target / "model.safetensors").stat().st_size
            command = [sys.executable, str(Path(__file__).parent / "offload.py"), "--child", str(target),
                       "--new-tokens", str(opts.new_tokens), "--max-memory", str(limit - (64 << 20))]
            done, peak, fails = cgroup.run(command, 7200)
            if done.returncode != 0:
                raise SystemExit(f"the decode run failed ({done.returncode}): {done.stderr[-500:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            report["decode"] = {key: run[key] for key in ("load_s", "first_token_s", "decode_tok_s", "max_rss",
                                                          "slots", "bytes_read_per_token") if key in run}
            report["decode"].update(cgroup_peak=peak, failcnt=fails)
        finally:
            cgroup.remove()
    finally:
        if not opts.keep:  # what this run wrote (a --dir of the caller's keeps everything else)
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            if not opts.dir:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"limit": opts.limit, "layers": opts.layers, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
