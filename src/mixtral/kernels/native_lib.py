"""Our C kernels (csrc/cpu_kernels.c) as a library: compiled, loaded, bound and checked once per process.

The library is compiled on first use with the system C compiler (about a second) into the cache directory
(paths.cache_dir), keyed by everything the build depends on, checked against torch on a probe, and used only
where it passed: otherwise models run on fbgemm (fbgemm.py) or plain torch. `MIXTRAL_NATIVE=0` turns it off;
`MIXTRAL_AVX512=0` takes our kernels' paths of a CPU without AVX-512 (AVX2 only) on one that has it, read once per
process: no AVX-512 flag is seen (`cpu_flags`), so prompts stay on the exact kernels unless MIXTRAL_PROMPT forces the
GEMMs (then oneDNN's), and the C side runs none of its AVX-512 kernels (mx_forbid_avx512: decode rows, the prompt
path's GEMMs, attention and int8/int4 widening). ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 hold ATen's
kernels and oneDNN to AVX2 as well (MKL and fbgemm still choose their own): how `make test` runs the kernels' tests
as on an AVX2-only CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..paths import cache_dir
from ..quantize import QuantLinear

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BF16, I8, I4 = 1, 3, 4

_state: dict = {}


class Weight(ctypes.Structure):
    """A weight as the C side reads it (weight_t in cpu_kernels.c)."""

    _fields_ = [("data", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("fmt", ctypes.c_int64),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("expert_stride", ctypes.c_int64), ("scale_stride", ctypes.c_int64),
                ("slots", ctypes.c_void_p), ("slot_scales", ctypes.c_void_p),  # per-expert addresses (offload.py)
                ("scale_fmt", ctypes.c_int64),  # int4 scales: FORMATS[bf16] or, from a GGUF's blocks, FORMATS[fp16]
                ("offsets", ctypes.c_void_p)]  # int4 group offsets, as the scales (a GGUF's Q4_K / Q4_1), or None


# int fetch(layer, needed, n_needed, guessed, n_guessed): store_t's callback (offload.py)
FETCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                         ctypes.POINTER(ctypes.c_int64), ctypes.c_int64)


class Store(ctypes.Structure):
    """A layer's expert store as the C side calls it (store_t in cpu_kernels.c)."""

    _fields_ = [("fetch", FETCH), ("layer", ctypes.c_int64), ("next_router", ctypes.c_void_p),
                ("next_top_k", ctypes.c_int64)]


