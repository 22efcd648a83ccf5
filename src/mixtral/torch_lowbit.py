"""Which of torch's low-bit CPU matmul kernels may be called on this CPU, for which input widths, and which int4
weight layout torch packs here.

`aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` are picked inside torch per CPU capability,
and some of them read past the weight when the input width K is not a multiple of their vector width: with
torch 2.13 on AVX-512 CPUs, `_weight_int8pack_mm` returns garbage (relative errors of 1e12 and more, or NaN) or
segfaults whenever K is an odd multiple of 8. A segfault is not an exception: no check inside this process
survives it. And `_convert_weight_to_int4pack_for_cpu` lays int4 codes out in blocks of 32 output rows on AVX2
CPUs but 64 on AVX-512 ones. So a torch low-bit kernel is called only where both of these say yes:

1. A shape rule per kernel and capability (`torch.backends.cpu.get_cpu_capability()`): int8 needs K to be a
   multiple of the capability's fp32 lanes per vector (8 for AVX2, 16 for AVX-512; 64 where the capability is
   another one); int4 runs on inputs zero-padded to a whole number of groups of 32 to 256 columns.
2. A probe in a child process, run once per torch version and CPU (its result is cached in the cache directory
   as JSON): every width class the rule allows (int8: K = 8..128 in steps of 8, i.e. every residue of K modulo
   128 that is a multiple of 8; int4: padded widths 32..256 in steps of 32 with each group size that divides
   them), with 1, 3, 17 and 32 input rows and two output sizes, compared with the exact fp32 product of the
   dequantized weight. A case that crashes the child, disagrees, or cannot be run says no (the child is
   restarted after a crash for the remaining cases). The child also packs a probe matrix with torch's own int4
   packer and reports which block layout (32 or 64 rows) it used, or none of ours.

Where the answer is no, the caller dequantizes and runs the exact fp32 matmul instead. `MIXTRAL_TORCH_LOWBIT=0`
says no to every torch low-bit kernel without probing.

Run as a script (`python torch_lowbit.py`), this file is the child: it reads the cases as JSON on stdin and
prints one line per case before and after running it; it imports nothing but torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

PROBE_VERSION = 1  # bump when the cases or the rule change: older cached answers are then ignored
INT8_RESIDUES = range(8, 129, 8)  # K modulo 128 (128 standing for 0)
INT4_WIDTHS = range(32, 257, 32)  # padded K modulo 256 (256 standing for 0)
INT4_GROUPS = (32, 64, 128, 256)
ROWS = (1, 3, 17, 32)  # input rows: the kernels are only called for up to quantize.KERNEL_MAX_ROWS
TOLERANCE = 0.02  # bf16 activations: the kernels' error relative to the largest exact output
_LANES = {"AVX2": 8, "AVX512": 16}
CHILD = Path(__file__)  # the child's script: this file

_answers: dict | None = None


# ---- what the parent asks ------------------------------------------------------------------------------------

def int8_safe(in_features: int) -> bool:
    """Whether `aten._weight_int8pack_mm` may be called here with input width `in_features`."""
    if not _int8_rule(in_features):
        return False
    return bool(answers()["int8"].get(str(_residue(in_features, 128)), False))


def int4_block() -> int | None:
    """The output rows per block of torch's int4 CPU layout on this CPU (32 or 64), None if it is neither."""
    return answers()["int4_block"]


def int4_safe(padded_features: int, group_size: int) -> bool:
    """Whether `aten._weight_int4pack_mm_for_cpu` may be called with this padded input width and group size."""
    if group_size not in INT4_GROUPS or padded_features % group_size or int4_block() is None:
        return False
    key = f"{_residue(padded_features, 256)}/{group_size}"
    return bool(answers()["int4"].get(key, False))


def describe() -> str:
    """One line for `mixtral info`: which torch low-bit kernels run here, and for which widths."""
    found = answers()
    if found.get("reason"):
        return f"torch low-bit kernels off: {found['reason']}"
    int8 = [int(k) for k, ok in found["int8"].items() if ok]
    lanes = min(int8) if int8 else None
    int8_text = f"int8 for widths that are multiples of {lanes}" if lanes else "int8 off"
    block = found["int4_block"]
    int4_text = f"int4 in blocks of {block} rows" if block and any(found["int4"].values()) else "int4 off"
    return f"torch low-bit kernels ({found['capability']}): {int8_text}, {int4_text}"


def _residue(width: int, modulus: int) -> int:
    return width % modulus or modulus


def _int8_rule(in_features: int) -> bool:
    return in_features > 0 and in_features % _LANES.get(torch.backends.cpu.get_cpu_capability(), 64) == 0


def answers() -> dict:
    """The probe's answers for this torch and CPU: from this process, the cache, or a new child probe."""
    global _answers
    if _answers is None:
        _answers = _load_or_probe()
    return _answers


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    from .paths import cache_dir

    identity = "\n".join([str(PROBE_VERSION), torch.__version__, torch.backends.cpu.get_cpu_capability(),
                          _cpu_flags(), sys.executable])
    return cache_dir() / f"torch-lowbit-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def _empty(reason: str) -> dict:
    return {"capability": torch.backends.cpu.get_cpu_capability(), "int8": {}, "int4": {}, "int4_block": None,
            "reason": reason}


