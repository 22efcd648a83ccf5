"""The Mixtral decoder as plain tensor math: embed -> N x [attention, mixture of experts] -> norm -> logits.

Read top to bottom: RMSNorm, rotary embeddings, grouped-query attention, the sparse MoE block (and the dense
MLP of `mistral` models), one decoder block, the whole model. Nothing here knows about files, tokenizers or
requests.

Legend for shape comments: B batch, T new tokens, S key positions (cached + new), D model width,
H query heads, G key/value heads, Dh head width, N = B*T tokens, E experts, K experts per token,
I expert width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import experts
from .config import ModelArgs
from .kv_cache import KVCache


def fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 (without a call into torch when it already is: decode steps are made of small ops)."""
    return t if t.dtype == torch.float32 else t.float()


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device, where there is nothing to fill: loading builds
    the model there, and torch's normal_ on a meta tensor imports ~800 modules (~70 MB of resident memory, about
    a sixth of a "small" checkpoint) on first use."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # in fp32, as the reference does
        return self.weight * normed.to(x.dtype)


# ---- rotary position embeddings (the "rotate half" layout Hugging Face checkpoints use) ------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables for integer `positions` (B, T) -> two (B, T, Dh) tensors in `dtype`."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (Dh/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, heads, Dh) queries and/or keys by the (B, T, 1, Dh) tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(query_pos: torch.Tensor, n_keys: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True where query at position p may see the key at position s.

    Causal (s <= p) and, with a sliding window W, only the last W positions (p - s < W).
    """
    key_pos = torch.arange(n_keys, device=query_pos.device)
    delta = query_pos[:, :, None] - key_pos  # (B, T, S)
    allowed = delta >= 0
    if sliding_window is not None:
        allowed &= delta < sliding_window
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, input_pos, cache: KVCache | None, n_keys: int, slots=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.wq, self.wk, self.wv))  # (B, T, H|G|G, Dh)
        return self.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, input_pos, cache, n_keys, slots)

    def attend(self, q, k, v, mask, input_pos, cache: KVCache | None, n_keys: int, slots=None) -> torch.Tensor:
        """Rotated queries and keys and the values, (B, T, H|G|G, Dh) -> the output projection of attention."""
        B, T = q.shape[:2]
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh), (B, G, T, Dh) x 2
        if cache is not None:
            k, v = cache.update(self.layer_id, input_pos, k, v, n_keys, slots)  # (B, G, S, Dh)
        if mask.is_floating_point():  # fp32 decode (see Transformer.forward): a few small matmuls beat the
            # fused kernel's set-up; heads share keys by group; the mask is additive, (B, 1, 1, S) of 0 / -inf
            scores = (q.reshape(B, G, H // G, Dh) @ k.mT).mul_(Dh ** -0.5).add_(mask)  # (B, G, H/G, S)
            y = (scores.softmax(dim=-1) @ v).view(B, H, 1, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G != H)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * Dh))


# ---- feed-forward: the sparse mixture of experts, and the dense MLP of `mistral` models ------------

@dataclass
class Routing:
    """What the router did in one layer for every token: kept for the web app's expert view and for training."""

    logits: torch.Tensor  # (B, T, E) float32 router logits
    expert_ids: torch.Tensor  # (B, T, K) chosen experts, best first
    weights: torch.Tensor  # (B, T, K) float32 mixing weights (softmax over the chosen K)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts: router -> top-K -> softmax over the K -> weighted sum of experts.

    Expert weights are stacked: w1, w3 (E, I, D) and w2 (E, D, I), so an expert is one index away. They are
    Parameters, or quantized stand-ins (quantize.QuantLinear) with the same shape and their own kernels.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(args.n_experts, args.hidden_dim, args.dim))
        self.w3 = nn.Parameter(torch.empty(args.n_experts, args.hidden_dim, args.dim))
        self.w2 = nn.Parameter(torch.empty(args.n_experts, args.dim, args.hidden_dim))

    def route(self, x: torch.Tensor):
        """Router for (N, D) tokens -> fp32 logits (N, E), expert ids (N, K), fp32 weights (N, K)."""
        logits = F.linear(fp32(x), fp32(self.router.weight))  # routing stays in fp32
        top_logits, expert_ids = torch.topk(logits, self.top_k, dim=-1)
        return logits, expert_ids, top_logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)  # (N, D)
        logits, expert_ids, weights = self.route(tokens)
        if routing is not None:
            routing.append(Routing(logits.view(B, T, -1), expert_ids.view(B, T, -1), weights.view(B, T, -1)))
        return experts.mix(tokens, expert_ids, weights, self.w1, self.w3, self.w2).view(B, T, D)