class Layer(ctypes.Structure):
    """One decoder block as the C side reads it (layer_t in cpu_kernels.c)."""

    _fields_ = [*((name, Weight) for name in ("q", "k", "v", "o", "router", "w1", "w3", "w2")),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("eps", ctypes.c_double),
                ("theta", ctypes.c_double), ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("window", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("store", ctypes.c_void_p)]


@functools.cache
def avx512_allowed() -> bool:
    """False with MIXTRAL_AVX512=0 (read once): our kernels then take an AVX2-only CPU's paths (the module's
    docstring)."""
    return os.environ.get("MIXTRAL_AVX512", "1") != "0"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), without the AVX-512 and AMX ones
    where those are turned off (`avx512_allowed`)."""
    try:
        flags = frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()
    return flags if avx512_allowed() else frozenset(f for f in flags if not f.startswith(("avx512", "amx")))


def _cpu_supported() -> str | None:
    """None when this CPU can run the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 (this is {platform.machine()})"
    flags = cpu_flags()
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
    sizes = (ctypes.c_int64 * 3)()
    if hasattr(lib, "mx_struct_sizes"):
        lib.mx_struct_sizes.argtypes = [ptr]
        lib.mx_struct_sizes(sizes)
    ours = [ctypes.sizeof(Weight), ctypes.sizeof(Store), ctypes.sizeof(Layer)]
    if list(sizes) != ours:  # a source from another version (bench/decode_batch.py --compare builds any)
        raise RuntimeError(f"{SOURCE.name} describes its weights, stores and layers in {list(sizes)} bytes, this "
                           f"version of mixtral in {ours}: it is another version's source")
    lib.mx_linear.argtypes = [p, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.mx_linear.restype = ctypes.c_int
    lib.mx_linear_rows.argtypes = lib.mx_linear.argtypes
    lib.mx_linear_rows.restype = ctypes.c_int
    lib.mx_moe.argtypes = [ptr, i64, p, p, p, p, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_void_p, ctypes.c_int]
    lib.mx_moe.restype = ctypes.c_int
    lib.mx_route.argtypes = [ptr, i64, p, i64, ptr, ptr, ptr, ctypes.c_void_p]
    lib.mx_route.restype = ctypes.c_int
    lib.mx_bf16_supported.argtypes = []
    lib.mx_bf16_supported.restype = ctypes.c_int
    lib.mx_to_bf16.argtypes = [p, i64, i64, i64, ptr]
    lib.mx_to_bf16.restype = ctypes.c_int
    lib.mx_quantize_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
    lib.mx_quantize_rows.restype = None
    lib.mx_vnni_supported.argtypes = []
    lib.mx_vnni_supported.restype = ctypes.c_int
    lib.mx_gemm_i8.argtypes = [p, i64, ptr, ptr, i64, ptr]
    lib.mx_gemm_i8.restype = ctypes.c_int
    lib.mx_gemm_bf16.argtypes = [p, i64, ptr, i64, ptr, i64]
    lib.mx_gemm_bf16.restype = ctypes.c_int
    lib.mx_expert_bf16.argtypes = [p, p, p, i64, ptr, i64, ptr, i64]
    lib.mx_expert_bf16.restype = ctypes.c_int
    lib.mx_attention.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, ptr]
    lib.mx_attention.restype = ctypes.c_int
    lib.mx_prompt_attention.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr]
    lib.mx_prompt_attention.restype = ctypes.c_int
    lib.mx_rmsnorm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr]
    lib.mx_rmsnorm.restype = None
    lib.mx_decode.argtypes = [ctypes.POINTER(Layer), i64, p, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr,
                              ptr, ptr, ptr, ctypes.c_float, p, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.mx_decode.restype = ctypes.c_int
    lib.mx_logsumexp.argtypes = [ptr, i64, i64, ptr]
    lib.mx_logsumexp.restype = None
    lib.mx_argmax.argtypes = [ptr, i64, i64, ptr]
    lib.mx_argmax.restype = None
    lib.mx_hugepages.argtypes = [ptr, i64, ctypes.c_int]
    lib.mx_hugepages.restype = i64
    lib.mx_move.argtypes = [ptr, ptr, i64, ctypes.c_int]
    lib.mx_move.restype = None
    lib.mx_release_threads.argtypes = []
    lib.mx_release_threads.restype = None
    lib.mx_use_avx512.argtypes = [ctypes.c_int]
    lib.mx_use_avx512.restype = ctypes.c_int
    if not avx512_allowed() and hasattr(lib, "mx_forbid_avx512"):  # (an older source, timed by a bench, has none)
        lib.mx_forbid_avx512.argtypes = []
        lib.mx_forbid_avx512.restype = None
        lib.mx_forbid_avx512()  # (the C side's own checks too: mx_to_bf16 asks mx_bf16_supported)
    _state["avx512"] = bool(lib.mx_use_avx512(int(avx512_allowed())))
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


def sync_threads() -> None:
    """OpenMP's thread count is per calling thread (a server runs the model on its own): use torch's."""
    threads = torch.get_num_threads()
    if _state.get("threads") != threads:
        library().mx_set_num_threads(threads)
        _state["threads"] = threads


def available() -> bool:
    return library() is not None


def release_threads() -> None:
    """Let this thread's idle OpenMP workers go, before another thread runs the model (the engine's worker): with
    them idle beside that thread's own, libgomp sees more threads than CPUs and stops spinning between parallel
    regions, which made every region a futex wake-up (cpu_kernels.c: mx_release_threads). Harmless: a later
    parallel region on this thread starts its workers again."""
    if available():
        library().mx_release_threads()


def avx512_rows() -> bool:
    """Whether bf16 one-row products (decode steps) run on 512-bit vectors here (the CPU has AVX-512 F/BW/DQ and
    MIXTRAL_AVX512 is not 0)."""
    return available() and _state.get("avx512", False)


def will_run(device) -> bool:
    """Whether `prepare` will put a model on `device` on these kernels (unless one of its weights has none)."""
    return (torch.device(device).type == "cpu" and os.environ.get("MIXTRAL_NATIVE", "1") != "0"
            and available())


def unavailable_reason() -> str | None:
    library()
    return _state["reason"]



# ---- the probe ------------------------------------------------------------------------------------------

def _probe() -> bool:
    """The library's matmul agrees with torch for each weight format (run once, when it is first loaded)."""

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 36, 80, generator=gen) * 0.1  # 2 experts, rows not a multiple of 4
    x = torch.randn(3, 80, generator=gen)
    candidates = [weight, weight.bfloat16(), weight.half(), QuantLinear.from_weight(weight, 8, pack=False),
                  *(QuantLinear.from_weight(weight, 4, group, pack=False) for group in (16, 32, 32))]
    held = candidates[-1]  # as a GGUF file's Q4_K blocks are held: fp16 scales and an offset per group
    held.scales = held.scales.half()
    held.offsets = (torch.randn(held.scales.shape, generator=gen) * held.scales.float()).half()
    # as its Q8_0 blocks are held: int8 with an fp16 scale per group of 32 columns (160: five groups)
    q8 = QuantLinear.from_weight(torch.randn(2, 36, 160, generator=gen), 8, pack=False)
    q8.scales = (torch.rand(2, 36, 5, generator=gen) * 0.01 + 0.001).half()
    _state["lib"].mx_set_num_threads(torch.get_num_threads())
    _state["threads"] = torch.get_num_threads()
    for candidate in [*candidates, q8]:
        reference = (candidate.dequantize() if isinstance(candidate, QuantLinear) else candidate).float()
        native, inputs = NativeWeight(candidate), x if candidate is not q8 else torch.randn(3, 160, generator=gen)
        for rows in (3, 1):  # the tiled kernels, and batch 1's
            out = torch.empty(rows, 36)
            _state["lib"].mx_linear(native.ref, 1, inputs.data_ptr(), rows, inputs.shape[1], out.data_ptr(), 36, 0)
            if not torch.allclose(out, inputs[:rows] @ reference[1].T, atol=1e-4, rtol=1e-4):
                return False
    return True


