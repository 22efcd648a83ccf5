"""GGUF files (llama.cpp's one-file format), at the level of the file: what it holds and how to write one.

A `.gguf` file is accepted wherever a model directory is (`load("x.gguf")`, `--model x.gguf`). It is read and
written with the `gguf` package, llama.cpp's own code, never by a parser of ours. Here:

- `hf_config`: the config as a Hugging Face config dict, from the `llama.*` metadata (Mixtral, Mistral and Llama
  files all say `llama`), for config.py;
- `tensors`: every tensor dequantized to fp32 by `gguf.quants` (F32, F16, BF16, Q8_0, Q4_0, the K-quants and the
  rest of its types), one at a time, under its GGUF name; or, where the caller can take them, Q4_0, Q4_1, Q4_K
  and Q8_0 tensors as their blocks (`Q4Blocks`, `Q8Blocks`); weights.py renames them (weights.gguf_to_hf) and
  puts the query/key rows that llama.cpp's converter reorders for its RoPE back in Hugging Face order
  (`unpermute`);
- `nearest_quantization`: a file of quantized blocks is held in the nearest of our formats (int8 for 5 bits and
  more, int4 in groups of 32 below, the matrices a 4-bit file stores finer as int8: weights.gguf_int8_weights),
  unless the caller asks for another. Q4_0 is our int4 in groups of 32 with fp16 scales, and Q4_1 and Q4_K are
  that with an offset per group (from their minimums): their blocks are held as they are, with fp16 scales and
  offsets (Q4Blocks.held; quantize_checkpoint.load_quantizing); Q8_0 is int8 with an fp16 scale per group of 32,
  held as it is too (Q8Blocks). Other types are quantized again from their values;
- `tokenizer_parts`: a SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`: tokens, scores, types)
  rebuilt as a SentencePiece model, so text encodes exactly as with the original `tokenizer.model`, or a
  byte-level BPE one (`gpt2`: tokens, merges, and `tokenizer.ggml.pre`, the way its words are split, as
  llama.cpp splits them) rebuilt as a `tokenizers` BPE; and the chat template (`tokenizer.chat_template`),
  rendered in the same sandbox as any other; for tokenizer.py;
- `write`: a GGUF file from metadata and named tensors (weights.export_gguf gives it a model's).

Not yet: Q6_K and the 5-bit blocks as they are (held as int8, one scale per row), BPE pre-tokenizers other than
the GPT-2, Llama 3 and Qwen 2 families, and expert offloading from a GGUF.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MixtralError
from .paths import atomic_path

MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


_READERS: dict[tuple[str, int, int], object] = {}


def reader(path: str | os.PathLike):
    """The file's `gguf.GGUFReader` (memory-mapped; one per file, size and time), its tensors checked to lie
    inside the file. Raises MixtralError with one line for anything the reader cannot make sense of."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise MixtralError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _READERS:
        return _READERS[key]
    from gguf import GGUFReader

    if not is_gguf(path):
        raise MixtralError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        found = GGUFReader(path)
        for tensor in found.tensors:
            if tensor.data_offset + tensor.n_bytes > stat.st_size or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} reaches past the end of the file (truncated?)")
    except MixtralError:
        raise
    except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, struct.error... on bad files
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MixtralError(f"{path}: not a GGUF file mixtral can read: damaged or truncated ({text})") from None
    _READERS.clear()  # the last file only: each holds a memory map
    _READERS[key] = found
    return found


def _value(found, key: str, default=None):
    field = found.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:
        raise MixtralError(f"GGUF metadata {key} cannot be read") from None


