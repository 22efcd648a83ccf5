"""Where the web app's replies come from: the in-process engine, a TGI server, or an OpenAI-compatible server.

Every backend has the same shape: `stream(messages, settings, turn)` is an async generator of text deltas for
one reply to a chat (`messages`: role/content dicts, system first). It records what happened in `turn`
(prompt and reply token ids where known, finish reason, notes about adjusted settings). Closing the generator
early (the Stop button) ends the generation where it runs: the local engine request is cancelled; for a
remote server the HTTP stream is closed, which makes a server like `mixtral serve` cancel it.

Settings a person can type are cleaned first (`clean_settings`): anything a backend would refuse is clamped
and explained in `turn.notes`, never turned into an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..errors import MixtralError
from ..tokenizer import Tokenizer

MAX_SEED = 2**63 - 1
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.01, 1.0)
REPETITION_PENALTY_RANGE = (0.5, 2.0)


class BackendError(MixtralError):
    """A reply could not be produced; the message is shown to the person as it is."""


@dataclass(frozen=True)
class ChatSettings:
    """The chat tab's knobs after cleaning. temperature 0 = greedy; seed None = a random one per reply."""

    system: str = ""
    temperature: float = 0.7
    max_new_tokens: int = 256
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Turn:
    """What one reply did: filled in by `Backend.stream` (ids only where the backend knows them)."""

    prompt_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0
    finish_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended: float | None = None
    cached_tokens: int | None = None  # prompt tokens the local engine took from its prefix cache


