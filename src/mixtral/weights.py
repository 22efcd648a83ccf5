"""Checkpoints on disk <-> the model: Hugging Face tensor names, stacked experts, sharded safetensors.

Loading builds the model on the meta device (no memory), then fills it tensor by tensor from safetensors files
(read with plain reads, one tensor at a time), casting to the requested dtype, so RAM never holds a second full
copy of the weights.
Only safetensors are read: pickled `.bin` / `.pt` files can run arbitrary code when loaded and are refused.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Collection, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import gguf_file, quantize
from .config import ModelArgs
from .errors import MixtralError
from .memory import release_free_memory
from .model import Transformer
from .paths import atomic_path, write_atomic

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Hugging Face name (per-layer part) -> our name. Experts and transformers-5 fused experts are handled apart.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "block_sparse_moe.gate.weight": "ffn.router.weight",
    "mlp.gate.weight": "ffn.router.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
# GGUF (llama.cpp) name -> Hugging Face name (GGUF files: gguf_file.py): per-layer part, and how the tensor is laid out
# ("q"/"k": rows reordered for llama.cpp's RoPE; "experts": merged (E, N, K), one Hugging Face tensor per expert).
_GGUF_LAYER_NAMES = {
    "attn_q.weight": ("self_attn.q_proj.weight", "q"),
    "attn_k.weight": ("self_attn.k_proj.weight", "k"),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "attn_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "ffn_gate_inp.weight": ("block_sparse_moe.gate.weight", None),
    "ffn_gate_exps.weight": ("block_sparse_moe.experts.{expert}.w1.weight", "experts"),
    "ffn_up_exps.weight": ("block_sparse_moe.experts.{expert}.w3.weight", "experts"),
    "ffn_down_exps.weight": ("block_sparse_moe.experts.{expert}.w2.weight", "experts"),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),  # dense models
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_GGUF_OLD_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")  # files converted before experts were merged
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def gguf_to_hf(name: str) -> tuple[str, str | None] | None:
    """The Hugging Face name of a GGUF tensor and its layout (see _GGUF_LAYER_NAMES), or None for a name we do not
    know."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name], None
    if not (m := _GGUF_LAYER.fullmatch(name)):
        return None
    prefix = f"model.layers.{m[1]}."
    if old := _GGUF_OLD_EXPERT.fullmatch(m[2]):
        which = {"gate": "w1", "up": "w3", "down": "w2"}[old[1]]
        return f"{prefix}block_sparse_moe.experts.{old[2]}.{which}.weight", None
    if m[2] in _GGUF_LAYER_NAMES:
        hf, kind = _GGUF_LAYER_NAMES[m[2]]
        return prefix + hf, kind
    return None


def ours_to_gguf(name: str) -> tuple[str, str | None]:
    """The GGUF name and layout (as gguf_to_hf gives them) of one of our weights: the inverse of the two mappings
    above, our stacked (E, N, K) experts as one merged tensor."""
    if name in _TOP_NAMES.values():
        hf = next(k for k, v in _TOP_NAMES.items() if v == name)
        return next(g for g, h in _GGUF_TOP_NAMES.items() if h == hf), None
    layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    if _STACKED.fullmatch(name):
        hf = f"block_sparse_moe.experts.{{expert}}.{rest[4:]}.weight"
    else:
        hf = next(h for h, ours in _LAYER_NAMES.items() if ours == rest and not h.startswith("mlp.gate."))
    gguf = next(g for g, (h, _) in _GGUF_LAYER_NAMES.items() if h == hf)
    return f"blk.{layer}.{gguf}", _GGUF_LAYER_NAMES[gguf][1]


def float_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """Every weight of the model under our names, in fp32: quantized ones dequantized (stacked experts stay
    (E, N, K)); a tied lm_head only once, as embed."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, quantize.QuantLinear):
            out[path if _STACKED.fullmatch(path) else f"{path}.weight"] = module.dequantize()
    for name, tensor in model.named_parameters():
        out[name] = tensor.detach().float()
    if model.args.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise MixtralError(f"unsupported dtype {dtype!r}; choose one of float32, bfloat16, float16")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, via the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MixtralError(f"{index}: not a valid shard index ({exc})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MixtralError(f"{model_dir}: shard(s) listed in model.safetensors.index.json are missing: "
                               f"{', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise MixtralError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled[:3])}); mixtral loads safetensors only, "
            "because unpickling a file can run arbitrary code. Convert it once, in an environment you trust, e.g. "
            "`python -c \"from transformers import AutoModelForCausalLM as M; "
            "M.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\"`")
    raise MixtralError(f"no *.safetensors weights found in {model_dir}")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                       "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: `nbytes` bytes at byte `offset` of `path`."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def safetensors_header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """The start of a safetensors file holding `layout`'s tensors (name -> (dtype, shape)) in order, for a writer
    that writes each tensor at its place: (the bytes the file starts with, each tensor's offset in the file, the
    file's size). The data starts 8-byte aligned."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header, offsets, at = {"__metadata__": metadata}, {}, 0
    for name, (dtype, shape) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [at, at + nbytes]}
        offsets[name] = at
        at += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + at for name, at in offsets.items()}, start + at


def _bad_file(path: Path, why: str) -> MixtralError:
    return MixtralError(f"cannot read {path}: {why} (the file may be truncated or corrupted; download it again)")


