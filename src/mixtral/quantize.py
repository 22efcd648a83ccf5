"""Weight-only quantization: int8 per output channel, int4 per group of input columns, as module swaps.

The scheme (recorded in config.json as method "mixtral-weight-only"), for a weight W (N out, K in):
- int8: symmetric, one scale per output row: scale = max|W_row| / 127, q = round(W / scale) in [-127, 127].
- int4: symmetric, one scale per row and group of `group_size` consecutive input columns:
  scale = max|W_group| / 7.5, q = round(W / scale) clamped to [-8, 7] (all 16 levels used). The input
  dimension is zero-padded to a multiple of the group size. Stored as offset codes u = q + 8, two per byte,
  the even column in the low nibble.
Scales are bfloat16, rounded *up* from the exact value, so every weight satisfies |W - q * scale| <= scale / 2.
(A GGUF file's Q4_0 blocks are held as they are, int4 in groups of 32 with the file's codes and fp16 scales, which
may be negative: a QuantLinear's int4 scales are bf16 or fp16, and our kernels read either. Its Q4_1 and Q4_K blocks
also carry a minimum per group: held as an fp16 offset per group (`offsets`), added to each weight of the group;
see gguf_file.Q4Blocks. Its Q8_0 blocks held as int8 keep their codes and their fp16 scale per group of 32: such an
int8 weight's scales are (..., N, K / 32) instead of (..., N); see QuantLinear.scale_group.)

Quantized: attention projections (wq, wk, wv, wo), expert weights (w1, w3, w2; the dense MLP's for `mistral`
models) and, optionally, lm_head (always int8). The router, the norms and the embedding stay in the model's
dtype (fp32, once the model is prepared for inference): routing decisions are sensitive, and those tensors are small.

Kernels (README: Quantization and speed): for up to KERNEL_MAX_ROWS input rows, int8 uses
`aten._weight_int8pack_mm` and int4 `aten._weight_int4pack_mm_for_cpu` (CUDA: `aten._weight_int4pack_mm`),
both with bfloat16 activations (fp32 activations make them ~10x slower). Larger inputs (prefill), unsupported
shapes and devices dequantize the weight (fp32 on CPU) and use a plain matmul. On the CPU, torch_lowbit says
which input widths each kernel is safe for (a shape rule and a probe in a child process: some crash the process)
and which int4 layout torch packs on this CPU; on CUDA each kernel is checked once per process against the
dequantize reference on a probe matrix. A kernel that is missing or disagrees is not used.
On the CPU, `load()` then runs them on our own kernels or repacks them for fbgemm (kernels/).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import torch_lowbit
from .errors import MixtralError

METHOD = "mixtral-weight-only"
DEFAULT_GROUP_SIZE = 64
KERNEL_MAX_ROWS = 32  # above this many input rows, dequantize + one matmul beat the packed kernels here
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)

_kernels_enabled = True
_kernel_checked: dict[tuple[str, int], bool] = {}


def check_settings(bits: int, group_size: int | None) -> int | None:
    """Validate (bits, group_size); returns the group size to use (None for int8). Raises MixtralError."""
    if bits not in (8, 4):
        raise MixtralError(f"quantization bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        return None  # int8 has one scale per output channel; a group size does not apply
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or not 16 <= group_size <= 1024
            or group_size & (group_size - 1)):
        raise MixtralError(f"int4 group size must be a power of two from 16 to 1024 (e.g. 32, 64, 128), "
                           f"got {group_size!r}")
    return group_size


def spec(bits: int, group_size: int | None = None, lm_head: bool = False) -> dict:
    """The quantization settings as config.json's "quantization" block and `model.quantization` hold them (the
    group size checked, and the default filled in for int4). Raises MixtralError."""
    return {"bits": bits, "group_size": check_settings(bits, group_size), "method": METHOD, "lm_head": lm_head}


def parse_quantize(text: str | None) -> tuple[int, int | None, bool] | None:
    """"int8" -> (8, None, False); "int4" -> (4, None, False) (default group); "int4-g32" -> (4, 32, False);
    a "+head" suffix also quantizes lm_head to int8 ("int8+head" -> (8, None, True)); None or "none" -> None."""
    if text is None or str(text).lower() == "none":
        return None
    spec, plus, suffix = str(text).lower().partition("+")
    name, _, group = spec.partition("-g")
    if (name not in ("int8", "int4") or (group and (name == "int8" or not group.isdigit()))
            or (plus and suffix != "head")):
        raise MixtralError(f"quantize must be 'int8', 'int4' or 'int4-g<group size>' (e.g. int4-g32), with an "
                           f"optional '+head' to quantize lm_head too (e.g. int8+head), got {text!r}")
    bits, group_size = (8, None) if name == "int8" else (4, int(group) if group else None)
    check_settings(bits, group_size)
    return bits, group_size, bool(plus)


# ---- the reference: quantize and dequantize in plain PyTorch -----------------------------------------

def _round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= x (x > 0, fp32)."""
    y = x.to(torch.bfloat16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Quantize a (..., N, K) weight -> (qweight, scales) in the canonical (portable, saved) form.

    int8: qweight int8 (..., N, K), scales bf16 (..., N).
    int4: qweight uint8 (..., N, Kp/2) (Kp = K rounded up to the group size), scales bf16 (..., N, Kp/G).
    """
    if not torch.isfinite(w).all():
        raise MixtralError("cannot quantize a weight that holds inf or NaN values")
    w = w.float()
    tiny = torch.finfo(torch.bfloat16).tiny  # an all-zero row or group gets a tiny scale and zero codes
    if bits == 8:
        scales = _round_up_to_bf16((w.abs().amax(-1) / 127).clamp(min=tiny))  # (..., N)
        q = (w / scales.float()[..., None]).round().clamp(-127, 127)
        return q.to(torch.int8), scales
    K = w.shape[-1]
    padded = math.ceil(K / group_size) * group_size
    groups = F.pad(w, (0, padded - K)).unflatten(-1, (padded // group_size, group_size))  # (..., N, Kp/G, G)
    scales = _round_up_to_bf16((groups.abs().amax(-1) / 7.5).clamp(min=tiny))  # (..., N, Kp/G)
    q = (groups / scales.float()[..., None]).round().clamp(-8, 7)
    return pack_codes((q + 8).to(torch.uint8).flatten(-2)), scales


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (..., N, Kp) in 0..15 -> qweight (..., N, Kp/2), two per byte, the even column in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None,
                      in_features: int, dtype: torch.dtype = torch.float32,
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The (..., N, K) weight that canonical (qweight, scales[, offsets]) stand for (computed in fp32: exactly,
    but for the one rounding of adding an int4 group's offset)."""
    if bits == 8 and scales.dim() == qweight.dim():  # a scale per group of columns (a GGUF file's Q8_0 blocks)
        return (qweight.float().unflatten(-1, (scales.shape[-1], -1)) * scales.float()[..., None]).flatten(-2).to(dtype)
    if bits == 8:
        return (qweight.float() * scales.float()[..., None]).to(dtype)
    codes = torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten(-2)  # (..., N, Kp)
    q = codes.float().unflatten(-1, (-1, group_size)) - 8  # (..., N, Kp/G, G)
    w = q * scales.float()[..., None]
    if offsets is not None:
        w += offsets.float()[..., None]
    return w.flatten(-2)[..., :in_features].to(dtype)


# ---- kernel layouts ----------------------------------------------------------------------------------

def _scales_and_zeros(scales: torch.Tensor) -> torch.Tensor:
    """Per-group scales (..., N, Kp/G) -> the int4 kernels' (..., Kp/G, N, 2) [scale, zero]; zero is 0 here
    because the kernels compute (u - 8) * scale + zero and our codes are symmetric."""
    s = scales.transpose(-1, -2)
    return torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()


def _cuda_inner_k_tiles(padded_k: int) -> int:
    return next(t for t in (8, 4, 2) if padded_k % (16 * t) == 0)


@contextmanager
def kernels_disabled():
    """Within this block every quantized matmul dequantizes and uses a plain matmul (the reference path)."""
    global _kernels_enabled
    saved, _kernels_enabled = _kernels_enabled, False
    try:
        yield
    finally:
        _kernels_enabled = saved


def kernel_available(device: torch.device, bits: int) -> bool:
    """Whether this device's packed kernel for `bits` exists and matches the reference on a probe matrix.

    On the CPU that is torch_lowbit's child-process probe (torch's low-bit CPU kernels can crash the process on
    some shapes, so they are never first tried here); on other devices a probe matrix in this process."""
    if device.type == "cpu":
        return torch_lowbit.int8_safe(256) if bits == 8 else torch_lowbit.int4_safe(256, 64)
    key = (device.type, bits)
    if key not in _kernel_checked:
        _kernel_checked[key] = False  # stays False if the probe fails
        try:
            gen = torch.Generator().manual_seed(0)
            weight, x = torch.randn(64, 256, generator=gen), torch.randn(3, 256, generator=gen)
            layer = QuantLinear.from_weight(weight.to(device), bits, 64 if bits == 4 else None, pack=False)
            expected = x @ layer.dequantize().cpu().T
            layer._pack(force=True)
            got = layer._kernel(x.to(device), layer.qweight, layer.scales).float().cpu()
            _kernel_checked[key] = bool((got - expected).abs().max() <= 0.02 * expected.abs().max())
        except (RuntimeError, NotImplementedError, AttributeError):
            pass
    return _kernel_checked[key]


# ---- the modules ---------------------------------------------------------------------------------------

QUANTIZE_STEP = 1 << 20  # weights quantized per step: bounds the fp32 temporaries (a 32k-row head: 65 MB each)


class QuantLinear(nn.Module):
    """A weight-only quantized stand-in for a bias-free nn.Linear, or (with `n_experts`) for a stacked
    (E, N, K) expert weight. Buffers: `qweight` and `scales`, canonical form or a kernel's layout, and for int4
    `offsets` (None, or one per group like the scales: each weight is (code - 8) * scale + offset; a GGUF file's
    Q4_K and Q4_1 blocks, whose weights are code * scale - min, held as they are; such weights stay canonical). An
    int8 weight's scales are one per row, or one per group of `scale_group` columns (a GGUF file's Q8_0 blocks held
    as they are: fp16, set by take_held_blocks; such weights run on our kernels or dequantized, never torch's)."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int | None = None,
                 n_experts: int | None = None, device=None):
        super().__init__()
        group_size = check_settings(bits, group_size)
        self.out_features, self.in_features, self.bits, self.group_size = out_features, in_features, bits, group_size
        self.n_experts = n_experts
        self.layout = "canonical"  # or "cpu-int4" / "cuda-int4" once packed for a kernel
        self.block = 0  # "cpu-int4": output rows per block of torch's layout on this CPU (torch_lowbit)
        lead = () if n_experts is None else (n_experts,)
        if bits == 8:
            self.register_buffer("qweight", torch.empty(*lead, out_features, in_features, dtype=torch.int8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(*lead, out_features, dtype=torch.bfloat16, device=device))
        else:
            n_groups = math.ceil(in_features / group_size)
            self.register_buffer("qweight", torch.empty(*lead, out_features, n_groups * group_size // 2,
                                                        dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(*lead, out_features, n_groups, dtype=torch.bfloat16,
                                                       device=device))
        self.register_buffer("offsets", None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int | None = None, pack: bool = True):
        """Quantize a (N, K) weight, or a stacked (E, N, K) one (one expert at a time, to bound memory)."""
        stacked = weight.dim() == 3
        layer = cls(weight.shape[-2], weight.shape[-1], bits, group_size, weight.shape[0] if stacked else None,
                    device=weight.device)
        for index in range(weight.shape[0]) if stacked else [...]:
            matrix, rows = weight[index], max(1, QUANTIZE_STEP // weight.shape[-1])
            for start in range(0, matrix.shape[0], rows):  # rows are quantized independently
                qweight, scales = quantize_weight(matrix[start:start + rows], bits, layer.group_size)
                layer.qweight[index][start:start + rows], layer.scales[index][start:start + rows] = qweight, scales
        if pack:
            layer._pack()
        return layer

    @property
    def scale_group(self) -> int | None:
        """Columns per scale: int4's group size; int8's None (a scale per row), or the group of a GGUF file's Q8_0
        blocks held as they are (scales (..., N, K / 32))."""
        if self.bits == 4:
            return self.group_size
        return self.in_features // self.scales.shape[-1] if self.scales.dim() == self.qweight.dim() else None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this stands for: (N, K), or (E, N, K) for stacked experts."""
        lead = () if self.n_experts is None else (self.n_experts,)
        return (*lead, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.scale_group}" if self.scale_group else ""
        return f"shape={self.shape}, bits={self.bits}{group}, layout={self.layout}"

    # -- layouts

    def _pack(self, force: bool = False) -> None:
        """Rearrange the canonical buffers into the layout of this device's kernel, when one applies and
        passed its check (`force` skips the check: the check itself uses it)."""
        if (self.bits != 4 or self.layout != "canonical" or self.group_size not in _INT4_KERNEL_GROUPS
                or self.offsets is not None):
            return
        if self.scales.dtype == torch.float16:  # a GGUF file's 4-bit scales: torch's kernels take bf16 ones, so these
            return                              # weights stay on the exact dequantize path (and those with offsets)
        device = self.qweight.device
        if not force and not kernel_available(device, 4):
            return
        padded = self.qweight.shape[-1] * 2
        block = torch_lowbit.int4_block() if device.type == "cpu" else None
        if (device.type == "cpu" and block and self.out_features % block == 0
                and torch_lowbit.int4_safe(padded, self.group_size)):
            codes = torch.stack((self.qweight & 15, self.qweight >> 4), dim=-1).flatten(-2)
            self.qweight = torch_lowbit.cpu_int4_layout(codes, block)
            self.layout, self.block = "cpu-int4", block
        elif device.type == "cuda" and self.out_features % 8 == 0:
            codes = torch.stack((self.qweight & 15, self.qweight >> 4), dim=-1).flatten(-2)
            hi_first = (codes[..., 0::2] << 4) | codes[..., 1::2]  # the CUDA packer's nibble order
            tiles = _cuda_inner_k_tiles(codes.shape[-1])
            packed = [torch.ops.aten._convert_weight_to_int4pack(m.contiguous(), tiles)
                      for m in hi_first.reshape(-1, *hi_first.shape[-2:])]
            self.qweight = torch.stack(packed).reshape(*hi_first.shape[:-2], *packed[0].shape)
            self.layout = "cuda-int4"
        else:
            return
        self.scales = _scales_and_zeros(self.scales)

    def canonical(self, index=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, scales) in the canonical form, for the whole weight or experts `index`."""
        qweight, scales = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        if self.layout == "cpu-int4":
            codes = torch_lowbit.cpu_int4_codes(qweight, self.block)
            return codes[..., 0::2] | (codes[..., 1::2] << 4), scales[..., 0].transpose(-1, -2)
        if self.layout == "cuda-int4":
            raise MixtralError("an int4 weight packed for the CUDA kernel cannot be read back or saved; "
                               "quantize on the CPU (`mixtral quantize`) and load the result on the GPU")
        return qweight, scales

    def dequantize(self, index=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (or experts `index` of it: an int or an index tensor) in `dtype`."""
        qweight, scales = self.canonical(index)
        offsets = self.offsets if self.offsets is None or index is None else self.offsets[index]
        return dequantize_weight(qweight, scales, self.bits, self.group_size, self.in_features, dtype, offsets)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """state_dict() always holds the canonical form, so a checkpoint does not depend on the device."""
        qweight, scales = self.canonical()
        destination[prefix + "qweight"], destination[prefix + "scales"] = qweight, scales
        if self.offsets is not None:
            destination[prefix + "offsets"] = self.offsets

    # -- matmuls

    def _kernel(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ W^T with the packed kernel, in bfloat16."""
        x, scales = x.to(torch.bfloat16), scales.to(torch.bfloat16)  # no-ops unless someone cast the module
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), qweight, scales)
        padded = math.ceil(self.in_features / self.group_size) * self.group_size
        x = F.pad(x, (0, padded - x.shape[-1])).contiguous()
        if self.layout == "cpu-int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, self.group_size, scales)
        return torch.ops.aten._weight_int4pack_mm(x, qweight, self.group_size, scales)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.layout == "cuda-int4":
            return True  # this layout has no other way to run
        if not _kernels_enabled or x.device != self.qweight.device or x.shape[0] > KERNEL_MAX_ROWS:
            return False
        if self.bits == 8 and self.scale_group:  # torch's int8 kernel takes a scale per row
            return False
        if self.bits == 8:  # on the CPU, only widths torch_lowbit found safe (others crash or miscompute)
            if x.device.type == "cpu":
                return torch_lowbit.int8_safe(self.in_features)
            return self.in_features % 8 == 0 and kernel_available(x.device, 8)
        return self.layout != "canonical" and (x.device.type == "cpu" or kernel_available(x.device, 4))

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """x (..., K) @ W^T (or expert `expert`'s W) -> (..., N) in x's dtype."""
        flat = x.reshape(-1, x.shape[-1])  # (M, K)
        if self._use_kernel(flat):
            qweight, scales = (self.qweight, self.scales) if expert is None else (self.qweight[expert],
                                                                                  self.scales[expert])
            out = self._kernel(flat, qweight, scales)
        else:  # on the CPU, fp32 matmuls are much faster than bf16 ones here, and exact
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            if self.bits == 8 and not self.scale_group:  # per-row scales commute with the matmul: scale the output
                qweight, scales = self.canonical(expert)
                out = F.linear(flat.to(compute), qweight.to(compute)) * scales.to(compute)
            else:
                out = F.linear(flat.to(compute), self.dequantize(expert, compute))
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


# ---- whole models ----------------------------------------------------------------------------------------

def take_held_blocks(model, state: dict) -> None:
    """Move what a GGUF file's blocks held as they are add to the scheme from `state` onto `model`'s QuantLinear
    modules, which load_state_dict would refuse: int4 group offsets (names ending ".offsets", its Q4_K and Q4_1
    minimums; the buffer starts as None) and int8 scales per group (its Q8_0 blocks' scales, (..., N, K / 32)
    where a module has one per row)."""
    for name in list(state):
        if name.endswith(".offsets"):
            model.get_submodule(name.removesuffix(".offsets")).offsets = state.pop(name)
        elif name.endswith(".scales"):
            module = model.get_submodule(name.removesuffix(".scales"))
            if module.bits == 8 and state[name].dim() == module.qweight.dim():
                if module.in_features % state[name].shape[-1]:
                    raise MixtralError(f"{name}: {state[name].shape[-1]} groups do not divide "
                                       f"{module.in_features} columns")
                module.scales = state.pop(name)


def _quantizable(model) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every weight the scheme quantizes (lm_head not included)."""
    from .model import MoE

    targets = []
    for block in model.layers:
        targets += [(block.attn, name) for name in ("wq", "wk", "wv", "wo")]
        targets += [(block.ffn, name) for name in ("w1", "w3", "w2")]
    return [(parent, name) for parent, name in targets if isinstance(parent, MoE) or hasattr(parent, name)]


def swap_in_quantized(model, bits: int, group_size: int | None, lm_head: bool, make) -> None:
    """Replace each target weight by `make(current, bits, group_size)`; `current` is an nn.Linear or a
    stacked expert Parameter."""
    for parent, name in _quantizable(model):
        current = getattr(parent, name)
        new = make(current.weight if isinstance(current, nn.Linear) else current, bits, group_size)
        delattr(parent, name)  # a Parameter's slot cannot take a module directly
        setattr(parent, name, new)
    if lm_head:
        model.lm_head = make(model.lm_head.weight, 8, None)
    model.quantization = spec(bits, group_size, lm_head)


def quantize_model(model, bits: int = 8, group_size: int | None = None, lm_head: bool = False,
                   kernel_layout: bool = True):
    """Quantize `model` (a Transformer) in place: int8 per channel or int4 per group (default group 64).

    The router, norms and embedding keep the model's dtype; `lm_head=True` also quantizes the output
    projection (to int8). `kernel_layout=False` keeps the canonical layout instead of rearranging int4 codes for
    torch's kernel (our C kernels read the canonical one). Returns the model, with `model.quantization` describing
    what was done.
    Raises MixtralError for unsupported settings or a model that is already quantized.
    """
    group_size = check_settings(bits, group_size)
    if model.compute_dtype is not None:
        raise MixtralError("this model is prepared for inference; load it with pack=False to quantize it")
    if getattr(model, "quantization", None):
        raise MixtralError("this model is already quantized; load the original weights to quantize them again")
    with torch.no_grad():
        swap_in_quantized(model, bits, group_size, lm_head,
                           lambda w, b, g: QuantLinear.from_weight(w.detach(), b, g, pack=kernel_layout))
    return model
