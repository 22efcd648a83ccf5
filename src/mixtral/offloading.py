"""Loading a model whose experts stay on disk: everything else is read into memory, and each expert is found in
the checkpoint's files (file, offset, bytes) for the expert store (kernels/offload.py) to read when it is needed.

Works on plain Hugging Face checkpoints (one tensor per expert weight: three reads per expert, each converted to
the model's dtype if stored in another) and on checkpoints written by `mixtral quantize` (each expert one slice of
the stacked codes and scales: six reads). Transformers 5's fused experts (every expert in one tensor, gate and up
interleaved by column) cannot be read one expert at a time and are refused with what to do instead.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import kernels, quantize
from .config import ModelArgs
from .errors import MixtralError
from .kernels.native_lib import FORMATS, I4, I8
from .kernels.offload import ExpertStore, Piece, expert_format
from .memory import release_free_memory
from .memory_plan import Plan
from .model import MoE, Transformer
from .weights import (StoredTensor, _empty_like_quantized, pieces, read_stored, safetensors_files,
                      stored_tensors)

EXPERT_WEIGHTS = ("w1", "w3", "w2")


def load_offloaded(model_dir: Path, args: ModelArgs, spec: dict | None, dtype: torch.dtype, plan: Plan,
                   prefetch: bool = True, progress: bool = True, exact: bool = False) -> Transformer:
    """The model with every weight but the experts in memory, prepared for the native runner with an expert store
    of `plan.slots` slots. `spec`: the checkpoint's quantization (None: a plain checkpoint, loaded in `dtype`).
    `progress`: a bar while the resident weights are read (a model's worth of tensors).
    Raises MixtralError for a checkpoint that does not match its config, or one whose experts cannot be read
    one at a time."""
    with torch.device("meta"):
        model = Transformer(args)
        if spec is not None:
            quantize.swap_in_quantized(model, spec["bits"], spec["group_size"], spec["lm_head"], _empty_like_quantized)
    moe_layers = [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MoE)]
    if not moe_layers:
        raise MixtralError(f"{model_dir}: a dense model has no experts to offload")
    entries = {entry.name: entry for path in safetensors_files(model_dir) for entry in stored_tensors(path)}
    expected = model.state_dict()
    if args.tie_embeddings and not (spec and spec["lm_head"]):
        expected.pop("lm_head.weight")
    expert_names = {f"layers.{i}.ffn.{w}{suffix}" for i in moe_layers for w in EXPERT_WEIGHTS
                    for suffix in ((".qweight", ".scales") if spec else ("",))}
    located = _locate(model_dir, args, spec, dtype, entries, expected, expert_names)
    state = {}
    resident = located["resident"]
    for name, entry in tqdm(resident.items(), desc="Loading the resident weights", unit="tensor",
                            disable=not progress or len(resident) < 50):
        tensor = read_stored(entry)
        quantized = name.endswith((".qweight", ".scales"))
        state[name] = tensor if quantized else tensor.to(dtype)
        del tensor
    release_free_memory()
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings and not (spec and spec["lm_head"]):
        model.lm_head.weight = model.embed.weight
    model.eval()

    if spec is None:
        fmt = FORMATS[dtype]
        formats = {w: expert_format(fmt, *_shape(args, w), 0, dtype.itemsize) for w in EXPERT_WEIGHTS}
    else:
        fmt = I8 if spec["bits"] == 8 else I4
        formats = {w: expert_format(fmt, *_shape(args, w), spec["group_size"] or 0, 1) for w in EXPERT_WEIGHTS}
    store = ExpertStore(located["experts"], formats, plan.slots, prefetch=prefetch)
    kernels.prepare(model, store=store, exact=exact)
    if kernels.runner(model).name != "native":
        store.close()
        raise MixtralError("expert offloading runs on mixtral's own CPU kernels, which cannot run this model here")
    weakref.finalize(model, store.close)  # its reader threads end with the model
    return model


def _shape(args: ModelArgs, weight: str) -> tuple[int, int]:
    return (args.dim, args.hidden_dim) if weight == "w2" else (args.hidden_dim, args.dim)


def _locate(model_dir, args, spec, dtype, entries: dict[str, StoredTensor], expected: dict, expert_names: set) -> dict:
    """{"resident": {our name: StoredTensor}, "experts": {(layer, expert): [Piece, ...]}}, every shape checked;
    a plain checkpoint's experts are held in `dtype`."""
    resident, experts, unexpected = {}, {}, []
    E = args.n_experts

    def check(entry: StoredTensor, shape, dtype=None) -> None:
        if tuple(entry.shape) != tuple(shape) or (dtype is not None and entry.dtype != dtype):
            raise MixtralError(f"{model_dir}: tensor {entry.name} is {entry.dtype} {tuple(entry.shape)}, expected "
                               f"{dtype or ''} {tuple(shape)}; the weights do not match config.json")

    for name, entry in entries.items():
        if spec is not None:  # our own names; experts stacked (E, ...)
            if name not in expected:
                unexpected.append(name)
                continue
            quantized = name.endswith((".qweight", ".scales"))
            check(entry, expected[name].shape, expected[name].dtype if quantized else None)
            if name in expert_names:
                parts = name.split(".")  # layers.L.ffn.wN.qweight
                layer, weight, part = int(parts[1]), parts[3], "data" if parts[4] == "qweight" else "scales"
                each = entry.nbytes // E
                for e in range(E):
                    experts.setdefault((layer, e), []).append(
                        Piece(weight, part, str(entry.path), entry.offset + e * each, each, entry.dtype, entry.dtype))
            else:
                resident[name] = entry
            continue
        found = pieces(name, torch.empty(entry.shape, dtype=entry.dtype, device="meta"), args)
        if found is None or any(ours not in expected for ours, _, _ in found):
            unexpected.append(name)
            continue
        for ours, expert, _ in found:
            if ours in expert_names:
                if expert is None:
                    raise MixtralError(f"{model_dir}: tensor {name} holds every expert of a layer at once (the "
                                       "fused layout of transformers 5), which cannot be read one expert at a time; "
                                       "load it without a memory budget and save it with save_checkpoint, or "
                                       "quantize it with `mixtral quantize`")
                check(entry, expected[ours].shape[1:])
                layer, weight = int(ours.split(".")[1]), ours.split(".")[3]
                experts.setdefault((layer, expert), []).append(
                    Piece(weight, "data", str(entry.path), entry.offset, entry.nbytes, entry.dtype, dtype))
            else:
                check(entry, expected[ours].shape)
                resident[ours] = entry
    want = len(EXPERT_WEIGHTS) * (2 if spec is not None else 1)
    missing = sorted(set(expected) - set(resident) - expert_names)
    missing += [f"layer {layer} expert {e}" for layer in sorted({int(n.split('.')[1]) for n in expert_names})
                for e in range(E) if len(experts.get((layer, e), ())) != want]
    if unexpected or missing:
        raise MixtralError(f"{model_dir}: {len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3]) or '-'}) "
                           f"and {len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); "
                           "the checkpoint does not match its config.json")
    return {"resident": resident, "experts": experts}
