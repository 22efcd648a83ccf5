"""One model split over N torchrun processes against one process, in one run: peak resident memory of each
process, prompt and decode tokens/s, and how far the split model's logits are from one process's.

    python bench/distributed.py                          # "medium" (hidden 1024, 16 layers, 8 experts), bf16, N=2
    python bench/distributed.py --config small --dtype float32 --ranks 2
    python bench/distributed.py --quantize int4                # a checkpoint written by `mixtral quantize`

Random weights in Hugging Face layout (bench/decode.py's configs). One process and the split model each run
twice: on the model's own torch code (`--no-pack`; `load_shard(pack=False)`) and on our C kernels (what `mixtral
generate` uses, one process or split). The split runs are `torchrun --standalone --nproc-per-node N` on the same
machine, the cores shared out (each rank gets cores / N threads, one process all of them): on a 2-core machine
their speed says what the split and the collectives cost here, not what N machines would give. Greedy decoding;
the logits compared are the last position's of one fixed sequence, against one process in fp32 (for a bf16 run,
an extra fp32 run of the same weights is the reference).
With --quantize the weights are first written quantized (`mixtral quantize`), each rank reads its part of that
checkpoint as stored, and the reference is one process on the same checkpoint (the fp32 run reads it too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(opts) -> None:
    """Load, prefill `--prompt-tokens`, decode `--new-tokens` greedily; write this process's numbers as JSON."""
    from mixtral import distributed
    from mixtral.generate import generate_step
    from mixtral.loading import load_model
    from mixtral.sampling import Sampler, SamplingParams

    split = distributed.world() > 1
    started = time.perf_counter()
    if split:
        distributed.init()
        model = distributed.load_shard(opts.model, opts.dtype, progress=False, pack=opts.native)
        if distributed.rank() > 0:
            loaded = time.perf_counter() - started
            distributed.follow(model)
            distributed.finish()
            Path(f"{opts.worker}.rank{distributed.rank()}").write_text(json.dumps(
                {"rss_mb": peak_rss_mb(), "load_s": loaded}))
            return
        distributed.lead(model)
    else:
        model = load_model(opts.model, "float32" if opts.fp32 else opts.dtype, progress=False, pack=opts.native)
    loaded = time.perf_counter() - started
    prompt = torch.randint(3, 32000, (opts.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    steps, times = generate_step(model, [prompt], [Sampler(SamplingParams(temperature=0))], opts.new_tokens), []
    last = time.perf_counter()
    tokens = []
    with torch.inference_mode():
        for step in steps:
            now = time.perf_counter()
            times.append(now - last)
            last = now
            tokens.append(step[0][0])
        ids = torch.tensor([prompt + prompt[:opts.new_tokens]])  # the same sequence for every run
        logits = model(ids, logits_at=torch.tensor([ids.shape[1] - 1]))[0, -1].float()
    if split:
        distributed.finish(distributed.leader())
    torch.save(logits, f"{opts.worker}.logits")
    decode = times[1:]
    Path(f"{opts.worker}.rank0").write_text(json.dumps({
        "rss_mb": peak_rss_mb(), "load_s": loaded, "prefill_tok_s": opts.prompt_tokens / times[0],
        "decode_tok_s": len(decode) / sum(decode), "tokens": tokens}))


def run(command: list[str], out: str, processes: int) -> list[dict]:
    """Run one configuration; the machine's cores are shared out among its processes (threads each)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(Path(out).parent.glob(Path(out).name + ".rank*"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="medium")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--quantize", default=None, metavar="int8|int4|int4-gG[+head]",
                        help="split a checkpoint quantized on disk this way")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--native", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return 0
    from decode import model_args, write_random_checkpoint

    from mixtral.memory import count_params, per_rank

    args = model_args(opts.config)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model").mkdir()
        model_dir = write_random_checkpoint(args, Path(tmp) / "model")
        if opts.quantize:
            from mixtral.quantize import parse_quantize
            from mixtral.quantize_checkpoint import quantize_checkpoint

            bits, group, head = parse_quantize(opts.quantize)
            model_dir = quantize_checkpoint(model_dir, Path(tmp) / "quantized", bits, group, head, progress=False)
        common = [__file__, "--model", str(model_dir), "--dtype", opts.dtype, "--prompt-tokens",
                  str(opts.prompt_tokens), "--new-tokens", str(opts.new_tokens)]
        rows = {}
        fp32 = [("1 process, fp32 torch code", [sys.executable], ["--fp32"])] if opts.dtype != "float32" else []
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(opts.ranks)]
        for label, launcher, extra in (
                *fp32,
                ("1 process, torch code", [sys.executable], []),
                ("1 process, our kernels", [sys.executable], ["--native"]),
                (f"{opts.ranks} ranks, torch code", torchrun, []),
                (f"{opts.ranks} ranks, our kernels", torchrun, ["--native"])):
            out = str(Path(tmp) / label.replace(" ", "_").replace(",", ""))
            processes = opts.ranks if "ranks" in label else 1
            rows[label] = (run([*launcher, *common, "--worker", out, *extra], out, processes),
                           torch.load(out + ".logits"))
        reference = rows["1 process, fp32 torch code" if fp32 else "1 process, torch code"][1]
        params = count_params(args).total
        print(f"{opts.config} ({params / 1e6:,.0f}M parameters, {opts.quantize or opts.dtype}), "
              f"{opts.prompt_tokens}-token prompt, {opts.new_tokens} greedy tokens; {os.cpu_count()} CPU cores")
        print(f"{'':<24}{'peak RSS per process MB':>26}{'prefill tok/s':>15}{'decode tok/s':>14}"
              f"{'max |logit diff|':>18}  same tokens")
        first = rows["1 process, torch code"][0][0]["tokens"]  # same tokens: as the one process on the torch code
        for label, (ranks, logits) in rows.items():
            lead, rss = ranks[0], " / ".join(f"{r['rss_mb']:,.0f}" for r in ranks)
            print(f"{label:<24}{rss:>26}{lead['prefill_tok_s']:>15,.0f}"
                  f"{lead['decode_tok_s']:>14,.1f}{(logits - reference).abs().max().item():>18.2e}  "
                  f"{lead['tokens'] == first}")
        split = per_rank(args, opts.ranks)
        print(f"planned per rank (mixtral info --ranks {opts.ranks}): {split['params'] / 1e6:,.0f}M parameters, "
              f"{split['replicated_params'] / 1e6:.2f}M of them on every rank (routers, norms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
