"""What fits in a memory budget, before anything is loaded: the plan `load(max_memory=...)` follows and
`mixtral info --memory` prints.

The budget is the whole process's memory (what a memory cgroup or the OOM killer counts): the Python runtime
already in memory, the weights that stay resident (everything but the experts: attention, routers, norms, the
embedding and the output head), the KV cache for `context` tokens of `batch` sequences (fp32, as the CPU kernels
keep it), working buffers, and whatever is left as an expert cache of whole experts. When every expert fits
there is nothing to plan: the model loads as usual. Otherwise the experts stay on disk (kernels/offload.py).

Expected numbers, for decoding one sequence: the hit rate of the expert cache when the routing is uniform (each
layer's share of the slots over its experts: real routing has some locality, so this is a floor), the bytes read
from disk per token for the misses, and a tokens/s bound from this machine's measured disk and RAM bandwidth:
every token reads its misses from disk and streams its active weights from RAM.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .config import ModelArgs
from .errors import MixtralError
from .paths import cache_dir

PROMPT_CHUNK = 1024  # prompt tokens per forward pass (generate.PREFILL_CHUNK; the engine takes 256)
DEFAULT_CONTEXT = 4096  # KV-cache positions planned for when a budget is set and no context is given
PAGE = 4096  # expert slots keep each tensor page-aligned (kernels/offload.py)


def parse_size(text: str | int | float, zero: bool = False) -> int:
    """"16GB", "12GiB", "900MiB", "1.5G", 2e9 -> bytes (GB = 1e9, GiB = 2**30; a bare G means GiB, as `free -g`).
    `zero`: 0 is a size too (a setting that turns something off)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or (text == 0 and not zero):
            raise MixtralError(f"a memory size must be positive, got {text}")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text), re.IGNORECASE)
    if not match or (float(match[1]) <= 0 and not zero):
        raise MixtralError(f"cannot read {text!r} as a memory size; write e.g. 16GB, 12GiB or 900MiB")
    unit, suffix = match[2].lower(), match[3].lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" else 1024  # GB: decimal; GiB and a bare G: binary
    return int(float(match[1]) * base ** power)


