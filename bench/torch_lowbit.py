"""Which path each int8/int4 matmul takes on this CPU, and how far it is from the exact result.

For every input width K from 8 to 128 in steps of 8, with 1, 3 and 40 input rows, one quantize.QuantLinear
(48 output rows for int8, 64 for int4 in groups of 32) on plain torch ops (`pack=False`, the path of
`--no-pack`, training and re-quantizing): the path its matmul takes (torch's low-bit "kernel" or the exact fp32
"fallback"), and its largest error relative to the largest output of the dequantized fp32 matmul. Each kind runs
in its own child process, so a kernel that crashed would show as a crash here instead of ending the run.

    python bench/torch_lowbit.py            # the table
    python bench/torch_lowbit.py --json     # one JSON object per case
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WIDTHS = range(8, 129, 8)
ROWS = (1, 3, 40)


def measure(bits: int) -> list[dict]:
    """Every (K, rows) case of one kind in this process (the child)."""
    import torch

    from mixtral import quantize as Q
    from mixtral import torch_lowbit

    cases = []
    for K in WIDTHS:
        gen = torch.Generator().manual_seed(K)
        weight = torch.randn(48 if bits == 8 else 64, K, generator=gen) * 0.1
        layer = Q.QuantLinear.from_weight(weight, bits, 32 if bits == 4 else None)
        for rows in ROWS:
            x = torch.randn(rows, K, generator=gen)
            exact = x @ layer.dequantize().T
            path = "kernel" if layer._use_kernel(x) else "fallback"
            got = layer(x)
            error = ((got - exact).abs().max() / exact.abs().max()).item()
            cases.append(dict(kind=f"int{bits}", K=K, rows=rows, path=path, error=error,
                              layout=layer.layout, rule=torch_lowbit.describe()))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--child", type=int, choices=(8, 4), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for case in measure(args.child):
            print(json.dumps(case), flush=True)
        return
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for bits in (8, 4):
        done = subprocess.run([sys.executable, __file__, "--child", str(bits)], capture_output=True, text=True)
        cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0:
            print(f"int{bits}: the child died (exit {done.returncode}) after {len(cases)} cases: "
                  f"{done.stderr.strip()[-300:]}")
        if args.json:
            for case in cases:
                print(json.dumps(case))
            continue
        if cases:
            print(cases[0]["rule"])
        print(f"int{bits}: K, then per row count 'path error' (k = torch kernel, f = exact fp32 fallback)")
        for K in WIDTHS:
            cells = [f"rows {c['rows']:>2}: {c['path'][0]} {c['error']:.1e}" for c in cases if c["K"] == K]
            print(f"  K={K:>3}  " + "   ".join(cells))


if __name__ == "__main__":
    main()