def _number(value, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _clamp(name: str, value, default: float, low: float, high: float, notes: list[str]) -> float:
    number = default if value is None or value == "" else _number(value, math.nan)
    if math.isnan(number):
        notes.append(f"{name} {value!r} is not a number; used {default:g}")
        number = default
    clamped = min(max(number, low), high)
    if clamped != number:
        notes.append(f"{name} {number:g} is outside [{low:g}, {high:g}]; used {clamped:g}")
    return clamped


def clean_settings(system=None, temperature=None, max_new_tokens=None, top_p=None, repetition_penalty=None,
                   seed=None, *, defaults: ChatSettings = ChatSettings(),
                   max_new_limit: int | None = None) -> tuple[ChatSettings, list[str]]:
    """Turn raw values from the page (or an API call) into ChatSettings every backend accepts.

    Out-of-range numbers are clamped, blanks take `defaults`, a blank or negative seed means random; each change
    is explained by one line in the returned notes. Never raises.
    """
    notes: list[str] = []
    temperature = _clamp("temperature", temperature, defaults.temperature, *TEMPERATURE_RANGE, notes)
    top_p = _clamp("top-p", top_p, defaults.top_p, *TOP_P_RANGE, notes)
    penalty = _clamp("repetition penalty", repetition_penalty, defaults.repetition_penalty,
                     *REPETITION_PENALTY_RANGE, notes)
    limit = max_new_limit or 1_000_000
    new_tokens = int(round(_clamp("max new tokens", max_new_tokens, defaults.max_new_tokens, 1, limit, notes)))
    seed_value = seed if isinstance(seed, int) and not isinstance(seed, bool) else _number(seed, -1.0)
    clean_seed = None if seed_value < 0 else int(seed_value)
    if clean_seed is not None and clean_seed > MAX_SEED:
        clean_seed %= MAX_SEED + 1
        notes.append(f"seed {int(seed_value)} is too large; used {clean_seed}")
    return ChatSettings(str(system or "").strip(), temperature, new_tokens, top_p, penalty, clean_seed), notes


def chat_messages(history: list, message, system: str = "") -> list[dict]:
    """The chat to send: the system prompt, the history (user/assistant pairs that got a real reply) and
    `message`, as role/content dicts with string contents (gradio may hand content over as parts)."""
    turns = []
    for item in history or []:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = _text(item.get("content") if isinstance(item, dict) else getattr(item, "content", ""))
        if role == "user":
            if turns and turns[-1]["role"] == "user":  # an unanswered message (stopped before any text)
                turns.pop()
            turns.append({"role": "user", "content": content})
        elif role == "assistant" and turns and turns[-1]["role"] == "user":
            if ERROR_MARK in content:  # a failed reply: leave the exchange out
                turns.pop()
            else:
                turns.append({"role": "assistant", "content": content})
        elif role == "assistant" and turns and turns[-1]["role"] == "assistant":  # gradio split one reply
            turns[-1]["content"] += content
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    head = [{"role": "system", "content": system}] if system else []
    return head + turns + [{"role": "user", "content": _text(message)}]


ERROR_MARK = "⚠️ **Error:** "


def error_reply(partial: str, message: str) -> str:
    """The chat message shown for a failed reply: what arrived before the failure, then the reason."""
    return (partial + "\n\n" if partial else "") + ERROR_MARK + message


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return _text(content.get("text", content.get("content", "")))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return str(content)


def fit_prompt(tokenizer: Tokenizer, messages: list[dict], settings: ChatSettings, max_total: int,
               max_input: int | None, notes: list[str]) -> tuple[list[int], list[dict], ChatSettings]:
    """Encode the chat and make it fit: drop the oldest exchanges while prompt + max_new_tokens is over
    `max_total` (or the prompt over `max_input`), then lower max_new_tokens if still needed.

    Returns (prompt ids, the messages kept, settings). Raises BackendError when even the newest message alone
    leaves no room for a reply.
    """
    max_input = min(max_input or max_total - 1, max_total - 1)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    ids = tokenizer.apply_chat_template(system + turns)
    while len(turns) > 1 and (len(ids) > max_input or len(ids) + settings.max_new_tokens > max_total):
        turns = turns[2:]
        dropped += 1
        ids = tokenizer.apply_chat_template(system + turns)
    if dropped:
        notes.append(f"the {dropped} oldest exchange{'s' if dropped > 1 else ''} left out to fit the "
                     f"{max_total}-token context")
    if len(ids) > max_input:
        raise BackendError(f"the message is too long: the prompt is {len(ids)} tokens and the model takes at "
                           f"most {max_input}. Shorten it or start a new chat.")
    room = max_total - len(ids)
    if settings.max_new_tokens > room:
        notes.append(f"max new tokens lowered from {settings.max_new_tokens} to {room} to fit the "
                     f"{max_total}-token context")
        settings = ChatSettings(settings.system, settings.temperature, room, settings.top_p,
                                settings.repetition_penalty, settings.seed)
    return ids, system + turns, settings


class Backend:
    """One source of replies. `label` says where replies come from; `context` is prompt + reply tokens at most
    (None when unknown); `engine` is the local Engine (None for remote backends)."""

    label = ""
    context: int | None = None
    engine = None
    tokenizer: Tokenizer | None = None
    model_dir = None  # the local model directory, when there is one

    def stream(self, messages: list[dict], settings: ChatSettings, turn: Turn) -> AsyncIterator[str]:
        raise NotImplementedError


class LocalBackend(Backend):
    """The in-process `Engine`: requests from every browser tab share its continuous batch."""

    def __init__(self, engine, model_dir=None, name: str = "local model"):
        self.engine, self.tokenizer, self.model_dir = engine, engine.tokenizer, model_dir
        self.context = engine.max_total_tokens
        self.label = f"{name} (in-process engine)"

    async def stream(self, messages, settings, turn):
        from ..sampling import SamplingParams

        ids, _, settings = fit_prompt(self.tokenizer, messages, settings, self.context, None, turn.notes)
        params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, do_sample=not settings.greedy,
                                repetition_penalty=settings.repetition_penalty, seed=settings.seed,
                                max_new_tokens=settings.max_new_tokens)
        turn.prompt_ids = ids
        try:
            handle = self.engine.submit(ids, params)
        except MixtralError as exc:  # Overloaded, closed engine
            raise BackendError(str(exc)) from None
        done = False
        try:
            async for event in handle.aevents():
                if event.error is not None:
                    done = True
                    turn.finish_reason = event.error_type
                    raise BackendError(event.error)
                if event.token_id is not None:
                    turn.token_ids.append(event.token_id)
                turn.first_token_at = turn.first_token_at or time.perf_counter()
                turn.cached_tokens = event.cached_tokens
                turn.finish_reason = event.finish_reason
                done = event.done
                if event.text:
                    turn.chunks += 1
                    yield event.text
        finally:
            turn.ended = time.perf_counter()
            if not done:  # closed early (Stop, a closed tab): stop the engine's work on it now
                handle.cancel()
                turn.finish_reason = turn.finish_reason or "stopped"


