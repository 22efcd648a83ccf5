"""The Memory tab: parameters, weight memory and KV cache of a model at a precision and context length, and
whether that fits a given GPU or RAM size, and what expert offloading makes of it when it does not. All
arithmetic is memory.py's and memory_plan.py's; this file only lays it out."""

from __future__ import annotations

import os

import torch

from ..config import ModelArgs, preset
from ..memory import BYTES_PER_PARAM, count_params, kv_cache_bytes, weight_bytes
from ..memory_plan import plan as memory_plan_for_budget
from ..quantize import spec as quantization_spec

RUNTIME_ESTIMATE = 400 << 20  # a mixtral process before its model: Python, torch, the tokenizer

PRESET_CHOICES = {"Mixtral-8x7B": "mixtral-8x7b", "Mixtral-8x22B": "mixtral-8x22b"}
PRECISIONS = ["bf16", "fp16", "fp32", "int8", "int4"]
DEVICE_SIZES_GB = {"RTX 4090 (24 GB)": 24, "A100 40GB": 40, "L40S / A6000 (48 GB)": 48, "A100 / H100 (80 GB)": 80,
                   "H200 (141 GB)": 141, "2 x H100 (160 GB)": 160}


def machine_ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def model_choices(loaded: dict[str, ModelArgs]) -> dict[str, ModelArgs]:
    """Presets first, then the loaded model(s) under their own names."""
    choices = {name: preset(key) for name, key in PRESET_CHOICES.items()}
    choices.update(loaded)
    return choices


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n < 10e9 else f"{n / 1e9:,.1f} GB"


def _params(n: int) -> str:
    if n >= 1e9:
        return f"{n:,} ({n / 1e9:.1f} B)"
    return f"{n:,} ({n / 1e6:.1f} M)"


def memory_plan(args: ModelArgs, name: str, precision: str, context: int, batch: int, memory_gb: float) -> str:
    """Markdown: parameters (total, active per token), weights at `precision`, the KV cache of `batch` sequences
    of `context` tokens (bf16, or fp32 for fp32 weights), their sum and whether it fits in `memory_gb`."""
    precision = precision if precision in BYTES_PER_PARAM else "bf16"
    context = max(1, int(context or 1))
    batch = max(1, int(batch or 1))
    counts = count_params(args)
    weights = weight_bytes(args, precision)
    kv_bytes_per_value = 4 if precision == "fp32" else 2
    cached = min(context, args.sliding_window) if args.sliding_window else context
    kv = kv_cache_bytes(args, cached, kv_bytes_per_value) * batch
    total = weights + kv
    lines = [
        f"### {name} at {precision}, {context:,}-token context" + (f", {batch} sequences" if batch > 1 else ""),
        "",
        "| quantity | value |",
        "|---|---|",
        f"| layers / width / experts | {args.n_layers} / {args.dim} / "
        + (f"{args.n_experts}, top-{args.top_k} |" if args.is_moe else "dense |"),
        f"| total parameters | {_params(counts.total)} |",
        f"| active parameters per token | {_params(counts.active)} |",
        f"| weights ({precision}, {BYTES_PER_PARAM[precision]:g} bytes each) | {_gb(weights)} |",
        f"| KV cache ({'fp32' if kv_bytes_per_value == 4 else 'bf16'}, {cached:,} tokens x {batch}) | {_gb(kv)} |",
        f"| **weights + KV cache** | **{_gb(total)}** |",
        "",
    ]
    if context > args.max_seq_len:
        lines.append(f"Note: the model was trained for {args.max_seq_len:,} tokens; longer contexts are untested.\n")
    if args.sliding_window and context > args.sliding_window:
        lines.append(f"The sliding window ({args.sliding_window:,}) caps the KV cache.\n")
    if precision == "int4":
        lines.append("int4 adds its group scales (about 0.5 bit per weight at group size 64), not counted above.\n")
    memory = float(memory_gb or 0) * 1e9
    if memory <= 0:
        lines.append("Give a GPU or RAM size to check the fit.")
    elif total <= 0.9 * memory:
        lines.append(f"**Fits** in {memory / 1e9:g} GB: {_gb(memory - total)} left for activations and the runtime.")
    elif total <= memory:
        lines.append(f"**Tight** in {memory / 1e9:g} GB: only {_gb(memory - total)} left for activations and "
                     "the runtime (plan for 10 %).")
    else:
        smaller = [p for p in ("int8", "int4") if BYTES_PER_PARAM[p] < BYTES_PER_PARAM[precision]
                   and weight_bytes(args, p) + kv <= 0.9 * memory]
        hint = f" It would fit at {smaller[0]}." if smaller else ""
        lines.append(f"**Does not fit** in {memory / 1e9:g} GB: {_gb(total - memory)} short.{hint}")
        if args.is_moe:
            lines.append("")
            lines.append(offload_plan(args, precision, context, batch, memory))
    return "\n".join(lines)


def offload_plan(args: ModelArgs, precision: str, context: int, batch: int, memory: float) -> str:
    """Markdown: what expert offloading (`--max-memory`) makes of `memory` bytes on this CPU (memory_plan.py),
    for a process whose runtime takes RUNTIME_ESTIMATE."""
    bits = {"int8": 8, "int4": 4}.get(precision)
    spec = quantization_spec(bits) if bits else None
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
    plan = memory_plan_for_budget(args, spec, dtype, int(memory), context, batch, runtime=RUNTIME_ESTIMATE)
    if not plan.fits:
        return (f"With expert offloading (`--max-memory`) it needs at least {_gb(plan.minimum)} at {precision} "
                f"(the resident weights, the KV cache and one layer's experts).")
    speed = (f", about {plan.tokens_per_s:.2f} tokens/s at most on this machine" if plan.tokens_per_s else "")
    return (f"**Runs with expert offloading** (`--max-memory {memory / 1e9:g}GB`): {_gb(plan.resident)} resident, "
            f"{plan.slots} of {plan.experts} experts cached, {plan.hit_rate:.0%} or more of them found in memory, "
            f"{_gb(plan.bytes_read_per_token)} read from disk per token{speed}.")
