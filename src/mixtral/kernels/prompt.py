"""The prompt path: a prefill's matmuls as bf16 GEMMs on torch's oneDNN kernels, where this CPU multiplies bf16 in
hardware (AVX512_BF16 or AMX).

A prompt is compute-bound: every weight meets every token. Our C kernels (csrc/cpu_kernels.c) widen each weight to
fp32 and multiply with AVX2 FMA, exactly (100-120 GFLOP/s on 2 Zen 5 cores); oneDNN's bf16 GEMM reaches 300-380
there (AVX512_BF16 dot products). So the native runner (native.py) sends a prefill of at least `MIN_ROWS` tokens here,
when the weights are bf16, int8 or int4; fp32 and fp16 weights, offloaded experts (offload.py, read by the C side),
decode steps and the output projection (only the rows that need logits) stay on the C kernels.

- Attention projections: one GEMM each (q, k, v, o); attention itself is torch's SDPA in fp32, as on the exact path.
- Experts: the C side routes (`mx_route`, the exact path's routing code), then the tokens are grouped by expert
  (one sort per layer) and each expert runs as three GEMMs on its own tokens, added back with their mixing weights.
- Weights: bf16 weights are multiplied where they lie (no copy). int8 and int4 codes times their scale are rounded
  to the nearest bf16 one expert at a time (`mx_to_bf16`, with AVX512_BF16's rounding where the CPU has it), into a
  scratch buffer reused across calls. (Widening int8 codes exactly and scaling each output column after cost a
  pass over every output in fp32: int8 prompts on "small" ran ~15 % slower on an AMX Xeon.)
- A GEMM of up to TRANSPOSED_MAX_ROWS rows is computed as W x^T (below). GEMMs write bf16; the experts' down
  projections go into one (pairs, D) buffer in expert order, which is then put back in (token, choice) order and
  added to the residual stream with the mixing weights.
- A bf16 dot-product GEMM of our own in C (vdpbf16ps, int4 widened in the tile) was measured against this and ran
  at 60-80 % of oneDNN's speed on these shapes, so it was not kept.

Numbers (the contract): each GEMM's inputs (activations) and outputs are rounded to bf16 and its sums are fp32
(oneDNN); int8 and int4 weights are rounded to bf16 as above; SiLU and its product with the up projection are bf16
ops (each computed in fp32, then rounded, as transformers' bf16 model does); the residual stream, norms, routing and
the mixing sums stay fp32. tests/test_prompt.py holds the result to the exact path and to transformers' bf16 model.
`exact=True` on the runner (or MIXTRAL_PROMPT=exact) keeps every prefill on the exact path;
MIXTRAL_PROMPT=gemm takes this path on any CPU (slow where the CPU has no bf16 arithmetic: for tests).
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F

from .native_lib import BF16, I4, I8, cpu_flags, library, sync_threads

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


def unavailable_reason() -> str | None:
    """None when prompts take the GEMM path on this machine (given bf16, int8 or int4 weights), else why not."""
    setting = os.environ.get("MIXTRAL_PROMPT", "")
    if setting == "exact":
        return "turned off by MIXTRAL_PROMPT=exact"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    if setting == "gemm":
        return None
    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return "this CPU has no bf16 arithmetic (AVX512_BF16 or AMX), so oneDNN's bf16 GEMM would be slower"
    return None


def describe() -> str:
    """One line for `mixtral info`."""
    reason = unavailable_reason()
    if reason is None:
        flags = cpu_flags()
        unit = ("AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags
                else "no bf16 arithmetic: MIXTRAL_PROMPT=gemm")
        return (f"oneDNN bf16 GEMMs ({unit}) for prefills of {MIN_ROWS}+ tokens with bf16/int8/int4 weights of "
                f"{MIN_WEIGHTS:,}+ elements (kernels/prompt.py)")
    return f"our C kernels (exact fp32), since {reason}"


def takes(weights, rows: int) -> bool:
    """Whether a prefill of `rows` tokens runs these weights (native_lib.NativeWeight) here: enough rows, weights
    in memory (not an expert store's), of a GEMM format and large enough (MIN_WEIGHTS), and a machine this path is
    for."""
    return (rows >= MIN_ROWS and all(hasattr(w, "tensors") and w.struct.fmt in FAST_FORMATS for w in weights)
            and (max(w.struct.n * w.struct.k for w in weights) >= MIN_WEIGHTS
                 or os.environ.get("MIXTRAL_PROMPT") == "gemm")
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


def linear(weight, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
    """x (M, K) bf16 @ W_expert^T -> (M, N) bf16; up to TRANSPOSED_MAX_ROWS rows as (W x^T)^T, a transposed view,
    and an int8/int4 weight larger than WIDEN_CHUNK_BYTES in bf16 then widened and multiplied a chunk of rows at a
    time."""
    if x.shape[0] > TRANSPOSED_MAX_ROWS:
        return torch.mm(x, _matrix(weight, expert).t())
    n, k = weight.struct.n, weight.struct.k
    rows = max(1, WIDEN_CHUNK_BYTES // (2 * k))
    if weight.struct.fmt == BF16 or rows >= n:
        return torch.mm(_matrix(weight, expert), x.t()).t()
    chunks = -(-n // rows)
    rows = -(-n // chunks)  # chunks of equal size, none left with a few rows
    out, xt = torch.empty(n, x.shape[0], dtype=torch.bfloat16), x.t()
    buffer = _buffer(rows * k)
    for first in range(0, n, rows):
        count = min(rows, n - first)
        torch.mm(_widen(weight, expert, first, buffer[:count * k].view(count, k)), xt, out=out[first:first + count])
    return out.t()


def attention_inputs(layer, h: torch.Tensor, out: torch.Tensor, H: int, G: int, Dh: int) -> None:
    """The q, k, v projections of normed rows h (N, D) fp32 into out (N, (H + 2G) Dh) fp32."""
    hb = h.to(torch.bfloat16)
    out[:, :H * Dh] = linear(layer.q, hb)
    out[:, H * Dh:(H + G) * Dh] = linear(layer.k, hb)
    out[:, (H + G) * Dh:] = linear(layer.v, hb)


def attention_output(layer, y: torch.Tensor, x: torch.Tensor) -> None:
    """x (N, D) += y (N, H Dh) @ o^T."""
    x += linear(layer.o, y.to(torch.bfloat16))


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on bf16 GEMM outputs, in bf16 as transformers does (each op computes in fp32 and rounds)."""
    return F.silu(gate).mul_(up)


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
    hb = h.to(torch.bfloat16)[order // top_k]
    out = torch.empty(N * top_k, x.shape[1], dtype=torch.bfloat16)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        local = expert - layer.first  # (the layer may hold some of the experts only: a split model's part)
        if 0 <= local < layer.held:
            rows = hb[start:start + count]
            hidden = _swiglu(linear(layer.w1, rows, local), linear(layer.w3, rows, local))
            out[start:start + count] = linear(layer.w2, hidden, local)
        else:
            out[start:start + count] = 0
        start += count
    pairs = out[torch.argsort(order)].view(N, top_k, -1)  # back in (token, choice) order
    for choice in range(top_k):
        x.addcmul_(pairs[:, choice], mix[:, choice, None])
    return 0


def dense_mlp(layer, h: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU block (a layer without experts) on normed rows h (N, D) fp32 -> (N, D) bf16 (maybe a
    transposed view)."""
    hb = h.to(torch.bfloat16)
    return linear(layer.w2, _swiglu(linear(layer.w1, hb), linear(layer.w3, hb)))
