"""`mixtral quantize`: a plain checkpoint quantized tensor by tensor, straight to disk, in bounded memory.

Mixtral-8x7B is 93 GB in bf16; quantizing it must not need that much RAM. The output file's layout (every
tensor's name, dtype, shape and place) follows from config.json and the quantization settings alone, so the
safetensors header is written first and the file sized at once; then each source tensor is read on its own
(weights.pieces says where it goes: a whole tensor, or one expert of a stacked weight), quantized a million
weights at a time, written at its place, and dropped. Peak memory is about one source tensor plus those
temporaries, whatever the checkpoint's size. The result is what `quantize.quantize_model` + `weights.save_quantized`
give for the same weights (tested), and loads the same way.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from . import quantize
from .config import ModelArgs, load_config
from .gguf_file import Q4Blocks, Q8Blocks, is_gguf, tokenizer_parts
from .paths import atomic_path, write_atomic
from .errors import MixtralError
from .memory import release_free_memory
from .model import Transformer
from .weights import (_empty_like_quantized, check_config_matches_files, gguf_offset_weights, gguf_q8_weights,
                      gguf_weight_types, read_quantization, read_weights, safetensors_header)

COPIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "generation_config.json", "chat_template.json", "chat_template.jinja")


def quantize_checkpoint(source: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None,
                        lm_head: bool = False, progress: bool = True) -> Path:
    """Quantize the plain checkpoint in directory `source` (loading.resolve_model finds one for a Hub id), or a
    GGUF file, into
    `out_dir`, with its tokenizer and
    generation files. Weights are taken in the checkpoint's dtype (config.json's torch_dtype or dtype;
    bfloat16 if unknown), which the tensors that stay unquantized keep. Raises MixtralError for a bad source,
    an already quantized one, `out_dir` equal to the source, or weights that do not match config.json (no
    model file is left in `out_dir` then)."""
    spec = quantize.spec(bits, group_size, lm_head)  # (checked before anything else)
    source, out_dir = Path(source), Path(out_dir)
    gguf = is_gguf(source)  # its weights widened as read (gguf_file.py); its tokenizer written as tokenizer.model
    if not gguf and not (source / "config.json").is_file():
        raise MixtralError(f"{source} is not a model directory (no config.json) nor a GGUF file")
    if out_dir.exists() and out_dir.resolve() == source.resolve():
        raise MixtralError("the output directory must differ from the input directory")
    if read_quantization(source) is not None:
        raise MixtralError(f"{source} is already quantized; quantize the original checkpoint")
    args: ModelArgs = load_config(source)
    check_config_matches_files(source, args)
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(None if gguf else checkpoint_dtype(source),
                                                                       torch.bfloat16)

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as partial:
        _write(source, args, spec, dtype, partial, progress)
    config = args.to_hf_config()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["quantization"] = spec
    write_atomic(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    if gguf:
        write_gguf_tokenizer(source, out_dir)
    for name in COPIED_FILES if not gguf else ():
        if (source / name).is_file():
            shutil.copy(source / name, out_dir / name)
    return out_dir


def write_gguf_tokenizer(source: Path, out_dir: Path) -> None:
    """A GGUF file's vocabulary as tokenizer.model (SentencePiece-style) or tokenizer.json (byte-level BPE); its
    chat template, a BPE vocabulary's BOS and EOS, and whether prompts start with BOS in tokenizer_config.json; the
    ids that end generation in generation_config.json: what load_tokenizer reads back the same."""
    vocab = tokenizer_parts(source)
    settings = {"chat_template": vocab.template} if vocab.template is not None else {}
    if vocab.bpe is None:
        write_atomic(out_dir / "tokenizer.model", vocab.sentencepiece)
    else:
        write_atomic(out_dir / "tokenizer.json", vocab.bpe.to_str())
        settings.update({name: vocab.bpe.id_to_token(i) for name, i in (("bos_token", vocab.bos_id),
                                                                        ("eos_token", vocab.eos_id)) if i is not None})
    if not vocab.add_bos:
        settings["add_bos_token"] = False
    if settings:
        write_atomic(out_dir / "tokenizer_config.json", json.dumps(settings) + "\n")
    if vocab.end_ids:
        write_atomic(out_dir / "generation_config.json", json.dumps({"eos_token_id": sorted(vocab.end_ids)}) + "\n")


def checkpoint_dtype(source: Path) -> str | None:
    """The dtype config.json declares ("torch_dtype"; transformers 5 writes "dtype"), or None."""
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MixtralError(f"{source / 'config.json'}: cannot read it ({exc})") from None
    declared = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return declared if isinstance(declared, str) else None


def _quantized_on_meta(args: ModelArgs, spec: dict, int8_weights: frozenset[str] = frozenset()) -> Transformer:
    """The quantized model with no data: its state dict names every output tensor's dtype and shape. Weights named
    in `int8_weights` (as named_parameters names them) are int8 whatever the spec says."""
    with torch.device("meta"):
        model = Transformer(args)
    return quantize_on_meta(model, spec, int8_weights)


def quantize_on_meta(model: Transformer, spec: dict, int8_weights: frozenset[str] = frozenset()) -> Transformer:
    """A model on the meta device (one process's, or a rank's part: distributed.py) made quantized as `spec` and
    `int8_weights` say (see _quantized_on_meta), in place."""
    with torch.device("meta"):
        names = {id(p): name for name, p in model.named_parameters()}

        def make(weight, bits, group_size):
            if names.get(id(weight)) in int8_weights:
                bits, group_size = 8, None
            return _empty_like_quantized(weight, bits, group_size)

        quantize.swap_in_quantized(model, spec["bits"], spec["group_size"], spec["lm_head"], make)
    return model


def _layout(model: Transformer, spec: dict, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every output tensor: name -> (dtype, shape), as the quantized model's state dict has them."""
    layout = {}
    for name, tensor in model.state_dict().items():
        quantized = name.endswith((".qweight", ".scales"))
        layout[name] = (tensor.dtype if quantized else dtype, tuple(tensor.shape))
    if model.args.tie_embeddings and not spec["lm_head"]:
        layout.pop("lm_head.weight", None)  # the same tensor as embed.weight
    return layout


