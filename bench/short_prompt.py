"""Short prompts after a cached prefix (a chat turn's new tokens): the forward pass as one C call
(`DecodeSession.prompt`) against the torch-attention prefill path it replaced, alternating in one process.

    python bench/short_prompt.py                      # the shipped model, 200 cached positions
    python bench/short_prompt.py --model DIR --cached 1000 --repeat 50

Each pass feeds T new tokens at positions cached..cached+T-1 of one cache row and asks for the last one's
logits, as the engine does for a turn whose prefix it reused. Prints the median ms of each way per T.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mixtral.kernels import native
from mixtral.kv_cache import KVCache
from mixtral.loading import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the shipped model)")
    parser.add_argument("--cached", type=int, default=200, help="positions already in the cache")
    parser.add_argument("--tokens", default="2,4,8,15,24,31", help="new tokens per pass, comma-separated")
    parser.add_argument("--repeat", type=int, default=30)
    opts = parser.parse_args()
    model = load_model(opts.model, progress=False)
    if native.hooked(model) or not isinstance(model.runner, native.NativeRunner):
        print("this model does not run on the native kernels here", file=sys.stderr)
        return 1
    lengths = [int(t) for t in opts.tokens.split(",")]
    cache = KVCache(model.args, 1, opts.cached + max(lengths), torch.float32)
    generator = torch.Generator().manual_seed(0)
    ways = {"one C call": native.PROMPT_ROWS_MAX, "torch attention": 0}
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {torch.get_num_threads()} threads, "
          f"{opts.cached} cached positions; median ms of the forward pass:")
    print(f"{'new tokens':>10}" + "".join(f"{name:>18}" for name in ways))
    try:
        for T in lengths:
            ids = torch.randint(3, model.args.vocab_size, (1, T), generator=generator)
            positions = torch.arange(opts.cached, opts.cached + T)[None]
            times = {name: [] for name in ways}
            for _ in range(opts.repeat):
                for name, limit in ways.items():
                    native.PROMPT_ROWS_MAX = limit
                    start = time.perf_counter()
                    with torch.inference_mode():
                        model(ids, positions, cache, n_keys=opts.cached + T, logits_at=torch.tensor([T - 1]))
                    times[name].append(time.perf_counter() - start)
            print(f"{T:>10}" + "".join(f"{statistics.median(t) * 1e3:>18.2f}" for t in times.values()))
    finally:
        native.PROMPT_ROWS_MAX = ways["one C call"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
