"""The native runner: a model's forward pass and decode steps on our C kernels (csrc/cpu_kernels.c, loaded by
native_lib.py; weights described by native_weights.py).

A decode step is one C call (`DecodeSession.step`: the embedding, every block, the final norm, the output
projection, and each row's log-normalizer and argmax), because whatever Python runs between steps runs on caches
the step's weights have just flushed. A short prompt is one such call too (`DecodeSession.prompt`: its tokens are
rows of their sequence's cache row); longer prompts run every matmul and the experts in C or on the GEMMs of
prompt.py, and attention in torch (SDPA) or, with the GEMMs, on our bf16 kernel (prompt.attention). A rank's part
of a split model (`Split`, distributed.py) runs every pass that way, decode steps too, its parts summed over the
ranks between the ops.

Numbers: every weight is widened to its exact fp32 value and multiplied in fp32, so the result equals an fp32
matmul with the dequantized weights up to the order of summation; except that int8 and int4 weights in
one-row products (every row of a decode step, a short prompt's products on the decode rows' kernel, and any
one-row matmul) meet activations rounded to int16 with one scale per span of columns, 256 for int8 and one group
for int4 (error <= 2^-16 of the span's largest value). Each row of a batched decode step is computed exactly as
at batch 1. Activations and the KV cache are fp32. Routing ties (equal router logits) may pick other experts than
torch.topk, whose order for ties is unspecified.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import release_free_memory
from ..model import RMSNorm, Routing, apply_rope, attention_mask, rope_cos_sin
from ..quantize import QuantLinear
from . import prompt
from .native_lib import library, sync_threads, will_run
from .native_lib import to_canonical
from .native_weights import NativeModel, move_to_huge_pages, supports
from .runner import Runner, Step


ROWS_EXACT, ROWS_SHORT = 1, 2  # cpu_kernels.c's products: decode rows as at batch 1; a short prompt's, by shape
PROMPT_ROWS_MAX = 64  # prompts (chunks) of at most this many tokens not on GEMMs run as one C call (_forward)


@dataclass
class Split:
    """How the parts of a model split over processes (distributed.py: this process holds some heads, experts and
    vocabulary rows) are joined: `reduce` sums a tensor over the processes in place (attention's output, the MoE
    or MLP block's), `gather` makes each process's logits for its vocabulary rows the whole vocabulary's."""

    reduce: Callable[[torch.Tensor], None]
    gather: Callable[[torch.Tensor], torch.Tensor]


class NativeRunner(Runner):
    """Runs a model on the C kernels; made by `prepare` (which also readies the model's tensors for them)."""

    name = "native"

    def __init__(self, model, store=None, exact: bool = False, split: Split | None = None):
        super().__init__(model)
        self.exact = exact  # every prefill on the exact fp32 kernels, never the GEMMs of prompt.py
        # a process's part of a split model: every pass op by op (_prefill_layers, decode steps too), joining the
        # parts where the model's own code does; the one-call decode step does not join them
        self.split = split
        self.native = NativeModel(model, store)
        self.store = store  # an expert store (offload.py) holding some layers' experts, or None
        self._sessions = weakref.WeakKeyDictionary()  # KVCache -> its DecodeSession (own logits buffer)
        self._fresh_sessions = weakref.WeakKeyDictionary()  # KVCache -> one that returns fresh logits


    def session(self, cache, own_logits: bool = True) -> DecodeSession:
        """The DecodeSession for `cache` (made on first use, kept while the cache lives)."""
        table = self._sessions if own_logits else self._fresh_sessions
        session = table.get(cache)
        if session is None:
            session = table[cache] = DecodeSession(self.model, self.native, cache, own_logits=own_logits)
        return session

    def forward(self, input_ids, input_pos=None, cache=None, n_keys=None, logits_at=None, routing=None,
                slots=None) -> torch.Tensor:
        return _forward(self, input_ids, input_pos, cache, n_keys, logits_at, routing, slots)

    def decode_step(self, cache, tokens, positions, rows=None, routing=None) -> Step:
        """One C call, unless forward hooks must run (then through the model, as `model(...)` would) or the cache
        is not the fp32 CPU kind the C side writes."""
        if hooked(self.model) or not decodes(cache) or self.split is not None:
            return super().decode_step(cache, tokens, positions, rows, routing)
        session = self.session(cache)
        logits = session.step(tokens, positions, rows, routing)
        return Step(logits, session.lse, session.best, session._out_array)

    def feeds(self, cache, tokens: int) -> bool:
        """Prompts (or their rests) that would be one C call alone (_forward: not on the GEMMs, at most
        PROMPT_ROWS_MAX tokens) ride in a step's C call, each token a row computed as a decode row is (ROWS_EXACT:
        its numbers do not depend on the rows beside it)."""
        return (tokens <= PROMPT_ROWS_MAX and self.split is None and not hooked(self.model) and decodes(cache)
                and (self.exact or not _takes_gemms(self.native, tokens)))

    def feed(self, cache, inputs, starts, rows) -> Step:
        """One C call for every sequence's tokens (each sequence's count one that `feeds` takes)."""
        if not all(self.feeds(cache, len(ids)) for ids in inputs):
            raise ValueError(f"feed takes up to {PROMPT_ROWS_MAX} tokens per sequence, of a count that would not "
                             f"run on the prompt GEMMs, on a cache the C side writes; got {[len(i) for i in inputs]}")
        tokens = [token for ids in inputs for token in ids]
        positions = [start + i for ids, start in zip(inputs, starts) for i in range(len(ids))]
        wanted = list(itertools.accumulate(len(ids) for ids in inputs))
        logits, lse, best = self.session(cache, own_logits=False).run_rows(
            tokens, positions, [row for ids, row in zip(inputs, rows) for _ in ids], [end - 1 for end in wanted],
            mode=ROWS_EXACT)
        return Step(logits, lse, best, logits.numpy())


def prepare(model, store=None, exact: bool = False, split: Split | None = None) -> NativeRunner | None:
    """Set `model` up for the C kernels, in place: norms to fp32, int4 codes in our own layout, every weight moved
    onto 2 MiB pages where the OS allows, activations fp32 (model.compute_dtype). `store`: an expert store
    (offload.py) that holds the experts the model does not (left on the meta device). `exact`: prefills stay on the
    exact fp32 kernels (see prompt.py). `split`: the model is one process's part of a split model (see Split).
    Returns the runner, or None
    when the kernels are unavailable here or some weight has none (the model is then unchanged)."""
    if not will_run(model.device) or not supports(model):
        return None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.float()
            if isinstance(module, QuantLinear):
                to_canonical(module)
    release_free_memory()  # the int4 codes in torch's layout
    move_to_huge_pages(model)
    model.compute_dtype = torch.float32  # activations and the KV cache
    return NativeRunner(model, store, exact, split)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(M, D) fp32 contiguous -> normalized (M, D)."""
    out = torch.empty_like(x)
    library().mx_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def _forward(runner, input_ids, input_pos, cache, n_keys, logits_at, routing, slots) -> torch.Tensor:
    """Transformer.forward (same arguments and result) on the native kernels."""
    model, native, args = runner.model, runner.native, runner.model.args
    sync_threads()
    B, T = input_ids.shape
    N, D = B * T, args.dim
    if input_pos is None:
        input_pos = torch.arange(T).expand(B, T)
    whole = runner.split is None  # (a split model's parts are joined between the ops: no one-call passes)
    if T == 1 and whole and cache is not None and decodes(cache) and not _has_hooks(model.embed):
        decoder = runner.session(cache, own_logits=False)
        rows = range(B) if slots is None else slots.tolist()
        return decoder.step(input_ids[:, 0].tolist(), input_pos[:, 0].tolist(), rows, routing, fresh=True)[:, None]
    if (1 < N <= PROMPT_ROWS_MAX and whole and cache is not None and decodes(cache) and not _has_hooks(model.embed)
            and (runner.exact or not _takes_gemms(native, N))):
        # a short prompt (a chat turn after its reused prefix, a prompt's last chunk): the whole pass in one C
        # call, each token a row of its sequence's cache row, logits only where wanted
        rows = list(range(B)) if slots is None else slots.tolist()
        wanted = list(range(N))
        if logits_at is not None:  # an index along T per sequence, negative ones from the end, as x[b, t] takes it
            at = logits_at.tolist()
            if any(not -T <= t < T for t in at):
                raise IndexError(f"logits_at {at} is outside the {T} positions of the input")
            wanted = [b * T + t % T for b, t in enumerate(at)]
        logits = runner.session(cache, own_logits=False).prompt(
            input_ids.reshape(N).tolist(), input_pos.expand(B, T).reshape(N).tolist(),
            [r for r in rows for _ in range(T)], wanted, routing, B)
        return logits.view(B, -1 if logits_at is None else 1, logits.shape[-1])
    x = model.embed(input_ids).reshape(N, D).float().contiguous()  # the residual stream, updated in place
    E = native.n_experts
    K = args.top_k if E else 0
    logits = torch.empty(len(native.layers), N, E)  # what each router did, for `routing`
    ids, mix = torch.empty(len(native.layers), N, K, dtype=torch.int64), torch.empty(len(native.layers), N, K)
    _prefill_layers(model, native, x, B, T, input_pos, cache, n_keys, slots, logits, ids, mix,
                    gemms=not runner.exact, split=runner.split)
    if routing is not None:
        routing.extend(_routing(native, logits, ids, mix, B, T))
    x = x.view(B, T, D)
    if logits_at is not None:
        x = x[torch.arange(B), logits_at][:, None]  # (B, 1, D)
    rows = x.shape[0] * x.shape[1]
    h = rms_norm(x.reshape(rows, D).contiguous(), model.norm.weight, model.norm.eps)
    logits = native.lm_head.linear(h, per_row=runner.split is not None and T == 1)
    if runner.split is not None:
        logits = runner.split.gather(logits)
    return logits.view(x.shape[0], x.shape[1], -1)


def _takes_gemms(native, rows: int) -> bool:
    """Whether a prefill of `rows` tokens runs any product as a GEMM (prompt.py)."""
    return any(prompt.takes((layer.q, layer.k, layer.v, layer.o), rows)
               or prompt.takes((layer.w1, layer.w3, layer.w2), rows) for layer in native.layers)


def _routing(native, logits, ids, mix, B, T) -> list:
    E, K = logits.shape[-1], ids.shape[-1]
    return [Routing(logits[i].view(B, T, E), ids[i].view(B, T, K), mix[i].view(B, T, K))
            for i, layer in enumerate(native.layers) if layer.moe]


def decodes(cache) -> bool:
    """Whether decode steps against `cache` can run as one call to the C side (a `DecodeSession`)."""
    return cache.keys[0].dtype == torch.float32 and cache.keys[0].is_contiguous() and cache.keys[0].device.type == "cpu"


def _has_hooks(module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def hooked(model) -> bool:
    """Whether forward hooks are registered on `model`, its embedding (which the step used to call) or every
    module: then each decode step goes through `model(...)`, so that they run, and not straight to a `DecodeSession`."""
    return (_has_hooks(model) or _has_hooks(model.embed) or bool(nn.modules.module._global_forward_pre_hooks)
            or bool(nn.modules.module._global_forward_hooks))


class DecodeSession:
    """Decode steps against one KV cache, one C call each (cpu_kernels.c: mx_decode): the embedding, every block,
    the final norm, the output projection, and each row's log-normalizer and greedy choice.

    A decode step of a small model is a few milliseconds, and the Python around it runs on cold caches (the step
    streams more weights than the caches hold): each torch op there is slow (README). So the inputs go in through
    ctypes arrays, the buffers are allocated once, and `lse` and `best` come back with the logits, for the caller
    to skip the torch ops it would otherwise run on them.

    `step` returns (B, V) logits in the session's own buffer, valid until the next step (unless `fresh`; a
    session made with `own_logits=False` only makes fresh ones). Like the cache it writes, a session is stepped by
    one thread at a time.
    """

    def __init__(self, model, native, cache, own_logits: bool = True):
        args = model.args
        self.native, self.norm_eps = native, model.norm.eps
        self.cache_rows, self.max_seq_len = cache.batch_size, cache.max_seq_len
        self.kv_shape = (cache.batch_size, args.n_kv_heads, cache.max_seq_len, args.head_dim)
        rows, L, E = cache.batch_size, len(native.layers), native.n_experts
        self.K = args.top_k if E else 0
        self.x = torch.empty(rows, args.dim)
        self.router = (torch.empty(L * rows * E), torch.empty(L * rows * self.K, dtype=torch.int64),
                       torch.empty(L * rows * self.K))
        self.out = torch.empty(rows, native.lm_head.n) if own_logits else None
        self._out_array = self.out.numpy() if own_logits else None  # the same memory: a value read is no torch op
        self._views = {rows: self.out}  # out[:B] for each batch size seen
        # the addresses every step passes (read once: each torch call between steps is slow, see above)
        self._pointers = dict(x=self.x.data_ptr(), router=[t.data_ptr() for t in self.router],
                              norm=model.norm.weight.data_ptr(), out=self.out.data_ptr() if own_logits else 0)
        self._tensors_held = (model.norm.weight,)
        self.tokens, self.positions, self.rows = ((ctypes.c_int64 * rows)() for _ in range(3))
        self.lse_out, self.best_out = (ctypes.c_double * rows)(), (ctypes.c_int64 * rows)()
        self.lse: list[float] = []  # the last step's log(sum(exp(logits))) per row
        self.best: list[int] = []  # the last step's greedy choice per row (argmax, a NaN logit never chosen)
        self._cache, self._tensors = weakref.ref(cache), None  # weak: NativeModel.decoders is keyed on the cache
        self._follow(cache)

    def _follow(self, cache) -> None:
        """(Re)read the addresses of the cache's tensors, which the C side writes through, after checking that
        they are what it writes: fp32, contiguous, on the CPU, of the cache's shape."""
        tensors = cache.keys + cache.values
        if self._tensors is not None and len(tensors) == len(self._tensors) and all(
                a is b for a, b in zip(tensors, self._tensors)):
            return
        if len(cache.keys) != len(self.native.layers) or len(cache.values) != len(self.native.layers):
            raise ValueError(f"the KV cache has {len(cache.keys)} layers, the model {len(self.native.layers)}")
        for t in tensors:
            if (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"
                    or tuple(t.shape) != self.kv_shape):
                raise ValueError(f"the native decoder writes fp32 contiguous CPU key/value tensors of shape "
                                 f"{self.kv_shape}; the cache holds {t.dtype} {tuple(t.shape)} on {t.device}")
        self._keys, self._values = ((ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts))
                                    for ts in (cache.keys, cache.values))
        self._tensors = list(tensors)

    def step(self, tokens, positions, rows=None, routing: list | None = None, fresh: bool = False) -> torch.Tensor:
        """Logits (B, V) for one new token per sequence: tokens[b] at position positions[b] of cache row rows[b]
        (default 0..B-1); each a Python int (ctypes wraps ints beyond int64 silently). `routing`, if given,
        receives one `Routing` per MoE layer. Out-of-range tokens, positions or rows raise IndexError before
        anything is written."""
        B = len(tokens)
        if len(positions) != B or (rows is not None and len(rows) != B):
            raise ValueError(f"{B} tokens, {len(positions)} positions and {B if rows is None else len(rows)} rows")
        if not 0 < B <= self.cache_rows:
            raise IndexError(f"a decode step takes 1 to {self.cache_rows} sequences (the KV cache's rows), got {B}")
        self._ready()
        self.tokens[:B], self.positions[:B] = tokens, positions
        self.rows[:B] = range(B) if rows is None else rows
        L, E, K = len(self.native.layers), self.native.n_experts, self.K
        pointers = self._pointers
        router, out_at = pointers["router"], pointers["out"]
        if routing is not None:
            logits, ids, mix = torch.empty(L * B * E), torch.empty(L * B * K, dtype=torch.int64), torch.empty(L * B * K)
            router = [t.data_ptr() for t in (logits, ids, mix)]
        if fresh or self.out is None:
            fresh, out = True, torch.empty(B, self.native.lm_head.n)
            out_at = out.data_ptr()
        status = self._run(self.tokens, pointers["x"], B, self.positions, self.rows, router, out_at, self.lse_out,
                           self.best_out, None, 0, ROWS_EXACT)
        if status:
            raise _decode_error(status, tokens, positions, rows, self)
        self.lse, self.best = self.lse_out[:B], self.best_out[:B]
        if routing is not None:
            routing.extend(_routing(self.native, logits.view(L, B, E), ids.view(L, B, K), mix.view(L, B, K), B, 1))
        if fresh:
            return out
        view = self._views.get(B)
        if view is None:
            view = self._views[B] = self.out[:B]
        return view

    def prompt(self, tokens, positions, rows, wanted, routing: list | None = None, sequences: int = 1) -> torch.Tensor:
        """Short prompts, or chunks of them, in one C call: token i at positions[i] of cache row rows[i] (the
        tokens of one sequence share its row, at consecutive positions). Returns fresh logits (len(wanted), V) of
        the tokens listed in `wanted` only. `routing` as for `step`, shaped (sequences, tokens of each)."""
        return self.run_rows(tokens, positions, rows, wanted, routing, sequences)[0]

    def run_rows(self, tokens, positions, rows, wanted, routing: list | None = None, sequences: int = 1,
                 mode: int = ROWS_SHORT) -> tuple[torch.Tensor, list[float], list[int]]:
        """`prompt`'s pass, its products by `mode` (cpu_kernels.c: ROWS_SHORT, by shape; ROWS_EXACT, each row as a
        decode row) -> (logits, log-normalizers, greedy choices) of the `wanted` tokens."""
        N = len(tokens)
        if len(positions) != N or len(rows) != N or N % sequences:
            raise ValueError(f"{N} tokens, {len(positions)} positions and {len(rows)} rows for {sequences} sequences")
        self._ready()
        L, E, K = len(self.native.layers), self.native.n_experts, self.K
        x = torch.empty(N, self.native.lm_head.k)
        logits, ids, mix = torch.empty(L * N * E), torch.empty(L * N * K, dtype=torch.int64), torch.empty(L * N * K)
        out = torch.empty(len(wanted), self.native.lm_head.n)
        ints = ctypes.c_int64 * N
        lse, best = (ctypes.c_double * len(wanted))(), (ctypes.c_int64 * len(wanted))()
        status = self._run(ints(*tokens), x.data_ptr(), N, ints(*positions), ints(*rows),
                           [t.data_ptr() for t in (logits, ids, mix)], out.data_ptr(), lse, best,
                           (ctypes.c_int64 * len(wanted))(*wanted), len(wanted), mode)
        if status:
            raise _decode_error(status, tokens, positions, rows, self)
        if routing is not None:
            routing.extend(_routing(self.native, logits.view(L, N, E), ids.view(L, N, K), mix.view(L, N, K),
                                    sequences, N // sequences))
        return out, list(lse), list(best)

    def _ready(self) -> None:
        """Before a call: the cache still lives, its tensors are the ones the C side writes, the threads are set."""
        cache = self._cache()
        if cache is None:
            raise ValueError("this decoder's KV cache is gone")
        self._follow(cache)
        sync_threads()

    def _run(self, tokens, x, B, positions, rows, router, out, lse, best, head_rows, n_head, mode) -> int:
        """mx_decode on this session's model and cache; the rest as cpu_kernels.c describes it."""
        return library().mx_decode(
            self.native.structs, len(self.native.layers), self.native.embed.ref, tokens, x, B, positions, rows,
            self.cache_rows, self._keys, self._values, self.max_seq_len, self.native.n_experts, self.K, *router,
            self._pointers["norm"], self.norm_eps, self.native.lm_head.ref, out, lse, best, head_rows, n_head, mode)

    def logit(self, row: int, token: int) -> float:
        """The last step's logit of `token` in row `row` (of a step that was not `fresh`)."""
        return float(self._out_array[row, token])


def _decode_error(status: int, tokens, positions, rows, decoder) -> Exception:
    if status == -5:
        return store_error(decoder.native.store)
    if status == -2:
        return IndexError(f"token ids {list(tokens)} are outside the vocabulary of {decoder.native.embed.n}")
    if status == -3:
        return IndexError(f"positions {list(positions)} are outside the KV cache's {decoder.max_seq_len} positions")
    if status == -4:
        rows = range(len(tokens)) if rows is None else rows
        return IndexError(f"cache rows {list(rows)} are outside the KV cache's {decoder.cache_rows} rows")
    if status == -6:
        return IndexError(f"the tokens whose logits are wanted are not all among the {len(tokens)} given")
    return MemoryError("native decode: out of memory")


def store_error(store) -> Exception:
    """The error that made the expert store's fetch fail (taken: the next pass starts clean)."""
    error, store.error = store.error, None
    return error if error is not None else RuntimeError("the expert store failed")


def _prefill_layers(model, native, x, B, T, input_pos, cache, n_keys, slots, logits, ids, mix, gemms,
                    split: Split | None = None) -> None:
    """Several tokens per sequence: attention by torch (SDPA); every matmul and the experts by the C side, or, for
    prompts long enough and weights it takes (`gemms`), by the GEMMs of prompt.py and attention by its kernel.
    `split`: x is one process's part of a split model; the attention and MoE/MLP outputs are summed over the
    processes before they are added to x, and one new token per sequence (a decode step) is computed as a decode
    step computes it."""
    lib, args = library(), model.args
    step = split is not None and T == 1  # (each row as at batch 1: its numbers do not depend on the rows beside it)
    gemms = gemms and not step
    N, H, G, Dh = B * T, args.n_heads, args.n_kv_heads, args.head_dim
    n_keys = T if cache is None else (cache.max_seq_len if n_keys is None else n_keys)
    # a whole prompt from position 0 (no window inside it): SDPA's causal kernel, which skips the masked half
    causal = (n_keys == T and (args.sliding_window is None or args.sliding_window >= T)
              and bool((input_pos == torch.arange(T)).all()))
    mask = None if causal else attention_mask(input_pos, n_keys, args.sliding_window)
    cos, sin = rope_cos_sin(input_pos, Dh, args.rope_theta, torch.float32)
    cos, sin = cos[:, :, None], sin[:, :, None]
    for index, layer in enumerate(native.layers):
        attention_gemms = gemms and prompt.takes((layer.q, layer.k, layer.v, layer.o), N)
        h = rms_norm(x, layer.attn_norm, args.norm_eps)
        qkv = torch.empty(N, (H + 2 * G) * Dh)
        if attention_gemms:
            prompt.attention_inputs(layer, h, qkv, H, G, Dh)
        else:
            layer.q.linear(h, out=qkv[:, :H * Dh], per_row=step)
            layer.k.linear(h, out=qkv[:, H * Dh:(H + G) * Dh], per_row=step)
            layer.v.linear(h, out=qkv[:, (H + G) * Dh:], per_row=step)
        qkv = qkv.view(B, T, H + 2 * G, Dh)
        q, k = apply_rope(qkv[:, :, :H + G], cos, sin).split((H, G), dim=2)  # (B, T, H|G, Dh)
        k, v = k.transpose(1, 2), qkv[:, :, H + G:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(index, input_pos, k, v, n_keys, slots)
        if attention_gemms and prompt.attends(q, k, v):
            y = prompt.attention(q, k, v, input_pos, args.sliding_window)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=G != H)  # (B, H, T, Dh)
            y = y.transpose(1, 2).reshape(N, H * Dh)
        out = x if split is None else torch.zeros_like(x)  # what the block adds to x (a split model's part first)
        if attention_gemms:
            prompt.attention_output(layer, y, out)
        else:
            layer.o.linear(y.contiguous(), out=out, accumulate=True, per_row=step)
        _join(x, out, split)
        h = rms_norm(x, layer.ffn_norm, args.norm_eps)
        out = x if split is None else out.zero_()
        ffn_gemms = gemms and prompt.takes((layer.w1, layer.w3, layer.w2), N)
        if layer.moe:
            hook = layer.store_hook and ctypes.addressof(layer.store_hook)
            if ffn_gemms:
                status = prompt.experts(layer, h, out, args.top_k, logits[index], ids[index], mix[index], hook)
            else:
                status = lib.mx_moe(h.data_ptr(), N, layer.router.ref, layer.w1.ref, layer.w3.ref, layer.w2.ref,
                                    args.top_k, layer.first, layer.held, out.data_ptr(), logits[index].data_ptr(),
                                    ids[index].data_ptr(), mix[index].data_ptr(), hook, step)
            if status:
                raise store_error(native.store) if status == -5 else MemoryError(
                    "native mixture of experts: out of memory")
        elif ffn_gemms:
            out += prompt.dense_mlp(layer, h)
        else:
            gate, up = layer.w1.linear(h, per_row=step), layer.w3.linear(h, per_row=step)
            layer.w2.linear(F.silu(gate) * up, out=out, accumulate=True, per_row=step)
        _join(x, out, split)


def _join(x: torch.Tensor, out: torch.Tensor, split: Split | None) -> None:
    """A split model's part of a block's output, summed over the processes and added to x (in one process the
    block added to x itself: out is x)."""
    if split is not None:
        split.reduce(out)
        x += out
