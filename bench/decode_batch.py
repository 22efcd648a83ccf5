"""Decode-step time of our CPU kernels by batch size, and a 128-token prompt, optionally for two versions of the
C source side by side (kernel work: the same weights, alternating processes, one run).

    python bench/decode_batch.py --config small                       # bf16, int8, int4 at batch 1, 2, 4, 8, 16
    python bench/decode_batch.py --config small --compare OLD.c       # and the same with an older cpu_kernels.c

Each (source, precision) runs in a fresh process on the same random "small" weights (bench/decode.py's); a step
is `kernels.runner(model).decode_step` with every row at its own cache row, the best of --repeat runs of --steps steps.
A source whose C structures differ from this version's (weight_t, store_t, layer_t) is refused and its rows say so:
to compare across such a change, give the older source the newer structures first.

The last lines put the steps against the two things that bound them, measured in the same run: the weights a step
must read (memory: the dense weights once, plus the experts any row chose), and the multiply-adds it must do
(compute: every row multiplies by its own active weights, in fp32 on our exact kernels, at most at the speed of
torch's own fp32 GEMM here). On a CPU whose fp32 rate is low the second bound is the one a large batch meets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (1, 2, 4, 8, 16)


def worker(opts) -> dict:
    from mixtral import kernels, load  # before torch: `import mixtral` shortens OpenMP's spin (README)
    from mixtral.kernels import native_lib

    import torch
    from mixtral.kv_cache import KVCache

    if opts.source:
        native_lib.SOURCE = Path(opts.source)
    quantize = None if opts.precision == "bf16" else opts.precision  # int8, int4, int4-g32, ...
    model, _ = load(opts.model, dtype="bfloat16", quantize=quantize, progress=False)
    runner = kernels.runner(model)
    if runner.name != "native":
        return {"error": f"our kernels do not run here: {native_lib.unavailable_reason()}"}
    cache = KVCache(model.args, max(BATCHES), opts.steps + 8, torch.float32)
    for step in range(5):  # warm-up
        runner.decode_step(cache, [5], [step], [0])
    result = {}
    for B in BATCHES:
        best = float("inf")
        for _ in range(opts.repeat):
            start = time.perf_counter()
            for step in range(opts.steps):
                runner.decode_step(cache, [100 + row for row in range(B)], [step] * B, list(range(B)))
            best = min(best, (time.perf_counter() - start) / opts.steps)
        result[f"step_ms_batch_{B}"] = best * 1e3
    ids = torch.randint(3, model.args.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(opts.repeat):
            prompt_cache = KVCache(model.args, 1, 128, torch.float32)
            start = time.perf_counter()
            model(ids, torch.arange(128)[None], prompt_cache, n_keys=128)
            best = min(best, time.perf_counter() - start)
    result["prefill_128_tok_s"] = 128 / best
    result["fp32_gemm_gmac_s"] = fp32_gemm_rate()
    return result


def fp32_gemm_rate() -> float:
    """Multiply-adds per second (1e9) of torch's fp32 GEMM on this machine: 256 x 512 by 512 x 1792 (an expert's
    shape on "small"), best of three runs of 100."""
    import torch

    a, b = torch.randn(256, 512), torch.randn(512, 1792)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(100):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 256 * 512 * 1792 * 100 / best / 1e9


def active_macs(args) -> int:
    """Multiply-adds of one decode row: attention projections, router, top-k experts per layer, output head."""
    D, H, G, Dh = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
    per_layer = D * (H + 2 * G) * Dh + H * Dh * D + D * args.n_experts + args.top_k * 3 * D * args.hidden_dim
    return args.n_layers * per_layer + D * args.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="a bench/decode.py config (tiny, small, medium)")
    parser.add_argument("--precisions", default="bf16,int8,int4", help="bf16 and quantize settings (int4-g32, ...)")
    parser.add_argument("--compare", default=None, help="another cpu_kernels.c to time side by side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import decode

    from mixtral.tokenizer import mistral_v1_tokenizer_path

    sources = [("this", None)] + ([("compare", opts.compare)] if opts.compare else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        decode.write_random_checkpoint(decode.model_args(opts.config), Path(tmp))
        (Path(tmp) / "tokenizer.model").write_bytes(mistral_v1_tokenizer_path().read_bytes())
        for precision in opts.precisions.split(","):
            for name, source in sources:
                command = [sys.executable, __file__, "--worker", "--model", tmp, "--precision", precision,
                           "--steps", str(opts.steps), "--repeat", str(opts.repeat)]
                done = subprocess.run(command + (["--source", source] if source else []), capture_output=True,
                                      text=True)
                lines = done.stdout.strip().splitlines()
                result = json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-300:]}
                rows.append({"source": name, "precision": precision, **result})
    if opts.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"config {opts.config}: decode step ms by batch size (best of {opts.repeat} x {opts.steps} steps), "
          f"and a 128-token prompt")
    print(f"{'precision':<10}{'source':<9}" + "".join(f"{'B=' + str(b):>9}" for b in BATCHES)
          + f"{'prefill tok/s':>15}")
    for row in rows:
        if "error" in row:
            print(f"{row['precision']:<10}{row['source']:<9}{row['error']}")
            continue
        print(f"{row['precision']:<10}{row['source']:<9}"
              + "".join(f"{row[f'step_ms_batch_{b}']:>9.2f}" for b in BATCHES)
              + f"{row['prefill_128_tok_s']:>15,.1f}")
    args = decode.model_args(opts.config)
    for row in rows:
        if "error" in row:
            continue
        one = row["step_ms_batch_1"]
        compute = [b * active_macs(args) / (row["fp32_gemm_gmac_s"] * 1e9) * 1e3 for b in BATCHES]
        print(f"{row['precision']} {row['source']}: aggregate tokens/s over batch 1: "
              + ", ".join(f"B={b} {b * one / row[f'step_ms_batch_{b}']:.2f}x" for b in BATCHES)
              + f"; fp32 compute bound ({row['fp32_gemm_gmac_s']:.0f} GMAC/s, {active_macs(args) / 1e6:.0f}M per row): "
              + ", ".join(f"B={b} {b * one / max(one, c):.2f}x" for b, c in zip(BATCHES, compute)))


if __name__ == "__main__":
    main()
