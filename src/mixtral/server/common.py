"""What both protocols share: server settings, error replies, safe body parsing, prompt budgets, event streams.

Errors are raised as `ApiError` anywhere in a route and rendered by the app in the shape of the route's
protocol: TGI `{"error": "...", "error_type": "..."}` or OpenAI `{"error": {"message", "type", "param",
"code"}}`. Paths under /v1 are OpenAI's; everything else speaks TGI.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..engine import Event, RequestHandle
from ..tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NEW_TOKENS = 256
CHARS_PER_TOKEN_CAP = 16  # a prompt may have at most this many characters per allowed input token


@dataclass(frozen=True)
class ServerConfig:
    """Limits and identity of one server. `max_prompt_chars` defaults to 16 characters per input token."""

    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_batch_size: int
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_chars: int | None = None
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    api_key: str | None = None
    model_dtype: str = "float32"
    model_device: str = "cpu"

    @property
    def prompt_char_cap(self) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN_CAP * self.max_input_tokens


class ApiError(Exception):
    """An error reply. `kind` is the TGI error_type or the OpenAI error type; `param`/`code` are OpenAI's."""

    def __init__(self, status: int, message: str, kind: str = "validation", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


OPENAI_TYPES = {"validation": "invalid_request_error", "overloaded": "overloaded_error", "unhealthy": "server_error",
                "generation": "server_error", "authentication": "invalid_request_error",
                "not_found": "invalid_request_error", "payload_too_large": "invalid_request_error",
                "unsupported_media_type": "invalid_request_error", "misdirected": "invalid_request_error"}


def error_response(path: str, error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers={**(error.headers or {}),
                                                                                   **(headers or {})} or None)


def error_body(path: str, error: ApiError) -> dict:
    if is_openai(path):
        return {"error": {"message": error.message, "type": OPENAI_TYPES.get(error.kind, error.kind),
                          "param": error.param, "code": error.code}}
    message = error.message
    if error.kind == "validation" and not message.startswith("Input validation error"):
        message = f"Input validation error: {message}"
    return {"error": message, "error_type": error.kind}


RETRY_AFTER = {"Retry-After": "1"}  # seconds: a 429's hint (batch slots free within a few decode steps)


# ---- request bodies ---------------------------------------------------------------------------------------

def _no_constants(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_strings(value, where: str = "body") -> None:
    """Refuse lone surrogates (JSON "\\ud800"): they cannot be encoded and would fail deep in the tokenizer."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ApiError(400, f"{where} contains an unpaired surrogate (invalid Unicode)", param=where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where)
            _check_strings(item, f"{where}.{key}" if where != "body" else key)
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _check_strings(item, f"{where}[{n}]")


async def read_json(request: Request, config: ServerConfig):
    """The request body as JSON: declared JSON (415), at most `max_body_bytes` (413), strict UTF-8, no NaN/Infinity,
    no lone surrogates (400), a JSON object (422)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        # A page in the user's browser may POST text/plain or a form to a local server without asking first (a
        # CORS "simple request"); a JSON API declared JSON refuses those before reading anything.
        raise ApiError(415, f"the request body must be JSON, sent with Content-Type: application/json (got "
                            f"{media or 'none'})", "unsupported_media_type", code="unsupported_media_type")
    limit = config.max_body_bytes
    too_large = ApiError(413, f"request body is larger than the limit of {limit} bytes", "payload_too_large")
    declared = request.headers.get("content-length")
    declared_too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    if not declared_too_large:
        async for chunk in request.stream():
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                break
    if declared_too_large or size > limit:
        await _drain(request, 16 * limit)
        raise too_large
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        message = f"request body is not valid JSON: {exc}"
        # TGI treats NaN/Infinity as a validation error (422); to OpenAI clients it is malformed JSON (400)
        status = 422 if "not a valid JSON number" in str(exc) and not is_openai(request.url.path) else 400
        raise ApiError(status, message) from None
    _check_strings(data)
    if not isinstance(data, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(data).__name__}")
    return data


async def _drain(request: Request, up_to: int) -> None:
    """Read and drop the rest of an oversized body (so the client gets to read the 413), up to `up_to` bytes."""
    seen = 0
    try:
        while seen <= up_to:
            message = await request.receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
    except Exception:  # the client went away: nothing left to drain
        return


def json_body(schema: str) -> dict:
    """A route's `openapi_extra`: its body is JSON of the named schema (the routes read the body themselves)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


def parse(model: type[BaseModel], data: dict) -> BaseModel:
    """Validate `data` against a schema; a wrong type or a missing field becomes a 422 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("str", "list[", "int", "float")))
        where = where or ".".join(map(str, first["loc"]))
        raise ApiError(422, f"`{where}`: {first['msg']}", param=where) from None


# ---- prompts and events -----------------------------------------------------------------------------------

def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Prompt text -> ids with exactly one BOS (Tokenizer.with_bos); special-token strings like "<s>" and "[INST]"
    count as such."""
    return tokenizer.with_bos(tokenizer.encode(text, parse_special=True))


def check_alive(engine) -> None:
    """503 when the engine thread is not running (it was closed, or never started)."""
    if not engine.alive:
        raise ApiError(503, "the model engine is not running", "unhealthy", code="unhealthy")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's own text: "▁" as a space, a byte token as its character when it is one on its own."""
    piece = tokenizer.id_to_piece(token_id)
    if tokenizer.is_special(token_id):
        return piece
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ")


async def collect(handle: RequestHandle, request: Request) -> list[Event]:
    """All events of a non-streamed request; the request is cancelled if the client disconnects first."""
    events: list[Event] = []

    async def read() -> None:
        async for event in handle.aevents():
            events.append(event)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reader, watcher = asyncio.ensure_future(read()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, watcher):
            task.cancel()
        if not reader.done() or not events or not events[-1].done:
            handle.cancel()
    return events


def sse(data: dict | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {payload}\n\n"
