"""Decode-step time of our CPU kernels by batch size, and a 128-token prompt, optionally for two versions of the
C source side by side (kernel work: the same weights, alternating processes, one run).

    python bench/decode_batch.py --config small                       # bf16, int8, int4 at batch 1, 2, 4, 8
    python bench/decode_batch.py --config small --compare OLD.c       # and the same with an older cpu_kernels.c

Each (source, precision) runs in a fresh process on the same random "small" weights (bench/decode.py's); a step
is `kernels.runner(model).decode_step` with every row at its own cache row, the best of --repeat runs of --steps steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = (1, 2, 4, 8)


def worker(opts) -> dict:
    from mixtral import kernels, load  # before torch: `import mixtral` shortens OpenMP's spin (README)
    from mixtral.kernels import native_lib

    import torch
    from mixtral.kv_cache import KVCache

    if opts.source:
        native_lib.SOURCE = Path(opts.source)
    quantize = {"bf16": None, "int8": "int8", "int4": "int4"}[opts.precision]
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="a bench/decode.py config (tiny, small, medium)")
    parser.add_argument("--precisions", default="bf16,int8,int4")
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


if __name__ == "__main__":
    main()
