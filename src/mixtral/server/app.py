"""The HTTP server: FastAPI wiring of the TGI and OpenAI routes around one `Engine`.

    app = create_app(engine, "my-model", api_key="secret")   # then run it with any ASGI server
    run(engine, "my-model", port=8080)                       # or: build it and run it with uvicorn

Also here: GET /health, /info, /metrics (Prometheus), the API-key check (Bearer, constant-time; health, info,
metrics and the docs stay open), the Host check against DNS rebinding (421), CORS only for the origins named,
and JSON errors for everything, unknown routes included. The access log
records the request line and status only, never headers, so the Authorization header a client sends (for
InferenceClient: the user's Hugging Face token) is never written anywhere.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import Engine
from ..errors import MixtralError
from ..web_guard import host_allowed, is_ip, normalize_hosts
from . import openai, responses, tgi
from .common import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_NEW_TOKENS, ApiError, ServerConfig, error_response
from .schemas import ChatRequest, CompletionRequest, TGIRequest, TokenizeRequest

log = logging.getLogger("mixtral.server")
OPEN_PATHS = frozenset({"/health", "/info", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class ApiKeyMiddleware:
    """Refuse (401) any request without `Authorization: Bearer <key>`, except the open paths."""

    def __init__(self, app, api_key: str, refused: dict[int, int]):
        self.app, self.key, self.refused = app, api_key.encode("utf-8"), refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.key):
            error = ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`",
                             "authentication", code="invalid_api_key")
            response = error_response(scope["path"], error, headers={"WWW-Authenticate": "Bearer"})
            self.refused[401] = self.refused.get(401, 0) + 1
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class HostCheckMiddleware:
    """Refuse (421) a request whose Host header does not name this server (web_guard.host_allowed: the defence
    against DNS rebinding), in the shape of the route's protocol."""

    def __init__(self, app, allowed: frozenset[str], refused: dict[int, int]):
        self.app, self.allowed, self.refused = app, allowed, refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = Headers(scope=scope).get("host", "")
        if not host_allowed(host, self.allowed):
            error = ApiError(421, f"Host {host!r} is not a name of this server (start it with --allowed-hosts "
                                  f"to add one)", "misdirected", code="misdirected_request")
            self.refused[421] = self.refused.get(421, 0) + 1
            return await error_response(scope["path"], error)(scope, receive, send)
        return await self.app(scope, receive, send)


class EngineCollector:
    """Prometheus view of `engine.stats()` plus the server's own count of refused requests."""

    def __init__(self, engine: Engine, refused: dict[int, int]):
        self.engine, self.refused = engine, refused

    def collect(self):
        stats = self.engine.stats()
        requests = CounterMetricFamily("mixtral_requests", "Requests by outcome", labels=["outcome"])
        for outcome, count in stats["requests"].items():
            requests.add_metric([outcome], count)
        yield requests
        invalid = CounterMetricFamily("mixtral_http_errors", "Requests refused before generation, by status",
                                      labels=["status"])
        for status, count in sorted(self.refused.items()):
            invalid.add_metric([str(status)], count)
        yield invalid
        yield CounterMetricFamily("mixtral_generated_tokens", "Tokens generated", value=stats["tokens_generated"])
        yield CounterMetricFamily("mixtral_prompt_tokens", "Prompt tokens prefilled", value=stats["prompt_tokens"])
        yield GaugeMetricFamily("mixtral_active_requests", "Requests in the running batch", value=stats["active"])
        yield GaugeMetricFamily("mixtral_waiting_requests", "Requests waiting for a batch slot", value=stats["waiting"])
        yield GaugeMetricFamily("mixtral_max_batch_size", "Batch slots", value=stats["max_batch_size"])
        store = stats.get("expert_store")
        if store is not None:  # the model's experts are offloaded (kernels/offload.py)
            yield GaugeMetricFamily("mixtral_expert_cache_slots", "Experts the expert cache holds",
                                    value=store["slots"])
            yield CounterMetricFamily("mixtral_expert_lookups", "Experts the layers asked for",
                                      value=store["lookups"])
            yield CounterMetricFamily("mixtral_expert_misses", "Experts read from disk on demand",
                                      value=store["misses"])
            yield CounterMetricFamily("mixtral_expert_prefetched_hits", "Experts needed that prefetch had read ahead",
                                      value=store["prefetched_hits"])
            yield CounterMetricFamily("mixtral_expert_bytes_read", "Expert bytes read from disk",
                                      value=store["bytes_read"])
            by_layer = GaugeMetricFamily("mixtral_expert_hit_rate", "Share of lookups found in memory, by layer",
                                         labels=["layer"])
            for layer, rate in store["hit_rate_by_layer"].items():
                by_layer.add_metric([str(layer)], rate)
            yield by_layer
            for key, doc in (("prefetch_recall", "Share of needed experts the previous layer guessed"),
                             ("prefetch_precision", "Share of guessed experts that were needed")):
                if store[key] is not None:
                    yield GaugeMetricFamily(f"mixtral_expert_{key}", doc, value=store[key])
        prefix = stats.get("prefix_cache")
        if prefix is not None:  # prompts start from the keys and values earlier requests left (prefix_cache.py)
            for key, kind, doc in (("hit_tokens", CounterMetricFamily, "Prompt tokens taken from the prefix cache"),
                                   ("hits", CounterMetricFamily, "Prompts that reused a cached prefix"),
                                   ("lookups", CounterMetricFamily, "Prompts looked up in the prefix cache"),
                                   ("evictions", CounterMetricFamily, "Entries evicted for room"),
                                   ("bytes", GaugeMetricFamily, "Memory the prefix cache holds"),
                                   ("budget_bytes", GaugeMetricFamily, "Memory the prefix cache may hold"),
                                   ("entries", GaugeMetricFamily, "Sequences the prefix cache holds")):
                yield kind(f"mixtral_prefix_cache_{key}", doc, value=prefix[key])
        for name, doc in (("queue_time_seconds", "Time from submission to admission into the batch"),
                          ("time_to_first_token_seconds", "Time from submission to the first generated token"),
                          ("time_per_token_seconds", "Mean time per generated token after the first, per request")):
            h = stats[name]
            yield HistogramMetricFamily(f"mixtral_{name}", doc, sum_value=h["sum"],
                                        buckets=[(floatToGoString(le), n) for le, n in h["buckets"]])