def size_text(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def process_bytes() -> int:
    """This process's resident memory now (the runtime a plan starts from)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 400 << 20  # about what Python with torch imported takes


@dataclass(frozen=True)
class Weights:
    """A model's weights split the way offloading splits them, in the format they will be held in."""

    resident: int  # bytes that stay in memory
    expert: int  # bytes of one expert as read from disk
    expert_slot: int  # bytes of one expert's cache slot (each tensor page-aligned)
    active: int  # bytes a decoded token reads (resident matrices + top_k experts per layer)
    experts: int  # experts of all layers
    per_layer: int  # experts per layer
    top_k: int
    moe_layers: int


def model_weights(args: ModelArgs, quantization: dict | None, dtype: torch.dtype,
                  int8_weights: frozenset[str] = frozenset(), offset_weights: frozenset[str] = frozenset(),
                  q8_weights: frozenset[str] = frozenset()) -> Weights:
    """Sizes from the architecture and the quantization settings alone (no checkpoint read). `int8_weights`: the
    matrices held as int8 in a model otherwise held as int4 (a GGUF file's finer ones, weights.gguf_int8_weights:
    "layers.0.attn.wk.weight", "layers.0.ffn.w2"); where they make the layers differ, `expert` and `expert_slot`
    are a mean over the layers, so that all experts together are counted exactly. `offset_weights`: int4 matrices
    that also hold an offset per group (a GGUF file's Q4_K and Q4_1 ones, weights.gguf_offset_weights).
    `q8_weights`: matrices a GGUF file stores in Q8_0 blocks (weights.gguf_q8_weights): those held as int8 keep a
    scale per group of 32."""
    D, hidden, E = args.dim, args.hidden_dim, max(args.n_experts, 1)
    item = dtype.itemsize

    def matrix(n: int, k: int, bits: int | None, offsets: bool = False, q8: bool = False) -> tuple[int, int]:
        """(codes or values, scales and offsets) bytes"""
        if bits == 8:
            return n * k, n * (k // 32 if q8 else 1) * 2
        if bits == 4:
            group = quantization["group_size"]
            groups = math.ceil(k / group)
            return n * groups * group // 2, n * groups * 2 * (2 if offsets else 1)
        return n * k * item, 0

    bits = quantization["bits"] if quantization else None
    head_bits = 8 if quantization and quantization.get("lm_head") else None
    moe = args.is_moe
    hd = args.head_dim

    def held(name: str) -> tuple[int | None, bool, bool]:  # (bits, offsets, Q8_0 blocks)
        return (8 if bits and name in int8_weights else bits), name in offset_weights, name in q8_weights

    attention, experts, slots = [], [], []
    for i in range(args.n_layers):
        attention.append(sum(sum(matrix(n, k, *held(f"layers.{i}.attn.{w}.weight"))) for w, n, k in (
            ("wq", args.n_heads * hd, D), ("wk", args.n_kv_heads * hd, D), ("wv", args.n_kv_heads * hd, D),
            ("wo", D, args.n_heads * hd))))
        parts = [matrix(n, k, *held(f"layers.{i}.ffn.{w}" + ("" if moe else ".weight")))
                 for w, n, k in (("w1", hidden, D), ("w3", hidden, D), ("w2", D, hidden))]
        experts.append(sum(a + b for a, b in parts))
        slots.append(sum(-(-a // PAGE) * PAGE + -(-b // PAGE) * PAGE for a, b in parts))
    expert, slot = -(-sum(experts) // args.n_layers), -(-sum(slots) // args.n_layers)  # (alike unless int8_weights)
    per_layer = [a + (D * E * item if moe else 0) + 2 * D * 4 for a in attention]
    embedding = args.vocab_size * D * item
    head = 0 if args.tie_embeddings and not head_bits else sum(matrix(args.vocab_size, D, head_bits,
                                                                      q8="lm_head.weight" in q8_weights))
    resident = sum(per_layer) + embedding + head + D * 4
    if not moe:
        resident += sum(experts)
    top_k = args.top_k if moe else 1
    active = sum(per_layer) + top_k * sum(experts) + head + D * item
    return Weights(resident, expert, slot, active, args.n_layers * E if moe else 0, E if moe else 0, top_k,
                   args.n_layers if moe else 0)


@dataclass(frozen=True)
class Plan:
    """How a model runs within `budget` bytes (see the module docstring); `offload` is False when it all fits."""

    budget: int
    runtime: int
    resident: int
    kv_cache: int
    working: int
    expert: int
    expert_slot: int
    experts: int
    slots: int  # expert cache slots (== experts when nothing is offloaded)
    minimum: int  # the smallest budget that runs at all (one layer's experts cached)
    context: int
    batch: int
    hit_rate: float
    bytes_read_per_token: float
    tokens_per_s: float | None  # the bound, when bandwidths are known
    disk_gb_per_s: float | None
    ram_gb_per_s: float | None

    @property
    def offload(self) -> bool:
        return self.slots < self.experts

    @property
    def fits(self) -> bool:
        return self.budget >= self.minimum

    def as_dict(self) -> dict:
        return {**asdict(self), "offload": self.offload, "fits": self.fits}

    def describe(self) -> str:
        """What `mixtral info --memory` prints."""
        lines = [f"Memory plan for a budget of {size_text(self.budget)} (context {self.context:,} tokens x "
                 f"{self.batch} sequence{'s' if self.batch > 1 else ''}):",
                 f"  runtime (Python, torch)   {size_text(self.runtime)}",
                 f"  resident weights          {size_text(self.resident)}  (all but the experts)",
                 f"  KV cache (fp32)           {size_text(self.kv_cache)}",
                 f"  working buffers           {size_text(self.working)}",
                 f"  one expert                {size_text(self.expert)} on disk, "
                 f"{self.experts} experts = {size_text(self.expert * self.experts)}"]
        if not self.fits:
            lines.append(f"  does not fit: it needs at least {size_text(self.minimum)} (one layer's experts "
                         f"cached); give more memory, a shorter --context, or quantize (int4 is the smallest)")
            return "\n".join(lines)
        if not self.offload:
            spare = size_text(self.budget - self.need(self.experts))
            lines.append(f"  every expert fits: nothing is offloaded ({spare} to spare)")
        else:
            lines.append(f"  expert cache              {self.slots} of {self.experts} experts "
                         f"({size_text(self.slots * self.expert_slot)}); the rest are read from disk")
            lines.append(f"  expected hit rate         {self.hit_rate:.0%} or better (uniform routing, "
                         f"{self.slots / self.experts:.0%} of the experts cached)")
            lines.append(f"  read per token            {size_text(self.bytes_read_per_token)}")
        if self.tokens_per_s is not None:
            lines.append(f"  decode bound              {self.tokens_per_s:,.2f} tokens/s (disk "
                         f"{self.disk_gb_per_s:.2f} GB/s, RAM {self.ram_gb_per_s:.1f} GB/s, measured here)")
        return "\n".join(lines)

    def need(self, slots: int) -> int:
        return self.runtime + self.resident + self.kv_cache + self.working + slots * self.expert_slot


def plan(args: ModelArgs, quantization: dict | None, dtype: torch.dtype, budget: int, context: int | None = None,
         batch: int = 1, runtime: int | None = None, bandwidth: tuple[float, float] | None = None,
         int8_weights: frozenset[str] = frozenset(), offset_weights: frozenset[str] = frozenset(),
         q8_weights: frozenset[str] = frozenset()) -> Plan:
    """The plan for `args` (quantized as `quantization`, else in `dtype`; `int8_weights`, `offset_weights`,
    `q8_weights`: see model_weights) within `budget` bytes. `runtime`: bytes the process holds already (default:
    this process's now). `bandwidth`: (disk, RAM) GB/s (default: as measured on this machine, once, by
    `measured_bandwidth`)."""
    weights = model_weights(args, quantization, dtype, int8_weights, offset_weights, q8_weights)
    context = min(args.max_seq_len, DEFAULT_CONTEXT) if context is None else context
    if context < 1 or batch < 1:
        raise MixtralError("the context and the batch must be at least 1")
    runtime = process_bytes() if runtime is None else runtime
    kv = 2 * args.n_layers * batch * args.n_kv_heads * context * args.head_dim * 4
    working = working_bytes(args, context, batch)
    fixed = runtime + weights.resident + kv + working
    slots = max(0, min(weights.experts, (budget - fixed) // weights.expert_slot)) if weights.experts else 0
    minimum = fixed + weights.per_layer * weights.expert_slot
    hit = _hit_rate(slots, weights) if weights.experts else 1.0
    read = (1 - hit) * weights.moe_layers * weights.top_k * weights.expert
    disk, ram = bandwidth if bandwidth is not None else measured_bandwidth()
    bound = 1 / (read / (disk * 1e9) + weights.active / (ram * 1e9)) if disk and ram else None
    return Plan(budget, runtime, weights.resident, kv, working, weights.expert, weights.expert_slot,
                weights.experts, slots, minimum, context, batch, hit, read, bound, disk, ram)


def working_bytes(args: ModelArgs, context: int, batch: int) -> int:
    """The largest transient memory of a forward pass, in fp32: a prompt chunk's activations through a layer
    (its residual stream, norms, q/k/v, the experts' inputs, hidden and outputs), its attention scores over the
    context, and a decode step's logits; plus 32 MiB for everything smaller."""
    tokens = min(PROMPT_CHUNK, context) * batch
    activations = tokens * (6 * args.dim + 2 * args.hidden_dim) * 4
    scores = batch * args.n_heads * min(PROMPT_CHUNK, context) * context * 4
    return activations + scores + batch * args.vocab_size * 4 + (32 << 20)


def _hit_rate(slots: int, weights: Weights) -> float:
    """The expert cache's hit rate for uniform routing: each layer holds an equal share of the slots (less the
    few kept free for prefetch; kernels/offload.py) and finds a needed expert there with probability share / E;
    a share smaller than top-k is emptied by the layer's own picks of every token."""
    if slots >= weights.experts:
        return 1.0
    usable = slots - min(weights.top_k, slots - weights.per_layer)
    base, extra = divmod(usable, weights.moe_layers)
    total = 0.0
    for share, layers in ((base + 1, extra), (base, weights.moe_layers - extra)):
        total += layers * (share / weights.per_layer if share >= weights.top_k else 0.0)
    return total / weights.moe_layers


# ---- this machine's bandwidths ----------------------------------------------------------------------

def measured_bandwidth(directory: str | os.PathLike | None = None) -> tuple[float, float]:
    """(disk read, RAM read) in GB/s: measured once (a 256 MiB file written and read back past the page cache
    in `directory`, default the cache directory; a 256 MiB sum in RAM) and kept in the cache directory."""
    record = cache_dir() / "bandwidth.json"
    try:
        found = json.loads(record.read_text())
        return float(found["disk_gb_per_s"]), float(found["ram_gb_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        disk = _disk_bandwidth(directory)
    except (OSError, AttributeError):  # no writable cache directory, or no posix_fadvise: no bound
        return 0.0, 0.0
    ram = _ram_bandwidth()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"disk_gb_per_s": disk, "ram_gb_per_s": ram}) + "\n")
    except OSError:
        pass
    return disk, ram


def _ram_bandwidth() -> float:
    data = torch.ones(64 << 20)  # 256 MiB of fp32
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def _disk_bandwidth(directory) -> float:
    """Large positioned reads of a fresh file, its pages dropped from the page cache first (what the expert store
    does: reads of 4 MiB, four at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    directory = cache_dir() if directory is None else directory
    os.makedirs(directory, exist_ok=True)
    size, chunk = 256 << 20, 4 << 20
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        block = os.urandom(chunk)
        for _ in range(size // chunk):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_DONTNEED)
        buffers = [bytearray(chunk) for _ in range(4)]

        def read(i: int) -> int:
            return os.preadv(f.fileno(), [buffers[i % 4]], i * chunk)

        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            total = sum(pool.map(read, range(size // chunk)))
        seconds = time.perf_counter() - start
    return total / seconds / 1e9