class MLP(nn.Module):
    """The dense SwiGLU feed-forward of `mistral` models."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # residual dropout, active only in training mode
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe else MLP(args)

    def forward(self, x, cos, sin, mask, input_pos, cache, n_keys, routing, slots=None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, mask, input_pos, cache, n_keys, slots)
        x = x + (F.dropout(h, self.dropout) if self.training and self.dropout else h)
        h = self.ffn(self.ffn_norm(x), routing)
        return x + (F.dropout(h, self.dropout) if self.training and self.dropout else h)


class Transformer(nn.Module):
    """The whole decoder. `model(input_ids)` maps (B, T) token ids to (B, T, V) logits, like transformers.

    `dropout` (training only) is applied to the embeddings and to each residual branch.
    """

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.args = args
        self.dropout = dropout
        self.embed = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i, dropout) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Set when the model is prepared for inference (kernels.prepare): the dtype activations and the KV cache
        # take (None: the weights' own), and a runner that runs the whole forward pass its own way (None: the
        # code below). Moving or casting the model resets both.
        self.compute_dtype: torch.dtype | None = None
        self.runner = None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (bf16 for a bf16 checkpoint, whether or not its weights are packed)."""
        return self.embed.weight.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache: `compute_dtype` if the model was prepared, else `dtype`."""
        return self.compute_dtype or self.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def _apply(self, fn, recurse=True):
        """.to(), .half(), ...: a runner holds the weights as prepared, so the model returns to its own code."""
        result = super()._apply(fn, recurse)  # (a model packed for fbgemm refuses, and stays as it was)
        if self.runner is not None:
            self.runner, self.compute_dtype = None, None
        return result

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        n_keys: int | None = None,
        logits_at: torch.Tensor | None = None,
        routing: list | None = None,
        slots: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T).

        input_pos: (B, T) absolute positions of these tokens (default 0..T-1 for every row).
        cache: a KVCache to read earlier keys/values from and write these into (at input_pos).
        n_keys: how many cache positions to attend over (the longest row's length after this step);
            defaults to the whole cache.
        logits_at: (B,) index along T of the one position per row whose logits are wanted; the result is then
            (B, 1, V), which saves the vocabulary projection for every other position during prefill.
        routing: a list that receives one `Routing` per MoE layer.
        slots: (B,) which cache rows these B sequences use (default rows 0..B-1); lets an engine step any
            subset of the sequences it holds.
        head: False returns the final normed hidden states (B, T, D) instead of logits, for a loss that applies
            the output projection itself (training's chunked cross-entropy).
        """
        if self.runner is not None:  # prepared for kernels that run the whole pass (kernels/)
            if not head:
                raise ValueError("head=False needs the model's own code: a runner always applies the head")
            return self.runner.forward(input_ids, input_pos, cache, n_keys, logits_at, routing, slots)
        return self.compute(input_ids, input_pos, cache, n_keys, logits_at, routing, slots, head)

    def compute(self, input_ids, input_pos=None, cache=None, n_keys=None, logits_at=None, routing=None, slots=None,
                head: bool = True) -> torch.Tensor:
        """`forward` in the model's own torch code, whatever runner the model holds (one that wraps this code, as
        distributed.py's does, calls it)."""
        B, T = input_ids.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is None:
            n_keys = T
        elif n_keys is None:
            n_keys = cache.max_seq_len
        mask = attention_mask(input_pos, n_keys, self.args.sliding_window)  # (B, 1, T, S)
        x = F.dropout(self.embed(input_ids).to(self.activation_dtype), self.dropout, self.training)  # (B, T, D)
        if T == 1 and x.dtype == torch.float32:  # fp32 decode attention adds the mask: 0 allowed, -inf not
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        cos, sin = rope_cos_sin(input_pos, self.args.head_dim, self.args.rope_theta, x.dtype)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, Dh): one table for every head
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, cache, n_keys, routing, slots)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, D)
        x = self.norm(x)  # (B, T, D)
        return self.lm_head(x) if head else x  # (B, T, V) or (B, T, D)
