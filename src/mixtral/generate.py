"""Text generation in three tiers, each built on the one below:

- `generate_step`: token ids in, one (token id, log-prob) per row per step out; prefill then decode with a KV cache;
- `stream_generate`: one prompt, events with the new text, ids, log-probs, finish reason and speed;
- `generate`: a prompt (or a batch of prompts) in, the generated string(s) out.

Each sequence's text and stop rules come from `stopping.TextTracker`, which the server's engine uses too, so
every front end stops in the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import kernels
from .errors import MixtralError
from .kv_cache import KVCache
from .model import Transformer
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams
from .stopping import TextTracker
from .tokenizer import Tokenizer

# prompt tokens per forward pass: bounds activation memory for long prompts (memory_plan.PROMPT_CHUNK plans for it).
# On Zen 4 (2 threads), "medium" bf16 prefilled a 2,048-token prompt at 380-394 tokens/s in chunks of 512, 392-409
# in chunks of 1,024 and 380-420 in one (five alternating runs in one process): fewer, larger GEMMs per expert.
PREFILL_CHUNK = 1024


@torch.inference_mode()
def generate_step(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    samplers: Sequence[Sampler],
    max_new_tokens: int,
    routing: list | None = None,
    prefix: PrefixCache | None = None,
    info: dict | None = None,
) -> Iterator[list[tuple[int, float]]]:
    """Generate for a batch of token-id prompts (of any lengths) until the caller stops iterating.

    Yields, once per step, one `(token_id, logprob)` per row; logprob is the model's own log-probability of the
    token (before any sampling filter). Runs at most `max_new_tokens` steps. `routing`, if given, receives the
    `Routing` of every MoE layer of every forward pass. `prefix` (one prompt only): a prefix cache the prompt
    starts from (only the rest is prefilled) and the sequence is left in when the caller stops; `info`, if given,
    gets "cached_tokens", how many prompt tokens came from it. Raises MixtralError if a prompt is empty or too
    long.
    """
    args = model.args
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise MixtralError("cannot generate from an empty prompt")
    if max(lengths) + max_new_tokens > args.max_seq_len:
        raise MixtralError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"model's context of {args.max_seq_len} tokens")
    B, T, device = len(prompts), max(lengths), model.device
    cache = KVCache(args, B, T + max_new_tokens, model.activation_dtype, device)
    ids = torch.zeros(B, T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    ids = ids.to(device)
    positions = torch.arange(T, device=device).expand(B, T)
    last = torch.tensor(lengths, device=device) - 1  # (B,) index of each row's last prompt token
    logits = torch.empty(B, args.vocab_size, dtype=model.activation_dtype, device=device)
    reused = prefix.load(prompts[0], cache, 0) if prefix is not None and B == 1 else 0
    if info is not None:
        info["cached_tokens"] = reused
    for start in range(reused, T, PREFILL_CHUNK):  # chunked prefill; rows are right-padded, positions per row
        end = min(start + PREFILL_CHUNK, T)
        chunk_logits = model(ids[:, start:end], positions[:, start:end], cache, n_keys=end,
                             logits_at=(last - start).clamp(0, end - start - 1), routing=routing)[:, 0]
        ends_here = (last >= start) & (last < end)
        logits[ends_here] = chunk_logits[ends_here]

    history = [list(p) for p in prompts]  # what each row's cache holds keys and values for
    intact = False  # the row's keys and values are whole: not after an error, which may leave one half written
    try:
        yield from _decode(model, cache, logits, history, samplers, max_new_tokens, routing)
        intact = True
    except GeneratorExit:  # the caller stopped iterating
        intact = True
        raise
    finally:
        if intact and prefix is not None and B == 1:
            prefix.store(history[0], cache, 0)


def _decode(model, cache, logits, history, samplers, max_new_tokens, routing):
    generated: list[list[int]] = [[] for _ in history]
    positions = [len(h) for h in history]  # where each row's next token goes
    runner = kernels.runner(model)
    step = runner.step_of(logits)  # the prompts' last positions
    for count in range(1, max_new_tokens + 1):
        chosen = []
        for row, sampler in enumerate(samplers):
            if step.best is not None and sampler.picks_argmax:
                token = step.best[row]
            else:
                token = sampler(step.logits[row], history[row], generated[row])
            generated[row].append(token)
            chosen.append((token, step.logprob(row, token)))
        yield chosen
        if count == max_new_tokens:
            return  # no step for a token that will not be asked for
        tokens = [token for token, _ in chosen]
        step = runner.decode_step(cache, tokens, positions, routing=routing)
        for row, token in enumerate(tokens):
            history[row].append(token)
            positions[row] += 1


@dataclass
class GenerationEvent:
    """One generated token, as `stream_generate` reports it."""

    text: str  # new text since the previous event ("" while a character or a possible stop string is pending)
    token_id: int
    logprob: float
    finish_reason: str | None  # None until the last event: "eos_token", "stop_sequence" or "length"
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float  # prompt tokens prefilled (not taken from a prefix cache) per second of prefill
    generation_tps: float  # generated tokens per second since the first token
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    first_token_s: float = 0.0  # seconds from the call to the first token


def _encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=tokenizer.add_bos)
    return list(prompt)


def stream_generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, routing: list | None = None,
                    prefix: PrefixCache | None = None) -> Iterator[GenerationEvent]:
    """Generate from one prompt (text, encoded with one BOS, or token ids) and yield an event per token.
    `prefix`: a prefix cache to start from and leave the sequence in (a conversation's next turn)."""
    params = params or SamplingParams()
    prompt_ids = _encode_prompt(tokenizer, prompt)
    tracker = TextTracker(tokenizer, params, eos_ids=tokenizer.eos_ids | {model.args.eos_token_id})
    start = time.perf_counter()
    first = None
    info: dict = {}
    for [(token, logprob)] in generate_step(model, [prompt_ids], [Sampler(params)], params.max_new_tokens,
                                            routing=routing, prefix=prefix, info=info):
        now = time.perf_counter()
        first = first or now
        text = tracker.add(token)
        cached = info.get("cached_tokens", 0)
        yield GenerationEvent(text, token, logprob, tracker.finish_reason, len(prompt_ids), tracker.n_tokens,
                              prompt_tps=(len(prompt_ids) - cached) / max(first - start, 1e-9),
                              generation_tps=tracker.n_tokens / max(now - start, 1e-9) if tracker.n_tokens < 2
                              else (tracker.n_tokens - 1) / max(now - first, 1e-9),
                              cached_tokens=cached, first_token_s=first - start)
        if tracker.finish_reason:
            return


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int] | list,
             params: SamplingParams | None = None) -> str | list[str]:
    """The generated text for one prompt, or a list of texts for a list of prompts (run as one batch).

    A prompt is a string (encoded with one BOS) or a list of token ids. Each row stops on its own rules.
    """
    params = params or SamplingParams()
    batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
    prompts = [_encode_prompt(tokenizer, p) for p in (prompt if batched else [prompt])]
    eos = tokenizer.eos_ids | {model.args.eos_token_id}
    trackers = [TextTracker(tokenizer, params, eos_ids=eos) for _ in prompts]
    samplers = [Sampler(params) for _ in prompts]
    for step in generate_step(model, prompts, samplers, params.max_new_tokens):
        for tracker, (token, _) in zip(trackers, step):
            if not tracker.finish_reason:
                tracker.add(token)
        if all(t.finish_reason for t in trackers):
            break
    texts = [t.text for t in trackers]
    return texts if batched else texts[0]