# ---- weights ------------------------------------------------------------------------------------------

def to_canonical(layer) -> None:
    """A quantize.QuantLinear in torch's int4 kernel layout back to quantize.py's own (what the C side reads)."""
    if layer.layout != "canonical":
        layer.qweight, layer.scales = layer.canonical()
        layer.layout = "canonical"


class NativeWeight:
    """A weight tensor or quantize.QuantLinear described for the C side (it keeps the tensors alive)."""

    def __init__(self, weight):

        if isinstance(weight, nn.Module) and not isinstance(weight, QuantLinear):  # nn.Linear or alike
            weight = weight.weight
        if isinstance(weight, QuantLinear):
            to_canonical(weight)
            group = weight.scale_group or 0  # int8: 0 (a scale per row) or a GGUF file's Q8_0 groups
            if weight.bits == 8 and group not in (0, 32):  # (Q8_0's groups: the only ones the kernels take)
                raise TypeError(f"no native kernel for int8 in groups of {group} (only 32, a GGUF file's Q8_0)")
            half = group and weight.scales.dtype == torch.float16  # a GGUF file's blocks' scales
            data = weight.qweight.contiguous()
            scales = weight.scales.to(torch.float16 if half else torch.bfloat16).contiguous()
            offsets = None if weight.offsets is None else weight.offsets.to(scales.dtype).contiguous()
            n, k = weight.out_features, weight.in_features
            fmt = I8 if weight.bits == 8 else I4
            stacked = weight.n_experts is not None
        else:
            data, scales, offsets = weight.detach().contiguous(), None, None
            if data.dtype not in FORMATS:
                raise TypeError(f"no native kernel for {data.dtype} weights")
            n, k = data.shape[-2:]
            fmt, group = FORMATS[data.dtype], 0
            stacked = data.dim() == 3
        per_expert = data[0].numel() if stacked else 0  # elements (int4: bytes, one per two codes)
        self.tensors = (data, scales, offsets)
        self.struct = Weight(data.data_ptr(), 0 if scales is None else scales.data_ptr(), fmt, n, k, group,
                             per_expert, 0 if scales is None or not stacked else scales[0].numel(), None, None,
                             FORMATS[torch.bfloat16 if scales is None else scales.dtype],
                             None if offsets is None else offsets.data_ptr())
        self.ref = ctypes.pointer(self.struct)
        self.n, self.k = n, k

    def linear(self, x: torch.Tensor, expert: int = 0, out: torch.Tensor | None = None,
               accumulate: bool = False, per_row: bool = False) -> torch.Tensor:
        """x (M, K) fp32 contiguous -> x @ W^T (M, N), into `out` (added to it when `accumulate`). `per_row`:
        each row as a decode step computes it (the same numbers for a row alone or among others)."""
        M = x.shape[0]
        sync_threads()
        if out is None:
            out = torch.empty(M, self.n)
        if x.dtype != torch.float32 or x.stride(-1) != 1 or out.dtype != torch.float32 or out.stride(-1) != 1:
            raise TypeError("native linear takes fp32 rows with contiguous columns")
        run = library().mx_linear_rows if per_row else library().mx_linear
        if run(self.ref, expert, x.data_ptr(), M, x.stride(0), out.data_ptr(), out.stride(0), int(accumulate)):
            raise MemoryError("native linear: out of memory")
        return out


# ---- per-row helpers -------------------------------------------------------------------------------------

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
    ties; 0 when no entry is above -inf), what a decode step reports as `DecodeSession.best`."""
    return _per_row("argmax", x, torch.int64)
