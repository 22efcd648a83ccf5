"""GGUF files (llama.cpp's one-file format): read as a checkpoint (config, weights, tokenizer, chat template), and
written from any model we load (`export`, `mixtral export-gguf`) for llama.cpp and Ollama.

A `.gguf` file is accepted wherever a model directory is (`load("x.gguf")`, `--model x.gguf`). It is read with
the `gguf` package, llama.cpp's own reader, never by a parser of ours:

- the config comes from the `llama.*` metadata (Mixtral, Mistral and Llama files all say `llama`);
- the weights are dequantized to fp32 with `gguf.quants` one tensor at a time (F32, F16, BF16, Q8_0, Q4_0, the
  K-quants and the rest of its types) and renamed to Hugging Face names (weights.gguf_to_hf), so that the rest
  of loading (shapes checked, cast to the requested dtype, quantized as read) is the safetensors path's. The query
  and key rows that llama.cpp's converter reorders for its RoPE are put back in Hugging Face order. A file of
  quantized blocks is held quantized again, in the nearest of our formats (`nearest_quantization`: int8 for 5 bits
  and more, int4 in groups of 32 below), unless the caller asks for another;
- a SentencePiece-style vocabulary (`tokenizer.ggml.model = llama`: tokens, scores, types) becomes a SentencePiece
  model again, so text encodes exactly as with the original `tokenizer.model`; the chat template is
  `tokenizer.chat_template`, rendered in the same sandbox as any other.

Writing is the same mapping the other way (weights.ours_to_gguf), with `gguf.GGUFWriter` and `gguf.quants`.

Not yet: keeping Q8_0/Q4_0 blocks as they are in our kernels (every type is widened at load; quantize again with
`--quantize`), byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`), and expert offloading from a GGUF.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelArgs
from .errors import MixtralError

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


def read_config(path: str | os.PathLike) -> ModelArgs:
    """ModelArgs from the file's metadata. Raises MixtralError for an architecture we do not run."""
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
    return ModelArgs.from_hf_config(cfg)