def hf_config(path: str | os.PathLike) -> dict:
    """The file's config as a Hugging Face config dict (for ModelArgs.from_hf_config). Raises MixtralError for an
    architecture we do not run."""
    found = reader(path)
    arch = _value(found, "general.architecture")
    if arch != "llama":
        raise MixtralError(f"{Path(path).name}: GGUF architecture {arch!r} is not one mixtral runs (it runs "
                           f"'llama' files: Mixtral, Mistral and Llama)")

    def get(key: str, default=None):
        return _value(found, f"llama.{key}", default)

    names = {t.name for t in found.tensors}
    tokens = _value(found, "tokenizer.ggml.tokens")
    experts = get("expert_count", 0) or 0
    heads = get("attention.head_count")
    cfg = {
        "model_type": "mixtral" if experts else "mistral",
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "vocab_size": get("vocab_size", len(tokens) if tokens else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _value(found, "tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": _value(found, "tokenizer.ggml.eos_token_id", 2),
    }
    if get("attention.key_length") is not None:
        cfg["head_dim"] = get("attention.key_length")
    if get("attention.sliding_window"):
        cfg["sliding_window"] = get("attention.sliding_window")
    if experts:
        cfg.update(num_local_experts=experts, num_experts_per_tok=get("expert_used_count", 2))
    missing = [key for key, value in cfg.items() if value is None]
    if missing:
        raise MixtralError(f"{Path(path).name}: GGUF metadata lacks what {', '.join(missing)} comes from")
    if isinstance(heads, list) or isinstance(cfg["num_key_value_heads"], list):
        raise MixtralError(f"{Path(path).name}: per-layer head counts are not supported")
    return cfg


# The nearest format our kernels run for each GGUF block type: 5 bits and more -> int8, 4 bits and less -> int4 with
# groups of 32 (the block size of Q4_0). Float types stay float (in --dtype).
EIGHT_BITS = {"Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}
FLOATS = {"F32", "F16", "BF16", "F64"}


def nearest_quantization(path: str | os.PathLike) -> tuple[str | None, str]:
    """(the `quantize` setting nearest to how the file stores its matrices, a line saying so), from the type
    holding most of the weights of the layers; "+head" when the output projection is quantized too."""
    found = reader(path)
    counts: dict[str, int] = {}
    head = None
    for tensor in found.tensors:
        kind = tensor.tensor_type.name
        if tensor.name == "output.weight":
            head = kind
        elif tensor.name.startswith("blk.") and len(tensor.shape) >= 2 and "ffn_gate_inp" not in tensor.name:
            counts[kind] = counts.get(kind, 0) + int(tensor.n_elements)
    if not counts:
        return None, ""
    main = max(counts, key=counts.get)
    types = "/".join(sorted(counts, key=counts.get, reverse=True))
    if main in FLOATS:
        return None, ""
    setting = ("int8" if main in EIGHT_BITS else "int4-g32") + ("+head" if head and head not in FLOATS else "")
    how = "their blocks as they are" if main in BLOCK_TYPES else "converted at load"
    if head and head not in FLOATS and head != "Q8_0":
        how += ", the output projection's quantized again with a scale per row"
    return setting, f"{Path(path).name}: its {types} weights are held as {setting} ({how}; --quantize chooses another)"


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter's reordering of query/key rows (each head's two halves interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of query/key rows (the inverse of `unpermute`)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class Q4Blocks:
    """A 4-bit tensor as the file stores it, in groups of 32 weights along a row: codes in 0..15, one scale per
    group and, for the types with a minimum, one minimum per group, each exact (fp32). codes (..., N, K) uint8,
    scales and minimums (..., N, K / 32).
    - Q4_0: scale d (fp16); each weight (code - 8) * d.
    - Q4_1: d and m (fp16); each weight code * d + m: scale d, minimum -m.
    - Q4_K: 256-weight super-blocks of eight groups, each with a 6-bit scale and a 6-bit minimum times the super-
      block's fp16 d and dmin; each weight code * d * sc - dmin * m: scale d * sc, minimum dmin * m.
    `dequantize` gives the file's values (as gguf.quants does); `held` the form our kernels read (quantize.py's int4
    with fp16 scales, and for the types with a minimum an fp16 offset per group), exact for Q4_0 and within fp16's
    rounding of the scale and the offset for the others. Indexing the first dimension and `rows` (a reordering of
    the rows) work as on a tensor of shape `shape`."""

    BLOCK = 32
    TYPES = ("Q4_0", "Q4_1", "Q4_K")  # what `of` reads

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor | None = None):
        self.codes, self.scales, self.minimums = codes, scales, minimums

    @classmethod
    def of(cls, raw, kind: str) -> Q4Blocks:
        """From the file's bytes (..., N, bytes per row) of a tensor of type `kind` (one of TYPES)."""
        return {"Q4_0": cls.from_raw, "Q4_1": cls._from_q4_1, "Q4_K": cls._from_q4_k}[kind](raw)

    @classmethod
    def from_raw(cls, raw) -> Q4Blocks:
        """From a Q4_0 tensor's bytes (..., N, K / 32 * 18): per block d (fp16, little-endian), then 16 bytes whose
        low nibbles are the block's first 16 codes and high nibbles its last 16."""
        blocks = torch.from_numpy(raw.copy()).unflatten(-1, (-1, 18))
        return cls(_nibbles(blocks[..., 2:]), _halves(blocks[..., :2])[..., 0])

    @classmethod
    def _from_q4_1(cls, raw) -> Q4Blocks:
        """Per block of 32: d, m (fp16), then the codes as Q4_0 packs them."""
        blocks = torch.from_numpy(raw.copy()).unflatten(-1, (-1, 20))
        d, m = _halves(blocks[..., :4]).unbind(-1)
        return cls(_nibbles(blocks[..., 4:]), d, -m)

    @classmethod
    def _from_q4_k(cls, raw) -> Q4Blocks:
        """Per super-block of 256: d, dmin (fp16); twelve bytes of eight 6-bit scales and minimums (the first four
        of each in the low six bits of bytes 0-3 and 4-7; the last four in the nibbles of bytes 8-11, their top two
        bits in the top bits of bytes 0-3 and 4-7); then four runs of 32 bytes, whose low nibbles are one group's
        codes and high nibbles the next group's."""
        blocks = torch.from_numpy(raw.copy()).unflatten(-1, (-1, 144))
        d, dmin = _halves(blocks[..., :4]).unbind(-1)
        packed = blocks[..., 4:16].to(torch.int32)
        low, high, last = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
        sc = torch.cat((low & 63, (last & 15) | ((low >> 6) << 4)), dim=-1).float()  # (..., blocks, 8)
        mins = torch.cat((high & 63, (last >> 4) | ((high >> 6) << 4)), dim=-1).float()
        runs = blocks[..., 16:].unflatten(-1, (4, 32))  # (..., blocks, 4, 32)
        codes = torch.stack((runs & 15, runs >> 4), dim=-2).flatten(-4)  # groups in order, 32 codes each
        return cls(codes, (d[..., None] * sc).flatten(-2), (dmin[..., None] * mins).flatten(-2))

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, index) -> Q4Blocks:
        return Q4Blocks(self.codes[index], self.scales[index],
                        None if self.minimums is None else self.minimums[index])

    def rows(self, reorder) -> Q4Blocks:
        """The same blocks with the rows reordered by `reorder` (a function of a tensor whose first dimension is
        the rows: it is applied to the codes, the scales and the minimums alike)."""
        return Q4Blocks(reorder(self.codes), reorder(self.scales),
                        None if self.minimums is None else reorder(self.minimums))

    def dequantize(self) -> torch.Tensor:
        """The file's values, fp32."""
        codes = self.codes.float().unflatten(-1, (-1, self.BLOCK))
        if self.minimums is None:
            return ((codes - 8) * self.scales[..., None]).flatten(-2)
        return (codes * self.scales[..., None] - self.minimums[..., None]).flatten(-2)

    def held(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, offsets) as the kernels hold them, fp16: each weight (code - 8) * scale + offset. The scale is
        rounded to fp16 (Q4_0's and Q4_1's d are fp16 already; Q4_K's d * sc is held to 2^-11), the offset 8 * scale
        - minimum is computed with the rounded scale and then rounded itself; None for Q4_0."""
        scales = self.scales.to(torch.float16)
        if self.minimums is None:
            return scales, None
        return scales, (8 * scales.float() - self.minimums).to(torch.float16)


class Q8Blocks:
    """A Q8_0 tensor as the file stores it: blocks of 32 weights along a row, each an fp16 scale d and 32 int8 codes;
    each weight code * d. codes (..., N, K) int8, scales (..., N, K / 32) fp32 (exact: fp16 values). `dequantize`
    gives the file's values (as gguf.quants does); `held` its scales as the kernels hold them (fp16: exactly the
    file's), beside the codes as they are (quantize.py's int8 with a scale per group of 32). Indexing and `rows` as
    for Q4Blocks."""

    BLOCK = 32
    TYPES = ("Q8_0",)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales

    @classmethod
    def of(cls, raw, kind: str = "Q8_0") -> Q8Blocks:
        """From a Q8_0 tensor's bytes (..., N, K / 32 * 34): per block d (fp16, little-endian), then 32 int8 codes."""
        blocks = torch.from_numpy(raw.copy()).unflatten(-1, (-1, 34))
        return cls(blocks[..., 2:].contiguous().view(torch.int8).flatten(-2), _halves(blocks[..., :2])[..., 0])

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, index) -> Q8Blocks:
        return Q8Blocks(self.codes[index], self.scales[index])

    def rows(self, reorder) -> Q8Blocks:
        return Q8Blocks(reorder(self.codes), reorder(self.scales))

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float().unflatten(-1, (-1, self.BLOCK)) * self.scales[..., None]).flatten(-2)

    def held(self) -> torch.Tensor:
        return self.scales.to(torch.float16)


