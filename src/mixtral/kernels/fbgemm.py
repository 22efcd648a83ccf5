"""The fallback CPU runner's kernels: weights prepacked once for fbgemm, chosen per precision (a module swap; the
model's own torch code then runs them). Used where our C kernels (native.py) cannot run: another CPU, no C
compiler, MIXTRAL_NATIVE=0.

- bf16 and fp16 weights run on fbgemm's fp16 GEMM (`quantized.linear_dynamic_fp16`, fp32 activations): plain
  bf16 `F.linear` is slower at batch 1 and several times slower on prompts (README). `pack_model` swaps every
  attention, expert and output weight for a `PackedLinear`. A bf16 value converts to fp16 exactly when
  2^-14 <= |w| <= 65504; below that it keeps fp16's subnormal spacing (error <= 2^-25, about 3e-8).
- int8 weight-only codes (quantize.py) run on fbgemm's dynamic int8 GEMM (`quantized.linear_dynamic`), faster
  than `aten._weight_int8pack_mm` at batch 1. Activations are quantized per call (one scale per call, 7 bits so
  fbgemm's 16-bit accumulation cannot saturate); the weights are exactly our codes and scales.

Packing is for inference only: a packed model cannot be trained, re-quantized or saved as a checkpoint.
Each kernel is checked once per process against a plain matmul; one that is missing or disagrees is not used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import MixtralError
from ..memory import release_free_memory
from ..model import Attention, MoE, RMSNorm, apply_rope
from ..quantize import QuantLinear

_checked: dict[str, bool] = {}


def _probe(kind: str) -> bool:
    """Whether the fbgemm kernel `kind` ("fp16" or "int8") runs here and agrees with a plain matmul."""
    if kind not in _checked:
        _checked[kind] = False
        try:
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(64, 256, generator=gen) * 0.05, torch.randn(3, 256, generator=gen)
            if kind == "fp16":
                got, want = fp16_linear(x, pack_fp16(w)), x @ w.T
            else:
                scales = w.abs().amax(1) / 127
                codes = (w / scales[:, None]).round().to(torch.int8)
                got, want = int8_linear(x, pack_int8(codes, scales)), x @ (codes.float() * scales[:, None]).T
            _checked[kind] = bool((got - want).abs().max() <= 0.03 * want.abs().max())
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    return _checked[kind]


def fp16_available() -> bool:
    return _probe("fp16")


def int8_available() -> bool:
    return _probe("int8")


# ---- the four primitives --------------------------------------------------------------------------

def pack_fp16(weight: torch.Tensor):
    """A (N, K) weight -> fbgemm's packed fp16 form (an opaque object)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)