def create_app(engine: Engine, model_id: str, *, max_input_tokens: int | None = None,
               max_total_tokens: int | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_chars: int | None = None,
               default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, allowed_hosts: tuple[str, ...] = (),
               cors_allow_origins: tuple[str, ...] = ()) -> FastAPI:
    """A FastAPI app serving `engine` under the name `model_id`.

    allowed_hosts: host names (besides IP addresses and localhost) a request's Host header may name ("*": any).
    cors_allow_origins: web origins whose pages may call the API from a browser (CORS); none by default, and never
    "*" together with an api_key.

    max_total_tokens: prompt + new tokens per request (default and upper bound: the engine's).
    max_input_tokens: prompt tokens (default: max_total_tokens minus min(256, half of it)).
    max_queue of the engine is the concurrency limit (429 past it). Raises MixtralError for impossible limits.
    """
    if "*" in cors_allow_origins and api_key:
        raise MixtralError("--cors-allow-origin '*' with --api-key would let any web page use the key a browser "
                           "holds; name the origins")
    total = engine.max_total_tokens if max_total_tokens is None else max_total_tokens
    if not 2 <= total <= engine.max_total_tokens:
        raise MixtralError(f"max_total_tokens must be between 2 and {engine.max_total_tokens}, got {total}")
    inputs = total - min(256, total // 2) if max_input_tokens is None else max_input_tokens
    if not 1 <= inputs < total:
        raise MixtralError(f"max_input_tokens must be between 1 and max_total_tokens - 1 ({total - 1}), got {inputs}")
    config = ServerConfig(model_id=model_id, max_input_tokens=inputs, max_total_tokens=total,
                          max_concurrent_requests=engine.max_queue, max_batch_size=engine.max_batch_size,
                          max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                          default_max_new_tokens=default_max_new_tokens, api_key=api_key,
                          model_dtype=str(engine.model.dtype).replace("torch.", ""),
                          model_device=engine.model.device.type)

    app = FastAPI(title="mixtral", version=__version__,
                  description="Text Generation Inference and OpenAI-compatible API for a Mixtral-style model.")
    app.state.engine, app.state.config, app.state.started = engine, config, int(time.time())
    refused: dict[int, int] = {}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, refused))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        refused[exc.status] = refused.get(exc.status, 0) + 1
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "validation"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return await api_error(request, ApiError(exc.status_code, message, kind, code=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return await api_error(request, ApiError(422, f"invalid request: {exc.errors()[0].get('msg')}"))

    @app.get("/health", tags=["TGI"], summary="200 when the engine runs, else 503")
    async def health():
        if engine.alive:
            return Response(status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    @app.get("/info", tags=["TGI"], summary="Model and limits (TGI)")
    async def info():
        return {"model_id": model_id, "model_sha": None, "model_dtype": config.model_dtype,
                "model_device_type": config.model_device, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": config.max_concurrent_requests, "max_best_of": 1,
                "max_stop_sequences": config.max_stop_sequences, "max_input_tokens": config.max_input_tokens,
                "max_input_length": config.max_input_tokens, "max_total_tokens": config.max_total_tokens,
                "max_batch_size": config.max_batch_size, "max_client_batch_size": 1, "validation_workers": 1,
                "router": "mixtral", "version": __version__, "sha": None, "docker_label": None}

    @app.get("/metrics", tags=["TGI"], summary="Prometheus metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(tgi.router)
    app.include_router(openai.router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = responses.document(get_openapi(title=app.title, version=app.version,
                                                    description=app.description, routes=app.routes))
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (TGIRequest, TokenizeRequest, ChatRequest, CompletionRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, refused=refused)
    if cors_allow_origins:  # outside the key check: a browser's preflight carries no Authorization header
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostCheckMiddleware, allowed=normalize_hosts(allowed_hosts), refused=refused)
    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8080, shutdown_timeout: float = 30.0,
        **limits) -> None:
    """Serve `engine` under the name `model_id` with uvicorn on host:port until interrupted (`mixtral serve`).

    A stop signal (SIGTERM, SIGINT) drains: /health and new requests get 503 at once, the requests held run on for
    up to `shutdown_timeout` seconds, then any still held end with a final "shutdown" error in their protocol's
    shape, and run returns (a second signal stops at once).

    limits: `create_app`'s keywords (max_input_tokens, max_total_tokens, api_key, max_body_bytes,
    max_prompt_chars, default_max_new_tokens, allowed_hosts, cors_allow_origins); a host name given as `host` is
    an allowed host. The engine stays the caller's to close.
    Raises MixtralError for impossible limits.
    """
    import uvicorn

    if host not in ("0.0.0.0", "::", "") and not is_ip(host):  # the name it listens on is one of its names
        limits["allowed_hosts"] = (*limits.get("allowed_hosts", ()), host)
    app = create_app(engine, model_id, **limits)
    config: ServerConfig = app.state.config
    if not _is_loopback(host) and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    print(f"mixtral: serving {model_id} on http://{host}:{port} (TGI: POST /, /generate, "
          f"/generate_stream; OpenAI: /v1/chat/completions, /v1/completions; docs: /docs); "
          f"max_input_tokens={config.max_input_tokens} max_total_tokens={config.max_total_tokens} "
          f"max_batch_size={engine.max_batch_size} max_concurrent_requests={engine.max_queue}; "
          f"KV cache {engine.cache.nbytes() / 2**30:.2f} GiB (lower --max-total-tokens or --max-batch-size "
          "to shrink it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=True,
                                           timeout_graceful_shutdown=5))
    stop_now = server.handle_exit

    def finish() -> None:
        deadline = time.monotonic() + shutdown_timeout
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.close()  # what is still held ends with a "shutdown" error event, sent by its own handler
        server.should_exit = True

    def drain(sig, frame) -> None:
        if not engine.alive:  # already draining (or the engine stopped): a second signal stops at once
            return stop_now(sig, frame)
        engine.drain()
        held = engine.stats()
        print(f"mixtral: stopping: new requests get 503; waiting up to {shutdown_timeout:g} s for "
              f"{held['active'] + held['waiting']} held request(s)", flush=True)
        threading.Thread(target=finish, name="mixtral-drain", daemon=True).start()

    server.handle_exit = drain
    server.run()