def _load_or_probe() -> dict:
    if os.environ.get("MIXTRAL_TORCH_LOWBIT", "1") == "0":
        return _empty("MIXTRAL_TORCH_LOWBIT=0")
    try:
        path = _cache_file()
        return json.loads(path.read_text())
    except (OSError, ValueError, RuntimeError, KeyError):  # no cache yet, or no home directory to keep one in
        pass
    found = probe()
    if found.get("reason"):
        return found  # the probe itself failed: no kernel this time, and another try in the next process
    try:
        path = _cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(found, indent=1))
        os.replace(tmp, path)  # atomic: parallel processes may race
    except (OSError, RuntimeError, KeyError):
        pass  # an unwritable cache only costs a probe per process
    return found


def _cases() -> list[dict]:
    cases = [{"id": "layout", "kind": "layout"}]
    cases += [{"id": f"int8/{k}", "kind": "int8", "k": k} for k in INT8_RESIDUES if _int8_rule(k)]
    cases += [{"id": f"int4/{k}/{g}", "kind": "int4", "k": k, "group": g}
              for k in INT4_WIDTHS for g in INT4_GROUPS if k % g == 0]
    return cases


def probe(timeout: float = 120.0) -> dict:
    """Run every case in a child process (restarted after a crash); returns the answers (see the module doc)."""
    found = _empty("")
    pending = _cases()
    results: dict[str, object] = {}
    # the child runs the script by path, so its folder (this package's modules) does not shadow any import
    command = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
               str(CHILD)]
    while pending:
        errors = ""
        try:
            done = subprocess.run(command, input=json.dumps(pending), text=True, capture_output=True,
                                  timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
            output, errors = done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:  # a case that hangs: a no, like a crash; the rest still run
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        except (OSError, subprocess.SubprocessError) as e:
            found["reason"] = f"the probe could not run ({type(e).__name__}: {e})"
            break
        started = None
        for line in output.splitlines():
            word, _, rest = line.partition(" ")
            if word == "start":
                started = rest
            elif word == "done":
                case_id, _, value = rest.partition(" ")
                results[case_id] = json.loads(value)
                started = None
        if started is not None:
            results[started] = "crash"  # the child died inside this case
        remaining = [c for c in pending if c["id"] not in results]
        if len(remaining) == len(pending):  # no progress (the child failed to start): stop trying
            found["reason"] = f"the probe process failed: {errors.strip()[-300:]}"
            break
        pending = remaining
    found["cases"] = results
    layout = results.get("layout")
    found["int4_block"] = layout if isinstance(layout, int) else None
    for case_id, value in results.items():
        kind, _, key = case_id.partition("/")
        if kind in ("int8", "int4"):
            found[kind][key] = isinstance(value, float) and value <= TOLERANCE
    return found


# ---- the child --------------------------------------------------------------------------------------------

def cpu_int4_layout(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Offset int4 codes (..., N, K) in 0..15 -> torch's CPU kernel layout with `block` output rows per block:
    per block and input column k, block/2 bytes, byte j holding row j (low nibble) and row block/2 + j (high).
    Returns (..., N, K/2) uint8. N must be a multiple of `block`."""
    *lead, N, K = codes.shape
    codes = codes.to(torch.uint8).reshape(-1, N // block, 2, block // 2, K)
    codes = codes.permute(0, 1, 4, 3, 2)  # (L, N/b, K, b/2, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).contiguous().reshape(*lead, N, K // 2)


def cpu_int4_codes(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `cpu_int4_layout`: (..., N, K/2) uint8 -> codes (..., N, K) uint8."""
    *lead, N, half = packed.shape
    blocks = packed.reshape(-1, N // block, 2 * half, block // 2)
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).permute(0, 1, 4, 3, 2)  # (L, N/b, 2, b/2, K)
    return codes.reshape(*lead, N, 2 * half).contiguous()


def _run_case(case: dict):
    gen = torch.Generator().manual_seed(0)
    if case["kind"] == "layout":
        codes = torch.randint(0, 16, (128, 64), generator=gen, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).view(torch.uint8).reshape(128, 32)
        return next((b for b in (32, 64) if torch.equal(cpu_int4_layout(codes, b), packed)), None)
    worst = 0.0
    K = case["k"]
    for N in (64, 48) if case["kind"] == "int8" else (64, 128):
        for M in ROWS:
            x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
            if case["kind"] == "int8":
                q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
                scales = (torch.rand(N, generator=gen) + 0.5).to(torch.bfloat16)
                exact = x.float() @ (q.float() * scales.float()[:, None]).T
                got = torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scales)
            else:
                G = case["group"]
                codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.int32)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                scales = (torch.rand(K // G, N, generator=gen) + 0.5).to(torch.bfloat16)
                scales_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).contiguous()
                weight = ((codes.float() - 8).view(N, K // G, G) * scales.float().T[:, :, None]).view(N, K)
                exact = x.float() @ weight.T
                got = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, G, scales_zeros)
            error = ((got.float() - exact).abs().max() / exact.abs().max()).item()
            worst = max(worst, error if error == error else float("inf"))  # NaN counts as the worst
    return worst


def _child() -> None:
    torch.set_num_threads(1)
    for case in json.loads(sys.stdin.read()):
        print("start", case["id"], flush=True)
        try:
            value = _run_case(case)
        except Exception as e:  # a kernel missing or refusing the shape: no, but no crash
            value = f"{type(e).__name__}: {str(e)[:100]}"
        print("done", case["id"], json.dumps(value), flush=True)


if __name__ == "__main__":
    _child()