# The nearest format our kernels run for each GGUF block type: 5 bits and more -> int8, 4 bits and less -> int4 with
# groups of 32 (the block size of Q4_0). Float types stay float (in --dtype).
_EIGHT_BITS = {"Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}
_FLOATS = {"F32", "F16", "BF16", "F64"}


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
    if main in _FLOATS:
        return None, ""
    setting = ("int8" if main in _EIGHT_BITS else "int4-g32") + ("+head" if head and head not in _FLOATS else "")
    return setting, (f"{Path(path).name}: its {types} weights are held as {setting} (converted at load; "
                     f"--quantize chooses another)")


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter's reordering of query/key rows (each head's two halves interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_tensors(path: str | os.PathLike, args: ModelArgs, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, fp32 tensor) for every weight of the file, one tensor in memory at a time; merged
    expert tensors (E, N, K) as one tensor per expert. Raises MixtralError for a type gguf cannot dequantize."""
    from gguf import quants
    from tqdm.auto import tqdm

    from .weights import gguf_to_hf

    found = reader(path)
    for tensor in tqdm(found.tensors, desc="Loading weights", unit="tensor", disable=not progress):
        target = gguf_to_hf(tensor.name)
        if target is None:
            raise MixtralError(f"{Path(path).name}: tensor {tensor.name} is not one mixtral knows")
        try:
            values = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy())
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise MixtralError(f"{Path(path).name}: cannot read tensor {tensor.name} of type "
                               f"{getattr(tensor.tensor_type, 'name', tensor.tensor_type)} ({exc})") from None
        name, kind = target
        if kind == "q":
            values = _unpermute(values, args.n_heads)
        elif kind == "k":
            values = _unpermute(values, args.n_kv_heads)
        if kind == "experts":
            for expert in range(values.shape[0]):
                yield name.format(expert=expert), values[expert]
        else:
            yield name, values
        del values


# ---- the tokenizer: a SentencePiece model written back from the vocabulary ----------------------------------

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


def tokenizer_parts(path: str | os.PathLike) -> tuple[bytes, str | None]:
    """(a SentencePiece model for the file's vocabulary, its chat template or None). Raises MixtralError for a
    file without a vocabulary, or with one that is not SentencePiece-style."""
    read_config(path)  # an architecture we do not run is the first thing to say
    found = reader(path)
    kind = _value(found, "tokenizer.ggml.model")
    if kind is None or _value(found, "tokenizer.ggml.tokens") is None:
        raise MixtralError(f"{Path(path).name}: this GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    if kind != "llama":
        raise MixtralError(f"{Path(path).name}: its {kind!r} vocabulary is not supported yet (only SentencePiece-"
                           f"style 'llama' vocabularies are)")
    tokens = _value(found, "tokenizer.ggml.tokens")
    scores = _value(found, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _value(found, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise MixtralError(f"{Path(path).name}: its vocabulary's tokens, scores and types differ in length")
    unk = _value(found, "tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == 2), 0))
    proto = sentencepiece_model(tokens, scores, types, _value(found, "tokenizer.ggml.bos_token_id", 1),
                                _value(found, "tokenizer.ggml.eos_token_id", 2), unk,
                                bool(_value(found, "tokenizer.ggml.add_space_prefix", True)))
    template = _value(found, "tokenizer.chat_template")
    return proto, template if isinstance(template, str) else None


# ---- writing ---------------------------------------------------------------------------------------------------

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of query/key rows (the inverse of _unpermute)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _sentencepiece_vocab(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types of a SentencePiece tokenizer (types as SentencePiece's own)."""
    from .tokenizer_backends import SentencePieceBackend

    backend = tokenizer._backend
    if not isinstance(backend, SentencePieceBackend):
        raise MixtralError("export-gguf writes SentencePiece vocabularies (tokenizer.model) only; this model's "
                           "tokenizer is a tokenizer.json")
    sp = backend.sp
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    return tokens, scores, types


def export(model, tokenizer, out: str | os.PathLike, kind: str = "f16", name: str = "mixtral",
           progress: bool = True) -> Path:
    """Write `model` (any precision we load: quantized weights are dequantized first) and its tokenizer to a GGUF
    file llama.cpp reads: `kind` is the type of the matrices (f32, f16, bf16, q8_0 or q4_0); norms and the router
    stay F32, and with q4_0 the embedding and output projection are Q8_0 (as llama.cpp's quantizer keeps them
    finer). A matrix whose rows are not a whole number of 32-weight blocks is written F16. The file appears whole
    or not at all (written beside it, then renamed)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter, LlamaFileType, quants

    from .tokenizer import MIXTRAL_V1_CHAT_TEMPLATE
    from .weights import float_weights, ours_to_gguf

    if kind not in EXPORT_TYPES:
        raise MixtralError(f"GGUF type must be one of {', '.join(EXPORT_TYPES)}, got {kind!r}")
    args, out = model.args, Path(out)
    tokens, scores, types = _sentencepiece_vocab(tokenizer)
    matrix = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[kind]
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = GGUFWriter(str(partial), "llama")
    try:
        writer.add_name(name)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_rope_freq_base(args.rope_theta)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_rope_dimension_count(args.head_dim)
        if args.head_dim * args.n_heads != args.dim:
            writer.add_key_length(args.head_dim)
            writer.add_value_length(args.head_dim)
        if args.n_experts:
            writer.add_expert_count(args.n_experts)
            writer.add_expert_used_count(args.top_k)
        if args.sliding_window:
            writer.add_sliding_window(args.sliding_window)
        writer.add_vocab_size(args.vocab_size)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(tokenizer.bos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        template = tokenizer.chat_template or (MIXTRAL_V1_CHAT_TEMPLATE if tokenizer.chat_format == "v1" else None)
        if template:
            writer.add_chat_template(template)
        for our_name, weight in float_weights(model).items():
            gguf_name, layout = ours_to_gguf(our_name)
            if layout == "q":
                weight = _permute(weight, args.n_heads)
            elif layout == "k":
                weight = _permute(weight, args.n_kv_heads)
            data = weight.contiguous().numpy().astype(np.float32)
            wanted = T.F32 if data.ndim == 1 or gguf_name.endswith("ffn_gate_inp.weight") else matrix
            if wanted == T.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
                wanted = T.Q8_0
            if wanted in (T.Q8_0, T.Q4_0) and data.shape[-1] % 32:
                wanted = T.F16
            if wanted == T.F32:
                writer.add_tensor(gguf_name, data)
            elif wanted == T.F16:
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, quants.quantize(data, wanted), raw_dtype=wanted)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    return out
