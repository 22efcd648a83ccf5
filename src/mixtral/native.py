"""Our own CPU kernels (csrc/cpu_kernels.c): the whole forward pass of a Mixtral model on x86-64 with AVX2.

Why: at batch 1 a decode step is ~50 matrix-vector products and ~450 small torch ops. PyTorch's fastest CPU
matmuls for that shape (fbgemm, kernels.py) read weights at ~10 GB/s on this project's 2-core machine, against
~33 GB/s for a plain read, and each small op costs ~10 us of dispatch. The C kernels read weights in the
checkpoint's own format (bf16, fp16, fp32, or quantize.py's int8/int4 codes) at close to the memory's speed,
and one call does a whole decode step (the embedding, every block, the final norm, the output projection, and
each row's log-normalizer and argmax; `Decoder`).

The library is compiled on first use with the system C compiler (about a second) into a cache directory
(`MIXTRAL_CACHE_DIR`, else `$XDG_CACHE_HOME/mixtral`, else `~/.cache/mixtral`), checked against torch on a
probe, and used only where it passed: otherwise the model runs on the fbgemm kernels or plain torch.
`MIXTRAL_NATIVE=0` turns it off.

Numbers: every weight is widened to its exact fp32 value and multiplied in fp32, so the result equals an
fp32 matmul with the dequantized weights up to the order of summation; except that int8 and int4 weights at
batch 1 meet activations rounded to int16 with one scale per span of columns, 256 for int8 and one group for
int4 (error <= 2^-16 of the span's largest value). Activations and the KV cache are fp32. Routing ties (equal
router logits) may pick other experts than torch.topk, whose order for ties is unspecified.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import release_free_memory

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
I8, I4 = 3, 4

_state: dict = {}


class Weight(ctypes.Structure):
    """A weight as the C side reads it (weight_t in cpu_kernels.c)."""

    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("fmt", ctypes.c_int64),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("expert_stride", ctypes.c_int64), ("scale_stride", ctypes.c_int64)]


class Layer(ctypes.Structure):
    """One decoder block as the C side reads it (layer_t in cpu_kernels.c)."""

    _fields_ = [*((name, Weight) for name in ("q", "k", "v", "o", "router", "w1", "w3", "w2")),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("eps", ctypes.c_double),
                ("theta", ctypes.c_double), ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("window", ctypes.c_int64), ("top_k", ctypes.c_int64)]


def cache_dir() -> Path:
    if os.environ.get("MIXTRAL_CACHE_DIR"):
        return Path(os.environ["MIXTRAL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral"


def _cpu_supported() -> str | None:
    """None when this CPU can run the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 (this is {platform.machine()})"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags and not {"avx2", "fma", "f16c"} <= flags:
        return "this CPU lacks AVX2, FMA or F16C"
    if not flags and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU lacks AVX2"
    return None


