"""Prompt speed of one Mixtral-8x7B decoder layer at its real shapes (hidden 4096, ffn 14336, 8 experts top-2,
32/8 heads of 128), random weights: ours (bf16, int8 and int4, the prompt path and the exact one) against
transformers' MixtralForCausalLM in bf16 with the same single layer, in one run, on the same checkpoint.

Both engines run a whole one-layer model (embedding, the layer, norm, a 32-token output projection for the last
position only), so what is timed is the layer. From the per-layer time the projected time to first token of the
full model (32 layers) for a 500-token prompt is printed: 32 x (time of a 512-token prompt) x 500 / 512, leaving
out the embedding and the output projection of one row (small next to 32 layers).

    python bench/prefill_layer.py                       # 128 and 512 tokens, 2 rounds
    python bench/prefill_layer.py --tokens 128 --json

The checkpoint (2.8 GB of bf16) is written once to a temporary directory and deleted afterwards; each engine and
precision runs in its own process, one after another.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, FFN, HEADS, KV_HEADS, EXPERTS, LAYERS = 4096, 14336, 32, 8, 8, 32
# exact: our fp32 kernels for prompts too
RUNS = ["hf:bf16", "ours:bf16", "exact:bf16", "ours:int8", "ours:int4", "exact:int4"]


def write_checkpoint(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import write_random_checkpoint

    from mixtral.config import ModelArgs

    args = ModelArgs(dim=HIDDEN, hidden_dim=FFN, n_layers=1, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=128,
                     n_experts=EXPERTS, top_k=2, vocab_size=32, max_seq_len=4096, rope_theta=1e6)
    write_random_checkpoint(args, out)


def worker(run: str, model_dir: str, tokens: list[int], repeat: int) -> dict:
    import torch

    engine, precision = run.split(":")
    gen = torch.Generator().manual_seed(1)
    results = {}
    if engine == "hf":
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

        def prefill(ids):
            model(ids, use_cache=True, logits_to_keep=1)
    else:
        from mixtral import kernels
        from mixtral.loading import load_model

        model = load_model(model_dir, dtype="bfloat16", progress=False, exact=engine == "exact",
                           quantize=precision if precision in ("int8", "int4") else None)
        runner = kernels.runner(model)

        def prefill(ids):
            runner.forward(ids, logits_at=torch.tensor([ids.shape[1] - 1]))

    with torch.inference_mode():
        for T in tokens:
            ids = torch.randint(0, 32, (1, T), generator=gen)
            prefill(ids)  # warm-up
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                prefill(ids)
                best = min(best, time.perf_counter() - start)
            results[str(T)] = best
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="128,512", help="prompt lengths (comma-separated)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    tokens = [int(t) for t in opts.tokens.split(",")]
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.model_dir, tokens, opts.repeat)))
        return 0
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("writing a random one-layer checkpoint at Mixtral-8x7B's shapes ...", file=sys.stderr)
        write_checkpoint(Path(tmp))
        for run in opts.runs.split(","):
            done = subprocess.run([sys.executable, __file__, "--worker", run, "--model-dir", tmp, "--tokens",
                                   opts.tokens, "--repeat", str(opts.repeat)], capture_output=True, text=True)
            if done.returncode:
                rows[run] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            else:
                rows[run] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {run}: {rows[run]}", file=sys.stderr)
    if opts.json:
        print(json.dumps(rows))
        return 0
    reference = rows.get("hf:bf16", {})
    header = "".join(f"{f'{T} tok/s':>12}{'vs hf':>8}" for T in tokens)
    print(f"one Mixtral-8x7B layer (hidden {HIDDEN}, ffn {FFN}, {EXPERTS} experts top-2, {HEADS}/{KV_HEADS} heads), "
          f"prompt tokens/s through the layer")
    print(f"{'engine':<14}{header}{'500-token TTFT, 32 layers':>28}")
    for run, row in rows.items():
        if "error" in row:
            print(f"{run:<14}error: {row['error']}")
            continue
        cells = ""
        for T in tokens:
            rate = T / row[str(T)]
            ratio = reference[str(T)] / row[str(T)] if str(T) in reference else float("nan")
            cells += f"{rate:>12,.1f}{ratio:>7.2f}x"
        longest = max(tokens)
        ttft = LAYERS * row[str(longest)] * 500 / longest
        print(f"{run:<14}{cells}{ttft:>26.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
