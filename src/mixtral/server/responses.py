"""What each route answers, for /openapi.json: the success bodies of both protocols and every error status a
route can return, in its protocol's error shape. The routes build their replies as plain dicts (common.py,
tgi.py, openai.py); these JSON schemas describe those dicts, and tests/test_fuzz.py holds every reply to them.

    schema = document(get_openapi(...))   # adds "responses" to every operation
"""

from __future__ import annotations

from typing import Any

from .common import is_openai


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict:
    """An object with these properties (the required ones always sent); other properties may follow."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


STRING, INTEGER, NUMBER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}

# ---- TGI --------------------------------------------------------------------------------------------------

TGI_ERROR = _object({"error": STRING, "error_type": STRING})
_TOKEN = _object({"id": INTEGER, "text": STRING, "logprob": _nullable(NUMBER), "special": BOOLEAN})
_PREFILL_TOKEN = _object({"id": INTEGER, "text": STRING, "logprob": _nullable(NUMBER)})
_DETAILS = _object({"finish_reason": STRING, "generated_tokens": INTEGER, "seed": _nullable(INTEGER),
                    "prefill": _array(_PREFILL_TOKEN), "tokens": _array(_TOKEN)},
                   {"top_tokens": _array(_array(_TOKEN))})
TGI_GENERATED = _object({"generated_text": STRING}, {"details": _DETAILS})
TGI_SPANS = _array(_object({"id": INTEGER, "text": STRING, "start": INTEGER, "stop": INTEGER}))
TGI_INFO = _object({"model_id": STRING, "model_dtype": STRING, "model_device_type": STRING,
                    "max_concurrent_requests": INTEGER, "max_best_of": INTEGER, "max_stop_sequences": INTEGER,
                    "max_input_tokens": INTEGER, "max_total_tokens": INTEGER, "max_batch_size": INTEGER,
                    "version": STRING})


def sse(event: dict, done: bool = False) -> dict:
    """text/event-stream content whose every event's data is JSON matching `event` (or "[DONE]" where `done`)."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": event}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"text/event-stream": {"schema": _object({"data": data})}}


TGI_EVENT = {"anyOf": [_object({"index": INTEGER, "token": _TOKEN, "generated_text": _nullable(STRING),
                                "details": _nullable({"type": "object"})}), TGI_ERROR]}

# ---- OpenAI -----------------------------------------------------------------------------------------------

OPENAI_ERROR = _object({"error": _object({"message": STRING, "type": STRING, "param": _nullable(STRING),
                                          "code": _nullable(STRING)})})
_USAGE = _object({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
                 {"prompt_tokens_details": _object({"cached_tokens": INTEGER})})
_FINISH = {"type": "string", "enum": ["stop", "length"]}
_HEAD = {"id": STRING, "object": STRING, "created": INTEGER, "model": STRING}
CHAT_COMPLETION = _object({**_HEAD, "choices": _array(_object({
    "index": INTEGER, "finish_reason": _FINISH, "logprobs": _nullable({"type": "object"}),
    "message": _object({"role": {"const": "assistant"}, "content": STRING})})), "usage": _USAGE})
COMPLETION = _object({**_HEAD, "choices": _array(_object({
    "index": INTEGER, "text": STRING, "finish_reason": _FINISH, "logprobs": _nullable({"type": "object"})})),
    "usage": _USAGE})
OPENAI_CHUNK = _object({**_HEAD, "choices": _array(_object({"index": INTEGER,
                                                               "finish_reason": _nullable(_FINISH)}))},
                       {"usage": _nullable(_USAGE)})
OPENAI_EVENT = {"anyOf": [OPENAI_CHUNK, OPENAI_ERROR]}
MODEL = _object({"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING})
MODELS = _object({"object": {"const": "list"}, "data": _array(MODEL)})

# ---- which route answers what -----------------------------------------------------------------------------

ERRORS = {  # status -> when
    400: "The body is not valid JSON, or a value is out of range", 401: "The API key is missing or wrong",
    404: "No such model", 413: "The body is larger than the server's limit",
    415: "The body is not declared JSON (Content-Type: application/json)",
    421: "The Host header names a host this server was not told it is (DNS rebinding)",
    422: "The body does not have the request's shape, or a value is out of range (TGI)",
    424: "Generation failed (TGI)", 429: "Too many requests are held; retry after Retry-After seconds",
    500: "Generation failed (OpenAI)", 503: "The server is stopping, or the request waited too long for a slot",
}
_POST = (400, 401, 413, 415, 421, 422, 429, 503)
ROUTES: dict[tuple[str, str], tuple[dict, tuple[int, ...]]] = {  # (method, path) -> (200 content, error statuses)
    ("get", "/health"): ({}, (421, 503)),
    ("get", "/info"): ({"application/json": {"schema": TGI_INFO}}, (421,)),
    ("get", "/metrics"): ({"text/plain": {"schema": STRING}}, (421,)),
    ("post", "/"): ({"application/json": {"schema": _array(TGI_GENERATED)}, **sse(TGI_EVENT)}, (*_POST, 424)),
    ("post", "/generate"): ({"application/json": {"schema": TGI_GENERATED}}, (*_POST, 424)),
    ("post", "/generate_stream"): (sse(TGI_EVENT), _POST),
    ("post", "/tokenize"): ({"application/json": {"schema": TGI_SPANS}}, (400, 401, 413, 415, 421, 422)),
    ("post", "/v1/chat/completions"): ({"application/json": {"schema": CHAT_COMPLETION},
                                       **sse(OPENAI_EVENT, done=True)}, (*_POST, 500)),
    ("post", "/v1/completions"): ({"application/json": {"schema": COMPLETION},
                                  **sse(OPENAI_EVENT, done=True)}, (*_POST, 500)),
    ("get", "/v1/models"): ({"application/json": {"schema": MODELS}}, (401, 421)),
    ("get", "/v1/models/{model_id}"): ({"application/json": {"schema": MODEL}}, (401, 404, 421)),
}


def document(schema: dict) -> dict:
    """Put each route's responses (ROUTES) into an OpenAPI document made by FastAPI; returns it."""
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            content, errors = ROUTES[(method, path)]  # a new route must say here what it answers
            error = {"application/json": {"schema": OPENAI_ERROR if is_openai(path) else TGI_ERROR}}
            responses = {"200": {"description": "Success", **({"content": content} if content else {})}}
            for status in errors:
                responses[str(status)] = {"description": ERRORS[status], "content": error}
                if status == 429:
                    responses["429"]["headers"] = {"Retry-After": {"schema": INTEGER}}
            operation["responses"] = responses
    return schema