def _build() -> Path:
    """Compile the library into the cache (once per source version), atomically: parallel processes may race."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    # what the library depends on: the source, the flags (fixed AVX2/FMA/F16C, not -march=native: the same build
    # is right on every CPU that passes _cpu_supported), the compiler binary and the architecture
    resolved = Path(shutil.which(compiler) or compiler).resolve()
    try:
        stat = resolved.stat()
        compiler_id = f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        compiler_id = str(resolved)
    identity = [source, " ".join(FLAGS).encode(), compiler_id.encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "mixtral-cache"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    path = _build()
    lib = ctypes.CDLL(str(path))
    p, i64, ptr = ctypes.POINTER(Weight), ctypes.c_int64, ctypes.c_void_p
    lib.mx_linear.argtypes = [p, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.mx_linear.restype = ctypes.c_int
    lib.mx_moe.argtypes = [ptr, i64, p, p, p, p, i64, ptr, ptr, ptr, ptr]
    lib.mx_moe.restype = ctypes.c_int
    lib.mx_attention.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr]
    lib.mx_attention.restype = ctypes.c_int
    lib.mx_rmsnorm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.mx_rmsnorm.restype = None
    lib.mx_decode.argtypes = [ctypes.POINTER(Layer), i64, p, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr,
                              ptr, ptr, ptr, ctypes.c_float, p, ptr, ptr, ptr]
    lib.mx_decode.restype = ctypes.c_int
    lib.mx_logsumexp.argtypes = [ptr, i64, i64, ptr]
    lib.mx_logsumexp.restype = None
    lib.mx_argmax.argtypes = [ptr, i64, i64, ptr]
    lib.mx_argmax.restype = None
    lib.mx_hugepages.argtypes = [ptr, i64, ctypes.c_int]
    lib.mx_hugepages.restype = i64
    lib.mx_move.argtypes = [ptr, ptr, i64, ctypes.c_int]
    lib.mx_move.restype = None
    lib.mx_set_num_threads.argtypes = [ctypes.c_int]
    lib.mx_set_num_threads.restype = None
    return lib


def library():
    """The loaded library, or None (see `unavailable_reason`)."""
    if "lib" not in _state:
        _state["lib"], _state["reason"] = None, None
        if os.environ.get("MIXTRAL_NATIVE", "1") == "0":
            _state["reason"] = "turned off by MIXTRAL_NATIVE=0"
        elif (reason := _cpu_supported()) is not None:
            _state["reason"] = reason
        else:
            try:
                _state["lib"] = _load()
                if not _probe():
                    _state["lib"], _state["reason"] = None, "the kernels disagreed with torch on a probe"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"], _state["reason"] = None, str(exc)
    return _state["lib"]


def _sync_threads() -> None:
    """OpenMP's thread count is per calling thread (a server runs the model on its own): use torch's."""
    threads = torch.get_num_threads()
    if _state.get("threads") != threads:
        library().mx_set_num_threads(threads)
        _state["threads"] = threads


def available() -> bool:
    return library() is not None


def will_run(device) -> bool:
    """Whether `prepare` will put a model on `device` on these kernels (unless one of its weights has none)."""
    return (torch.device(device).type == "cpu" and os.environ.get("MIXTRAL_NATIVE", "1") != "0"
            and available())


def unavailable_reason() -> str | None:
    library()
    return _state["reason"]


# ---- weights ------------------------------------------------------------------------------------------

def _to_canonical(layer) -> None:
    """A quantize.QuantLinear in torch's int4 kernel layout back to quantize.py's own (what the C side reads)."""
    if layer.layout != "canonical":
        layer.qweight, layer.scales = layer.canonical()
        layer.layout = "canonical"


class NativeWeight:
    """A weight tensor or quantize.QuantLinear described for the C side (it keeps the tensors alive)."""

    def __init__(self, weight):
        from .quantize import QuantLinear

        if isinstance(weight, nn.Linear):
            weight = weight.weight
        if isinstance(weight, QuantLinear):
            _to_canonical(weight)
            data, scales = weight.qweight.contiguous(), weight.scales.to(torch.bfloat16).contiguous()
            n, k = weight.out_features, weight.in_features
            fmt, group = (I8, 0) if weight.bits == 8 else (I4, weight.group_size)
            stacked = weight.n_experts is not None
        else:
            data, scales = weight.detach().contiguous(), None
            if data.dtype not in FORMATS:
                raise TypeError(f"no native kernel for {data.dtype} weights")
            n, k = data.shape[-2:]
            fmt, group = FORMATS[data.dtype], 0
            stacked = data.dim() == 3
        per_expert = data[0].numel() if stacked else 0  # elements (int4: bytes, one per two codes)
        self.tensors = (data, scales)
        self.struct = Weight(data.data_ptr(), 0 if scales is None else scales.data_ptr(), fmt, n, k, group,
                             per_expert, 0 if scales is None or not stacked else scales[0].numel())
        self.ref = ctypes.pointer(self.struct)
        self.n, self.k = n, k

    def linear(self, x: torch.Tensor, expert: int = 0, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
        """x (M, K) fp32 contiguous -> x @ W^T (M, N), into `out` (added to it when `accumulate`)."""
        M = x.shape[0]
        _sync_threads()
        if out is None:
            out = torch.empty(M, self.n)
        if x.dtype != torch.float32 or x.stride(-1) != 1 or out.dtype != torch.float32 or out.stride(-1) != 1:
            raise TypeError("native linear takes fp32 rows with contiguous columns")
        if library().mx_linear(self.ref, expert, x.data_ptr(), M, x.stride(0), out.data_ptr(), out.stride(0),
                               int(accumulate)):
            raise MemoryError("native linear: out of memory")
        return out


def supports(model) -> bool:
    """Whether every weight of `model` has a native kernel (on the CPU, float or quantize.py int8/int4)."""
    from .quantize import QuantLinear

    if model.device.type != "cpu" or not available():
        return False
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if isinstance(module, QuantLinear):
                continue
            if tensor.is_floating_point() and tensor.dtype not in FORMATS:
                return False
    return True


class NativeLayer:
    """A decoder block's weights for the C side: one by one (prefill) and as one Layer struct (decode)."""

    def __init__(self, block, args):
        from .model import MoE

        attn, ffn = block.attn, block.ffn
        self.q, self.k, self.v, self.o = (NativeWeight(w) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
        self.moe = isinstance(ffn, MoE)
        self.router = NativeWeight(ffn.router) if self.moe else None
        self.w1, self.w3, self.w2 = (NativeWeight(w) for w in (ffn.w1, ffn.w3, ffn.w2))
        self.attn_norm, self.ffn_norm = block.attn_norm.weight, block.ffn_norm.weight  # fp32 by now
        self.struct = Layer(self.q.struct, self.k.struct, self.v.struct, self.o.struct,
                            self.router.struct if self.moe else Weight(), self.w1.struct, self.w3.struct,
                            self.w2.struct, self.attn_norm.data_ptr(), self.ffn_norm.data_ptr(),
                            block.attn_norm.eps, args.rope_theta, args.n_heads, args.n_kv_heads, args.head_dim,
                            args.sliding_window or 0, args.top_k if self.moe else 0)


class NativeModel:
    """What the forward pass needs from a model, described once for the C side."""

    def __init__(self, model):
        self.layers = [NativeLayer(block, model.args) for block in model.layers]
        self.structs = (Layer * len(self.layers))(*(layer.struct for layer in self.layers))  # for mx_decode
        self.embed = NativeWeight(model.embed.weight)
        self.lm_head = NativeWeight(model.lm_head)
        self.n_experts = next((layer.router.n for layer in self.layers if layer.moe), 0)  # 0: no MoE layer
        self.decoders = weakref.WeakKeyDictionary()  # KVCache -> its Decoder, for decode steps through forward()

    def decoder(self, model, cache) -> Decoder:
        """The Decoder that `forward` uses for `cache` (made on first use, kept while the cache lives)."""
        decoder = self.decoders.get(cache)
        if decoder is None:
            decoder = self.decoders[cache] = Decoder(model, cache, own_logits=False)
        return decoder


def prepare(model) -> bool:
    """Run `model` on the native kernels from now on (in place): norms to fp32, activations fp32, weights moved
    onto 2 MiB pages where the OS allows. Returns whether it did (False when the kernels are unavailable or some
    weight has none)."""
    from .model import RMSNorm
    from .quantize import QuantLinear

    if not will_run(model.device) or getattr(model, "native", None) is not None or not supports(model):
        return False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.float()
            if isinstance(module, QuantLinear):
                _to_canonical(module)
    release_free_memory()  # the int4 codes in torch's layout
    _move_to_huge_pages(model)
    model.native = NativeModel(model)
    model.packed = True  # activations and the KV cache in fp32
    return True


HUGE_PAGE = 2 << 20


def _move_to_huge_pages(model) -> int:
    """Move every weight into one buffer backed by 2 MiB pages (cpu_kernels.c: mx_hugepages), as views of it;
    returns the bytes moved (0 where transparent huge pages are off: nothing changes). One buffer, unlike advising
    each tensor, also covers the small attention weights and the ends of the large ones. A tensor that nothing
    but the model holds gives its pages back as they are copied (mx_move), so the move never holds two copies
    of one; any other is copied whole and freed after."""
    slots: dict[int, list] = {}  # id(tensor) -> the (table, name) places that hold it (a tied head: two)
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is not None and tensor.numel() and tensor.is_contiguous() and tensor.storage_offset() == 0
                        and tensor.untyped_storage().nbytes() == tensor.nbytes):
                    tensors.setdefault(id(tensor), tensor)
                    slots.setdefault(id(tensor), []).append((table, name))
    sizes = {key: -(-tensor.nbytes // 4096) * 4096 for key, tensor in tensors.items()}
    total = sum(sizes.values())
    if total < HUGE_PAGE:
        return 0
    whole_pages = -(-total // HUGE_PAGE) * HUGE_PAGE
    arena = torch.empty(whole_pages + HUGE_PAGE, dtype=torch.uint8)  # not written yet: no memory used
    start = -arena.data_ptr() % HUGE_PAGE
    if library().mx_hugepages(arena.data_ptr() + start, whole_pages, 0) == 0:
        return 0
    offset = start
    with torch.no_grad():
        for key in list(tensors):
            old, places = tensors.pop(key), slots.pop(key)
            new = arena[offset:offset + old.nbytes].view(old.dtype).view(old.shape)
            # held only by `old`, getrefcount's argument and the model's slots; its storage only by `old` and the
            # temporary storage object asked about
            owned = (sys.getrefcount(old) == 2 + len(places)
                     and torch._C._storage_Use_Count(old.untyped_storage()._cdata) == 2)
            library().mx_move(new.data_ptr(), old.data_ptr(), old.nbytes, int(owned))
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for table, name in places:
                table[name] = new
            offset += sizes[key]
            del old, new
            release_free_memory()
    return total


# ---- the forward pass ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(M, D) fp32 contiguous -> normalized (M, D)."""
    out = torch.empty_like(x)
    library().mx_rmsnorm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def _per_row(name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One value per row of an fp32 (M, N) tensor from the C side's `mx_<name>`."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise TypeError(f"native {name} takes a 2-D fp32 tensor")
    x = x.contiguous()  # held while the C side reads it
    out = torch.empty(x.shape[0], dtype=dtype)
    getattr(library(), f"mx_{name}")(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(row))) of each row of an fp32 (M, N) tensor: what log-softmax subtracts (in fp64)."""
    return _per_row("logsumexp", x, torch.float64)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The greedy choice of each row of an fp32 (M, N) tensor: its argmax with NaN counted as -inf (the first on
    ties; 0 when no entry is above -inf), what a decode step reports as `Decoder.best`."""
    return _per_row("argmax", x, torch.int64)


def forward(model, input_ids, input_pos, cache, n_keys, logits_at, routing, slots) -> torch.Tensor:
    """Transformer.forward (same arguments and result) on the native kernels."""
    native, args = model.native, model.args
    _sync_threads()
    B, T = input_ids.shape
    N, D = B * T, args.dim
    if input_pos is None:
        input_pos = torch.arange(T).expand(B, T)
    if T == 1 and cache is not None and decodes(model, cache) and not _has_hooks(model.embed):
        decoder = native.decoder(model, cache)
        rows = range(B) if slots is None else slots.tolist()
        return decoder.step(input_ids[:, 0].tolist(), input_pos[:, 0].tolist(), rows, routing, fresh=True)[:, None]
    x = model.embed(input_ids).reshape(N, D).float().contiguous()  # the residual stream, updated in place
    E = native.n_experts
    K = args.top_k if E else 0
    logits = torch.empty(len(native.layers), N, E)  # what each router did, for `routing`
    ids, mix = torch.empty(len(native.layers), N, K, dtype=torch.int64), torch.empty(len(native.layers), N, K)
    _prefill_layers(model, x, B, T, input_pos, cache, n_keys, slots, logits, ids, mix)
    if routing is not None:
        routing.extend(_routing(native, logits, ids, mix, B, T))
    x = x.view(B, T, D)
    if logits_at is not None:
        x = x[torch.arange(B), logits_at][:, None]  # (B, 1, D)
    rows = x.shape[0] * x.shape[1]
    h = rms_norm(x.reshape(rows, D).contiguous(), model.norm.weight, model.norm.eps)
    return native.lm_head.linear(h).view(x.shape[0], x.shape[1], -1)


def _routing(native, logits, ids, mix, B, T) -> list:
    from .model import Routing

    E, K = logits.shape[-1], ids.shape[-1]
    return [Routing(logits[i].view(B, T, E), ids[i].view(B, T, K), mix[i].view(B, T, K))
            for i, layer in enumerate(native.layers) if layer.moe]


def decodes(model, cache) -> bool:
    """Whether decode steps of `model` against `cache` can run as one call to the C side (a `Decoder`)."""
    return (getattr(model, "native", None) is not None and cache.keys[0].dtype == torch.float32
            and cache.keys[0].is_contiguous())


def _has_hooks(module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def hooked(model) -> bool:
    """Whether forward hooks are registered on `model`, its embedding (which the step used to call) or every
    module: then each decode step goes through `model(...)`, so that they run, and not straight to a `Decoder`."""
    return (_has_hooks(model) or _has_hooks(model.embed) or bool(nn.modules.module._global_forward_pre_hooks)
            or bool(nn.modules.module._global_forward_hooks))


class Decoder:
    """Decode steps against one KV cache, one C call each (cpu_kernels.c: mx_decode): the embedding, every block,
    the final norm, the output projection, and each row's log-normalizer and greedy choice.

    A decode step of a small model is a few milliseconds, and the Python around it runs on cold caches (the step
    streams more weights than the caches hold): each torch op there cost 20-200 us, ~1 ms a step in all. So the
    inputs go in through ctypes arrays, the buffers are allocated once, and `lse` and `best` come back with the
    logits, for the caller to skip the torch ops it would otherwise run on them.

    `step` returns (B, V) logits in the decoder's own buffer, valid until the next step (unless `fresh`; a
    decoder made with `own_logits=False` only makes fresh ones). Like the cache it writes, a decoder is stepped by
    one thread at a time.
    """

    def __init__(self, model, cache, own_logits: bool = True):
        native, args = model.native, model.args
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
        cache = self._cache()
        if cache is None:
            raise ValueError("this decoder's KV cache is gone")
        self._follow(cache)
        _sync_threads()
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
        status = library().mx_decode(
            self.native.structs, L, self.native.embed.ref, self.tokens, pointers["x"], B, self.positions, self.rows,
            self.cache_rows, self._keys, self._values, self.max_seq_len, E, K, *router, pointers["norm"],
            self.norm_eps, self.native.lm_head.ref, out_at, self.lse_out, self.best_out)
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

    def logit(self, row: int, token: int) -> float:
        """The last step's logit of `token` in row `row` (of a step that was not `fresh`)."""
        return float(self._out_array[row, token])


def _decode_error(status: int, tokens, positions, rows, decoder) -> Exception:
    if status == -2:
        return IndexError(f"token ids {list(tokens)} are outside the vocabulary of {decoder.native.embed.n}")
    if status == -3:
        return IndexError(f"positions {list(positions)} are outside the KV cache's {decoder.max_seq_len} positions")
    if status == -4:
        rows = range(len(tokens)) if rows is None else rows
        return IndexError(f"cache rows {list(rows)} are outside the KV cache's {decoder.cache_rows} rows")
    return MemoryError("native decode: out of memory")


def _prefill_layers(model, x, B, T, input_pos, cache, n_keys, slots, logits, ids, mix) -> None:
    """Several tokens per sequence: attention by torch (SDPA), every matmul and the experts by the C side."""
    from .model import apply_rope, attention_mask, rope_cos_sin

    lib, args = library(), model.args
    N, H, G, Dh = B * T, args.n_heads, args.n_kv_heads, args.head_dim
    n_keys = T if cache is None else (cache.max_seq_len if n_keys is None else n_keys)
    mask = attention_mask(input_pos, n_keys, args.sliding_window)
    cos, sin = rope_cos_sin(input_pos, Dh, args.rope_theta, torch.float32)
    cos, sin = cos[:, :, None], sin[:, :, None]
    for index, layer in enumerate(model.native.layers):
        h = rms_norm(x, layer.attn_norm, args.norm_eps)
        qkv = torch.empty(N, (H + 2 * G) * Dh)
        layer.q.linear(h, out=qkv[:, :H * Dh])
        layer.k.linear(h, out=qkv[:, H * Dh:(H + G) * Dh])
        layer.v.linear(h, out=qkv[:, (H + G) * Dh:])
        qkv = qkv.view(B, T, H + 2 * G, Dh)
        q, k = apply_rope(qkv[:, :, :H + G], cos, sin).split((H, G), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, H + G:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(index, input_pos, k, v, n_keys, slots)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G != H)  # (B, H, T, Dh)
        layer.o.linear(y.transpose(1, 2).reshape(N, H * Dh).contiguous(), out=x, accumulate=True)
        h = rms_norm(x, layer.ffn_norm, args.norm_eps)
        if layer.moe:
            status = lib.mx_moe(h.data_ptr(), N, layer.router.ref, layer.w1.ref, layer.w3.ref, layer.w2.ref,
                                args.top_k, x.data_ptr(), logits[index].data_ptr(), ids[index].data_ptr(),
                                mix[index].data_ptr())
            if status:
                raise MemoryError("native mixture of experts: out of memory")
        else:
            layer.w2.linear(F.silu(layer.w1.linear(h)) * layer.w3.linear(h), out=x, accumulate=True)


# ---- the probe ------------------------------------------------------------------------------------------

def _probe() -> bool:
    """The library's matmul agrees with torch for each weight format (run once, when it is first loaded)."""
    from .quantize import QuantLinear

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 36, 80, generator=gen) * 0.1  # 2 experts, rows not a multiple of 4
    x = torch.randn(3, 80, generator=gen)
    candidates = [weight, weight.bfloat16(), weight.half(), QuantLinear.from_weight(weight, 8, pack=False),
                  *(QuantLinear.from_weight(weight, 4, group, pack=False) for group in (16, 32))]
    _state["lib"].mx_set_num_threads(torch.get_num_threads())
    _state["threads"] = torch.get_num_threads()
    for candidate in candidates:
        reference = (candidate.dequantize() if isinstance(candidate, QuantLinear) else candidate).float()
        native = NativeWeight(candidate)
        for rows in (3, 1):  # the tiled kernels, and batch 1's
            out = torch.empty(rows, 36)
            _state["lib"].mx_linear(native.ref, 1, x.data_ptr(), rows, 80, out.data_ptr(), 36, 0)
            if not torch.allclose(out, x[:rows] @ reference[1].T, atol=1e-4, rtol=1e-4):
                return False
    return True
