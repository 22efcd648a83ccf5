"""Stacked experts: x through the chosen SwiGLU experts, mixed by the router's weights (model.MoE's last step).

Expert weights are stacked, w1 and w3 (E, I, D), w2 (E, D, I) (or w1|w3 as one (E, 2I, D) weight and w3 None),
and come in three kinds with one interface here:
a plain Parameter, a quantize.QuantLinear, or a kernels.fbgemm.PackedLinear (both have `linear(x, expert)`;
QuantLinear also `dequantize(expert_ids, dtype)`). How the tokens meet their experts depends on where and how
many they are, with the same numbers each way (the same matmuls, summed in ascending expert order):
- `grouped`: sort the (token, expert) pairs by expert, one matmul chain per expert that has work;
- `direct`: one token on the CPU (batch-1 decode): its K experts directly, no sorting or counting;
- `gathered`: on a GPU, few tokens: gather the chosen experts' weights, batched matmuls, no host sync.

Legend: N tokens, D model width, E experts, K experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weights, expert: int) -> torch.Tensor:
    """x (M, in) @ weights[expert]^T -> (M, out), for any kind of stacked (E, out, in) weight."""
    if isinstance(weights, torch.Tensor):
        return F.linear(x, weights[expert])
    return weights.linear(x, expert)


def gather(weights, expert_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights of experts `expert_ids` (any shape S) -> (*S, out, in) in `dtype`, plain or quantized."""
    if isinstance(weights, torch.Tensor):
        return weights[expert_ids]
    return weights.dequantize(expert_ids, dtype)


def swiglu(x: torch.Tensor, e: int, w1, w3, w2) -> torch.Tensor:
    """Expert e on (M, D) tokens -> (M, D): w2(silu(w1 x) * w3 x). With w3 None, w1 holds w1 and w3 stacked
    along its rows (one matmul for both: kernels/fbgemm.py packs them so)."""
    if w3 is None:
        gate, up = linear(x, w1, e).chunk(2, dim=-1)  # (M, I) each
    else:
        gate, up = linear(x, w1, e), linear(x, w3, e)
    return linear(F.silu(gate) * up, w2, e)


def mix(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """(N, D) tokens, their (N, K) experts and fp32 mixing weights -> (N, D): sum_k weight_k * expert_k(x)."""
    plain = isinstance(w2, torch.Tensor)  # gathering quantized experts would dequantize them whole
    if x.is_cuda and plain and expert_ids.numel() <= 2 * w2.shape[0]:
        return gathered(x, expert_ids, weights, w1, w3, w2)
    if x.device.type == "cpu" and x.shape[0] == 1:
        return direct(x, expert_ids, weights, w1, w3, w2)
    return grouped(x, expert_ids, weights, w1, w3, w2)


def grouped(x, expert_ids, weights, w1, w3, w2) -> torch.Tensor:
    """Sort the N*K (token, expert) pairs by expert, then one matmul chain per expert that has work.

    One host sync per call (the per-expert counts) and a loop over experts, never over tokens.
    """
    N, K = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)  # (N*K,)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // K  # token index of each sorted pair
    counts = torch.bincount(flat_ids, minlength=w2.shape[0]).tolist()
    xs = x[token_of]  # (N*K, D), grouped by expert
    outputs, start = [], 0
    for e, count in enumerate(counts):
        if count:
            outputs.append(swiglu(xs[start:start + count], e, w1, w3, w2))  # (count, D)
            start += count
    expert_out = torch.cat(outputs) * weights.reshape(-1)[order, None].to(x.dtype)  # (N*K, D)
    return torch.zeros_like(x).index_add_(0, token_of, expert_out)


def direct(x, expert_ids, weights, w1, w3, w2) -> torch.Tensor:
    """One token (batch-1 decode on the CPU): its K experts directly, no sorting or counting; the same numbers
    as `grouped` (the same matmuls, summed in the same ascending expert order)."""
    # (expert, weight rounded to x's dtype) in ascending expert order, as Python numbers: few tensor ops
    mixing = weights[0] if x.dtype == weights.dtype else weights[0].to(x.dtype)
    out = None
    for e, weight in sorted(zip(expert_ids[0].tolist(), mixing.tolist())):
        y = swiglu(x, e, w1, w3, w2) * weight  # (1, D)
        out = y if out is None else out.add_(y)
    return out


def gathered(x, expert_ids, weights, w1, w3, w2) -> torch.Tensor:
    """Gather the chosen experts' weights per token and use batched matmuls: no host sync (decode on a GPU)."""
    # (N, K, I, D), (N, K, I, D), (N, K, D, I)
    g1, g3, g2 = (gather(w, expert_ids, x.dtype) for w in (w1, w3, w2))
    hidden = F.silu(torch.einsum("nd,nkid->nki", x, g1)) * torch.einsum("nd,nkid->nki", x, g3)
    out = torch.einsum("nki,nkdi->nkd", hidden, g2)  # (N, K, D)
    return (out * weights.to(x.dtype)[..., None]).sum(dim=1)
