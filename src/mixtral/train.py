"""Training a small Mixtral on the CPU: `mixtral train`, and `mixtral eval` for held-out nats per character.

- AdamW, linear warm-up then cosine decay, bf16 autocast of the decoder (optional), gradient clipping, residual
  dropout.
- Loss: next-token cross-entropy on all tokens (in fp32, in chunks, never holding a batch's whole logits), plus
  the router load-balancing loss computed *per layer* (E * sum_e f_e * P_e averaged over layers, times
  `router_aux_loss_coef`), so every layer stays balanced.
- Checkpoints are safetensors (model, AdamW moments) plus a JSON state file: a run resumes where it stopped,
  and nothing pickled is ever written or read. Batches are drawn from a generator seeded by (seed, step),
  so a resumed run sees the same data it would have seen.
- The final export is a Hugging Face directory (config.json, model.safetensors, generation_config.json,
  tokenizer files) that both mixtral and transformers load.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.autograd.function import once_differentiable
from tqdm.auto import tqdm

from .config import ModelArgs
from .errors import MixtralError
from .model import Routing, Transformer
from .paths import atomic_path, write_atomic


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    eval_every: int = 200
    eval_tokens: int = 40_000
    ckpt_every: int = 100
    time_limit_min: float | None = None
    seed: int = 0


def load_balancing_loss(routing: list[Routing], n_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss, balanced per layer: mean over layers of E * sum_e f_e * P_e.

    f_e is the fraction of routed slots that went to expert e, P_e its mean router probability. It is 1.0
    when the router is perfectly even and grows as tokens pile onto a few experts.
    """
    losses = []
    for r in routing:
        probs = r.logits.reshape(-1, n_experts).softmax(dim=-1)  # (N, E)
        chosen = F.one_hot(r.expert_ids.reshape(-1), n_experts).float()  # (N*K, E)
        losses.append(n_experts * (chosen.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `h @ weight.T` against `targets`, a chunk of rows at a time.

    With a 32,000-token vocabulary the (N, V) logits of a batch are hundreds of MB, and writing, normalizing and
    differentiating them dominated a training step on the CPU. Here each chunk's logits become its softmax and
    then its gradient in one (chunk, V) buffer that stays in cache, and the gradients for `h` and `weight` are
    made in the forward pass: the loss is the last op, so backward only scales them by the incoming scalar.
    Consequences: it is differentiable once (no double backward), and changing `weight` in place between the
    forward and the backward pass goes unnoticed (the gradient was already taken at the old values).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grad_enabled):
        n = h.shape[0]
        want_h, want_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            logits = hc @ weight.T  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum(dtype=torch.float64)
            if want_h or want_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(tc)), tc] -= 1.0  # d(summed NLL)/d(logits)
                if want_h:
                    torch.matmul(probs, weight, out=grad_h[start:start + chunk])
                if want_w:
                    grad_w.addmm_(probs.T, hc)
        ctx.n = n
        ctx.save_for_backward(grad_h, grad_w)
        return (total / n).to(h.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (None if grad_h is None else grad_h * scale, None if grad_w is None else grad_w * scale,
                None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 256) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets) for (N, D) h, (V, D) weight and (N,) targets in [0, V), without
    ever holding the (N, V) logits; always in fp32 (autocast does not reach inside), no `ignore_index`."""
    if h.dim() != 2 or targets.shape != h.shape[:1] or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"expected h (N, D), weight (V, D), targets (N,); got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    with torch.autocast(h.device.type, enabled=False):
        return LinearCrossEntropy.apply(h.float(), weight.float(), targets, chunk, torch.is_grad_enabled())


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "router" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "router" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def init_weights(model: Transformer, seed: int) -> None:
    """Normal(0, 0.02) matrices, residual output projections scaled by 1/sqrt(2 * layers), unit norms."""
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = out_std if name.endswith(("wo.weight", "ffn.w2", "ffn.w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def sample_batch(ids: torch.Tensor, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) windows of the token stream and their (B, T) next-token targets; seeded by step."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    window = torch.stack([ids[s: s + cfg.seq_len + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


# ---- evaluation: nats per character of reply text ---------------------------------------------------

@torch.inference_mode()
def reply_nats_per_char(model: Transformer, ids: torch.Tensor, mask: torch.Tensor, reply_chars_per_token=None,
                        max_tokens: int | None = None, bos_id: int = 1, max_len: int = 1024,
                        routing_counts: torch.Tensor | None = None, batch_tokens: int = 4096) -> dict:
    """Held-out quality: total NLL of reply tokens / characters of reply text, conversation by conversation.

    ids/mask: the concatenated split as written by `mixtral.data` (every conversation starts with BOS).
    reply_chars_per_token: (len(ids),) characters each reply token stands for (from the data's char counts);
    when None, `meta['reply_chars']` must be divided by the caller. Returns dict(nll, reply_tokens, nats_per_char
    when chars are known, tokens_seen). routing_counts (L, E), if given, is filled with expert slot counts.
    batch_tokens: the most tokens, padding included, in one forward pass.
    """
    was_training = model.training
    model.eval()
    starts = (ids == bos_id).nonzero().flatten().tolist() + [len(ids)]
    total_nll, n_reply, seen, chars = 0.0, 0, 0, 0.0
    batch: list[tuple[int, int]] = []

    def run(batch):
        nonlocal total_nll, n_reply, chars
        T = max(e - s for s, e in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        for row, (s, e) in enumerate(batch):
            x[row, : e - s] = ids[s:e]
        routing = [] if routing_counts is not None else None
        logits = model(x, routing=routing).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                              reduction="none").view(len(batch), T - 1)
        for row, (s, e) in enumerate(batch):
            keep = mask[s + 1: e].bool()
            total_nll += float(nll[row, : e - s - 1][keep].sum())
            n_reply += int(keep.sum())
            if reply_chars_per_token is not None:
                chars += float(reply_chars_per_token[s + 1: e][keep].sum())
        if routing is not None:
            for layer, r in enumerate(routing):
                valid = torch.zeros(len(batch), T, dtype=torch.bool)
                for row, (s, e) in enumerate(batch):
                    valid[row, : e - s] = True
                routing_counts[layer] += torch.bincount(r.expert_ids[valid].flatten(),
                                                        minlength=routing_counts.shape[1])

    spans = []  # the conversations to score, in the split's order, up to max_tokens
    for s, e in zip(starts[:-1], starts[1:]):
        spans.append((s, min(e, s + max_len)))
        seen += spans[-1][1] - s
        if max_tokens is not None and seen >= max_tokens:
            break
    # Batches of similar length (shortest first, up to `batch_tokens` padded tokens or 16 rows), so that little
    # of each batch is padding; the sums do not depend on the order.
    for s, e in sorted(spans, key=lambda span: span[1] - span[0]):
        if batch and ((len(batch) + 1) * (e - s) > batch_tokens or len(batch) == 16):
            run(batch)
            batch = []
        batch.append((s, e))
    if batch:
        run(batch)
    model.train(was_training)
    result = {"nll": total_nll, "reply_tokens": n_reply, "tokens_seen": seen}
    if reply_chars_per_token is not None:
        result["nats_per_char"] = total_nll / max(chars, 1.0)
    result["nats_per_token"] = total_nll / max(n_reply, 1)
    return result


# ---- checkpoints (safetensors + JSON; resumable) ----------------------------------------------------

def save_training_state(run_dir: Path, model: Transformer, opt: torch.optim.AdamW, step: int,
                        cfg: TrainConfig, history: list[dict]) -> None:
    tensors = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"adam.{key}.{name}"] = state[key]
            if "step" in state:
                tensors[f"adam.step.{name}"] = torch.as_tensor(state["step"]).reshape(1).float()
    state = {"step": step, "train_config": asdict(cfg), "model_args": asdict(model.args), "history": history}
    # The state travels inside the checkpoint (one atomic file: a kill can never pair new weights with an old
    # step); state.json is the same state for people to read.
    with atomic_path(run_dir / "checkpoint.safetensors") as partial:
        save_file(tensors, str(partial), metadata={STATE_KEY: json.dumps(state)})
    write_atomic(run_dir / "state.json", json.dumps(state, indent=1))


STATE_KEY = "mixtral_training_state"


def read_state(run_dir: Path) -> dict:
    """A run's saved state (step, configs, history): the one inside its checkpoint (for a checkpoint written before
    the state travelled inside it, its state.json)."""
    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get(STATE_KEY)
    if stored is None:
        if not (run_dir / "state.json").is_file():
            raise MixtralError(f"{path} holds no training state and {run_dir / 'state.json'} is missing; "
                               "remove the checkpoint to start over")
        stored = (run_dir / "state.json").read_text(encoding="utf-8")
    return json.loads(stored)


def load_training_state(run_dir: Path, model: Transformer, opt: torch.optim.AdamW) -> tuple[int, list[dict]]:
    path = run_dir / "checkpoint.safetensors"
    state = read_state(run_dir)
    tensors = load_file(str(path))
    names = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(tensors[f"model.{n}"])
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in names.items() if q is p)
            if f"adam.exp_avg.{name}" in tensors:
                opt.state[p] = {"step": tensors[f"adam.step.{name}"].reshape(()),
                                "exp_avg": tensors[f"adam.exp_avg.{name}"],
                                "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"]}
    return state["step"], state["history"]


# ---- the loop -------------------------------------------------------------------------------------

def train(model_args: ModelArgs, cfg: TrainConfig, data_dir: Path, run_dir: Path, log=print) -> Transformer:
    """Train (or resume) in run_dir; returns the model with the final weights."""
    from .data import load_split

    run_dir.mkdir(parents=True, exist_ok=True)
    train_ids, _, _ = load_split(data_dir, "train")
    val_ids, val_mask, val_meta = load_split(data_dir, "val")
    val_chars = reply_chars_tensor(val_ids, val_mask, val_meta)
    if len(train_ids) <= cfg.seq_len + 1:
        raise MixtralError(f"training data in {data_dir} is shorter than one sequence of {cfg.seq_len} tokens")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_args, dropout=cfg.dropout)
    init_weights(model, cfg.seed)
    opt = make_optimizer(model, cfg)
    step, history = 0, []
    if (run_dir / "checkpoint.safetensors").is_file():
        step, history = load_training_state(run_dir, model, opt)
        log(f"resumed from {run_dir} at step {step}")
    model.train()
    start_time, tokens_done = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = sample_batch(train_ids, cfg, step)
        routing: list[Routing] = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            hidden = model(x, routing=routing, head=False)  # (B, T, D)
        lm_loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, y.reshape(-1))
        aux = load_balancing_loss(routing, model_args.n_experts) if model_args.is_moe else torch.zeros(())
        loss = lm_loss + model_args.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_done += x.numel()
        elapsed = time.time() - start_time
        bar.update(1)
        bar.set_postfix(loss=f"{lm_loss.item():.3f}", aux=f"{aux.item():.3f}", tok_s=f"{tokens_done / elapsed:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            result = reply_nats_per_char(model, val_ids, val_mask, val_chars, max_tokens=cfg.eval_tokens)
            entry = {"step": step, "train_loss": round(lm_loss.item(), 4), "aux": round(aux.item(), 4),
                     "val_nats_per_char": round(result["nats_per_char"], 4), "minutes": round(elapsed / 60, 2)}
            history.append(entry)
            log(json.dumps(entry))
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(run_dir, model, opt, step, cfg, history)
        if cfg.time_limit_min is not None and elapsed > cfg.time_limit_min * 60:
            save_training_state(run_dir, model, opt, step, cfg, history)
            log(f"time limit reached at step {step}; run again to resume")
            break
    bar.close()
    return model.eval()


def reply_chars_tensor(ids: torch.Tensor, mask: torch.Tensor, meta: dict) -> torch.Tensor:
    """Characters per reply token, spread evenly so that the split's total equals meta['reply_chars']."""
    n_reply = int(mask.sum())
    per_token = meta["reply_chars"] / max(n_reply, 1)
    return mask.float() * per_token


def export(model: Transformer, out_dir: Path, tokenizer_dir: Path | None, generation_config: dict,
           dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a Hugging Face model directory: weights, config, generation config and tokenizer files."""
    from .weights import save_checkpoint

    save_checkpoint(model, out_dir, dtype=dtype)
    write_atomic(out_dir / "generation_config.json", json.dumps(
        {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id, **generation_config},
        indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir
