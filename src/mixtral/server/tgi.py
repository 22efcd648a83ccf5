"""The Text Generation Inference routes: POST /, /generate, /generate_stream, /tokenize.

Semantics and messages follow TGI's: validation errors are 422 with
`{"error": "Input validation error: ...", "error_type": "validation"}`, overload 429, failures 424.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..engine import Event, Overloaded, RequestHandle
from ..errors import MixtralError
from ..sampling import SamplingParams
from .common import (RETRY_AFTER, ApiError, ServerConfig, check_alive, collect, encode_text, json_body, parse,
                     read_json, sse, token_text)
from .schemas import TGIParameters, TGIRequest, TokenizeRequest

router = APIRouter(tags=["TGI"])


class _Prepared:
    """A validated TGI request, ready to submit."""

    def __init__(self, inputs: str, prompt_ids: list[int], params: SamplingParams, p: TGIParameters):
        self.inputs, self.prompt_ids, self.params, self.p = inputs, prompt_ids, params, p
        self.top_n = p.top_n_tokens or 0


def _invalid(message: str) -> ApiError:
    return ApiError(422, message, "validation")


def _check_parameters(p: TGIParameters, config: ServerConfig, stream: bool) -> None:
    """TGI's own rules, in TGI's words."""
    if p.best_of is not None and p.best_of != 1:
        raise _invalid(f"`best_of` must be > 0 and <= 1. Given: {p.best_of}")
    if p.temperature is not None and p.temperature <= 0:
        raise _invalid("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise _invalid("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise _invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise _invalid("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise _invalid("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise _invalid("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _invalid("`max_new_tokens` must be strictly positive")
    if p.stop and len(p.stop) > config.max_stop_sequences:
        raise _invalid(f"`stop` supports up to {config.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= config.max_top_n_tokens:
        raise _invalid(f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {p.top_n_tokens}")
    if p.decoder_input_details and stream:
        raise _invalid("`decoder_input_details` == true is not supported when streaming tokens")
    if p.truncate is not None and not 0 < p.truncate <= config.max_input_tokens:
        raise _invalid(f"`truncate` must be strictly positive and less than {config.max_input_tokens}. "
                       f"Given: {p.truncate}")
    if p.watermark:
        raise _invalid("`watermark` is not supported by this server")
    if p.grammar is not None:
        raise _invalid("`grammar` (guided generation) is not supported by this server")
    if p.adapter_id is not None:
        raise _invalid("`adapter_id`: this server has no adapters (LoRA); remove the parameter")


async def _prepare(request: Request, req: TGIRequest, stream: bool) -> _Prepared:
    config: ServerConfig = request.app.state.config
    tokenizer = request.app.state.engine.tokenizer
    p = req.parameters or TGIParameters()
    _check_parameters(p, config, stream)
    if not req.inputs:
        raise _invalid("`inputs` cannot be empty")
    if len(req.inputs) > config.prompt_char_cap:
        raise _invalid(f"`inputs` must have less than {config.prompt_char_cap} characters. Given: {len(req.inputs)}")
    ids = await run_in_threadpool(encode_text, tokenizer, req.inputs)  # long prompts: keep the loop free
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    if len(ids) > config.max_input_tokens:
        raise _invalid(f"`inputs` must have less than {config.max_input_tokens} tokens. Given: {len(ids)}")
    room = config.max_total_tokens - len(ids)
    max_new = p.max_new_tokens if p.max_new_tokens is not None else max(1, min(config.default_max_new_tokens, room))
    if max_new > room:
        raise _invalid(f"`inputs` tokens + `max_new_tokens` must be <= {config.max_total_tokens}. "
                       f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
    sampling = bool(p.do_sample) or (p.temperature is not None and p.temperature != 1.0) or bool(p.top_k) \
        or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0)
    try:
        params = SamplingParams(
            temperature=1.0 if p.temperature is None else p.temperature, top_k=p.top_k or 0,
            top_p=1.0 if p.top_p is None else p.top_p, typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            frequency_penalty=p.frequency_penalty or 0.0, do_sample=sampling, seed=p.seed,
            stop=tuple(p.stop or ()), max_new_tokens=max_new)
    except MixtralError as exc:
        raise _invalid(str(exc)) from None
    return _Prepared(req.inputs, ids, params, p)


def _submit(request: Request, prepared: _Prepared) -> RequestHandle:
    check_alive(request.app.state.engine)
    try:
        return request.app.state.engine.submit(prepared.prompt_ids, prepared.params, top_n=prepared.top_n,
                                               prompt_logprobs=bool(prepared.p.decoder_input_details))
    except Overloaded:
        raise ApiError(429, "Model is overloaded", "overloaded", headers=RETRY_AFTER) from None
    except MixtralError as exc:
        raise _invalid(str(exc)) from None


def _token(tokenizer, event: Event) -> dict:
    text = tokenizer.id_to_piece(event.token_id) if event.special else event.text
    return {"id": event.token_id, "text": text, "logprob": event.logprob, "special": event.special}


def _top_tokens(tokenizer, event: Event) -> list[dict]:
    return [{"id": i, "text": token_text(tokenizer, i), "logprob": lp, "special": tokenizer.is_special(i)}
            for i, lp in event.top_tokens]


async def _generate(request: Request, prepared: _Prepared) -> dict:
    """Run one request to the end; the reply of /generate."""
    tokenizer = request.app.state.engine.tokenizer
    events = await collect(_submit(request, prepared), request)
    last = events[-1] if events else None
    if last is not None and last.error_type == "queue_timeout":
        raise ApiError(503, last.error, "overloaded", headers=RETRY_AFTER)
    if last is None or last.error:
        raise ApiError(424, last.error if last else "generation was interrupted", "generation")
    tokens = [e for e in events if e.token_id is not None]
    text = "".join(e.text for e in tokens)
    out = {"generated_text": prepared.inputs + text if prepared.p.return_full_text else text}
    if prepared.p.details:
        prefill = []
        if prepared.p.decoder_input_details and tokens[0].prompt_logprobs is not None:
            prefill = [{"id": i, "text": token_text(tokenizer, i), "logprob": lp}
                       for i, lp in zip(prepared.prompt_ids, tokens[0].prompt_logprobs)]
        details = {"finish_reason": last.finish_reason, "generated_tokens": last.generated_tokens,
                   "seed": last.seed, "prefill": prefill, "tokens": [_token(tokenizer, e) for e in tokens]}
        if prepared.top_n:
            details["top_tokens"] = [_top_tokens(tokenizer, e) for e in tokens]
        out["details"] = details
    return out


def _stream(request: Request, prepared: _Prepared) -> StreamingResponse:
    """Server-sent events, one per token; the last has generated_text (and details when asked). No [DONE]."""
    tokenizer = request.app.state.engine.tokenizer
    handle = _submit(request, prepared)

    async def events():
        parts: list[str] = []
        index = 0
        async for event in handle.aevents():  # leaving early (client gone) cancels the request
            if event.error:
                if event.error_type != "cancelled":
                    yield sse({"error": event.error, "error_type": event.error_type})
                return
            parts.append(event.text)
            data = {"index": index, "token": _token(tokenizer, event), "generated_text": None, "details": None}
            if prepared.top_n:
                data["top_tokens"] = _top_tokens(tokenizer, event)
            if event.done:
                text = "".join(parts)
                data["generated_text"] = prepared.inputs + text if prepared.p.return_full_text else text
                if prepared.p.details:
                    data["details"] = {"finish_reason": event.finish_reason, "generated_tokens":
                                       event.generated_tokens, "seed": event.seed, "input_length": event.prompt_tokens}
            index += 1
            yield sse(data)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/", openapi_extra=json_body("TGIRequest"), summary="Generate (TGI); SSE when \"stream\": true")
async def root(request: Request):
    req = parse(TGIRequest, await read_json(request, request.app.state.config))
    prepared = await _prepare(request, req, stream=bool(req.stream))
    if req.stream:
        return _stream(request, prepared)
    return JSONResponse([await _generate(request, prepared)])


@router.post("/generate", openapi_extra=json_body("TGIRequest"), summary="Generate (TGI)")
async def generate(request: Request):
    req = parse(TGIRequest, await read_json(request, request.app.state.config))
    return JSONResponse(await _generate(request, await _prepare(request, req, stream=False)))


@router.post("/generate_stream", openapi_extra=json_body("TGIRequest"), summary="Generate, streamed (TGI SSE)")
async def generate_stream(request: Request):
    req = parse(TGIRequest, await read_json(request, request.app.state.config))
    return _stream(request, await _prepare(request, req, stream=True))


@router.post("/tokenize", openapi_extra=json_body("TokenizeRequest"), summary="Tokenize (TGI)")
async def tokenize(request: Request):
    config: ServerConfig = request.app.state.config
    req = parse(TokenizeRequest, await read_json(request, config))
    if not req.inputs:
        raise _invalid("`inputs` cannot be empty")
    if len(req.inputs) > config.prompt_char_cap:
        raise _invalid(f"`inputs` must have less than {config.prompt_char_cap} characters. Given: {len(req.inputs)}")
    tokenizer = request.app.state.engine.tokenizer
    ids = await run_in_threadpool(encode_text, tokenizer, req.inputs)
    return JSONResponse(token_spans(tokenizer, req.inputs, ids))


def token_spans(tokenizer, text: str, ids: list[int]) -> list[dict]:
    """Each token with the span of `text` it came from: {"id", "text", "start", "stop"} (character offsets).

    SentencePiece's dummy-prefix space is not in the text, so a piece's leading "▁" that the text lacks
    is skipped; a byte token that only starts a character gets an empty span, the last one the character. A
    space in front of a special token that no token took (Mistral's instruct tokenizers take one space on
    each side of "[INST]" as formatting: "[INST] Hi [/INST]") belongs to no span.
    """
    spans, pos, pending = [], 0, b""
    for token in ids:
        if tokenizer.is_special(token):
            piece = tokenizer.id_to_piece(token)
            pos += 1 if text.startswith(" " + piece, pos) else 0
            width = len(piece) if text.startswith(piece, pos) else 0  # "<s>" written in the text, or added
            spans.append({"id": token, "text": text[pos:pos + width], "start": pos, "stop": pos + width})
            pos += width
            continue
        piece = tokenizer.id_to_piece(token)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            pending += bytes([int(piece[3:5], 16)])
            try:
                piece, pending = pending.decode("utf-8"), b""
            except UnicodeDecodeError:
                piece = ""
        else:
            piece = piece.replace("\u2581", " ")
        if piece.startswith(" ") and not text.startswith(" ", pos):
            piece = piece[1:]
        stop = min(len(text), pos + len(piece))
        spans.append({"id": token, "text": text[pos:stop], "start": pos, "stop": stop})
        pos = stop
    return spans