def _server_limits(url: str, api_key: str | None) -> tuple[int | None, int | None]:
    """(max_input_tokens, max_total_tokens) from a TGI server's GET /info, (None, None) if it does not say."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        info = httpx.get(url.rstrip("/") + "/info", headers=headers, timeout=5.0).json()
        total = info.get("max_total_tokens")
        return info.get("max_input_tokens") or info.get("max_input_length"), int(total) if total else None
    except Exception:
        return None, None


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


class TGIBackend(Backend):
    """A Text Generation Inference server (ours, TGI, or a Hugging Face model id with a token) through
    huggingface_hub's (Async)InferenceClient.text_generation, streaming. The prompt is the chat rendered as
    text in the model's format by `tokenizer` (one "<s>", the system prompt where the engine puts it)."""

    def __init__(self, endpoint: str, tokenizer: Tokenizer, api_key: str | None = None):
        self.endpoint, self.tokenizer, self.api_key = endpoint, tokenizer, api_key
        self.max_input, self.context = _server_limits(endpoint, api_key) if _is_url(endpoint) else (None, None)
        self.label = f"TGI endpoint {endpoint}"

    def prompt(self, messages: list[dict], settings: ChatSettings, turn: Turn) -> tuple[str, ChatSettings]:
        """The prompt text sent for `messages`, and the settings after fitting them to the server's limits."""
        if self.context:
            ids, messages, settings = fit_prompt(self.tokenizer, messages, settings, self.context, self.max_input,
                                                 turn.notes)
        else:
            ids = self.tokenizer.apply_chat_template(messages)
        turn.prompt_ids = ids
        return self.tokenizer.decode(ids, skip_special=False), settings

    async def stream(self, messages, settings, turn):
        from huggingface_hub import AsyncInferenceClient

        prompt, settings = self.prompt(messages, settings, turn)
        # TGI refuses temperature 0 and top_p 1: greedy is do_sample=False, and top_p 1 is no top_p at all
        sampling = {} if settings.greedy else {
            "temperature": settings.temperature, "seed": settings.seed,
            "top_p": settings.top_p if settings.top_p < 1.0 else None}
        # one client per reply: closing it closes the HTTP stream, so Stop reaches the server at once
        async with AsyncInferenceClient(self.endpoint, token=self.api_key or None) as client:
            with _remote_turn(turn, self.endpoint):
                chunks = await client.text_generation(
                    prompt, max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                    repetition_penalty=settings.repetition_penalty if settings.repetition_penalty != 1.0 else None,
                    stream=True, details=True, return_full_text=False, **sampling)
                async with aclosing(chunks) as stream:
                    async for chunk in stream:
                        turn.first_token_at = turn.first_token_at or time.perf_counter()
                        if chunk.token.id is not None:
                            turn.token_ids.append(chunk.token.id)
                        if chunk.details is not None:
                            turn.finish_reason = str(chunk.details.finish_reason)
                        if chunk.token.special or not chunk.token.text:
                            continue
                        turn.chunks += 1
                        yield chunk.token.text


def openai_base_url(url: str) -> str:
    """The client's base URL: `/v1` is added to a bare server address (http://host:port)."""
    parsed = urlparse(url)
    return url.rstrip("/") + "/v1" if parsed.path in ("", "/") else url


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server (vLLM, llama.cpp, `mixtral serve`) through the `openai` client, streaming
    /v1/chat/completions; the server applies its own chat template. `model`: default, the first of /v1/models."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None):
        self.base_url, self.api_key, self.model = openai_base_url(base_url), api_key, model
        self.label = f"OpenAI-compatible server {self.base_url}"

    def _client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, timeout=600.0)

    async def stream(self, messages, settings, turn):
        async with self._client() as client:
            with _remote_turn(turn, self.base_url):
                if self.model is None:
                    models = await client.models.list()
                    if not models.data:
                        raise BackendError(f"{self.base_url}/models lists no model; pass --openai-model NAME")
                    self.model = models.data[0].id
                extra = {} if settings.repetition_penalty == 1.0 else {
                    "extra_body": {"repetition_penalty": settings.repetition_penalty}}
                stream = await client.chat.completions.create(
                    model=self.model, messages=messages, stream=True, max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed, **extra)
                async with stream:
                    async for chunk in stream:
                        turn.first_token_at = turn.first_token_at or time.perf_counter()
                        if not chunk.choices:
                            continue
                        choice = chunk.choices[0]
                        if choice.finish_reason:
                            turn.finish_reason = choice.finish_reason
                        if choice.delta and choice.delta.content:
                            turn.chunks += 1
                            yield choice.delta.content


@contextmanager
def _remote_turn(turn, where: str):
    """Around one remote reply: any failure becomes a BackendError in words; the turn is closed either way
    ("stopped" when the server never said why it finished: Stop, a closed tab, a broken stream)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(_remote_error(exc, where)) from None
    finally:
        turn.ended = time.perf_counter()
        turn.finish_reason = turn.finish_reason or "stopped"


def _remote_error(exc: Exception, where: str) -> str:
    """A server's complaint in words: its own error message when it sent one, else what failed."""
    name = type(exc).__name__
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return f"{where} refused the request: {message}"
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            data = response.json()
            message = data.get("error") if isinstance(data, dict) else None
            if isinstance(message, dict):
                message = message.get("message")
            if message:
                return f"{where} answered {response.status_code}: {message}"
        except Exception:
            pass
    if "Connect" in name or "connect" in str(exc).lower():
        return f"cannot reach {where} ({name}): is the server running?"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    return f"{where}: {text}"