def fp16_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x (..., K) fp32 @ W^T -> (..., N) fp32."""
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor):
    """int8 codes (N, K) with one scale per row (N,) -> fbgemm's packed per-channel int8 form."""
    scales = scales.double()
    with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; fbgemm's packer needs one
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(codes.contiguous(), scales,
                                                          torch.zeros_like(scales, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(weight, None)


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x (..., K) fp32 @ W^T with activations quantized dynamically to 7 bits -> (..., N) fp32.

    fbgemm picks one activation scale per call; rows are first scaled to the same magnitude (and the output
    scaled back, exact since the product is linear per row), so each token is quantized on its own range."""
    if x.numel() == x.shape[-1]:  # one row
        return torch.ops.quantized.linear_dynamic(x, packed, True)
    norm = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)  # (..., 1)
    return torch.ops.quantized.linear_dynamic(x / norm, packed, True) * norm


def unpack_int8(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to (codes int8 (N, K), scales fp32 (N,))."""
    weight, _ = torch.ops.quantized.linear_unpack(packed)
    return weight.int_repr(), weight.q_per_channel_scales().float()


def unpack_fp16(packed) -> torch.Tensor:
    weight, _ = torch.ops.quantized.linear_unpack_fp16(packed)
    return weight


# ---- a packed weight, as a module ----------------------------------------------------------------------

class PackedLinear(nn.Module):
    """A frozen bias-free linear, or a stacked (E, N, K) expert weight, packed for fbgemm: "fp16" or "int8".

    `linear(x, expert)` takes and returns x's dtype and computes in fp32. Same interface as
    quantize.QuantLinear, so the model runs it wherever it runs a weight.
    """

    def __init__(self, kind: str, packs: list, out_features: int, in_features: int, n_experts: int | None):
        super().__init__()
        self.kind, self.packs = kind, packs
        self.out_features, self.in_features, self.n_experts = out_features, in_features, n_experts
        self._linear = fp16_linear if kind == "fp16" else int8_linear

    @classmethod
    def fp16(cls, weights: list[torch.Tensor]) -> PackedLinear:
        """From float (N_i, K) weights, or stacked (E, N_i, K) experts, concatenated along their rows.

        One expert at a time, so packing never holds more than one expert's weights twice."""
        first = weights[0]
        rows = sum(w.shape[-2] for w in weights)
        if first.dim() == 2:
            return cls("fp16", [pack_fp16(torch.cat(weights))], rows, first.shape[-1], None)
        packs = [pack_fp16(torch.cat([w[e] for w in weights])) for e in range(first.shape[0])]
        return cls("fp16", packs, rows, first.shape[-1], first.shape[0])

    @classmethod
    def int8(cls, codes: torch.Tensor, scales: torch.Tensor) -> PackedLinear:
        """From int8 codes (N, K) or (E, N, K) and their per-row scales (N,) or (E, N)."""
        stacked = codes.dim() == 3
        packs = [pack_int8(c, s) for c, s in (zip(codes, scales) if stacked else [(codes, scales)])]
        return cls("int8", packs, *codes.shape[-2:], codes.shape[0] if stacked else None)

    @property
    def shape(self) -> tuple[int, ...]:
        lead = () if self.n_experts is None else (self.n_experts,)
        return (*lead, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, fbgemm {self.kind}"

    def nbytes(self) -> int:
        """Bytes of weight data (fp16 values, or int8 codes plus one fp32 scale per row)."""
        rows = (self.n_experts or 1) * self.out_features
        return rows * self.in_features * (2 if self.kind == "fp16" else 1) + (0 if self.kind == "fp16" else 4 * rows)

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        pack = self.packs[0 if expert is None else expert]
        if x.dtype == torch.float32:  # activations of a packed model: no casts, no reshapes
            return self._linear(x, pack)
        return self._linear(x.float(), pack).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def _weight(self, i: int) -> torch.Tensor:
        if self.kind == "fp16":
            return unpack_fp16(self.packs[i])
        codes, scales = unpack_int8(self.packs[i])
        return codes.float() * scales[:, None]

    def dequantize(self, index=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this stands for (or experts `index` of it) in `dtype`."""
        if self.n_experts is None:
            return self._weight(0).to(dtype)
        ids = torch.as_tensor(index if index is not None else range(self.n_experts))
        weights = [self._weight(i) for i in ids.reshape(-1).tolist()]
        return torch.stack(weights).reshape(*ids.shape, self.out_features, self.in_features).to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise MixtralError("a model packed for CPU inference cannot be saved; load it with pack=False")

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: the packs are opaque CPU objects
        raise MixtralError("a model packed for CPU inference cannot be moved or cast; load it again with "
                           "pack=False (or on the other device)")


# ---- whole models ----------------------------------------------------------------------------------------

def _pack(weights: list, fp16: bool) -> PackedLinear | None:
    """One PackedLinear for `weights` (nn.Linear modules, expert Parameters or int8 QuantLinears) concatenated
    along their output rows, or None when they cannot be packed together (int4, fp32 without `fp16`...)."""
    tensors = [w.weight if isinstance(w, nn.Linear) else w for w in weights]
    if all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        if not fp16 or max(max(-t.min(), t.max()) for t in tensors) > torch.finfo(torch.float16).max:
            return None  # (min and max: no temporary the size of the weight, as abs() would make)
        return PackedLinear.fp16(tensors)
    if all(isinstance(t, QuantLinear) and t.bits == 8 and not t.scale_group for t in tensors) and int8_available():
        codes, scales = zip(*(t.canonical() for t in tensors))
        return PackedLinear.int8(torch.cat(codes, dim=-2), torch.cat(scales, dim=-1).float())
    return None


class PackedAttention(Attention):
    """Attention whose wq, wk and wv are one packed projection (`wqkv`): one GEMM call instead of three, the
    rest of attention as the model has it (Attention.attend)."""

    def forward(self, x, cos, sin, mask, input_pos, cache, n_keys: int, slots=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * G, self.head_dim)
        q, k = apply_rope(qkv[:, :, :H + G], cos, sin).split((H, G), dim=2)  # one rotation for both
        return self.attend(q, k, qkv[:, :, H + G:], mask, input_pos, cache, n_keys, slots)


def _packed_attention(attn: Attention, wqkv: PackedLinear) -> PackedAttention:
    packed = PackedAttention.__new__(PackedAttention)
    nn.Module.__init__(packed)
    packed.layer_id, packed.n_heads, packed.n_kv_heads, packed.head_dim = (
        attn.layer_id, attn.n_heads, attn.n_kv_heads, attn.head_dim)
    packed.wqkv, packed.wo = wqkv, attn.wo
    return packed


def pack_model(model) -> bool:
    """Repack a CPU model's weights for fbgemm, in place: bf16/fp16 weights as fp16 packs, int8 ones as int8
    packs; wq/wk/wv packed as one projection (a PackedAttention) and each expert's w1/w3 as one (w3 None: see
    experts.swiglu). int4 weights keep their own kernel; the embedding, router and norms are untouched. Returns
    whether anything changed (then activations are fp32: model.compute_dtype)."""
    if model.device.type != "cpu" or model.compute_dtype is not None:
        return False
    fp16 = model.dtype in (torch.bfloat16, torch.float16) and fp16_available()
    changed = False

    def swap(parent, names: list[str]):
        """Pack parent's weights `names` as one (stacked along their rows); returns the pack or None."""
        nonlocal changed
        packed = _pack([getattr(parent, n) for n in names], fp16)
        if packed is not None:
            for n in names:
                delattr(parent, n)  # a Parameter's slot cannot take a module directly
            changed = True
        return packed

    with torch.no_grad():
        for block in model.layers:
            wqkv = swap(block.attn, ["wq", "wk", "wv"])
            if wqkv is not None:  # one projection for queries, keys and values
                block.attn = _packed_attention(block.attn, wqkv)
            if (wo := swap(block.attn, ["wo"])) is not None:
                block.attn.wo = wo
            if isinstance(block.ffn, MoE):
                if (w13 := swap(block.ffn, ["w1", "w3"])) is not None:  # w1 and w3 in one (experts.swiglu)
                    block.ffn.w1, block.ffn.w3 = w13, None
            else:
                for name in ("w1", "w3"):
                    if (packed := swap(block.ffn, [name])) is not None:
                        setattr(block.ffn, name, packed)
            if (w2 := swap(block.ffn, ["w2"])) is not None:
                block.ffn.w2 = w2
            release_free_memory()  # the weights just packed: so the old and new copies never pile up
        if (head := swap(model, ["lm_head"])) is not None:
            model.lm_head = head
        if changed:  # activations become fp32 (model.compute_dtype): so does every weight they meet
            for module in model.modules():  # that was not packed: norms, routers, and any weight left as it was
                if isinstance(module, (RMSNorm, nn.Linear)):
                    module.float()
                elif isinstance(module, MoE):
                    for name in ("w1", "w3", "w2"):
                        weight = getattr(module, name, None)
                        if isinstance(weight, nn.Parameter) and weight.dtype != torch.float32:
                            setattr(module, name, nn.Parameter(weight.float(), requires_grad=False))
    if changed:
        model.compute_dtype = torch.float32
    return changed
