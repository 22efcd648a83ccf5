"""One model over N processes with torch.distributed: tensor parallel attention, expert parallel MoE, vocabulary
parallel embedding and output projection. Started by torchrun; gloo carries the collectives (the ranks run on
CPUs: GPUs are not split yet).

    torchrun --nproc-per-node 2 -m mixtral generate --model DIR --prompt "..."
    torchrun --nproc-per-node 2 -m mixtral serve --model DIR

How the model is split (rank r of N; each rank reads only its rows of the checkpoint, and a tensor split by
columns, o and a dense w2, whole and one at a time):
- attention by heads: q, k and v keep the rows of heads [r H/N, (r+1) H/N) (and of their key/value heads), so
  each rank's KV cache holds its heads only; o keeps the matching columns, and one sum over the ranks (a gather of
  the parts for a few rows, else an all-reduce: _sum_in_place) adds up their parts of its output;
- the MoE block by experts: each rank holds experts [r E/N, (r+1) E/N) of every layer; the router is on every
  rank, so every rank routes every token the same way, runs the tokens routed to its experts, and one sum over
  the ranks adds up the experts' contributions (a dense MLP is split like attention: w1, w3 by rows, w2 by
  columns);
- embedding and output projection by vocabulary rows: a token's embedding comes from the rank that holds its
  row (zeros elsewhere, summed over the ranks), and the logits are gathered from all ranks;
- norms are on every rank.
Numbers: the same as one process up to the order of the all-reduced sums (fp32: logits within 1e-4).

One engine, N ranks: rank 0 runs the command (its engine, HTTP server, chat loop) on a model whose runner
(`LeaderRunner`) first sends each forward pass's inputs to the other ranks, which run the same pass
(`follow`) until rank 0 says stop. A rank that dies makes the collectives fail on the others (a dead
process at once; a hung one after `--dist-timeout`): rank 0 fails the requests it holds and exits non-zero.
Every rank routes every token itself (in fp32): ranks on CPUs that round differently could route a near-tie
differently, so a split over unlike machines is not supported.

Prefix reuse works as in one process: rank 0's prefix cache sends each load and store to the other ranks, which
do the same on their own KV caches. Weights can be quantized as each rank loads them (`--quantize int8|int4`), or
come quantized from a checkpoint written by `mixtral quantize` (split as stored; +head too) or a GGUF file (each
tensor read whole, one at a time, held as one process holds the file, the rank's part kept).

Each rank runs its part on our C kernels where they run (kernels/native.py with a `Split`: every pass op by op,
the decode steps too, each part summed over the ranks before it is added to the residual stream), else on the
model's own torch code (`load_shard(pack=False)`, and other devices). Not yet split: GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import experts
from .config import ModelArgs, load_config
from .errors import MixtralError
from .kernels import will_run_native
from .kernels.runner import Runner
from .kv_cache import KVCache
from .memory import release_free_memory
from .prefix_cache import MIN_TOKENS, PrefixCache
from .quantize import QuantLinear, parse_quantize, quantize_model, spec, swap_in_quantized, take_held_blocks
from .model import MoE, Routing, Transformer
from .gguf_file import Q8Blocks, is_gguf
from .quantize_checkpoint import gguf_block_scales, int8_in_groups, quantize_on_meta, stream_quantized
from .weights import (_empty_like_quantized, check_stored_takes, gguf_held_as, gguf_q8_weights, read_quantization,
                      read_stored, read_weights, resolve_dtype, safetensors_files, skipped, stored_tensors, target)


class RankFailed(MixtralError):
    """A collective failed: another rank died or stopped answering."""


def world() -> int:
    """Processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


_control: list = []  # the process group rank 0's commands travel on, and the model's timeout (see init)


def init(timeout_s: float = 60.0) -> None:
    """Join the process group torchrun set up (gloo: the ranks run on CPUs); the model's collectives fail after
    timeout_s. Rank 0's commands travel on a second group that waits as long as it takes: a follower waits for the
    next forward pass however long rank 0 stays idle (a server between requests, a chat while the user types),
    and still sees a dead rank 0 at once, by its closed connection; rank 0 itself gives a command timeout_s to
    be taken."""
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("gloo", timeout=timeout)
        _control[:] = [dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365)), timeout]


