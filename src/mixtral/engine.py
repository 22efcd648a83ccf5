"""The serving engine: one worker thread owns the model and runs every request with continuous batching.

    engine = Engine(model, tokenizer, max_batch_size=8, max_queue=64)
    handle = engine.submit(prompt_ids, SamplingParams(temperature=0, max_new_tokens=32))
    for event in handle.events():          # or: async for event in handle.aevents()
        print(event.text, end="")

How a step works (`Engine._step`): cancelled requests are dropped and their cache rows freed; waiting requests are
admitted into free rows of one shared `KVCache`; prompts are prefilled alone, in chunks cut at multiples of
`prefill_chunk` (whatever else runs, so a prompt's numbers never depend on its neighbours), at most `prefill_chunk`
prompt tokens per step so a long prompt never stalls the others for long; then ONE batched decode step runs for
every sequence that has a token to feed (`slots=` picks the cache rows, each row at its own position), and the rests
of short prompts that the runner computes token by token as it computes decode tokens (`Runner.feeds`: on our
kernels, those it would run as one call alone) ride in that same pass, so a new request costs the others no pass of
its own; each row samples with its own `Sampler` and stops by `stopping.TextTracker`, the rules every front end
shares. A failure inside a step fails only the requests it touched (a failed batch is retried row by row to find
them); the worker thread never dies of it. With a prefix cache (prefix_cache.py), an admitted prompt starts from the
longest prefix of it whose keys and values an earlier request left (copied into its row), and each request leaves
its own when its prompt is in and when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import kernels
from .errors import MixtralError
from .kv_cache import KVCache
from .model import Routing, Transformer
from .sampling import Sampler, SamplingParams
from .stopping import TextTracker
from .tokenizer import Tokenizer

log = logging.getLogger("mixtral.engine")

OUTCOMES = ("finished", "cancelled", "failed", "rejected")
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Overloaded(MixtralError):
    """The engine already holds `max_queue` requests (waiting + running); retry later."""


@dataclass
class Event:
    """One thing that happened to a request: a generated token, or the end of it.

    A token event has `token_id`, its `text` delta (the text now safe to show: "" while a character is
    incomplete or a possible stop string is held back), `logprob` (the model's, before sampling filters),
    `special` and `top_tokens` ((id, logprob) alternatives, best first, when asked for). `finish_reason` is
    None until the last token: "eos_token" | "stop_sequence" | "length". A request that fails or is cancelled
    ends with an event whose `error` says why and `error_type` is "generation", "cancelled" or "shutdown".
    """

    token_id: int | None
    text: str
    logprob: float | None
    special: bool
    finish_reason: str | None
    generated_tokens: int
    prompt_tokens: int
    seed: int | None  # the sampler's seed; None for greedy decoding
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # on the first event, when asked for
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, not a prefill
    error: str | None = None
    error_type: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestHandle:
    """A submitted request: read its events (sync or async), or cancel it. Safe to use from any thread."""

    def __init__(self, request_id: int):
        self.id = request_id
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._async: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelled = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop this request; its cache row is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _push(self, event: Event) -> None:  # called by the engine thread
        with self._lock:
            if self._loop is None:
                self._sync.put(event)
            else:
                try:
                    self._loop.call_soon_threadsafe(self._async.put_nowait, event)
                except RuntimeError:  # the reader's event loop is gone: nobody listens any more
                    self.cancel()
        if event.done:
            self.finished.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events until the last one (inclusive). `timeout`: seconds to wait for each, else TimeoutError."""
        while True:
            try:
                event = self._sync.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
            yield event
            if event.done:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """Async version of `events()`, for one event loop. Stopping early (break, or the task being
        cancelled, e.g. by a client disconnect) cancels the request."""
        with self._lock:
            if self._loop is None:
                self._loop, self._async = asyncio.get_running_loop(), asyncio.Queue()
                while not self._sync.empty():
                    self._async.put_nowait(self._sync.get_nowait())
        done = False
        try:
            while not done:
                event = await self._async.get()
                done = event.done
                yield event
        finally:
            if not done:
                self.cancel()


class _Histogram:
    """Cumulative-bucket histogram (Prometheus semantics), kept by the engine without a metrics library."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def snapshot(self) -> dict:
        cumulative = list(itertools.accumulate(self.counts))
        return {"buckets": list(zip([*self.buckets, float("inf")], cumulative)), "sum": self.sum,
                "count": self.count}


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    tracker: TextTracker
    top_n: int
    want_prompt_logprobs: bool
    submitted: float
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of those, the ones copied from the prefix cache
    generated: list[int] = field(default_factory=list)
    pending: int | None = None  # the last sampled token, fed to the model at the next decode step
    first_token_at: float | None = None
    prompt_logprobs: list[float | None] | None = None

    @property
    def position(self) -> int:  # where the pending token goes in the cache
        return len(self.prompt_ids) + len(self.generated) - 1


class Engine:
    """Continuous batching over one model. See the module docstring for how a step works.

    max_batch_size: sequences decoded together (KV cache rows). max_queue: requests held at once (waiting +
    running); past it `submit` raises `Overloaded`. max_total_tokens: prompt + new tokens of one request, and
    the cache length (default: the model's context). prefill_chunk: prompt tokens prefilled per step, at most.
    prefix_cache_bytes: memory for the keys and values of earlier requests, reused by prompts that start the same
    way (prefix_cache.py); 0 turns prefix reuse off. max_queue_time: seconds a request may wait for a batch slot;
    past it, it ends (outcome "rejected") with an error event of type "queue_timeout" (None: no limit).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 8, max_queue: int = 64,
                 max_total_tokens: int | None = None, prefill_chunk: int = 256, prefix_cache_bytes: int = 0,
                 max_queue_time: float | None = None):
        if max_batch_size < 1 or max_queue < 1 or prefill_chunk < 1:
            raise MixtralError("max_batch_size, max_queue and prefill_chunk must be >= 1")
        if max_queue_time is not None and not max_queue_time > 0:
            raise MixtralError(f"max_queue_time must be a positive number of seconds, got {max_queue_time}")
        self.max_queue_time = max_queue_time
        context = model.args.max_seq_len
        self.max_total_tokens = context if max_total_tokens is None else max_total_tokens
        if not 2 <= self.max_total_tokens <= context:
            raise MixtralError(f"max_total_tokens must be between 2 and the model's context ({context}), "
                               f"got {self.max_total_tokens}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.eos_ids = tokenizer.eos_ids | {model.args.eos_token_id}
        self.cache = KVCache(model.args, max_batch_size, self.max_total_tokens,
                             getattr(model, "activation_dtype", model.dtype), model.device)
        self.runner = kernels.runner(model)  # how the model runs: one decode step per call, whatever runs it
        self.prefix = self.runner.prefix_cache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._free_slots = list(range(max_batch_size))
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._jobs: deque[tuple] = deque()  # (fn, Future): model calls run by the worker between steps
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._draining = False  # drain(): no new requests, the held ones run on (a server's graceful stop)
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._tokens_generated = 0
        self._prompt_tokens = 0
        self._steps = 0
        self._queue_time = _Histogram(QUEUE_TIME_BUCKETS)
        self._time_per_token = _Histogram(TOKEN_TIME_BUCKETS)
        self._first_token_time = _Histogram(QUEUE_TIME_BUCKETS)
        if model.device.type == "cpu":  # the worker runs the model: this thread's idle OpenMP workers must not
            kernels.release_threads()    # stand beside its own (native_lib.release_threads)
        self._thread = threading.Thread(target=self._run, name="mixtral-engine", daemon=True)
        self._thread.start()

    # ---- the client side ------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, top_n: int = 0,
               prompt_logprobs: bool = False) -> RequestHandle:
        """Queue a request; return its handle at once. `top_n`: alternatives per token in events;
        `prompt_logprobs`: the first event carries the log-prob of every prompt token (None for the first).

        Raises `Overloaded` when the engine is full, MixtralError for an empty prompt, ids outside the
        vocabulary, prompt + max_new_tokens over max_total_tokens, or a closed engine.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise MixtralError("cannot generate from an empty prompt")
        vocab = self.model.args.vocab_size
        if any(not 0 <= i < vocab for i in prompt_ids):
            raise MixtralError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_new_tokens > self.max_total_tokens:
            raise MixtralError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                               f"exceeds max_total_tokens ({self.max_total_tokens})")
        sampler = Sampler(params)
        tracker = TextTracker(self.tokenizer, params, eos_ids=self.eos_ids)
        with self._cond:
            if self._stopping or self._draining:
                raise MixtralError("the engine is closed" if self._stopping else "the server is shutting down")
            if len(self._waiting) + len(self._active) >= self.max_queue:
                self._outcomes["rejected"] += 1
                raise Overloaded("Model is overloaded")
            handle = RequestHandle(next(self._ids))
            self._waiting.append(_Request(handle, prompt_ids, params, sampler, tracker, max(0, top_n),
                                          prompt_logprobs, time.perf_counter()))
            self._cond.notify()
        return handle

    def stats(self) -> dict:
        """Counters and histograms: requests by outcome, tokens, queue time, time to the first token (from
        submission), time per token after it, active now."""
        with self._cond:
            return {"requests": dict(self._outcomes), "tokens_generated": self._tokens_generated,
                    "prompt_tokens": self._prompt_tokens, "active": len(self._active), "waiting": len(self._waiting),
                    "steps": self._steps, "queue_time_seconds": self._queue_time.snapshot(),
                    "time_per_token_seconds": self._time_per_token.snapshot(),
                    "time_to_first_token_seconds": self._first_token_time.snapshot(),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
                    "expert_store": self.expert_store_stats(),
                    "prefix_cache": self.prefix.stats() if self.prefix is not None else None}

    def expert_store_stats(self) -> dict | None:
        """The expert cache's numbers (kernels/offload.py: hit rate, prefetch recall and precision, bytes read)
        when the model's experts are offloaded, else None."""
        store = getattr(kernels.runner(self.model), "store", None)
        if store is None:
            return None
        return {**store.stats.summary(), "slots": store.n_slots, "experts": len(store.pieces)}

    def routing(self, token_ids: Sequence[int], timeout: float | None = 60.0) -> list[Routing]:
        """Where the router sent every token of `token_ids`: one `Routing` per MoE layer ((1, T, E) logits,
        (1, T, K) expert ids and weights, on the CPU), from one cache-free forward pass that the worker runs
        between two steps, so it never races the batch (the web app's expert view of a finished reply).

        Empty for a dense model. Raises MixtralError for no tokens, ids outside the vocabulary, more tokens than
        the model's context or a closed engine; TimeoutError after `timeout` seconds.
        """
        ids = [int(i) for i in token_ids]
        args = self.model.args
        if not ids or len(ids) > args.max_seq_len or any(not 0 <= i < args.vocab_size for i in ids):
            raise MixtralError(f"routing needs 1 to {args.max_seq_len} token ids in [0, {args.vocab_size})")

        def forward() -> list[Routing]:
            routing: list[Routing] = []
            with torch.inference_mode():
                x = torch.tensor([ids], device=self.model.device)  # (1, T)
                self.model(x, logits_at=torch.tensor([len(ids) - 1], device=x.device), routing=routing)
            return [Routing(r.logits.cpu(), r.expert_ids.cpu(), r.weights.cpu()) for r in routing]

        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise MixtralError("the engine is closed")
            self._jobs.append((forward, future))
            self._cond.notify()
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"routing: no result within {timeout} s") from None

    @property
    def alive(self) -> bool:
        """True while the engine takes requests: its worker runs, and it is neither closed nor draining."""
        return self._thread.is_alive() and not self._stopping and not self._draining

    def drain(self) -> None:
        """Take no new requests (`submit` raises MixtralError, `alive` turns False); those held run on."""
        with self._cond:
            self._draining = True

    @property
    def idle(self) -> bool:
        """True when no request is waiting or running."""
        with self._cond:
            return not (self._waiting or self._active)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still held end with a "shutdown" error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active or self._jobs):
                    self._cond.wait()
                if self._stopping:
                    break
                jobs, self._jobs = list(self._jobs), deque()
                busy = bool(self._waiting or self._active)
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
            if not busy:
                continue
            try:
                self._step()
            except Exception:  # a bug outside any one request's work: fail everything held, keep running
                log.exception("engine step failed")
                for request in [*self._active, *self._waiting]:
                    self._end(request, "failed", "internal error in the engine step")
        for request in [*self._active, *self._waiting]:
            self._end(request, "failed", "the server is shutting down", "shutdown")
        with self._cond:
            jobs, self._jobs = list(self._jobs), deque()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(MixtralError("the engine is closed"))

    @torch.inference_mode()
    def _step(self) -> None:
        with self._cond:
            for request in [r for r in [*self._active, *self._waiting] if r.handle.cancelled]:
                self._end(request, "cancelled", "cancelled", "cancelled")
            if self.max_queue_time is not None:
                now = time.perf_counter()
                for request in [r for r in self._waiting if now - r.submitted > self.max_queue_time]:
                    self._end(request, "rejected", f"waited {now - request.submitted:.1f} s for a batch slot, longer "
                              f"than the server's limit of {self.max_queue_time:g} s; retry later", "queue_timeout")
            admitted = []
            while self._waiting and self._free_slots:
                request = self._waiting.popleft()
                request.slot = self._free_slots.pop(0)
                self._queue_time.observe(time.perf_counter() - request.submitted)
                self._active.append(request)
                admitted.append(request)
            self._steps += 1
        for request in admitted:
            self._reuse_prefix(request)
        # A prompt is cut into chunks at multiples of prefill_chunk whatever else runs, so its numbers do not depend
        # on its neighbours; a step prefills whole chunks while they fit in prefill_chunk tokens (the first always).
        # A rider's whole rest counts against the same budget; its tokens are decode rows, whatever their chunks.
        budget, riders = self.prefill_chunk, []
        for request in [r for r in self._active if r.prefilled < len(r.prompt_ids)]:
            rides = self._rides(request)
            cost = (len(request.prompt_ids) if rides else self._chunk_end(request)) - request.prefilled
            if cost > budget:
                break
            if rides:
                riders.append(request)
                budget -= cost
            else:
                budget -= self._prefill(request)
        self._decode([r for r in self._active if r.pending is not None], riders)

    def _rides(self, request: _Request) -> bool:
        """Whether the rest of this request's prompt rides in the decode pass (`Runner.feeds`), rather than being
        prefilled in a pass of its own: not when it asked for prompt log-probs (every position's logits), nor when
        it is longer than a step's prompt budget (prefill_chunk)."""
        rest = len(request.prompt_ids) - request.prefilled
        return not request.want_prompt_logprobs and rest <= self.prefill_chunk and self.runner.feeds(self.cache, rest)

    def _reuse_prefix(self, request: _Request) -> None:
        """Start an admitted request from the longest cached prefix of its prompt (not when it asked for prompt
        log-probs: they need every position's logits)."""
        if self.prefix is None or request.want_prompt_logprobs:
            return
        try:
            request.prefilled = request.cached = self.prefix.load(request.prompt_ids, self.cache, request.slot)
        except Exception as exc:  # nothing was changed but the row, which the prefill rewrites
            log.error("prefix cache: %s: %s", type(exc).__name__, exc)
            request.prefilled = request.cached = 0

    def _leave_prefix(self, request: _Request) -> None:
        """Keep what the request's row holds for later prompts: its prompt as far as it is prefilled, and, once the
        prompt is in, every generated token that was fed back (all but the last)."""
        if self.prefix is None or request.slot is None:
            return
        tokens = request.prompt_ids[:request.prefilled]
        if request.prefilled == len(request.prompt_ids):
            tokens = tokens + request.generated[:-1]
        try:
            self.prefix.store(tokens, self.cache, request.slot)
        except Exception as exc:  # a cache that cannot keep an entry only loses it
            log.error("prefix cache: %s: %s", type(exc).__name__, exc)

    def _chunk_end(self, request: _Request) -> int:
        return min(len(request.prompt_ids), (request.prefilled // self.prefill_chunk + 1) * self.prefill_chunk)

    def _prefill(self, request: _Request) -> int:
        """Feed the next chunk of one request's prompt; sample its first token after the last chunk."""
        start = request.prefilled
        end = self._chunk_end(request)
        try:
            ids = torch.tensor([request.prompt_ids[start:end]], device=self.model.device)  # (1, T)
            pos = torch.arange(start, end, device=self.model.device)[None]  # (1, T)
            slots = torch.tensor([request.slot], device=self.model.device)
            last = end == len(request.prompt_ids)
            # all positions' logits only for prompt log-probs; else just the last one (saves the vocab matmul)
            logits_at = None if request.want_prompt_logprobs else torch.tensor([end - start - 1], device=slots.device)
            logits = self.model(ids, pos, self.cache, n_keys=end, slots=slots, logits_at=logits_at)  # (1, T', V)
            if request.want_prompt_logprobs:
                self._record_prompt_logprobs(request, logits[0], start, end)
            request.prefilled = end
            if last:
                with self._cond:
                    self._prompt_tokens += len(request.prompt_ids)
                self._sample(request, self.runner.step_of(logits[:, -1]))
                if request in self._active:  # (after the first token is out) for requests that start the same way
                    self._leave_prefix(request)  # while this one runs; one that ended left its row in _end
        except Exception as exc:
            self._fail(request, exc)
        return end - start

    def _record_prompt_logprobs(self, request: _Request, logits: torch.Tensor, start: int, end: int) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (T, V): row t predicts token t + 1
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        following = torch.tensor(request.prompt_ids[start + 1:end + 1], device=logprobs.device)
        request.prompt_logprobs += logprobs[: len(following)].gather(1, following[:, None])[:, 0].tolist()

    def _decode(self, rows: list[_Request], riders: Sequence[_Request] = ()) -> None:
        """One decode step for every row with a pending token, and the rests of the riders' prompts in the same
        pass; a failed batch is retried request by request."""
        if not rows and not riders:
            return
        try:
            step = self._forward_decode(rows, riders)
        except Exception as exc:
            if len(rows) + len(riders) == 1:
                self._fail([*rows, *riders][0], exc)
            else:  # find the culprit(s): rewriting a row's cache entry at the same position is harmless
                for request in rows:
                    self._decode([request])
                for request in riders:
                    self._decode([], [request])
            return
        for row, request in enumerate(rows):
            self._sample(request, step, row)
        for row, request in enumerate(riders, len(rows)):
            request.prefilled = len(request.prompt_ids)
            with self._cond:
                self._prompt_tokens += len(request.prompt_ids)
            self._sample(request, step, row)
            if request in self._active:  # as after a prefill: for requests that start the same way
                self._leave_prefix(request)

    def _forward_decode(self, rows: list[_Request], riders: Sequence[_Request] = ()) -> kernels.Step:
        if not riders:
            return self.runner.decode_step(self.cache, [r.pending for r in rows], [r.position for r in rows],
                                           [r.slot for r in rows])
        return self.runner.feed(self.cache, [[r.pending] for r in rows] + [r.prompt_ids[r.prefilled:] for r in riders],
                                [r.position for r in rows] + [r.prefilled for r in riders],
                                [r.slot for r in [*rows, *riders]])

    def _sample(self, request: _Request, step: kernels.Step, row: int = 0) -> None:
        """Pick the next token of one request from row `row` of a step (its logits, log-normalizers and, where
        the runner reports it, greedy choice: a greedy request then needs no torch op), report it, and finish
        the request if it stopped."""
        if request.handle.cancelled:
            self._end(request, "cancelled", "cancelled", "cancelled")
            return
        try:
            if step.best is not None and request.sampler.picks_argmax:
                token = step.best[row]
            else:
                token = request.sampler(step.logits[row], request.prompt_ids, request.generated)
            logprob = step.logprob(row, token)
            top = []
            if request.top_n:
                values, ids = torch.topk(torch.log_softmax(step.logits[row].float(), dim=-1), request.top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            text = request.tracker.add(token)
        except Exception as exc:
            self._fail(request, exc)
            return
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
            with self._cond:
                self._first_token_time.observe(now - request.submitted)
        request.generated.append(token)
        request.pending = token
        finish = request.tracker.finish_reason
        with self._cond:
            self._tokens_generated += 1
        event = Event(token, text, logprob, self.tokenizer.is_special(token), finish,
                      len(request.generated), len(request.prompt_ids),
                      None if request.params.greedy else request.sampler.seed_used, top, cached_tokens=request.cached)
        if len(request.generated) == 1:
            event.prompt_logprobs = request.prompt_logprobs
        request.handle._push(event)
        if finish:
            if len(request.generated) > 1:
                spent = (now - request.first_token_at) / (len(request.generated) - 1)
                with self._cond:
                    self._time_per_token.observe(spent)
            self._end(request, "finished")

    def _fail(self, request: _Request, exc: Exception | str) -> None:
        if isinstance(exc, Exception):
            log.error("request %d failed: %s: %s", request.handle.id, type(exc).__name__, exc)
            exc = f"generation failed: {type(exc).__name__}: {exc}"
        self._end(request, "failed", exc, "generation")

    def _end(self, request: _Request, outcome: str, error: str | None = None, error_type: str = "generation") -> None:
        """Take a request out of the engine, free its cache row, count it, and send an error event if asked. A
        request that finished or was cancelled leaves its keys and values in the prefix cache first."""
        if outcome in ("finished", "cancelled") and request in self._active:
            self._leave_prefix(request)
        with self._cond:
            if request in self._active:
                self._active.remove(request)
                self._free_slots.append(request.slot)
                self._free_slots.sort()
            elif request in self._waiting:
                self._waiting.remove(request)
            else:
                return  # already ended
            self._outcomes[outcome] += 1
        request.pending = None
        if error is not None:
            request.handle._push(Event(None, "", None, False, None, len(request.generated),
                                       len(request.prompt_ids), None, error=error, error_type=error_type,
                                       cached_tokens=request.cached))
