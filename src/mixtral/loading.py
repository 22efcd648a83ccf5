"""From a name to a ready model: resolve a local directory or a Hugging Face Hub id, then load it.

A Hub id (`mistralai/Mixtral-8x7B-Instruct-v0.1`) is looked up in the local Hugging Face cache first; only if
it is absent there (and HF_HUB_OFFLINE is not set) is the Hub asked, and only for safetensors, JSON and
tokenizer files. Without the model and without the Hub, the error says how to get it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels, memory_plan, torch_lowbit
from .config import ModelArgs, load_config
from .errors import MixtralError
from .gguf_file import is_gguf
from .model import Transformer
from .offloading import load_offloaded
from .quantize import parse_quantize
from .quantize import spec as quantization_spec
from .quantize_checkpoint import load_quantizing
from .tokenizer import Tokenizer, load_tokenizer
from .weights import (check_config_matches_files, check_stored_takes, gguf_held_as, gguf_planned,
                      load_quantized, load_weights, read_quantization, resolve_dtype)

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
MODELS_DIR = Path(__file__).parent / "models"


def default_model_path() -> Path:
    """The model shipped inside the package, used when no model is named."""
    shipped = sorted(p for p in MODELS_DIR.glob("*") if (p / "config.json").is_file()) if MODELS_DIR.is_dir() else []
    if not shipped:
        raise MixtralError("no model given and no model is shipped with this installation; pass --model DIR")
    return shipped[0]


def resolve_model(name: str | os.PathLike | None) -> Path:
    """A model directory for a local path, a Hub id, or None (the shipped model)."""
    if name is None:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() and not is_gguf(path):
            raise MixtralError(f"{path} is a file but not a GGUF file; pass the model directory that holds "
                               f"config.json and the weights, or a .gguf file")
        return path
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/")) or any(c in text for c in " \\:"):
        raise MixtralError(f"model directory not found: {path}")
    return _from_hub_cache(text)


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for this)
        pass
    hint = (f"download it on a machine with access: `hf download {repo_id} --include '*.safetensors' '*.json' "
            f"tokenizer.model`, then pass the directory or copy the Hugging Face cache over")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise MixtralError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:
        raise MixtralError(f"{repo_id} is not in the local Hugging Face cache and could not be downloaded "
                           f"({type(exc).__name__}); {hint}") from None


def load_model(path: str | os.PathLike | None, dtype: str | torch.dtype = "bfloat16",
               device: str = "cpu", progress: bool = True, quantize: str | None = None,
               pack: bool = True, max_memory: str | int | None = None, context: int | None = None,
               batch: int = 1, exact: bool = False) -> Transformer:
    """Just the model (no tokenizer) from a model directory or Hub id.

    A checkpoint written by `mixtral quantize` (a "quantization" block in config.json) loads quantized.
    quantize: "int8", "int4" or "int4-g<group size>" quantizes a plain checkpoint tensor by tensor as it is
    read; a "+head" suffix quantizes lm_head too (to int8). For a GGUF file of quantized blocks, None means the
    nearest of these (gguf_file.nearest_quantization, said on stderr when progress is on).
    pack: prepare the model for the fastest runner this machine has (kernels.prepare: on the CPU our own C
    kernels, else weights repacked for fbgemm); inference only, so pass False to train or re-quantize the model.
    max_memory: the process's memory budget ("16GB", "12GiB", bytes; memory_plan.py). When the experts do not
    all fit, they stay on disk and an expert cache holds as many as fit (kernels/offload.py); when even the rest
    does not fit, MixtralError says the minimum, before anything is read. context, batch: the KV cache the
    budget keeps room for: `batch` sequences of `context` positions (default min(the model's context, 4096)).
    exact: prompts stay on our exact fp32 kernels instead of the faster GEMMs (kernels/prompt.py, where the CPU
    multiplies bf16 or int8 in hardware: the README's "Prompts on GEMMs" says what they round).
    """
    model_dir = resolve_model(path)
    args: ModelArgs = load_config(model_dir)
    int8_weights = frozenset()
    if quantize is None and is_gguf(model_dir):  # a file of quantized blocks stays quantized, in our nearest format
        quantize, line, int8_weights = gguf_held_as(model_dir, args)  # (what it stores finer stays int8)
        if line and progress:
            print(line, file=sys.stderr, flush=True)
    wanted = parse_quantize(quantize)
    layout = not (pack and kernels.will_run_native(device))  # our kernels read int4 codes as stored
    stored = read_quantization(model_dir)
    check_config_matches_files(model_dir, args)  # before anything is built or allocated
    if max_memory is not None:
        budget = memory_plan.parse_size(max_memory)
        spec = stored
        if spec is None and wanted is not None:  # planned as it will be held once quantized
            spec = quantization_spec(*wanted)
        held = gguf_planned(model_dir, args, spec) if is_gguf(model_dir) else {}
        plan = memory_plan.plan(args, spec, resolve_dtype(dtype), budget, context, batch, bandwidth=(0.0, 0.0),
                                int8_weights=int8_weights, **held)
        if not plan.fits:
            raise MixtralError(f"a memory budget of {memory_plan.size_text(budget)} is too small for {model_dir.name}: "
                               f"it needs at least {memory_plan.size_text(plan.minimum)} (see `mixtral info --model "
                               f"{model_dir} --memory {max_memory}`)")
        if plan.offload and is_gguf(model_dir):
            raise MixtralError("expert offloading (a memory budget smaller than the model) reads safetensors: "
                               "convert the GGUF file with `mixtral quantize` first, or raise --max-memory")
        if plan.offload:
            if stored is None and wanted is not None:
                options = f"--bits {wanted[0]}" + (f" --group-size {wanted[1]}" if wanted[1] else "") + (
                    " --lm-head" if wanted[2] else "")
                raise MixtralError(f"this budget holds only some of the experts, and those left on disk are read as "
                                   f"stored: quantize the checkpoint once with `mixtral quantize {model_dir} OUT "
                                   f"{options}` and load OUT")
            if not (pack and kernels.will_run_native(device)):
                raise MixtralError("expert offloading (a memory budget smaller than the model) runs on mixtral's "
                                   "own CPU kernels: x86-64 with AVX2, device cpu, without --no-pack")
            return load_offloaded(model_dir, args, stored, resolve_dtype(dtype), plan, progress=progress, exact=exact)
    if stored is not None:
        check_stored_takes(model_dir, stored, quantize)
        model = load_quantized(model_dir, args, stored, resolve_dtype(dtype), torch.device(device), progress,
                               kernel_layout=layout)
    else:
        if wanted is None:
            model = load_weights(model_dir, args, resolve_dtype(dtype), torch.device(device), progress)
        else:  # quantized on the way in: never the whole unquantized model in memory
            model = load_quantizing(model_dir, args, *wanted, resolve_dtype(dtype), torch.device(device), progress,
                                    kernel_layout=layout, int8_weights=int8_weights)
    if pack:
        kernels.prepare(model, exact=exact)
    elif model.device.type == "cpu" and (stored or wanted):
        torch_lowbit.answers()  # probe torch's low-bit kernels now (once per machine), not at the first matmul
    return model


def load(path: str | os.PathLike | None = None, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
         progress: bool = True, quantize: str | None = None, pack: bool = True,
         max_memory: str | int | None = None, context: int | None = None,
         batch: int = 1, exact: bool = False) -> tuple[Transformer, Tokenizer]:
    """`model, tokenizer = load(path_or_id)`: the model in `dtype` on `device`, and its tokenizer.

    path: a directory with config.json, *.safetensors and tokenizer files; a Hub id; or None for the
    shipped model. quantize: None, "int8", "int4" or "int4-g32" (weight-only, each tensor as it is read; a checkpoint
    quantized by `mixtral quantize` is detected by itself). pack, max_memory, context, batch, exact: see `load_model`.
    Raises
    MixtralError for anything missing or malformed.
    """
    model_dir = resolve_model(path)
    tokenizer = load_tokenizer(model_dir)
    return (load_model(model_dir, dtype, device, progress, quantize, pack, max_memory, context, batch, exact),
            tokenizer)


@dataclass(frozen=True)
class LoadOptions:
    """How a front end loads its model: `load(path, **dataclasses.asdict(options))`.

    The fields mean what `load()`'s keywords of the same names mean, and their defaults are its defaults.
    The `mixtral` commands build one from their options (`cli.load_options`); a program can build its own.
    """

    dtype: str = "bfloat16"
    device: str = "cpu"
    quantize: str | None = None
    pack: bool = True
    max_memory: str | None = None
    context: int | None = None
    batch: int = 1
    exact: bool = False