BLOCK_TYPES = {**{kind: Q4Blocks for kind in Q4Blocks.TYPES}, "Q8_0": Q8Blocks}  # the types read as their blocks


def _halves(pairs: torch.Tensor) -> torch.Tensor:
    """(..., 2n) bytes -> (..., n) fp32: little-endian fp16 values."""
    return pairs.contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., blocks, 16) bytes -> (..., blocks * 32) codes: each block's low nibbles, then its high ones."""
    return torch.cat((packed & 15, packed >> 4), dim=-1).flatten(-2)


def tensors(path: str | os.PathLike, progress: bool = True, blocks: Collection[str] = (),
            first_dim=None) -> Iterator[tuple[str, torch.Tensor | Q4Blocks | Q8Blocks, int]]:
    """(GGUF name, fp32 tensor in row-major order, where it starts along the first dimension) for every tensor of
    the file, one in memory at a time; tensors of the types named in `blocks` (of BLOCK_TYPES) come as their
    blocks (Q4Blocks, Q8Blocks).
    `first_dim(name)`: the range of a 3-D tensor's first dimension to read (None, and without it: all of it, from
    0). Raises MixtralError for a type gguf cannot dequantize."""
    from gguf import quants
    from tqdm.auto import tqdm

    found = reader(path)
    for tensor in tqdm(found.tensors, desc="Loading weights", unit="tensor", disable=not progress):
        part = first_dim(tensor.name) if first_dim is not None and tensor.data.ndim == 3 else None
        data, start = (tensor.data, 0) if part is None else (tensor.data[part.start:part.stop], part.start)
        kind = getattr(tensor.tensor_type, "name", None)
        if kind in blocks and kind in BLOCK_TYPES:
            try:
                held = BLOCK_TYPES[kind].of(data, kind)
            except (RuntimeError, ValueError) as exc:
                raise MixtralError(f"{Path(path).name}: cannot read tensor {tensor.name} of type {kind} "
                                   f"({exc})") from None
            yield tensor.name, held, start
            continue
        try:
            values = torch.from_numpy(quants.dequantize(data, tensor.tensor_type).copy())
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise MixtralError(f"{Path(path).name}: cannot read tensor {tensor.name} of type "
                               f"{getattr(tensor.tensor_type, 'name', tensor.tensor_type)} ({exc})") from None
        yield tensor.name, values, start
        del values