@dataclass(frozen=True)
class Shard:
    """Which part of each split dimension rank `rank` of `world` holds."""

    rank: int
    world: int

    def even(self, n: int, what: str) -> tuple[int, int]:
        if n % self.world:
            raise MixtralError(f"{what} ({n}) do not split evenly over {self.world} ranks; run with a number of "
                               f"ranks that divides it")
        step = n // self.world
        return self.rank * step, (self.rank + 1) * step

    def vocab_step(self, n: int) -> int:
        """Rows of an n-row vocabulary per rank: ceil(n / world), the last rank fewer (`vocab`)."""
        return -(-n // self.world)

    def vocab(self, n: int) -> tuple[int, int]:
        """Rows [start, stop) of an n-row vocabulary."""
        step = self.vocab_step(n)
        return min(n, self.rank * step), min(n, (self.rank + 1) * step)


@contextlib.contextmanager
def _collective():
    """A collective's failure (a dead peer's closed connection, a timeout) as RankFailed."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        raise RankFailed(f"a rank stopped answering: {exc}") from None


# Up to this size a sum over the ranks gathers every rank's part and adds them up in rank order on each: gloo's
# all-reduce of a decode step's few rows took 4x as long as a gather (2 ranks on one machine: 1.4 ms against 0.36
# for 4 KB; at 256 KB the all-reduce was the faster, 1.0 ms against 1.3). Every rank adds the same parts in the
# same order, so all hold the same sum (with 3 or more ranks, a larger sum's order is gloo's).
GATHERED_SUM_BYTES = 128 << 10


def _sum_in_place(x: torch.Tensor) -> None:
    """x (fp32, contiguous) becomes its sum over the ranks."""
    with _collective():
        if x.nbytes > GATHERED_SUM_BYTES:
            dist.all_reduce(x)
            return
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
    total = parts[0]
    for part in parts[1:]:
        total += part
    x.copy_(total)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks, in fp32 whatever x's dtype; back in x's dtype."""
    total = x.float() if x.dtype != torch.float32 else x.contiguous()  # (callers pass a temporary: summed in place)
    _sum_in_place(total)
    return total.to(x.dtype)


class VocabEmbedding(nn.Module):
    """The embedding rows [start, stop) of the vocabulary; other tokens get zeros, summed over the ranks."""

    def __init__(self, start: int, stop: int, dim: int):
        super().__init__()
        self.start, self.stop = start, stop
        self.weight = nn.Parameter(torch.empty(stop - start, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        here = (ids >= self.start) & (ids < self.stop)
        x = F.embedding((ids - self.start).clamp_(0, max(self.stop - self.start - 1, 0)), self.weight)
        return _sum_over_ranks(x * here[..., None].to(x.dtype))


class VocabHead(nn.Module):
    """The output projection's rows [start, stop); every rank's logits gathered into the whole vocabulary."""

    def __init__(self, start: int, stop: int, dim: int, vocab_size: int, step: int):
        super().__init__()
        self.vocab_size, self.step = vocab_size, step  # (step: every rank's rows but the last's, Shard.vocab_step)
        self.weight = nn.Parameter(torch.empty(stop - start, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_vocabulary(F.linear(x, self.weight), self.vocab_size, self.step)


def _gather_vocabulary(local: torch.Tensor, vocab_size: int, step: int) -> torch.Tensor:
    """Each rank's logits for its `step` vocabulary rows (the last rank's fewer), gathered into the whole vocabulary."""
    if local.shape[-1] < step:  # the last rank's slice is shorter: pad to the common size
        local = F.pad(local, (0, step - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    with _collective():
        dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def _head_gathers(model: Transformer, args: ModelArgs, step: int) -> None:
    """After the output projection's rows were quantized (+head: int8 per row, so a rank's rows are exactly one
    process's), its logits are gathered by a forward hook, as VocabHead gathers a plain one's."""
    model.lm_head.register_forward_hook(lambda module, inputs, out: _gather_vocabulary(out, args.vocab_size, step))


def _sum_output_over_ranks(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a module whose last linear layer holds some of its input columns (attention's o, a dense
    MLP's w2): its output summed over the ranks, whatever that layer is (plain or quantized)."""
    return _sum_over_ranks(output)


class ExpertParallelMoE(MoE):
    """The whole router, experts [start, stop) of the layer; each token's mix summed over the ranks."""

    def __init__(self, args: ModelArgs, start: int, stop: int):
        super().__init__(replace(args, n_experts=stop - start, top_k=min(args.top_k, stop - start)))
        self.top_k = args.top_k  # (of all the experts: fewer may be held here than a token picks)
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)
        logits, expert_ids, weights = self.route(tokens)
        if routing is not None:
            routing.append(Routing(logits.view(B, T, -1), expert_ids.view(B, T, -1), weights.view(B, T, -1)))
        out = torch.zeros_like(tokens)
        for e in range(self.start, self.stop):  # ascending, as one process sums them
            token, choice = (expert_ids == e).nonzero(as_tuple=True)
            if token.numel():
                y = experts.swiglu(tokens[token], e - self.start, self.w1, self.w3, self.w2)  # plain or quantized
                out.index_add_(0, token, y * weights[token, choice][:, None].to(x.dtype))
        return _sum_over_ranks(out).view(B, T, D)


def _split(model: Transformer, args: ModelArgs, shard: Shard) -> dict[str, tuple[int, int, int]]:
    """Swap in the split modules (on the meta device); return, per parameter name, (dimension, start, stop) of the
    checkpoint tensor this rank keeps (dimension -1: all of it; for experts, the expert range)."""
    D, Dh = args.dim, args.head_dim
    h0, h1 = shard.even(args.n_heads, "attention heads")
    g0, g1 = shard.even(args.n_kv_heads, "key/value heads")
    v0, v1 = shard.vocab(args.vocab_size)
    keep = {"embed.weight": (0, v0, v1), "lm_head.weight": (0, v0, v1)}
    model.embed = VocabEmbedding(v0, v1, D)
    model.lm_head = VocabHead(v0, v1, D, args.vocab_size, shard.vocab_step(args.vocab_size))
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for i, layer in enumerate(model.layers):
        layer.attn.wo = nn.Linear((h1 - h0) * Dh, D, bias=False)
        layer.attn.register_forward_hook(_sum_output_over_ranks)
        keep[f"layers.{i}.attn.wq.weight"] = (0, h0 * Dh, h1 * Dh)
        keep[f"layers.{i}.attn.wk.weight"] = (0, g0 * Dh, g1 * Dh)
        keep[f"layers.{i}.attn.wv.weight"] = (0, g0 * Dh, g1 * Dh)
        keep[f"layers.{i}.attn.wo.weight"] = (1, h0 * Dh, h1 * Dh)
        if args.is_moe:
            e0, e1 = shard.even(args.n_experts, "experts")
            layer.ffn = ExpertParallelMoE(args, e0, e1)
            for w in ("w1", "w3", "w2"):
                keep[f"layers.{i}.ffn.{w}"] = (0, e0, e1)
        else:
            i0, i1 = shard.even(args.hidden_dim, "MLP columns")
            layer.ffn.w1 = nn.Linear(D, i1 - i0, bias=False)
            layer.ffn.w3 = nn.Linear(D, i1 - i0, bias=False)
            layer.ffn.w2 = nn.Linear(i1 - i0, D, bias=False)
            layer.ffn.register_forward_hook(_sum_output_over_ranks)
            keep[f"layers.{i}.ffn.w1.weight"] = keep[f"layers.{i}.ffn.w3.weight"] = (0, i0, i1)
            keep[f"layers.{i}.ffn.w2.weight"] = (1, i0, i1)
    return keep


def _read_part(entry, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a stored tensor read alone (they are contiguous in the file); columns: read, sliced."""
    if dim == 0:
        row = entry.nbytes // entry.shape[0]
        part = replace(entry, shape=(stop - start, *entry.shape[1:]), offset=entry.offset + start * row,
                       nbytes=(stop - start) * row)
        return read_stored(part)
    return read_stored(entry).narrow(dim, start, stop - start).clone()


def _quantized_part(entry, keep: dict[str, tuple[int, int, int]], stored: dict) -> torch.Tensor:
    """This rank's part of a tensor of a checkpoint quantized on disk, as stored. Codes and scales are split as the
    weight they stand for is: by rows (q, k, v, w1, w3; experts; vocabulary rows) their rows; by columns (o, a
    dense w2) their columns: int8's per-row scales then stay whole (the rank's columns are scaled as in the full
    row), int4's codes (two per byte) and group scales are cut at a group boundary."""
    base, _, kind = entry.name.rpartition(".")
    if kind not in ("qweight", "scales"):
        dim, start, stop = keep.get(entry.name, (-1, 0, 0))
    else:
        dim, start, stop = keep.get(f"{base}.weight", keep.get(base, (-1, 0, 0)))
        if dim == 1 and stored["bits"] == 8:
            if kind == "scales":
                return read_stored(entry)
        elif dim == 1:  # (at group boundaries: load_shard checked)
            step = _column_step(kind, stored["bits"] == 8, stored["group_size"])
            start, stop = start // step, stop // step
    return read_stored(entry) if dim < 0 else _read_part(entry, dim, start, stop)


def _column_step(kind: str, int8: bool, group: int | None) -> int:
    """Weight columns per column of a quantized weight's stored tensor `kind` ("qweight", "scales" or an int4
    weight's "offsets"), for cutting it by columns (int8's per-row scales are not cut: the callers keep them whole)."""
    return 1 if int8 else 2 if kind == "qweight" else group


def _gguf_part(path: Path, model: Transformer, args: ModelArgs, keep: dict[str, tuple[int, int, int]],
               streamed: dict | None, dtype: torch.dtype, device: str, progress: bool) -> dict[str, torch.Tensor]:
    """This rank's part of a GGUF file's weights, by name: each tensor is read whole (dequantized to the file's
    values, but for blocks held as they are; of merged experts, the rank's only), one at a time, and only the rank's
    part kept. `streamed`: the quantization spec they are held in (the split model on the meta device already has
    its modules): quantized as one process quantizes them (quantize_checkpoint.stream_quantized: Q4_0, Q4_1 and Q4_K
    blocks with their codes, fp16 scales and group offsets as one process holds them, Q8_0 blocks held as int8 with
    their codes and scales, what the file stores finer as int8), then cut as a checkpoint quantized on disk is
    (_quantized_part); offsets and Q8_0 scales as group scales are."""
    layout = {name: (t.dtype if name.endswith((".qweight", ".scales")) else dtype, tuple(t.shape))
              for name, t in model.state_dict().items()}
    if streamed is not None:
        layout = gguf_block_scales(path, args, streamed, layout, held=True)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, rows: torch.Tensor, expert: int | None, first_row: int) -> None:
        """Rows [first_row, ...) of one output tensor of the whole model (of one expert of it): the rank's part."""
        base, _, kind = name.rpartition(".")
        codes = kind in ("qweight", "scales", "offsets")
        dim, start, stop = keep.get(f"{base}.weight", keep.get(base, (-1, 0, 0))) if codes else keep.get(
            name, (-1, 0, 0))
        if name not in layout:
            raise MixtralError(f"{path}: tensor {name} does not match this config")
        if name not in state:
            state[name] = torch.empty(layout[name][1], dtype=layout[name][0], device=device)
        into = state[name]
        if expert is not None:  # one expert of a stacked weight: dimension 0 of `keep` is the rank's experts
            if not start <= expert < stop:
                return
            into, dim = into[expert - start], -1
        if dim == 0:
            low, high = max(first_row, start), min(first_row + rows.shape[0], stop)
            if low < high:
                into[low - start:high - start].copy_(rows[low - first_row:high - first_row])
            return
        if dim == 1:  # columns (at group boundaries: load_shard checked); int8's per-row scales stay whole
            int8 = codes and layout[f"{base}.qweight"][0] == torch.int8
            grouped = kind == "scales" and int8_in_groups(layout, base)
            if not (int8 and kind == "scales") or grouped:
                step = (Q8Blocks.BLOCK if grouped else _column_step(kind, int8, streamed and streamed["group_size"])
                        if codes else 1)
                rows = rows[:, start // step:stop // step]
        into[first_row:first_row + rows.shape[0]].copy_(rows)

    def experts(name: str) -> range:
        return range(*keep[name][1:])

    if streamed is not None:
        stream_quantized(path, args, streamed, dtype, layout, put, progress and rank() == 0, experts)
    else:
        for name, expert, piece in read_weights(path, args, progress and rank() == 0, experts=experts):
            put(name, piece.to(dtype), expert, 0)
            release_free_memory()
    return state


def load_shard(model_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               progress: bool = True, quantize: str | None = None, pack: bool = True,
               exact: bool = False) -> Transformer:
    """This rank's part of the model in `model_dir` (a Hugging Face safetensors checkpoint, one written by `mixtral
    quantize`, or a GGUF file), reading only that part (a GGUF file: each tensor read whole, one at a time).
    quantize: "int8", "int4" or "int4-g<group size>" quantizes this rank's attention and expert weights once read
    (quantize.py; a split weight's scales are those of the rank's own part: o's per-row int8 scales cover its
    columns only; "+head" quantizes its vocabulary rows, int8 per row). A checkpoint quantized on disk is split as
    stored: each rank holds exactly the codes and scales one process would (`_quantized_part`).
    pack: run the rank's passes on our C kernels where they run here (`_prepare_kernels`), else the torch code;
    exact: their prompts on our exact fp32 kernels, not the GEMMs of kernels/prompt.py (as `load(exact=True)`)."""
    model_dir = Path(model_dir)
    args = load_config(model_dir)
    shard = Shard(rank(), world())
    gguf, int8_weights = is_gguf(model_dir), frozenset()
    if gguf and quantize is None:  # held in our nearest format, as one process holds it
        quantize, line, int8_weights = gguf_held_as(model_dir, args)
        if line and progress and shard.rank == 0:
            print(line, file=sys.stderr, flush=True)
    stored = None if gguf else read_quantization(model_dir)
    if stored is not None:
        check_stored_takes(model_dir, stored, quantize)
        quantize = None  # (what it asks for is what the checkpoint holds)
    wanted = parse_quantize(quantize)
    local = replace(args, n_heads=args.n_heads // shard.world, n_kv_heads=args.n_kv_heads // shard.world)
    with torch.device("meta"):
        model = Transformer(local)
        keep = _split(model, args, shard)
    model.args, model.full_args = local, args
    streamed = spec(*wanted) if gguf and wanted is not None else None  # a GGUF file quantized as it is read
    held = stored or streamed
    group = held["group_size"] if held is not None and held["bits"] == 4 else None
    for name, (dim, start, stop) in keep.items():  # before anything is read: int4 codes split at group boundaries
        if group and dim == 1 and (start % group or stop % group):
            raise MixtralError(f"{name}: its columns [{start}, {stop}) on this rank do not start and end at a "
                               f"boundary of its int4 groups of {group}; run with a number of ranks that splits it "
                               f"at one")
    if stored is not None:
        with torch.device("meta"):
            swap_in_quantized(model, stored["bits"], stored["group_size"], stored["lm_head"], _empty_like_quantized)
    if streamed is not None:
        quantize_on_meta(model, streamed, int8_weights)
        wanted = None  # (quantized as it is read)
        q8 = gguf_q8_weights(model_dir, args)  # Q8_0 blocks held as int8: cut at their groups of 32
        for name, (dim, start, stop) in keep.items():
            if (name in q8 and dim == 1 and model.get_submodule(name.removesuffix(".weight")).bits == 8
                    and (start % Q8Blocks.BLOCK or stop % Q8Blocks.BLOCK)):
                raise MixtralError(f"{name}: its columns [{start}, {stop}) on this rank do not start and end at a "
                                   f"boundary of its Q8_0 blocks of {Q8Blocks.BLOCK}; run with a number of ranks "
                                   f"that splits it at one")
    dtype = resolve_dtype(dtype)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    params: dict[str, torch.Tensor] = {}
    files = [] if gguf else safetensors_files(model_dir)
    if gguf:
        params = _gguf_part(model_dir, model, args, keep, streamed, dtype, device, progress)
    for path in tqdm(files, desc=f"rank {shard.rank}: loading its shard", unit="file",
                     disable=not progress or len(files) < 2):
        for entry in stored_tensors(path):
            release_free_memory()  # the tensors read so far and dropped (else glibc keeps them resident)
            if stored is not None:
                if entry.name not in expected:
                    raise MixtralError(f"{model_dir}: tensor {entry.name} is not one this config's quantized model "
                                       f"has; the checkpoint does not match its config.json")
                name, tensor = entry.name, _quantized_part(entry, keep, stored)
            else:
                if skipped(entry.name, args):
                    continue
                found = target(entry.name, args)
                if found is None:
                    raise MixtralError(f"{model_dir}: tensor {entry.name} is not one a split model reads "
                                       f"(transformers 5 fused experts are not split yet)")
                name, expert = found
                if expert is not None:  # one expert of a stacked weight: only this rank's experts are read
                    _, e0, e1 = keep[name]
                    if e0 <= expert < e1:
                        if name not in params:
                            params[name] = torch.empty(expected[name].shape, dtype=dtype, device=device)
                        params[name][expert - e0].copy_(read_stored(entry))
                    continue
                if name not in expected:
                    raise MixtralError(f"{model_dir}: tensor {entry.name} does not match this config")
                dim, start, stop = keep.get(name, (-1, 0, 0))
                tensor = read_stored(entry) if dim < 0 else _read_part(entry, dim, start, stop)
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise MixtralError(f"tensor {entry.name} has shape {tuple(tensor.shape)} here, but the config "
                                   f"implies {tuple(expected[name].shape)}; the weights do not match config.json")
            quantized = name.endswith((".qweight", ".scales"))
            if quantized and tensor.dtype != expected[name].dtype:
                raise MixtralError(f"{model_dir}: tensor {name} is {tensor.dtype}, expected {expected[name].dtype}; "
                                   f"the weights do not match config.json")
            params[name] = tensor.to(device=device, dtype=tensor.dtype if quantized else dtype)
    missing = [n for n in expected if n not in params and not (args.tie_embeddings and n == "lm_head.weight")]
    if missing:
        raise MixtralError(f"{model_dir}: {len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}")
    take_held_blocks(model, params)
    model.load_state_dict(params, strict=False, assign=True)
    del params, expected  # (the model holds its tensors alone: preparing them for the kernels moves, not copies)
    tensor = None  # (nor the last one read)
    if args.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.embed.weight
    native = pack and will_run_native(model.device)  # (our kernels read int4 codes as stored)
    for module in model.modules():
        if isinstance(module, QuantLinear) and not native:
            module._pack()  # (as one process's load does: int4 in torch's kernel layout where it has one)
    if wanted is not None:
        quantize_model(model, *wanted, kernel_layout=not native)
        release_free_memory()
    if isinstance(model.lm_head, QuantLinear):
        _head_gathers(model, args, shard.vocab_step(args.vocab_size))
    model.eval()
    if pack:
        _prepare_kernels(model, args, shard, exact)
    return model


def _prepare_kernels(model: Transformer, args: ModelArgs, shard: Shard, exact: bool = False) -> None:
    """The rank's passes on our C kernels (kernels/native.py, op by op, the parts joined where the torch code joins
    them), where they run on this device; else the model stays on its torch code."""
    from .kernels import native

    step = shard.vocab_step(args.vocab_size)
    split = native.Split(reduce=_sum_in_place, gather=lambda logits: _gather_vocabulary(logits, args.vocab_size, step))
    model.runner = native.prepare(model, exact=exact, split=split)


def _passes(model: Transformer):
    """What runs a forward pass on this rank: the kernels' runner `_prepare_kernels` gave the model, else its own
    torch code."""
    return model.runner.forward if model.runner is not None else model.compute


# ---- rank 0 leads, the others follow -------------------------------------------------------------------------

STOP, FORWARD, NEW_CACHE, NEW_PREFIX, PREFIX_LOAD, PREFIX_STORE = range(6)
_HEADER = 8  # int64s: the command and its numbers (zeros after them); then the tensors it names
# FORWARD: B, T, n_keys (-1 none), cache id (-1 none), has pos, has logits_at, has slots; then the tensors
# NEW_CACHE: id, how many caches are alive, batch size, max length; then the live ids
# NEW_PREFIX: budget bytes. PREFIX_LOAD / PREFIX_STORE: cache id, row, tokens; then the token ids


def _send(numbers: list[int], *tensors) -> None:
    """Rank 0: a command header, then the tensors that are not None (as int64)."""
    _broadcast(torch.tensor([int(n) for n in numbers] + [0] * (_HEADER - len(numbers)), dtype=torch.int64))
    for tensor in tensors:
        if tensor is not None:
            _broadcast(torch.as_tensor(tensor).to(torch.int64).cpu().contiguous())


def _receive(shape) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.int64)
    _broadcast(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> None:
    """A command or its inputs, from rank 0 to the others, on the control group: rank 0 waits the model's timeout
    for the others to take it (a hung rank holds it up), they wait for it as long as it takes."""
    group, timeout = _control if _control else (None, None)
    with _collective():
        work = dist.broadcast(tensor, src=0, group=group, async_op=True)
        if dist.get_rank() == 0 and timeout is not None:
            work.wait(timeout)
        else:
            work.wait()


class LeaderRunner(Runner):
    """Rank 0's runner: each forward pass's inputs go to the other ranks first (they run the same pass), then
    it runs here (on our C kernels where they run, else the model's own code). Anything that stops a pass once
    the others have started it (a failed collective, an error or an interrupt here) leaves the ranks out of step:
    the runner is then `failed`, every later pass raises RankFailed, and `on_failure` is called once."""

    name = "torch.distributed"

    def __init__(self, model):
        super().__init__(model)
        self._run = _passes(model)  # (before `lead` makes this the model's runner)
        self._caches: weakref.WeakValueDictionary[int, KVCache] = weakref.WeakValueDictionary()
        self._ids = 0
        self.failed: str | None = None
        self.on_failure = None  # called once, from the thread whose pass failed
        self._lock = threading.Lock()  # one pass at a time; stop() never cuts into one

    def _cache_id(self, cache: KVCache) -> int:
        for key, known in self._caches.items():
            if known is cache:
                return key
        self._ids += 1
        self._caches[self._ids] = cache
        alive = sorted(self._caches)
        _send([NEW_CACHE, self._ids, len(alive), cache.batch_size, cache.max_seq_len], torch.tensor(alive))
        return self._ids

    @contextlib.contextmanager
    def _step(self):
        """One command to the other ranks and its work here, under the lock; a failure marks the ranks out of step."""
        with self._lock:
            if self.failed:
                raise RankFailed(f"the model's ranks are out of step ({self.failed}); restart the command")
            try:
                yield
            except BaseException as exc:
                self.failed = str(exc) if isinstance(exc, RankFailed) else f"a pass failed on rank 0: {exc!r}"
                if self.on_failure is not None:
                    self.on_failure()
                raise

    def forward(self, input_ids, input_pos=None, cache=None, n_keys=None, logits_at=None, routing=None,
                slots=None) -> torch.Tensor:
        with self._step():
            B, T = input_ids.shape
            cache_id = -1 if cache is None else self._cache_id(cache)
            _send([FORWARD, B, T, -1 if n_keys is None else n_keys, cache_id, input_pos is not None,
                   logits_at is not None, slots is not None], input_ids, input_pos, logits_at, slots)
            return self._run(input_ids, input_pos, cache, n_keys, logits_at, routing, slots)

    def prefix_cache(self, budget_bytes: int) -> PrefixCache:
        """A prefix cache whose every load and store the other ranks repeat on their own KV caches (their entries
        are as large as rank 0's, so the same budget makes the same choices)."""
        with self._step():
            _send([NEW_PREFIX, budget_bytes])
        return MirroredPrefixCache(budget_bytes, self)

    def stop(self) -> None:
        """Tell the other ranks to return from `follow` (once; not after a failure, nor while a pass still runs in
        another thread: the others then end by their timeout)."""
        if not self._lock.acquire(timeout=5):
            return
        try:
            if not self.failed:
                self.failed = "stopped"
                _send([STOP])
        except RankFailed:
            pass
        finally:
            self._lock.release()


_leaders: list[LeaderRunner] = []


def lead(model: Transformer) -> LeaderRunner:
    """Make `model` (rank 0's shard) send every forward pass to the other ranks."""
    model.runner = LeaderRunner(model)
    _leaders.append(model.runner)
    return model.runner


def leader() -> LeaderRunner | None:
    """The runner `lead` made in this process, if any."""
    return _leaders[-1] if _leaders else None


def follow(model: Transformer) -> None:
    """Run the forward passes rank 0 sends, on this rank's shard, until it says stop. Raises RankFailed when rank
    0 is gone. Stop signals are ignored here: rank 0 gets them too (Ctrl-C reaches the whole process group),
    drains its requests, then says stop; a follower that left first would fail the requests rank 0 still runs."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    caches: dict[int, KVCache] = {}
    prefix: PrefixCache | None = None
    device = model.device
    run = _passes(model)
    with torch.inference_mode():
        while True:
            command, *numbers = _receive(_HEADER).tolist()
            if command == STOP:
                return
            if command == NEW_CACHE:
                cache_id, n_alive, batch, length = numbers[:4]
                alive = set(_receive(n_alive).tolist())
                caches = {key: c for key, c in caches.items() if key in alive}
                caches[cache_id] = KVCache(model.args, batch, length, model.activation_dtype, device)
            elif command == NEW_PREFIX:
                prefix = PrefixCache(numbers[0])
            elif command in (PREFIX_LOAD, PREFIX_STORE):
                cache_id, row, n = numbers[:3]
                tokens = _receive(n).tolist()
                if prefix is None or cache_id not in caches:
                    raise RankFailed("rank 0 used a prefix cache or KV cache this rank was never told of")
                if command == PREFIX_LOAD:
                    prefix.load(tokens, caches[cache_id], row)
                else:
                    prefix.store(tokens, caches[cache_id], row)
            elif command == FORWARD:
                b, t, n_keys, cache_id, has_pos, has_at, has_slots = numbers[:7]
                ids = _receive((b, t)).to(device)
                pos, at, slots = (_receive(shape).to(device) if present else None
                                  for shape, present in (((b, t), has_pos), ((b,), has_at), ((b,), has_slots)))
                if cache_id >= 0 and cache_id not in caches:
                    raise RankFailed(f"rank 0 used a KV cache ({cache_id}) this rank was never told of")
                run(ids, pos, caches.get(cache_id), None if n_keys < 0 else n_keys, at, None, slots)
            else:
                raise RankFailed(f"rank 0 sent a command this rank does not know ({command})")


class MirroredPrefixCache(PrefixCache):
    """Rank 0's prefix cache: each load and store is sent to the other ranks first, which do the same on theirs."""

    def __init__(self, budget_bytes: int, runner: LeaderRunner):
        super().__init__(budget_bytes)
        self._runner = runner

    def load(self, prompt_ids, cache, row: int) -> int:
        prompt_ids = list(prompt_ids)
        if len(prompt_ids) < 2:  # nothing to reuse (the last prompt token always runs)
            return 0
        with self._runner._step():
            _send([PREFIX_LOAD, self._runner._cache_id(cache), row, len(prompt_ids)], torch.tensor(prompt_ids))
            return super().load(prompt_ids, cache, row)

    def store(self, tokens, cache, row: int) -> bool:
        tokens = list(tokens)
        if len(tokens) < MIN_TOKENS:  # not kept, here or there
            return False
        with self._runner._step():
            _send([PREFIX_STORE, self._runner._cache_id(cache), row, len(tokens)], torch.tensor(tokens))
            return super().store(tokens, cache, row)


def finish(leading: LeaderRunner | None = None) -> None:
    """At the end of a command: rank 0 (`leading`) tells the others to stop; every rank leaves the process group."""
    if leading is not None:
        leading.stop()
    _leaders.clear()  # (each holds its rank's weights through the runner it runs passes on)
    if dist.is_initialized():
        dist.destroy_process_group()  # (the control group with it)
    _control.clear()
