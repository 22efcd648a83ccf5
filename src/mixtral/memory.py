"""Parameter and memory arithmetic for a ModelArgs: what a model weighs before anything is loaded.

Sizes are decimal GB (1e9 bytes), as model cards quote them. Quantized sizes count the weights only at
1 or 0.5 bytes each (group scales add a few percent; see `weight_bytes`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .config import ModelArgs

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    attention_per_layer: int
    expert: int  # one expert (or the dense MLP)
    router_per_layer: int
    norms_per_layer: int
    final_norm: int
    n_layers: int
    n_experts: int  # 1 for a dense model
    top_k: int  # 1 for a dense model

    def _layers(self, experts: int) -> int:
        per_layer = self.attention_per_layer + experts * self.expert + self.router_per_layer + self.norms_per_layer
        return self.n_layers * per_layer

    @property
    def total(self) -> int:
        return self._layers(self.n_experts) + self.embedding + self.lm_head + self.final_norm

    @property
    def active(self) -> int:
        """Parameters used for one token: the shared ones plus top_k experts per layer."""
        return self._layers(self.top_k) + self.embedding + self.lm_head + self.final_norm

    @property
    def experts_total(self) -> int:
        return self.n_layers * self.n_experts * self.expert


def count_params(args: ModelArgs) -> ParamCounts:
    """Exact parameter counts of the architecture (no checkpoint needed)."""
    D, hd = args.dim, args.head_dim
    return ParamCounts(
        embedding=args.vocab_size * D,
        lm_head=0 if args.tie_embeddings else args.vocab_size * D,
        attention_per_layer=D * args.n_heads * hd * 2 + D * args.n_kv_heads * hd * 2,
        expert=3 * D * args.hidden_dim,
        router_per_layer=D * args.n_experts,
        norms_per_layer=2 * D,
        final_norm=D,
        n_layers=args.n_layers,
        n_experts=max(args.n_experts, 1),
        top_k=args.top_k if args.is_moe else 1,
    )


def weight_bytes(args: ModelArgs, precision: str) -> float:
    """Bytes of all weights at `precision` (fp32, bf16, fp16, int8, int4), scales not included."""
    return count_params(args).total * BYTES_PER_PARAM[precision]


def kv_cache_bytes(args: ModelArgs, tokens: int, bytes_per_value: int = 2) -> int:
    """Keys and values for `tokens` positions of one sequence (bf16 by default)."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * bytes_per_value * tokens


def summary(args: ModelArgs) -> dict:
    """The numbers `mixtral info` prints, as a JSON-friendly dict."""
    counts = count_params(args)
    context = args.max_seq_len
    return {
        "model_type": args.model_type,
        "total_params": counts.total,
        "active_params": counts.active,
        "expert_params": counts.experts_total,
        "weights_gb": {p: counts.total * b / 1e9 for p, b in BYTES_PER_PARAM.items() if p != "fp16"},
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes(args, 1),
        "context_length": context,
        "kv_cache_gb_full_context_bf16": kv_cache_bytes(args, context) / 1e9,
    }


def per_rank(args: ModelArgs, ranks: int) -> dict:
    """What each of `ranks` processes holds under torchrun (distributed.py): attention, experts, embedding and
    output projection split N ways; routers and norms on every rank (the replicated part); the KV cache split by
    key/value heads."""
    counts = count_params(args)
    vocab_rows = -(-args.vocab_size // ranks)
    split = (counts.n_layers * (counts.attention_per_layer + counts.n_experts * counts.expert) // ranks
             + (vocab_rows * args.dim) * (1 if args.tie_embeddings else 2))
    replicated = counts.n_layers * (counts.router_per_layer + counts.norms_per_layer) + counts.final_norm
    return {"ranks": ranks, "params": split + replicated, "replicated_params": replicated,
            "weights_gb": {p: (split + replicated) * b / 1e9 for p, b in BYTES_PER_PARAM.items() if p != "fp16"},
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes(args, 1) // ranks}


def _size(gb: float, digits: int = 1) -> str:
    """Decimal GB with `digits` decimals; below 1 GB, MB (a small model's sizes would all read 0.0 GB)."""
    return f"{gb:.{digits}f} GB" if gb >= 1 else f"{gb * 1000:,.{0 if gb >= 0.1 else 1}f} MB"


def format_summary(args: ModelArgs, name: str, ranks: int = 1) -> str:
    s = summary(args)
    gb = s["weights_gb"]
    lines = [
        f"{name} ({s['model_type']}: {args.n_layers} layers, hidden {args.dim}, "
        + (f"{args.n_experts} experts, top-{args.top_k})" if args.is_moe else "dense)"),
        f"  total parameters   {s['total_params']:>18,}",
        f"  active per token   {s['active_params']:>18,}",
        f"  weights  fp32 {_size(gb['fp32'])} · bf16 {_size(gb['bf16'])} · int8 {_size(gb['int8'])} "
        f"· int4 {_size(gb['int4'], 2)}",
        f"  KV cache (bf16)    {s['kv_cache_bytes_per_token_bf16'] / 1024:,.0f} KiB per token, "
        f"{_size(s['kv_cache_gb_full_context_bf16'], 2)} at the full {s['context_length']:,}-token context",
    ]
    if ranks > 1:
        r = per_rank(args, ranks)
        gb = r["weights_gb"]
        lines += [f"  per rank of {ranks} (torchrun): {r['params']:,} parameters ({r['replicated_params']:,} on every "
                  f"rank: routers, norms)",
                  f"    weights  fp32 {_size(gb['fp32'])} · bf16 {_size(gb['bf16'])}; KV cache (bf16) "
                  f"{r['kv_cache_bytes_per_token_bf16'] / 1024:,.0f} KiB per token"]
    return "\n".join(lines)


# ---- the process's own memory ----------------------------------------------------------------------

def release_free_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed blocks for reuse, so a load that copies
    tensors through temporaries would otherwise end up resident at well over the weights' size)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except Exception:  # not glibc (or not a platform where CDLL(None) works)
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