# ---- the tokenizer: a SentencePiece model or a tokenizers BPE, rebuilt from the vocabulary ----------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int32 fields are ten-byte varints
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str (length-delimited), float (fixed32), bool/int (varint)."""
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int], bos: int, eos: int,
                        unk: int, add_dummy_prefix: bool = True) -> bytes:
    """A serialized SentencePiece ModelProto (BPE, byte fallback where the vocabulary has the 256 byte pieces,
    identity normalization: how Mistral's and Llama's tokenizer.model files are made) with these pieces; GGUF's
    token types are SentencePiece's."""
    pieces = b"".join(_field(1, _field(1, t) + _field(2, float(s)) + _field(3, ty))
                      for t, s, ty in zip(tokens, scores, types))
    byte_fallback = sum(1 for ty in types if ty == 6) == 256
    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(25, True) + _field(26, True) + _field(35, byte_fallback)
               + _field(40, unk) + _field(41, bos) + _field(42, eos) + _field(43, -1))
    normalizer = _field(1, "identity") + _field(3, add_dummy_prefix) + _field(4, False) + _field(5, True)
    return pieces + _field(2, trainer) + _field(3, normalizer)


# How a byte-level BPE vocabulary ('gpt2') splits text into words before its merges, by tokenizer.ggml.pre: the
# regular expression llama.cpp's tokenizer uses for that family, and whether it takes a word that is a token whole
# (llama.cpp's ignore_merges). Other families are refused rather than tokenized differently from llama.cpp.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
BPE_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2"), (_GPT2_SPLIT, False)),
    **dict.fromkeys(_LLAMA3_NAMES, (_LLAMA3_SPLIT, True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT, False)),
}