def stored_tensors(path: Path) -> list[StoredTensor]:
    """Every tensor of one safetensors file, from its header (validated against the file's size; nothing else is
    read). Raises MixtralError for a malformed or truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, "no header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8 or header_len > 100_000_000:
                raise _bad_file(path, "header longer than the file")
            text = f.read(header_len)
    except OSError as exc:
        raise MixtralError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_file(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad_file(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    found = []
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(d) is int and d >= 0 for d in shape + offsets)):
            raise _bad_file(path, f"tensor {name} has an unreadable entry {info!r}")
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise MixtralError(f"cannot read {path}: tensor {name} has dtype {info.get('dtype')!r}, which mixtral "
                               f"does not read (it reads {', '.join(_SAFETENSORS_DTYPES)})")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not begin <= end <= data_size or end - begin != nbytes:  # checked before allocating anything
            raise _bad_file(path, f"tensor {name} lies outside the file or has the wrong size")
        found.append(StoredTensor(name, path, dtype, tuple(shape), data_start + begin, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in found if t.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:  # two tensors on the same bytes: a file written to confuse, not by any saver
            raise _bad_file(path, f"tensors {first} and {second} overlap")
    return found


def read_stored(entry: StoredTensor, f=None) -> torch.Tensor:
    """One tensor read into fresh memory with plain reads (no memory map: a mapping would keep the pages of
    tensors already copied resident, and a load's RSS would approach twice the weights)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if not entry.nbytes:
        return tensor
    with (open(entry.path, "rb") if f is None else nullcontext(f)) as stream:
        stream.seek(entry.offset)
        if stream.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != entry.nbytes:
            raise _bad_file(entry.path, f"tensor {entry.name} is cut short")
    return tensor


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one safetensors file, each read into its own fresh memory.
    Raises MixtralError for a malformed or truncated file."""
    entries = stored_tensors(path)
    with open(path, "rb") as f:
        for entry in entries:
            yield entry.name, read_stored(entry, f)


def _read_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for path in tqdm(files, desc="Loading weights", unit="shard", disable=not progress or len(files) < 2):
        try:
            for name, tensor in _read_safetensors(path):
                yield name, tensor
                del tensor
                release_free_memory()  # the tensors copied into the model so far, and dropped by the caller
        except (OSError, RuntimeError, MemoryError) as exc:
            raise MixtralError(f"cannot read {path}: {exc}") from None


def _read_gguf(path: Path, args: ModelArgs, progress: bool, blocks: Collection[str] = (),
               experts=None) -> Iterator[tuple[str, torch.Tensor | gguf_file.Q4Blocks | gguf_file.Q8Blocks]]:
    """(Hugging Face name, fp32 tensor) for every weight of a GGUF file (gguf_file.tensors): query/key rows back in
    Hugging Face order, merged (E, N, K) experts as one tensor per expert (with `experts`, see read_weights, only
    those of them are read). `blocks`: the types ("Q4_0", "Q8_0", ...) whose weights come as their blocks
    (gguf_file.BLOCK_TYPES), for a loader that keeps them as they are."""
    def first_dim(name: str):
        found = gguf_to_hf(name)
        if experts is None or found is None or found[1] != "experts":
            return None
        ours = target(found[0].format(expert=0), args)
        return None if ours is None else experts(ours[0])

    for name, values, start in gguf_file.tensors(path, progress, blocks, first_dim):
        known = gguf_to_hf(name)
        if known is None:
            raise MixtralError(f"{path.name}: tensor {name} is not one mixtral knows")
        hf, layout = known
        heads = {"q": args.n_heads, "k": args.n_kv_heads}.get(layout)
        if heads:
            unpermute = functools.partial(gguf_file.unpermute, heads=heads)
            values = unpermute(values) if isinstance(values, torch.Tensor) else values.rows(unpermute)
        if layout == "experts":
            for expert in range(values.shape[0]):
                yield hf.format(expert=start + expert), values[expert]
        else:
            yield hf, values


def gguf_weight_types(path: Path, args: ModelArgs) -> dict[str, set[str]]:
    """Our weights (e.g. "layers.0.attn.wq.weight", "layers.0.ffn.w1") -> the GGUF types a file stores them in
    ({"Q4_0"}; more than one only for per-expert tensors of different types)."""
    kinds: dict[str, set[str]] = {}
    for tensor in gguf_file.reader(path).tensors:
        found = gguf_to_hf(tensor.name)
        ours = found and target(found[0].format(expert=0) if found[1] == "experts" else found[0], args)
        if ours:
            kinds.setdefault(ours[0], set()).add(tensor.tensor_type.name)
    return kinds


_QUANTIZED = re.compile(r"layers\.\d+\.(attn\.w[qkvo]|ffn\.w[123])(\.weight)?")  # what quantize.py quantizes


def gguf_int8_weights(path: Path, args: ModelArgs) -> frozenset[str]:
    """The quantized weights (attention and feed-forward matrices) a GGUF file stores in more than 4 bits (Q8_0,
    Q6_K, the 5-bit types, floats): held as int8 when the rest of the file is held as int4, not rounded down with it
    (llama.cpp's quantizer keeps Mixtral's attention keys and values in Q8_0, and some down projections in Q6_K)."""
    wider = gguf_file.EIGHT_BITS | gguf_file.FLOATS
    return frozenset(name for name, kinds in gguf_weight_types(path, args).items()
                     if kinds and kinds <= wider and _QUANTIZED.fullmatch(name))


def gguf_offset_weights(path: Path, args: ModelArgs, quantization: dict | None) -> frozenset[str]:
    """The quantized weights a GGUF file stores in 4-bit blocks with a minimum (Q4_K, Q4_1; with Q4_0 experts beside
    them): held with an offset per group when the model is held as int4 in groups of 32 (`quantization`), which
    the file's blocks are (quantize_checkpoint.gguf_block_scales); else none."""
    if not quantization or (quantization["bits"], quantization["group_size"]) != (4, gguf_file.Q4Blocks.BLOCK):
        return frozenset()
    minimums = set(gguf_file.Q4Blocks.TYPES) - {"Q4_0"}
    return frozenset(name for name, kinds in gguf_weight_types(path, args).items()
                     if kinds and kinds <= set(gguf_file.Q4Blocks.TYPES) and kinds & minimums
                     and _QUANTIZED.fullmatch(name))


def gguf_q8_weights(path: Path, args: ModelArgs) -> frozenset[str]:
    """The quantized weights a GGUF file stores in Q8_0 blocks (in every expert), and its output projection if it
    is one (not tied to the embedding): those of them held as int8 keep the file's codes and its fp16 scale per
    group of 32 (quantize_checkpoint.gguf_block_scales)."""
    return frozenset(name for name, kinds in gguf_weight_types(path, args).items()
                     if kinds == {"Q8_0"} and (_QUANTIZED.fullmatch(name) or name == "lm_head.weight"))


def gguf_planned(path: Path, args: ModelArgs, quantization: dict | None) -> dict[str, frozenset[str]]:
    """What the memory planner counts of a GGUF file's blocks held as they are (memory_plan.model_weights'
    `offset_weights` and `q8_weights`), for a model held as `quantization`."""
    return {"offset_weights": gguf_offset_weights(path, args, quantization), "q8_weights": gguf_q8_weights(path, args)}


def gguf_held_as(path: Path, args: ModelArgs) -> tuple[str | None, str, frozenset[str]]:
    """How a GGUF file is held when loaded without --quantize: (the `quantize` setting nearest to its blocks or None
    for floats, the line that says so, the matrices held as int8 beside int4: gguf_int8_weights)."""
    setting, line = gguf_file.nearest_quantization(path)
    wider = gguf_int8_weights(path, args) if setting and setting.startswith("int4") else frozenset()
    if wider:
        line += f"; its {len(wider)} matrices stored in more than 4 bits are held as int8"
    return setting, line, wider


_STACKED = re.compile(r"layers\.\d+\.ffn\.w[123]")  # our stacked (E, N, K) expert weights (Parameters)


def pieces(hf_name: str, tensor: torch.Tensor, args: ModelArgs) -> list[tuple[str, int | None, torch.Tensor]] | None:
    """Where a checkpoint tensor goes in our model: (our name, expert index or None, the part of the tensor) for
    each piece of it ([] for a tensor that is skipped, e.g. a tied lm_head), or None for a name this config
    does not have. An expert's weight goes to one expert of a stacked (E, N, K) weight; transformers 5's fused
    gate_up_proj is two whole stacked weights."""
    if skipped(hf_name, args):
        return []
    if m := _FUSED.fullmatch(hf_name):  # transformers-5 in-memory layout, should someone save it
        if m[2] == "down_proj":
            return [(f"layers.{m[1]}.ffn.w2", None, tensor)]
        half = tensor.shape[1] // 2
        return [(f"layers.{m[1]}.ffn.w1", None, tensor[:, :half]), (f"layers.{m[1]}.ffn.w3", None, tensor[:, half:])]
    found = target(hf_name, args)
    return None if found is None else [(*found, tensor)]


def skipped(hf_name: str, args: ModelArgs) -> bool:
    """A checkpoint tensor the model does not take (a rotary table, a tied lm_head)."""
    return bool(_IGNORED.fullmatch(hf_name)) or (args.tie_embeddings and hf_name == "lm_head.weight")


def target(hf_name: str, args: ModelArgs) -> tuple[str, int | None] | None:
    """Where a checkpoint tensor goes whole: (our name, expert index or None); None for a name this config does not
    have (and for transformers 5's fused experts, which `pieces` splits)."""
    if m := _EXPERT.fullmatch(hf_name):
        return (f"layers.{m[1]}.ffn.{m[3]}", int(m[2])) if int(m[2]) < args.n_experts else None
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name], None
    if (m := _LAYER.fullmatch(hf_name)) and m[2] in _LAYER_NAMES:
        return f"layers.{m[1]}.{_LAYER_NAMES[m[2]]}", None
    return None


