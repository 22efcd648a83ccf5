"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Errors are `{"error": {"message", "type", "param", "code"}}`: 400 for values out of range, 422 for wrong
types, 429 when overloaded. Streams end with `data: [DONE]`. The vLLM extras top_k, min_p and
repetition_penalty are accepted, as local servers do.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import Event, Overloaded, RequestHandle
from ..errors import MixtralError
from ..sampling import SamplingParams
from .common import (RETRY_AFTER, ApiError, ServerConfig, check_alive, collect, encode_text, json_body, parse,
                     read_json, sse, token_text)
from .schemas import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["OpenAI"])
MAX_TOP_LOGPROBS = 20


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "validation", param=param, code=code)


def _sampling(req, config: ServerConfig, n_prompt: int, max_tokens: int | None) -> SamplingParams:
    """OpenAI (and vLLM) knobs -> SamplingParams, each rule named after the parameter it checks."""
    if req.n not in (None, 1):
        raise _bad(f"n must be 1: this server returns one choice per request (got {req.n})", "n")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise _bad(f"temperature must be between 0 and 2, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise _bad(f"top_k must be -1 or 0 (off) or a positive integer, got {req.top_k}", "top_k")
    if req.logit_bias:
        raise _bad("logit_bias is not supported by this server", "logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > config.max_stop_sequences:
        raise _bad(f"stop: at most {config.max_stop_sequences} stop sequences are allowed, got {len(stop)}", "stop")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if n_prompt > config.max_input_tokens:
        raise _bad(f"the prompt has {n_prompt} tokens; this server accepts at most {config.max_input_tokens}",
                   "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
    room = config.max_total_tokens - n_prompt
    if max_tokens is None:
        max_tokens = max(1, min(config.default_max_new_tokens, room))
    if max_tokens > room:
        raise _bad(f"This model's maximum context length is {config.max_total_tokens} tokens. However, you "
                   f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the "
                   "completion). Please reduce the length of the prompt or the completion.", "max_tokens",
                   "context_length_exceeded")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
            seed=req.seed, stop=tuple(stop), max_new_tokens=max_tokens)
    except MixtralError as exc:
        raise _bad(str(exc), str(exc).split(" ", 1)[0]) from None


def _submit(request: Request, prompt_ids: list[int], params: SamplingParams, top_n: int) -> RequestHandle:
    check_alive(request.app.state.engine)
    try:
        return request.app.state.engine.submit(prompt_ids, params, top_n=top_n)
    except Overloaded:
        raise ApiError(429, "Model is overloaded; retry later", "overloaded", code="overloaded",
                       headers=RETRY_AFTER) from None
    except MixtralError as exc:
        raise _bad(str(exc)) from None


def _finish(event: Event) -> str:
    return "length" if event.finish_reason == "length" else "stop"


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.generated_tokens,
            "total_tokens": event.prompt_tokens + event.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def _error_event(event: Event) -> str:
    return sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": event.error_type}})


# ---- chat -------------------------------------------------------------------------------------------------

def _chat_messages(req: ChatRequest, config: ServerConfig) -> list[dict]:
    messages, chars = [], 0
    for n, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{n}].role must be system, user or assistant, got {m.role!r}", f"messages[{n}].role")
        if isinstance(m.content, list):
            if any(part.type != "text" or part.text is None for part in m.content):
                raise _bad(f"messages[{n}].content: only text parts are supported", f"messages[{n}].content")
            content = "".join(part.text for part in m.content)
        else:
            content = m.content or ""
        chars += len(content)
        messages.append({"role": role, "content": content})
    if chars > config.prompt_char_cap:
        raise _bad(f"the messages have {chars} characters; at most {config.prompt_char_cap} are accepted",
                   "messages", "context_length_exceeded")
    return messages


def _chat_logprobs(tokenizer, event: Event) -> dict:
    text = token_text(tokenizer, event.token_id)
    return {"token": text, "logprob": event.logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": token_text(tokenizer, i), "logprob": lp,
                              "bytes": list(token_text(tokenizer, i).encode("utf-8"))} for i, lp in event.top_tokens]}


@router.post("/chat/completions", openapi_extra=json_body("ChatRequest"), summary="Chat completion (OpenAI)")
async def chat_completions(request: Request):
    config: ServerConfig = request.app.state.config
    engine = request.app.state.engine
    req: ChatRequest = parse(ChatRequest, await read_json(request, config))
    if req.tools or req.tool_choice not in (None, "none"):
        raise _bad("tools are not supported by this server", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    top_n = req.top_logprobs or 0
    if not 0 <= top_n <= MAX_TOP_LOGPROBS or (top_n and not req.logprobs):
        raise _bad(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS} and needs logprobs: true", "top_logprobs")
    try:
        prompt_ids = await run_in_threadpool(engine.tokenizer.apply_chat_template, _chat_messages(req, config))
    except MixtralError as exc:
        raise _bad(str(exc), "messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling(req, config, len(prompt_ids), max_tokens)
    handle = _submit(request, prompt_ids, params, top_n)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_id}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_chat(handle, meta, engine.tokenizer, bool(req.logprobs), include_usage)
    events = await collect(handle, request)
    last = events[-1] if events else None
    if last is not None and last.error_type == "queue_timeout":
        raise ApiError(503, last.error, "overloaded", code="queue_timeout", headers=RETRY_AFTER)
    if last is None or last.error:
        raise ApiError(500, last.error if last else "generation was interrupted", "generation")
    tokens = [e for e in events if e.token_id is not None]
    logprobs = {"content": [_chat_logprobs(engine.tokenizer, e) for e in tokens]} if req.logprobs else None
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(e.text for e in tokens)},
              "logprobs": logprobs, "finish_reason": _finish(last)}
    return JSONResponse({**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(last)})


