"""The prompt path: a prefill's matmuls as GEMMs, where this CPU multiplies bf16 or int8 in hardware (AVX512_BF16,
AVX512_VNNI or AMX): oneDNN's through torch, and two of our own in C for the products with few rows.

A prompt is compute-bound: every weight meets every token. Our exact C kernels (csrc/cpu_kernels.c) widen each
weight to fp32 and multiply with AVX2 FMA (100-120 GFLOP/s on 2 Zen 5 cores); oneDNN's bf16 GEMM reaches 300-380
there (AVX512_BF16 dot products). So the native runner (native.py) sends a prefill of at least `MIN_ROWS` tokens here,
when the weights are bf16, int8 or int4; fp32 and fp16 weights, offloaded experts (offload.py, read by the C side),
decode steps and the output projection (only the rows that need logits) stay on the exact kernels.

- Attention projections: one GEMM each (q, k, v, o); attention itself on our bf16 kernel (`attention`) where the
  CPU has AVX512_BF16 and no AMX, else torch's SDPA in fp32, as on the exact path.
- Experts: the C side routes (`mx_route`, the exact path's routing code), then the tokens are grouped by expert
  (one sort per layer) and each expert runs as three GEMMs on its own tokens, added back with their mixing weights.
- Which GEMM (`linear`), by weight format, rows and CPU:
  - int8 (a scale per row) and int4 (groups of a multiple of 32, no offsets) weights, where the CPU has
    AVX512_VNNI and no AMX (`integer_gemms`): integer GEMMs. The activations are rounded to int8, one scale per
    row (`Rows.int8`, `mx_quantize_rows`); our VNNI kernel (`mx_gemm_i8`) reads the weight's codes where they lie,
    int4 groups included; int8 products of more than OURS_MAX_ROWS rows go to oneDNN's int8 GEMM (torch._int_mm),
    which gives the same numbers. On Zen 4 this ran 1.3-1.7x the bf16 path on 128-token prompts.
  - bf16 weights on AVX512_BF16 without AMX: our bf16 GEMM (`mx_gemm_bf16`, the weight read where it lies, where
    oneDNN packs it on every call) for products of up to BF16_MAX_ROWS rows, and an expert's three GEMMs and the
    SwiGLU between them in one call for up to EXPERT_MAX_ROWS (`mx_expert_bf16`: its h goes from the first two to
    the third in the layout the third reads, rounded to bf16 as `Rows.bf16` rounds).
  - Our GEMMs prefetch as they compute the weight rows they read next. (They no longer ask for the start of the
    weight the next call reads: on Zen 4 that slowed bf16 prompts, most of all short ones, where each expert has
    few rows and waits on memory.)
  - Otherwise oneDNN's bf16 GEMM: bf16 weights where they lie; int8 and int4 codes times their scale rounded to the
    nearest bf16 one expert at a time (`mx_to_bf16`), into a scratch buffer reused across calls, WIDEN_CHUNK_BYTES
    of rows at a time for large weights. A GEMM of up to TRANSPOSED_MAX_ROWS rows is computed as W x^T (below).
    AMX runs bf16 at twice VNNI's int8 rate, so an AMX Xeon takes this for every weight.
- The experts' down projections go into one (pairs, D) buffer in expert order, which is then put back in (token,
  choice) order and added to the residual stream with the mixing weights.

Numbers (the contract), by GEMM: the rows are rounded to bf16 (bf16 GEMMs) or to int8 with one scale per row,
max |x| / 127 (integer GEMMs); products are exact and summed in fp32 (bf16; our kernel's vdpbf16ps flushes
subnormals to zero) or in int32 (integer; int4 per group, each group's sum times its scale added to an fp32 total
in a fused multiply-add); outputs are fp32 from ours and the integer GEMMs, bf16 from
oneDNN's bf16 GEMM; int8 and int4 weights widened for a bf16 GEMM are rounded to bf16. SiLU and its product with
the up projection are computed on the GEMMs' outputs in their type (on bf16 ones as transformers' bf16 model does:
each op in fp32, then rounded). Our attention rounds q, k, v and the softmax's weights to bf16 (`attention`). The
residual stream, norms, routing and the mixing sums stay fp32.
tests/test_prompt.py holds each GEMM to its contract, and the whole path to the exact path and to transformers' bf16
model. `exact=True` on the runner (or MIXTRAL_PROMPT=exact) keeps every prefill on the exact path;
MIXTRAL_PROMPT=gemm takes this path on any CPU (slow where the CPU has no bf16 arithmetic: for tests),
MIXTRAL_PROMPT=int8 also puts int8 (and, with AVX512_VNNI and no AMX, int4) weights on the integer GEMMs on any
CPU, and MIXTRAL_PROMPT=bf16 puts every weight on oneDNN's bf16 GEMMs.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F

from .native_lib import BF16, I4, I8, avx512_allowed, cpu_flags, library, sync_threads

# Rows (tokens x sequences) in a prefill from which the GEMMs win: on Zen 5, 2 threads, "small", they were even with
# the exact kernels at 16 and 1.1-1.4x ahead at 32 (bench/decode.py --prompt-tokens N --runs ours:bf16,exact:bf16)
MIN_ROWS = 32
# Elements of the largest weight of a group of products (q, k, v, o; an expert's w1, w3, w2) from which the group
# takes the GEMMs: smaller weights stay in cache on the exact kernels' tiled products, which won at every prompt
# length measured. On an AMX Xeon (2 threads), the shipped model (q 256 x 256, experts 128 x 256) prefilled 32
# tokens in 8.2 ms on the exact kernels against 20.3 ms on the GEMMs, and 512 tokens in 88 against 98 ms; "small"
# (q 512 x 512, experts 1792 x 512) took 77 ms against 65 at 32 tokens, 284 against 152 at 128. (Our products switch
# kernels at the same size: cpu_kernels.c short_linear.) MIXTRAL_PROMPT=gemm takes the GEMMs for any size (tests).
MIN_WEIGHTS = 1 << 18
FAST_FORMATS = (BF16, I8, I4)
# Up to this many rows a GEMM runs as W @ x^T: oneDNN then reads the weight as its first operand where it lies,
# where x @ W^T repacks the whole weight on every call (its second operand). On an AMX Xeon (2 threads) that made
# the experts' GEMMs of 16-128 rows 1.3-1.8x faster; from 512 rows the two were even or x @ W^T ahead.
TRANSPOSED_MAX_ROWS = 256
# An int8/int4 weight is widened to bf16 and multiplied this many bytes of bf16 rows at a time, so the GEMM reads
# what was just written from cache, not memory: at Mixtral-8x7B's expert shapes (14336 x 4096 and back) on an AMX
# Xeon, a 32-row product took 7.5 ms in 16 MiB chunks against 11 ms widened whole (128 rows: 10.9 against 19.6).
WIDEN_CHUNK_BYTES = 16 << 20


FORCED = ("gemm", "int8", "bf16")  # MIXTRAL_PROMPT settings that take the GEMMs on any CPU


def unavailable_reason() -> str | None:
    """None when prompts take the GEMM path on this machine (given bf16, int8 or int4 weights), else why not."""
    setting = os.environ.get("MIXTRAL_PROMPT", "")
    if setting == "exact":
        return "turned off by MIXTRAL_PROMPT=exact"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    if setting in FORCED:
        return None
    if not avx512_allowed():
        return "AVX-512 (and with it AVX512_BF16 and AMX) is turned off by MIXTRAL_AVX512=0"
    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return "this CPU has no bf16 arithmetic (AVX512_BF16 or AMX), so oneDNN's bf16 GEMM would be slower"
    return None


_exact_int_mm: list[bool] = []


def integer_gemms() -> bool:
    """Whether int8 weights with a scale per row (and, with our VNNI kernel, int4: `integer`) multiply on integer
    GEMMs, their activations rounded to int8, rather than widened to bf16: where the CPU has AVX512_VNNI and no AMX
    (on Zen 4, 2 threads, oneDNN's int8 GEMM ran 1.4-2x its bf16 one at the experts' shapes; on an AMX Xeon it was
    no faster than bf16, which AMX runs at twice the VNNI rate), or with MIXTRAL_PROMPT=int8; never with
    MIXTRAL_PROMPT=bf16. Used only once oneDNN's (torch._int_mm, for int8 products of many rows) is checked here to
    sum exactly (int8 extremes against an int64 matmul)."""
    setting = os.environ.get("MIXTRAL_PROMPT", "")
    if setting == "bf16" or (setting != "int8" and ("avx512_vnni" not in cpu_flags() or "amx_bf16" in cpu_flags())):
        return False
    if not _exact_int_mm:
        gen = torch.Generator().manual_seed(0)
        w, x = (torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8) for shape in ((48, 520), (19, 520)))
        w[0], x[0] = -128, -128  # the largest sums
        try:
            _exact_int_mm.append(torch.equal(torch._int_mm(w, x.t()).long(), w.long() @ x.long().t()))
        except (RuntimeError, NotImplementedError):
            _exact_int_mm.append(False)
    return _exact_int_mm[0]


def describe() -> str:
    """One line for `mixtral info`."""
    reason = unavailable_reason()
    if reason is not None:
        return f"our C kernels (exact fp32), since {reason}"
    flags = cpu_flags()
    unit = ("AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags
            else "no bf16 arithmetic: MIXTRAL_PROMPT=gemm")
    integer = ""
    if integer_gemms():
        vnni = _our_kernels().get("vnni") and "amx_bf16" not in flags
        integer = (f"{'int8 and int4' if vnni else 'int8'} weights on integer GEMMs "
                   f"({'AVX512_VNNI' if vnni else 'oneDNN'}; activations rounded to int8), the rest on ")
    attention = "our bf16 kernel (AVX512_BF16)" if _our_attention() else "torch's SDPA (fp32)"
    return (f"GEMMs for prefills of {MIN_ROWS}+ tokens with bf16/int8/int4 weights of {MIN_WEIGHTS:,}+ elements: "
            f"{integer}bf16 GEMMs ({unit}), attention on {attention} (kernels/prompt.py)")


def takes(weights, rows: int) -> bool:
    """Whether a prefill of `rows` tokens runs these weights (native_lib.NativeWeight) here: enough rows, weights
    in memory (not an expert store's), of a GEMM format and large enough (MIN_WEIGHTS), and a machine this path is
    for."""
    return (rows >= MIN_ROWS and all(hasattr(w, "tensors") and w.struct.fmt in FAST_FORMATS for w in weights)
            and (max(w.struct.n * w.struct.k for w in weights) >= MIN_WEIGHTS
                 or os.environ.get("MIXTRAL_PROMPT") in FORCED)
            and unavailable_reason() is None)


_scratch = threading.local()  # each thread's bf16 buffer for widened weights (grown, never shrunk)


def _buffer(elements: int) -> torch.Tensor:
    held = getattr(_scratch, "buffer", None)
    if held is None or held.numel() < elements:
        held = _scratch.buffer = torch.empty(elements, dtype=torch.bfloat16)
    return held[:elements]


def _widen(weight, expert: int, first: int, into: torch.Tensor) -> torch.Tensor:
    """Rows first .. first + len(into) of an int8 or int4 weight, codes times their scale rounded to bf16, into
    `into` (rows, K) bf16."""
    if library().mx_to_bf16(weight.ref, expert, first, into.shape[0], into.data_ptr()):
        raise MemoryError("widening a weight to bf16: out of memory")
    return into


def _matrix(weight, expert: int) -> torch.Tensor:
    """The whole (N, K) bf16 matrix of a weight: a bf16 weight where it lies, else int8 or int4 codes widened into
    this thread's scratch buffer."""
    data, n, k = weight.tensors[0], weight.struct.n, weight.struct.k
    if weight.struct.fmt == BF16:
        return data[expert] if data.dim() == 3 else data
    return _widen(weight, expert, 0, _buffer(n * k).view(n, k))


class Rows:
    """A GEMM's activations, rows (M, K) fp32 (any strides), rounded once to each form a weight asks for: bf16, or
    int8 with one scale per row (`mx_quantize_rows`). `take` gathers rows of every form made so far."""

    def __init__(self, x: torch.Tensor | None, source: tuple[Rows, object] | None = None):
        self._x, self._source, self.forms = x, source, {}

    @property
    def x(self) -> torch.Tensor:
        """The fp32 rows (those of a `take`, gathered when first asked for: a weight whose form was made before
        the take never needs them)."""
        if self._x is None:
            rows, index = self._source
            self._x, self._source = rows.x[index], None
        return self._x

    def bf16(self) -> torch.Tensor:
        if "bf16" not in self.forms:
            self.forms["bf16"] = self.x.to(torch.bfloat16)
        return self.forms["bf16"]

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (M, K) int8, scales (M,) fp32): row m is codes[m] * scales[m]."""
        if "int8" not in self.forms:
            x = self.x if self.x.dtype == torch.float32 else self.x.float()  # (e.g. a bf16 GEMM's outputs)
            codes, scales = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0])
            library().mx_quantize_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), x.stride(1),
                                       codes.data_ptr(), scales.data_ptr())
            self.forms["int8"] = codes, scales
        return self.forms["int8"]

    def make(self, weight) -> Rows:
        """These rows with the form `weight` multiplies already made (before a `take` of many)."""
        self.int8() if integer(weight) else self.bf16()
        return self

    def take(self, index) -> Rows:
        """The rows at `index` (a slice or an index tensor), in every form made so far."""
        taken = Rows(None, (self, index))
        taken.forms = {name: (tuple(part[index] for part in form) if isinstance(form, tuple) else form[index])
                       for name, form in self.forms.items()}
        return taken


def integer(weight) -> bool:
    """Whether this weight multiplies on the integer GEMMs (on a CPU where they win: `integer_gemms`): int8 codes
    with a scale per row (oneDNN's int8 GEMM, or ours where the CPU has AVX512_VNNI), or int4 in groups of a
    multiple of 32 without offsets (ours only)."""
    s = weight.struct
    if s.fmt == I8 and s.group == 0:
        return integer_gemms()
    return s.fmt == I4 and _ours(weight) and integer_gemms()


def _ours(weight) -> bool:
    """Whether one of our GEMM kernels (csrc/cpu_kernels.c: mx_gemm_i8 on AVX512_VNNI, mx_gemm_bf16 on
    AVX512_BF16) takes this weight on this CPU: they read the weight where it lies, where oneDNN packs it on every
    call, which costs most where few rows share it (an expert's tokens in a short prompt). Not on AMX, whose tiles
    oneDNN uses, nor with MIXTRAL_PROMPT=bf16 (every weight on oneDNN's bf16 GEMMs)."""
    s, kernels = weight.struct, _our_kernels()
    if not kernels or os.environ.get("MIXTRAL_PROMPT") == "bf16" or "amx_bf16" in cpu_flags():
        return False
    if s.fmt == BF16:
        return kernels["bf16"] and s.k % 2 == 0
    return kernels["vnni"] and (
        (s.fmt == I8 and s.group == 0 and s.k % 4 == 0 and s.k <= 65536)
        or (s.fmt == I4 and s.group > 0 and s.group % 32 == 0 and s.k <= 65536 and not s.offsets))


@functools.cache
def _our_kernels() -> dict[str, bool]:
    """Which of our GEMM kernels this CPU runs (empty without the library; none with MIXTRAL_AVX512=0)."""
    lib = library()
    return {} if lib is None else {"vnni": bool(lib.mx_vnni_supported()), "bf16": bool(lib.mx_bf16_supported())}


# Rows up to which our kernels take a product, not oneDNN's GEMMs (which pack the weight, then run as close to the
# CPU's peak or closer). On Zen 4, 2 threads, at the experts' shapes of "small" and "medium" (weights not in cache):
# int8 1.1-1.7x oneDNN's int8 GEMM at 32 rows, 1.0-1.3x at 64, 0.9-1.1x at 128; bf16 1.05-1.5x oneDNN's bf16 GEMM at
# 16-32 rows, 0.9-1.2x at 64 (both then run at the vdpbf16ps peak, ~190 GMAC/s). With its prefetches and an expert in
# one call (mx_expert_bf16), a whole 128-token prompt of "small" ran 2,414 tok/s with bf16 up to 128 or 256 rows on
# ours against 2,225 up to 48 (medium: 309-315 against 289; medium at 512 tokens: 383 at 256 rows, 364 at 128, 371 at
# 1,024), in one process.
OURS_MAX_ROWS = 128
BF16_MAX_ROWS = 256
# An expert's rows up to which its three bf16 GEMMs run in one call on ours (`one_expert`), not on oneDNN's. On Zen 4,
# 2 threads, medium's experts (8 in turn, weights from memory) ran 195-205 GMAC/s on ours at 260-1,024 rows against
# 172-197 on oneDNN's, and a 2,048-token prompt (passes of 1,024 tokens: about 256 rows an expert) 426-433 tok/s with
# up to 512 rows on ours against 413-422 with up to 256, in one process. (BF16_MAX_ROWS stays for the projections: a
# 512-token prompt's ran 435-454 tok/s on oneDNN's against 431-445 on ours.)
EXPERT_MAX_ROWS = 1024


def _check(status: int, kernel: str) -> None:
    """Our GEMMs' status as an error: -1 out of memory, any other nonzero a weight the kernel does not take."""
    if status:
        raise MemoryError(f"{kernel}: out of memory") if status == -1 else RuntimeError(
            f"{kernel} does not take this weight (status {status})")


def _integer_linear(weight, rows: Rows, expert: int) -> torch.Tensor:
    """rows @ W_expert^T -> (M, N) fp32 (a transposed view) on an integer GEMM: the rows' int8 codes times the
    weight's codes, summed exactly in int32, then times the weight's scale and the row's."""
    x_codes, x_scales = rows.int8()
    M = x_codes.shape[0]
    if _ours(weight) and (M <= OURS_MAX_ROWS or weight.struct.fmt == I4):
        out = torch.empty(weight.struct.n, M)
        status = library().mx_gemm_i8(weight.ref, expert, x_codes.data_ptr(), x_scales.data_ptr(), M,
                                      out.data_ptr())
        _check(status, "the integer GEMM")
        return out.t()
    codes, scales = weight.tensors[0], weight.tensors[1]
    if codes.dim() == 3:
        codes, scales = codes[expert], scales[expert]
    sums = torch._int_mm(codes, x_codes.t())  # (N, M): the weight as oneDNN's first operand, read where it lies
    return sums.float().mul_(scales.float()[:, None]).mul_(x_scales).t()


def linear(weight, rows: Rows, expert: int = 0, into: torch.Tensor | None = None) -> torch.Tensor:
    """rows (M, K) @ W_expert^T -> (M, N), maybe a transposed view, or written into `into` (M, N) fp32: int8/int4
    weights the integer GEMMs take (`integer`) there, fp32 out; bf16 weights of up to BF16_MAX_ROWS rows on our bf16
    GEMM where it runs, fp32 out, written where `into` lies; the rest on oneDNN's bf16 GEMM, bf16 out. A product
    that cannot be written where `into` lies is copied there."""
    if integer(weight):
        out = _integer_linear(weight, rows, expert)
    elif weight.struct.fmt == BF16 and rows.bf16().shape[0] <= BF16_MAX_ROWS and _ours(weight):
        x = rows.bf16().contiguous()
        out = torch.empty(x.shape[0], weight.struct.n) if into is None or not _in_place(into) else into
        status = library().mx_gemm_bf16(weight.ref, expert, x.data_ptr(), x.shape[0], out.data_ptr(), out.stride(0))
        _check(status, "the bf16 GEMM")
    else:
        out = _onednn_linear(weight, rows.bf16(), expert)
    return out if into is None or out is into else into.copy_(out)


def _onednn_linear(weight, x: torch.Tensor, expert: int) -> torch.Tensor:
    """x (M, K) bf16 @ W_expert^T -> (M, N) bf16, maybe a transposed view, on oneDNN's bf16 GEMM. One of up to
    TRANSPOSED_MAX_ROWS rows runs as (W x^T)^T, and an int8/int4 weight larger than WIDEN_CHUNK_BYTES in bf16 is then
    widened and multiplied a chunk of rows at a time."""
    if x.shape[0] > TRANSPOSED_MAX_ROWS:
        return torch.mm(x, _matrix(weight, expert).t())
    n, k = weight.struct.n, weight.struct.k
    count = max(1, WIDEN_CHUNK_BYTES // (2 * k))
    if weight.struct.fmt == BF16 or count >= n:
        return torch.mm(_matrix(weight, expert), x.t()).t()
    chunks = -(-n // count)
    count = -(-n // chunks)  # chunks of equal size, none left with a few rows
    out, xt = torch.empty(n, x.shape[0], dtype=torch.bfloat16), x.t()
    buffer = _buffer(count * k)
    for first in range(0, n, count):
        part = min(count, n - first)
        torch.mm(_widen(weight, expert, first, buffer[:part * k].view(part, k)), xt, out=out[first:first + part])
    return out.t()


def _in_place(into: torch.Tensor) -> bool:
    """Whether our kernels can write these fp32 rows where they lie (each row contiguous)."""
    return into.dtype == torch.float32 and into.stride(1) == 1


def attention_inputs(layer, h: torch.Tensor, out: torch.Tensor, H: int, G: int, Dh: int) -> None:
    """The q, k, v projections of normed rows h (N, D) fp32 into out (N, (H + 2G) Dh) fp32."""
    rows = Rows(h)
    linear(layer.q, rows, into=out[:, :H * Dh])
    linear(layer.k, rows, into=out[:, H * Dh:(H + G) * Dh])
    linear(layer.v, rows, into=out[:, (H + G) * Dh:])


def attention_output(layer, y: torch.Tensor, x: torch.Tensor) -> None:
    """x (N, D) += y (N, H Dh) @ o^T."""
    x += linear(layer.o, Rows(y))


def attends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether our attention kernel (`attention`) takes these: fp32 queries (B, T, H, Dh) and keys and values
    (B, G, S, Dh), each row of Dh (a multiple of 32) contiguous, on a CPU where it runs (`_our_attention`)."""
    return (_our_attention() and q.shape[-1] % 32 == 0
            and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v))
            and q.stride(2) == q.shape[-1])


def _our_attention() -> bool:
    """Whether our attention kernel runs on this CPU: AVX512_BF16, and no AMX (not measured on one: an AMX Xeon's
    prompts keep torch's SDPA, as its other products keep oneDNN's GEMMs)."""
    return bool(_our_kernels().get("bf16")) and "amx_bf16" not in cpu_flags()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """Attention of queries q (B, T, H, Dh) at positions (B, T) over keys and values (B, G, S, Dh) (a sequence's
    positions 0 .. S-1), each query seeing the keys at or before its position (the last `window` of them, given one)
    -> (B * T, H * Dh) fp32, on our kernel (cpu_kernels.c: mx_prompt_attention). Its numbers: q, k and v rounded to
    bf16, scores summed in fp32, the softmax in fp32, its weights rounded to bf16 for the sum over v (fp32)."""
    B, T, H, Dh = q.shape
    G, S = k.shape[1], k.shape[2]
    out = torch.empty(B * T, H * Dh)
    positions = positions.expand(B, T).to(torch.int64).contiguous()
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v)]
    status = library().mx_prompt_attention(q.data_ptr(), strides[0].data_ptr(), k.data_ptr(), strides[1].data_ptr(),
                                           v.data_ptr(), strides[2].data_ptr(), positions.data_ptr(), B, T, H, G, S,
                                           Dh, window or 0, out.data_ptr())
    _check(status, "our attention")
    return out


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> Rows:
    """silu(gate) * up on GEMM outputs: on bf16 ones in bf16 as transformers does (each op computes in fp32 and
    rounds), on the integer GEMMs' fp32 ones in fp32."""
    return Rows(F.silu(gate).mul_(up))


def experts(layer, h: torch.Tensor, x: torch.Tensor, top_k: int, logits: torch.Tensor, ids: torch.Tensor,
            mix: torch.Tensor, store_hook) -> int:
    """The MoE block for normed rows h (N, D) fp32, added to x (N, D): routed by the C side (into logits (N, E), ids
    and mix (N, top_k), the exact path's routing), then each expert's tokens as three GEMMs, their outputs laid
    side by side in expert order and added to x, each token's top_k of them with their mixing weights. Returns the
    C side's routing status (0, -1 out of memory, -5 the store failed). Experts the layer does not hold (a split
    model's other processes hold them) add nothing here."""
    sync_threads()
    N = h.shape[0]
    status = library().mx_route(h.data_ptr(), N, layer.router.ref, top_k, logits.data_ptr(), ids.data_ptr(),
                                mix.data_ptr(), store_hook)
    if status:
        return status
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)  # the (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=logits.shape[1]).tolist()
    rows = Rows(h).make(layer.w1).take(order // top_k)
    out = torch.empty(N * top_k, x.shape[1])  # (fp32: what each GEMM gave, bf16 or fp32, as it is)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        local = expert - layer.first
        if 0 <= local < layer.held:  # (the layer may hold some of the experts only: a split model's part)
            one_expert(layer, rows.take(slice(start, start + count)), local, into=out[start:start + count])
        else:
            out[start:start + count] = 0
        start += count
    pairs = out[torch.argsort(order)].view(N, top_k, -1)  # back in (token, choice) order
    for choice in range(top_k):
        x.addcmul_(pairs[:, choice], mix[:, choice, None])
    return 0


def one_expert(layer, rows: Rows, local: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """Expert `local` of the layer on its rows -> (M, D), maybe a transposed view, or written into `into`: bf16
    weights on our bf16 GEMM in one call (mx_expert_bf16: the three GEMMs and the SwiGLU between them, as `linear`
    and `_swiglu` compute them), others as three `linear`s."""
    w1, w3, w2 = layer.w1, layer.w3, layer.w2
    if not all(w.struct.fmt == BF16 and _ours(w) for w in (w1, w3, w2)) or rows.bf16().shape[0] > EXPERT_MAX_ROWS:
        hidden = _swiglu(linear(w1, rows, local), linear(w3, rows, local))
        return linear(w2, hidden, local, into)
    x = rows.bf16().contiguous()
    out = into if into is not None and _in_place(into) else torch.empty(x.shape[0], w2.struct.n)
    status = library().mx_expert_bf16(w1.ref, w3.ref, w2.ref, local, x.data_ptr(), x.shape[0], out.data_ptr(),
                                      out.stride(0))
    _check(status, "the bf16 GEMM")
    return out if into is None or out is into else into.copy_(out)


def dense_mlp(layer, h: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU block (a layer without experts) on normed rows h (N, D) fp32 -> (N, D) bf16 or fp32, by the
    GEMM (maybe a transposed view)."""
    rows = Rows(h)
    return linear(layer.w2, _swiglu(linear(layer.w1, rows), linear(layer.w3, rows)))