def _write(source: Path, args: ModelArgs, spec: dict, dtype: torch.dtype, path: Path, progress: bool) -> None:
    """The quantized checkpoint as one safetensors file at `path`: the header first, then each tensor in place."""
    layout = _layout(_quantized_on_meta(args, spec), spec, dtype)
    prefix, offsets, size = safetensors_header(layout, {"format": "pt", "quantization": quantize.METHOD})
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(size)  # the whole file at once; each tensor is written at its place

        def put(name: str, rows: torch.Tensor, expert: int | None, first_row: int) -> None:
            tensor_dtype, shape = layout[name]
            inner = shape[1:] if expert is not None else shape  # one expert's (N, ...) or the whole tensor
            row_bytes = math.prod(inner[1:]) * tensor_dtype.itemsize
            at = offsets[name] + (expert or 0) * math.prod(inner) * tensor_dtype.itemsize
            f.seek(at + first_row * row_bytes)
            f.write(memoryview(rows.to(tensor_dtype).contiguous().view(-1).view(torch.uint8).numpy()))

        stream_quantized(source, args, spec, dtype, layout, put, progress)


def load_quantizing(source: str | Path, args: ModelArgs, bits: int, group_size: int | None, lm_head: bool,
                    dtype: torch.dtype, device: str | torch.device = "cpu", progress: bool = True,
                    kernel_layout: bool = True, int8_weights: frozenset[str] = frozenset()) -> Transformer:
    """A plain checkpoint loaded and quantized on the way in: each tensor is read alone, cast to `dtype`,
    quantized and copied into the quantized model, so the peak is the quantized model plus one tensor (the
    same model as `quantize_model(load_weights(...))`, which holds the whole unquantized one first).
    `kernel_layout`: see quantize.quantize_model. `int8_weights`: weights held as int8 whatever `bits` says (a
    GGUF file's matrices stored in more than 4 bits: weights.gguf_int8_weights). A GGUF file's Q4_0, Q4_1 and Q4_K
    blocks held as int4 in groups of 32 keep their codes, with fp16 scales and (Q4_1, Q4_K) an fp16 offset per
    group (gguf_file.Q4Blocks.held); its Q8_0 blocks held as int8 keep theirs, with an fp16 scale per group of 32
    (Q8Blocks). Raises MixtralError for weights that do not match config.json."""
    spec = quantize.spec(bits, group_size, lm_head)
    model = _quantized_on_meta(args, spec, int8_weights)
    layout = gguf_block_scales(source, args, spec, _layout(model, spec, dtype), held=True)
    state = {name: torch.empty(shape, dtype=tensor_dtype, device=device)
             for name, (tensor_dtype, shape) in layout.items()}

    def put(name: str, rows: torch.Tensor, expert: int | None, first_row: int) -> None:
        target = state[name] if expert is None else state[name][expert]
        target[first_row:first_row + rows.shape[0]].copy_(rows)

    stream_quantized(Path(source), args, spec, dtype, layout, put, progress)
    quantize.take_held_blocks(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    state.clear()  # the model holds its tensors now; packing below replaces some of them
    if args.tie_embeddings and not lm_head:
        model.lm_head.weight = model.embed.weight
    if kernel_layout:
        for module in model.modules():
            if isinstance(module, quantize.QuantLinear):
                module._pack()
                release_free_memory()  # each weight's codes in the old layout, and the packing's temporaries
    return model.eval()


def gguf_block_scales(source: str | Path, args: ModelArgs, spec: dict, layout: dict, held: bool = False) -> dict:
    """`layout` with the scales of a GGUF file's 4-bit matrices (gguf_file.Q4Blocks.TYPES) held as int4 in groups
    of 32 in fp16, so that they are held as the file stores them (stream_quantized); with `held` (a loader, which
    can hold what a checkpoint cannot), also the group offsets of those that have a minimum (Q4_1, Q4_K; else they
    are quantized again), and the scales of its Q8_0 matrices held as int8, one per group of 32 in fp16 (else they
    are quantized again, a scale per row). Unchanged for any other source or spec."""
    if held and is_gguf(source) and spec:
        for name in gguf_q8_weights(Path(source), args):
            base = name.removesuffix(".weight")
            if layout.get(f"{base}.qweight", (None,))[0] == torch.int8:
                *lead, k = layout[f"{base}.qweight"][1]
                layout[f"{base}.scales"] = (torch.float16, (*lead, k // Q8Blocks.BLOCK))
    if is_gguf(source) and spec["bits"] == 4 and spec["group_size"] == Q4Blocks.BLOCK:
        with_offsets = gguf_offset_weights(Path(source), args, spec) if held else frozenset()
        for name, kinds in gguf_weight_types(Path(source), args).items():
            base = name.removesuffix(".weight")
            if layout.get(f"{base}.qweight", (None,))[0] != torch.uint8:  # not held as int4
                continue
            if kinds == {"Q4_0"} or name in with_offsets:
                layout[f"{base}.scales"] = (torch.float16, layout[f"{base}.scales"][1])
            if name in with_offsets:  # (the same rule the memory planner counts them by)
                layout[f"{base}.offsets"] = layout[f"{base}.scales"]
    return layout


def int8_in_groups(layout: dict, base: str) -> bool:
    """Whether `layout` holds the weight `base` ("layers.0.attn.wk") as int8 with a scale per group of columns (a
    GGUF file's Q8_0 blocks: gguf_block_scales) rather than one per row."""
    codes, scales = layout.get(f"{base}.qweight"), layout.get(f"{base}.scales")
    return codes is not None and codes[0] == torch.int8 and len(scales[1]) == len(codes[1])


def stream_quantized(source: Path, args: ModelArgs, spec: dict, dtype: torch.dtype, layout: dict, put,
                     progress: bool, experts=None) -> None:
    """Read the checkpoint one tensor at a time and hand every output tensor's rows to `put(name, rows, expert,
    first_row)`: the kept tensors cast to `dtype`, the quantized ones as codes and scales, a million weights at a
    time. `experts(name)`: the range of a stacked weight's experts wanted (default all; a rank's share: the others
    are neither read, where the file allows, nor quantized). Raises MixtralError for tensors the config does not
    have, misshapen or missing ones (weights.read_weights)."""
    def place(name: str, expert: int | None, matrix: torch.Tensor | Q4Blocks | Q8Blocks) -> None:
        """One weight (or one expert of a stacked one): quantized where the layout says so."""
        base = name.removesuffix(".weight")
        quantized = f"{base}.qweight" in layout
        bits = 8 if quantized and layout[f"{base}.qweight"][0] == torch.int8 else spec["bits"]  # (the head: int8)
        if isinstance(matrix, Q4Blocks):
            offsets = f"{base}.offsets" in layout
            if (quantized and bits == 4 and spec["group_size"] == Q4Blocks.BLOCK
                    and (matrix.minimums is None or offsets)):
                scales, held_offsets = matrix.held()
                for part in (scales, held_offsets):
                    if part is not None and not torch.isfinite(part).all():
                        raise MixtralError(f"{name}: its 4-bit blocks' scales or minimums are inf or NaN (in fp16)")
                put(f"{base}.qweight", quantize.pack_codes(matrix.codes), expert, 0)  # the file's codes, as they are
                put(f"{base}.scales", scales, expert, 0)  # fp16 when loading, bf16 in a checkpoint (layout)
                if offsets:  # (zero for the Q4_0 experts of a tensor whose others have minimums)
                    put(f"{base}.offsets", torch.zeros_like(scales) if held_offsets is None else held_offsets,
                        expert, 0)
                return
            matrix = matrix.dequantize().to(dtype)  # the file's values, quantized again below or kept
        if isinstance(matrix, Q8Blocks):
            if int8_in_groups(layout, base):
                held = matrix.held()
                if not torch.isfinite(held).all():
                    raise MixtralError(f"{name}: its Q8_0 blocks' scales are inf or NaN")
                put(f"{base}.qweight", matrix.codes, expert, 0)  # the file's codes and scales, as they are
                put(f"{base}.scales", held, expert, 0)
                return
            matrix = matrix.dequantize().to(dtype)
        if not quantized:  # kept as it is
            put(name, matrix, expert, 0)
            return
        step = max(1, quantize.QUANTIZE_STEP // matrix.shape[-1])
        for first in range(0, matrix.shape[0], step):  # rows are quantized independently
            qweight, scales = quantize.quantize_weight(matrix[first:first + step], bits,
                                                       None if bits == 8 else spec["group_size"])
            put(f"{base}.qweight", qweight, expert, first)
            put(f"{base}.scales", scales, expert, first)

    blocks = Q4Blocks.TYPES if any(name.endswith(".offsets") for name in layout) else ("Q4_0",)
    if any(int8_in_groups(layout, name.removesuffix(".qweight")) for name in layout if name.endswith(".qweight")):
        blocks += Q8Blocks.TYPES
    for name, expert, piece in read_weights(source, args, progress, blocks, experts):
        if isinstance(piece, torch.Tensor):
            piece = piece.to(dtype)  # quantized from the values the requested dtype holds, as a load would
        stacked = expert is None and len(piece.shape) == 3  # a whole (E, N, K) weight at once
        for index, matrix in ((i, piece[i]) for i in range(piece.shape[0])) if stacked else [(expert, piece)]:
            if index is not None and experts is not None and index not in experts(name):
                continue
            place(name, index, matrix)
            if name == "embed.weight" and args.tie_embeddings and "lm_head.qweight" in layout:
                place("lm_head.weight", None, matrix)  # a tied head quantized: from the embedding
        del piece
        release_free_memory()