# Token texts that end generation wherever a vocabulary has them, as llama.cpp decides (llama-vocab.cpp), beside
# the file's EOS, EOT and EOM ids: those of the families whose files mixtral reads
END_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
             "<end_of_turn>", "<EOT>")
# Families whose prompts llama.cpp starts with BOS when the file does not say (tokenizer.ggml.add_bos_token)
BOS_BY_DEFAULT = _LLAMA3_NAMES


@dataclass(frozen=True)
class Vocabulary:
    """A GGUF file's tokenizer, rebuilt for a tokenizer backend (tokenizer_backends.py): a SentencePiece model
    (`sentencepiece`, serialized) or a `tokenizers` library Tokenizer (`bpe`); its chat template; its BOS and EOS
    (None: the backend's own), the ids that end generation, and whether a prompt starts with BOS."""

    sentencepiece: bytes | None
    bpe: object | None
    template: str | None
    bos_id: int | None
    eos_id: int | None
    end_ids: frozenset[int]
    add_bos: bool


def tokenizer_parts(path: str | os.PathLike) -> Vocabulary:
    """The file's vocabulary (`tokenizer.ggml.*`) and chat template. Raises MixtralError for a file without a
    vocabulary, or with one of a kind or pre-tokenizer we do not read."""
    hf_config(path)  # an architecture we do not run is the first thing to say
    found = reader(path)
    name = Path(path).name
    kind = _value(found, "tokenizer.ggml.model")
    tokens = _value(found, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise MixtralError(f"{name}: this GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    types = _value(found, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos, eos = _value(found, "tokenizer.ggml.bos_token_id"), _value(found, "tokenizer.ggml.eos_token_id")
    template = _value(found, "tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    ends = {i for i in (eos, _value(found, "tokenizer.ggml.eot_token_id"), _value(found, "tokenizer.ggml.eom_token_id"))
            if isinstance(i, int) and 0 <= i < len(tokens)}
    ends |= {i for i, token in enumerate(tokens) if token in END_TEXTS}
    pre = _value(found, "tokenizer.ggml.pre", "default")
    add_bos = _value(found, "tokenizer.ggml.add_bos_token")
    add_bos = bool(add_bos) if add_bos is not None else kind != "gpt2" or pre in BOS_BY_DEFAULT
    if kind == "gpt2":
        if len(tokens) != len(types):
            raise MixtralError(f"{name}: its vocabulary's tokens and types differ in length")
        merges = _value(found, "tokenizer.ggml.merges")
        if pre not in BPE_PRE_TOKENIZERS:
            raise MixtralError(f"{name}: its byte-level BPE vocabulary splits text the {pre!r} way, which mixtral "
                               f"does not read yet (it reads {', '.join(sorted(BPE_PRE_TOKENIZERS))})")
        if not merges:
            raise MixtralError(f"{name}: its byte-level BPE vocabulary has no merges (tokenizer.ggml.merges)")
        return Vocabulary(None, byte_level_bpe(tokens, types, merges, *BPE_PRE_TOKENIZERS[pre]), template, bos, eos,
                          frozenset(ends), add_bos)
    if kind != "llama":
        raise MixtralError(f"{name}: its {kind!r} vocabulary is not supported (mixtral reads SentencePiece-style "
                           f"'llama' and byte-level BPE 'gpt2' vocabularies)")
    scores = _value(found, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise MixtralError(f"{name}: its vocabulary's tokens, scores and types differ in length")
    unk = _value(found, "tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == 2), 0))
    proto = sentencepiece_model(tokens, scores, types, 1 if bos is None else bos, 2 if eos is None else eos, unk,
                                bool(_value(found, "tokenizer.ggml.add_space_prefix", True)))
    return Vocabulary(proto, None, template, None, None, frozenset(ends), add_bos)


def byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], split: str, whole_words: bool):
    """A `tokenizers` Tokenizer for a byte-level BPE vocabulary as GGUF stores it: tokens spelled in GPT-2's byte
    alphabet, merges as "left right" strings ranked by their order, control tokens (type 3, and the END_TEXTS a file
    may have mislabelled) special and user-defined ones (type 4) matched whole, as llama.cpp does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        if not left or not right:
            raise MixtralError(f"a BPE merge {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    try:
        tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=whole_words))
    except Exception as exc:  # the library's own message says which merge names an unknown token
        raise MixtralError(f"the GGUF file's BPE vocabulary cannot be read: {exc}") from None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)  # (end texts: control, as in
                                  for t, kind in zip(tokens, types) if kind == 3 or t in END_TEXTS])  # llama.cpp)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == 4])
    return tokenizer


# ---- writing ---------------------------------------------------------------------------------------------------

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def sentencepiece_vocab(backend) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types (SentencePiece's own numbering) of a SentencePiece tokenizer backend."""
    sp = backend.sp
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


# The way a tokenizer.json splits words (its Split expression, or GPT-2's built into ByteLevel) -> the
# tokenizer.ggml.pre that makes llama.cpp split them so: our expressions, and those of Hugging Face's files
_PRE_OF_SPLIT = {
    _GPT2_SPLIT: "gpt-2", None: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2",
    _LLAMA3_SPLIT.replace(_CONTRACTIONS, r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"): "llama-bpe",
    _QWEN2_SPLIT.replace(_CONTRACTIONS, r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"): "qwen2",
}


def bpe_vocab(tokenizer) -> dict:
    """A byte-level BPE `tokenizers` Tokenizer as GGUF stores one: tokens by id, their types (3: special, 4: other
    added tokens), merges, and tokenizer.ggml.pre. MixtralError for one that GGUF cannot describe so that llama.cpp
    tokenizes alike (another model, a normalizer, or a way of splitting words not in BPE_PRE_TOKENIZERS)."""
    import json

    data = json.loads(tokenizer.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    splits = [step for step in steps if step.get("type") == "Split"]
    if model.get("type") != "BPE" or not byte_level or data.get("normalizer") or len(splits) > 1:
        raise MixtralError("GGUF export writes SentencePiece vocabularies and byte-level BPE ones (a tokenizer.json "
                           "with a BPE model, a ByteLevel pre-tokenizer and no normalizer); this tokenizer is neither")
    split = splits[0]["pattern"].get("Regex") if splits else None
    if split is None and not byte_level[0].get("use_regex", True):
        split = ""  # no split at all: no llama.cpp family
    if split not in _PRE_OF_SPLIT:
        raise MixtralError(f"this tokenizer splits words by {split!r}, not a way llama.cpp names (mixtral writes "
                           f"the GPT-2, Llama 3 and Qwen 2 ways)")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    tokens = [tokenizer.id_to_token(i) for i in range(size)]
    if any(t is None for t in tokens):
        raise MixtralError("this tokenizer's ids have gaps; GGUF needs one token per id")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(3 if added[i].get("special") else 4) if i in added else 1 for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _PRE_OF_SPLIT[split]}


def vocabulary_of(backend) -> tuple[list[str], list[float], list[int]] | dict:
    """What `write` takes for a tokenizer backend: sentencepiece_vocab's or bpe_vocab's. MixtralError for one GGUF
    cannot hold."""
    from .tokenizer_backends import SentencePieceBackend

    return sentencepiece_vocab(backend) if isinstance(backend, SentencePieceBackend) else bpe_vocab(backend.tok)


def write(out: str | os.PathLike, kind: str, config: dict, vocab: tuple[list[str], list[float], list[int]] | dict,
          template: str | None, weights: Iterator[tuple[str, torch.Tensor]], progress: bool = True) -> Path:
    """A GGUF file of the `llama` architecture: `config` (name, context, dim, n_layers, hidden_dim, n_heads,
    n_kv_heads, head_dim, rope_theta, norm_eps, n_experts, top_k, sliding_window, vocab_size, bos, eos, add_bos),
    the `vocab` (vocabulary_of: SentencePiece tokens, scores, types; or a byte-level BPE), the chat `template`,
    and `weights` as (GGUF name, fp32 tensor in llama.cpp's layout).
    `kind` is the type of the matrices (f32, f16, bf16, q8_0 or q4_0); norms and the router
    stay F32, and with q4_0 the embedding and output projection are Q8_0, and so are the attention's keys and
    values in a model with experts (llama.cpp's quantizer keeps them so for Mixtral's 8 experts, where they are a
    small part of the weights). A matrix whose rows are not a whole number of 32-weight blocks is written F16.
    The file appears whole or not at all (written beside it, then renamed)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter, LlamaFileType, quants

    if kind not in EXPORT_TYPES:
        raise MixtralError(f"GGUF type must be one of {', '.join(EXPORT_TYPES)}, got {kind!r}")
    out, c = Path(out), config
    matrix = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[kind]
    with atomic_path(out) as partial:
        writer = GGUFWriter(str(partial), "llama")
        writer.add_name(c["name"])
        writer.add_context_length(c["context"])
        writer.add_embedding_length(c["dim"])
        writer.add_block_count(c["n_layers"])
        writer.add_feed_forward_length(c["hidden_dim"])
        writer.add_head_count(c["n_heads"])
        writer.add_head_count_kv(c["n_kv_heads"])
        writer.add_rope_freq_base(c["rope_theta"])
        writer.add_layer_norm_rms_eps(c["norm_eps"])
        writer.add_rope_dimension_count(c["head_dim"])
        if c["head_dim"] * c["n_heads"] != c["dim"]:
            writer.add_key_length(c["head_dim"])
            writer.add_value_length(c["head_dim"])
        if c["n_experts"]:
            writer.add_expert_count(c["n_experts"])
            writer.add_expert_used_count(c["top_k"])
        if c.get("sliding_window"):
            writer.add_sliding_window(c["sliding_window"])
        writer.add_vocab_size(c["vocab_size"])
        writer.add_file_type(file_type)
        if isinstance(vocab, dict):  # byte-level BPE (bpe_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(vocab["pre"])
            writer.add_token_list(vocab["tokens"])
            writer.add_token_types(vocab["types"])
            writer.add_token_merges(vocab["merges"])
        else:
            tokens, scores, types = vocab
            writer.add_tokenizer_model("llama")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
        writer.add_bos_token_id(c["bos"])
        writer.add_eos_token_id(c["eos"])
        writer.add_add_bos_token(c.get("add_bos", True))
        writer.add_add_eos_token(False)
        if template:
            writer.add_chat_template(template)
        for name, weight in weights:
            data = weight.contiguous().numpy().astype(np.float32)
            wanted = T.F32 if data.ndim == 1 or name.endswith("ffn_gate_inp.weight") else matrix
            if wanted == T.Q4_0 and (name in ("token_embd.weight", "output.weight")
                                     or c["n_experts"] and name.endswith(("attn_k.weight", "attn_v.weight"))):
                wanted = T.Q8_0
            if wanted in (T.Q8_0, T.Q4_0) and data.shape[-1] % 32:
                wanted = T.F16
            if wanted == T.F32:
                writer.add_tensor(name, data)
            elif wanted == T.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, quants.quantize(data, wanted), raw_dtype=wanted)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return out