def check_config_matches_files(model_dir: Path, args: ModelArgs) -> None:
    """Refuse, before anything is built or allocated, a config that describes a model far larger than the weight
    files beside it (a config written to exhaust memory, or the wrong one): no format mixtral reads stores a weight
    in fewer than 2 bits."""
    from .memory import count_params

    files = [model_dir] if gguf_file.is_gguf(model_dir) else safetensors_files(model_dir)
    stored = sum(f.stat().st_size for f in files)
    params = count_params(args).total
    if params / 4 > stored:
        raise MixtralError(f"{model_dir}: its config describes {params:,} parameters, but its weight files hold only "
                           f"{stored:,} bytes; the config does not match the weights")


def read_weights(model_dir: Path, args: ModelArgs, progress: bool = True, blocks: Collection[str] = (),
                 experts=None) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """The checkpoint's weights one piece at a time, as (our name, expert index or None, tensor) (see `pieces`),
    each shape checked against the config. `blocks`: a GGUF file's weights of these types ("Q4_0", "Q8_0", ...) come
    as their blocks (gguf_file.BLOCK_TYPES).
    `experts(name)`: the range of a stacked weight's experts wanted (a rank's: distributed.py); a GGUF file's merged
    experts outside it are not read, and no other expert is missed if absent (default: all are).
    Raises MixtralError for a misshapen tensor (at once), for tensors the config does not have (after the last
    one) and for weights missing from the checkpoint (at the end)."""
    with torch.device("meta"):  # the weights a checkpoint holds (a tied lm_head once, as embed)
        shapes = {name: tuple(p.shape) for name, p in Transformer(args).named_parameters()}
    seen: set[tuple[str, int | None]] = set()
    unexpected = []
    source = (_read_gguf(model_dir, args, progress, blocks, experts) if gguf_file.is_gguf(model_dir)
              else _read_tensors(safetensors_files(model_dir), progress))
    for hf_name, tensor in source:
        found = pieces(hf_name, tensor, args)
        if found is None or any(name not in shapes for name, _, _ in found):
            unexpected.append(hf_name)
            continue
        for name, expert, piece in found:
            want = shapes[name][1:] if expert is not None else shapes[name]
            if tuple(piece.shape) != want:
                raise MixtralError(f"tensor {hf_name} has shape {tuple(piece.shape)}, but the config implies "
                                   f"{want}; the weights do not match config.json")
            yield name, expert, piece
            if expert is None and _STACKED.fullmatch(name):  # transformers 5: every expert at once
                seen.update((name, e) for e in range(args.n_experts))
            else:
                seen.add((name, expert))
    if unexpected:
        raise MixtralError(f"{model_dir}: {len(unexpected)} tensor(s) this {args.model_type} config does not "
                           f"have, e.g. {', '.join(unexpected[:3])}; check that config.json matches the weights")
    wanted = experts or (lambda name: range(args.n_experts))
    missing = [name for name in shapes if not all(
        (name, e) in seen for e in (wanted(name) if _STACKED.fullmatch(name) else [None]))]
    if missing:
        raise MixtralError(f"{model_dir}: {len(missing)} weight(s) missing from the checkpoint, e.g. "
                           f"{', '.join(missing[:3])}; a shard may be missing or the config may not match")