def _stream_chat(handle, meta: dict, tokenizer, want_logprobs: bool, include_usage: bool) -> StreamingResponse:
    def chunk(delta: dict, finish: str | None, logprobs: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        data = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    async def events():
        yield chunk({"role": "assistant", "content": ""}, None)
        pending_logprobs = []
        async for event in handle.aevents():  # leaving early (client gone) cancels the request
            if event.error:
                if event.error_type != "cancelled":
                    yield _error_event(event)
                    yield sse("[DONE]")
                return
            if want_logprobs:
                pending_logprobs.append(_chat_logprobs(tokenizer, event))
            if event.text:
                yield chunk({"content": event.text}, None, pending_logprobs)
                pending_logprobs = []
            if event.done:
                yield chunk({}, _finish(event), pending_logprobs)
                if include_usage:
                    yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(event)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- completions ------------------------------------------------------------------------------------------

def _completion_prompt(req: CompletionRequest, config: ServerConfig, tokenizer) -> tuple[str, list[int]]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _bad("only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt) > config.prompt_char_cap:
            raise _bad(f"the prompt has {len(prompt)} characters; at most {config.prompt_char_cap} are accepted",
                       "prompt", "context_length_exceeded")
        return prompt, encode_text(tokenizer, prompt)
    if not prompt:
        raise _bad("prompt must not be an empty list of token ids", "prompt")
    if any(not 0 <= i < tokenizer.vocab_size for i in prompt):
        raise _bad(f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt")
    return tokenizer.decode(prompt), list(prompt)


def _completion_logprobs(tokenizer, tokens: list[Event], offset: int) -> dict:
    texts = [token_text(tokenizer, e.token_id) for e in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [e.logprob for e in tokens],
            "top_logprobs": [{token_text(tokenizer, i): lp for i, lp in e.top_tokens} for e in tokens],
            "text_offset": offsets}


@router.post("/completions", openapi_extra=json_body("CompletionRequest"), summary="Text completion (OpenAI)")
async def completions(request: Request):
    config: ServerConfig = request.app.state.config
    engine = request.app.state.engine
    req: CompletionRequest = parse(CompletionRequest, await read_json(request, config))
    if req.suffix:
        raise _bad("suffix is not supported by this server", "suffix")
    if req.best_of not in (None, 1):
        raise _bad(f"best_of must be 1, got {req.best_of}", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise _bad(f"logprobs must be between 0 and 5, got {req.logprobs}", "logprobs")
    prompt_text, prompt_ids = await run_in_threadpool(_completion_prompt, req, config, engine.tokenizer)
    params = _sampling(req, config, len(prompt_ids), req.max_tokens)
    handle = _submit(request, prompt_ids, params, req.logprobs or 0)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": config.model_id}
    echo = prompt_text if req.echo else ""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_completion(handle, meta, engine.tokenizer, echo, req.logprobs, include_usage)
    events = await collect(handle, request)
    last = events[-1] if events else None
    if last is not None and last.error_type == "queue_timeout":
        raise ApiError(503, last.error, "overloaded", code="queue_timeout", headers=RETRY_AFTER)
    if last is None or last.error:
        raise ApiError(500, last.error if last else "generation was interrupted", "generation")
    tokens = [e for e in events if e.token_id is not None]
    logprobs = _completion_logprobs(engine.tokenizer, tokens, len(echo)) if req.logprobs is not None else None
    choice = {"index": 0, "text": echo + "".join(e.text for e in tokens), "logprobs": logprobs,
              "finish_reason": _finish(last)}
    return JSONResponse({**meta, "choices": [choice], "usage": _usage(last)})


def _stream_completion(handle, meta, tokenizer, echo: str, logprobs: int | None, include_usage: bool):
    def chunk(text: str, finish: str | None, tokens: list[Event], offset: int) -> str:
        lp = _completion_logprobs(tokenizer, tokens, offset) if logprobs is not None and tokens else None
        data = {**meta, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    async def events():
        offset, pending = 0, []
        if echo:
            yield chunk(echo, None, [], 0)
            offset = len(echo)
        async for event in handle.aevents():  # leaving early (client gone) cancels the request
            if event.error:
                if event.error_type != "cancelled":
                    yield _error_event(event)
                    yield sse("[DONE]")
                return
            pending.append(event)
            if event.text or event.done:
                yield chunk(event.text, _finish(event) if event.done else None, pending, offset)
                offset += len(event.text)
                pending = []
            if event.done and include_usage:
                yield sse({**meta, "choices": [], "usage": _usage(event)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models", summary="The served model (OpenAI)")
async def models(request: Request):
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model_id:path}", summary="One model (OpenAI)")
async def model(model_id: str, request: Request):
    if model_id != request.app.state.config.model_id:
        raise ApiError(404, f"The model `{model_id}` does not exist", "not_found", "model", "model_not_found")
    return _model_card(request)


def _model_card(request: Request) -> dict:
    return {"id": request.app.state.config.model_id, "object": "model", "created": request.app.state.started,
            "owned_by": "mixtral"}