def load_weights(model_dir: str | Path, args: ModelArgs, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", progress: bool = True) -> Transformer:
    """Build a `Transformer` for `args` and fill it from the safetensors in `model_dir`.

    Raises MixtralError for a missing, unexpected, wrongly shaped or unreadable tensor.
    """
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())
    params: dict[str, torch.Tensor] = {}
    for name, expert, piece in read_weights(model_dir, args, progress):
        if expert is None and not _STACKED.fullmatch(name):
            params[name] = piece.to(device=device, dtype=dtype)
            continue
        if name not in params:  # a stacked (E, N, K) weight, filled expert by expert (or whole)
            params[name] = torch.empty(expected[name].shape, dtype=dtype, device=device)
        (params[name] if expert is None else params[name][expert]).copy_(piece)
    model.load_state_dict(params, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, experts split per expert, as transformers saves them."""
    reverse = {ours: theirs for theirs, ours in _LAYER_NAMES.items() if not theirs.startswith("mlp.gate.")}
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.args.tie_embeddings:
            continue
        if name in _TOP_NAMES.values():
            out[next(k for k, v in _TOP_NAMES.items() if v == name)] = tensor
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        if rest in ("ffn.w1", "ffn.w2", "ffn.w3"):
            for expert in range(tensor.shape[0]):
                out[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{rest[4:]}.weight"] = tensor[expert]
        else:
            out[f"model.layers.{layer}.{reverse[rest]}"] = tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def export_gguf(model: Transformer, tokenizer, out: str | Path, kind: str = "f16", name: str = "mixtral",
                progress: bool = True) -> Path:
    """Write `model` (any precision we load: quantized weights are dequantized first) and its tokenizer
    (SentencePiece, or byte-level BPE: gguf_file.vocabulary_of) as one GGUF file llama.cpp and Ollama run
    (gguf_file.write: `kind` f32, f16, bf16, q8_0 or q4_0)."""
    from .tokenizer import MIXTRAL_V1_CHAT_TEMPLATE

    args = model.args
    vocab = gguf_file.vocabulary_of(tokenizer._backend)
    template = tokenizer.chat_template or (MIXTRAL_V1_CHAT_TEMPLATE if tokenizer.chat_format == "v1" else None)
    config = {"name": name, "context": args.max_seq_len, "dim": args.dim, "n_layers": args.n_layers,
              "hidden_dim": args.hidden_dim, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "head_dim": args.head_dim, "rope_theta": args.rope_theta, "norm_eps": args.norm_eps,
              "n_experts": args.n_experts, "top_k": args.top_k, "sliding_window": args.sliding_window,
              "vocab_size": args.vocab_size, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
              "add_bos": tokenizer.add_bos}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for our_name, weight in float_weights(model).items():
            gguf_name, layout = ours_to_gguf(our_name)
            heads = {"q": args.n_heads, "k": args.n_kv_heads}.get(layout)
            yield gguf_name, gguf_file.permute(weight, heads) if heads else weight

    return gguf_file.write(out, kind, config, vocab, template, weights(), progress)


def save_checkpoint(model: Transformer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` and `model.safetensors` in Hugging Face layout (loadable by transformers too)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config = model.args.to_hf_config()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with atomic_path(out_dir / "model.safetensors") as partial:  # each file whole or not at all
        save_file(tensors, str(partial), metadata={"format": "pt"})
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


# ---- quantized checkpoints (quantize.py's scheme, in our own tensor names) ------------------------------

def _empty_like_quantized(weight: torch.Tensor, bits: int, group_size: int | None) -> quantize.QuantLinear:
    stacked = weight.dim() == 3
    return quantize.QuantLinear(weight.shape[-2], weight.shape[-1], bits, group_size,
                                weight.shape[0] if stacked else None, device=weight.device)


def read_quantization(model_dir: str | Path) -> dict | None:
    """The "quantization" block of a checkpoint's config.json (validated), or None for a plain checkpoint (and for
    a GGUF file, whose blocks are widened as they are read)."""
    if gguf_file.is_gguf(model_dir):
        return None
    path = Path(model_dir) / "config.json"
    try:
        block = json.loads(path.read_text(encoding="utf-8")).get("quantization")
    except (OSError, ValueError, AttributeError) as exc:
        raise MixtralError(f"{path}: cannot read it ({exc})") from None
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("method") != quantize.METHOD:
        raise MixtralError(f"{path}: unsupported quantization {block!r}; mixtral reads method {quantize.METHOD!r} "
                           "(written by `mixtral quantize`)")
    bits, group_size = block.get("bits"), block.get("group_size")
    return {"bits": bits, "group_size": quantize.check_settings(bits, group_size), "method": quantize.METHOD,
            "lm_head": bool(block.get("lm_head", False))}


def check_stored_takes(model_dir: str | Path, stored: dict, setting: str | None) -> None:
    """Raise MixtralError when `setting` (a --quantize value, or None) asks for other than what the checkpoint in
    `model_dir` is quantized as (`stored`: read_quantization's): a quantized checkpoint is not quantized again."""
    wanted = quantize.parse_quantize(setting)
    if wanted is not None and (wanted[0] != stored["bits"] or wanted[1] not in (None, stored["group_size"])
                               or wanted[2] and not stored.get("lm_head")):
        raise MixtralError(f"{model_dir} is already quantized ({stored['bits']} bits); it cannot be re-quantized to "
                           f"{setting!r}: load the original checkpoint instead")


def save_quantized(model, out_dir: str | Path) -> Path:
    """Write a quantized model as config.json (with its "quantization" block) + model.safetensors.

    Tensors use our own names (`layers.0.attn.wq.qweight`, ...); transformers cannot read this format.
    """
    from safetensors.torch import save_file

    spec = getattr(model, "quantization", None)
    if not spec:
        raise MixtralError("this model is not quantized; call quantize_model first")
    for name, module in model.named_modules():
        if (isinstance(module, quantize.QuantLinear) and name != "lm_head"
                and (module.bits, module.group_size) != (spec["bits"], spec["group_size"])):
            raise MixtralError(f"this model holds its weights in more than one format ({name} is int{module.bits}, "
                               f"the rest int{spec['bits']}), which a checkpoint cannot describe; for a GGUF file, "
                               f"write one with `mixtral quantize FILE.gguf OUT`")
        if isinstance(module, quantize.QuantLinear) and module.offsets is not None:
            raise MixtralError(f"{name} holds a GGUF file's int4 blocks with their minimums, which a checkpoint cannot "
                               f"describe; write one with `mixtral quantize FILE.gguf OUT` (it quantizes them again)")
        if isinstance(module, quantize.QuantLinear) and module.bits == 8 and module.scale_group:
            raise MixtralError(f"{name} holds a GGUF file's Q8_0 blocks with a scale per group of "
                               f"{module.scale_group}, which a checkpoint cannot describe; write one with `mixtral "
                               f"quantize FILE.gguf OUT` (it quantizes them again, a scale per row)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = model.state_dict()
    if model.args.tie_embeddings and not spec["lm_head"]:
        tensors.pop("lm_head.weight")  # the same tensor as embed.weight
    tensors = {name: (t.to(torch.bfloat16) if name.endswith(".scales") and t.dtype == torch.float16 else t)
               .detach().cpu().contiguous() for name, t in tensors.items()}  # (a GGUF's Q4_0 scales: bf16 here)
    config = model.args.to_hf_config()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config["quantization"] = dict(spec)
    with atomic_path(out_dir / "model.safetensors") as partial:
        save_file(tensors, str(partial), metadata={"format": "pt", "quantization": quantize.METHOD})
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def load_quantized(model_dir: str | Path, args, spec: dict, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", progress: bool = True, kernel_layout: bool = True):
    """Build the model on the meta device, swap in quantized modules, fill both from the safetensors
    (`kernel_layout`: see quantize_model).

    Quantized buffers keep their stored dtypes; every other tensor is cast to `dtype`. Raises MixtralError
    for a missing, unexpected, mistyped or misshapen tensor.
    """
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = Transformer(args)
        quantize.swap_in_quantized(model, spec["bits"], spec["group_size"], spec["lm_head"], _empty_like_quantized)
    expected = model.state_dict()
    if args.tie_embeddings and not spec["lm_head"]:
        expected.pop("lm_head.weight")
    tensors, unexpected = {}, []
    for name, tensor in _read_tensors(safetensors_files(model_dir), progress):
        if name not in expected:
            unexpected.append(name)
            continue
        want = expected[name]
        quantized = name.endswith((".qweight", ".scales"))
        if tuple(tensor.shape) != tuple(want.shape) or (quantized and tensor.dtype != want.dtype):
            raise MixtralError(f"{model_dir}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                               f"{want.dtype} {tuple(want.shape)}; the weights do not match config.json")
        tensors[name] = tensor.to(device=device, dtype=tensor.dtype if quantized else dtype)
    missing = [name for name in expected if name not in tensors]
    if unexpected or missing:
        raise MixtralError(f"{model_dir}: {len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3]) or '-'}) "
                           f"and {len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); "
                           "the checkpoint does not match its config.json")
    model.load_state_dict(tensors, strict=False, assign=True)
    if args.tie_embeddings and not spec["lm_head"]:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        if isinstance(module, quantize.QuantLinear) and kernel_layout:
            module._pack()
    return model.eval()
