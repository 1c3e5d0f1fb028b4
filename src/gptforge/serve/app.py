"""The FastAPI app: OpenAI-compatible routes, SSE streaming, health, metrics, errors, drain on shutdown.

`create_app(service, settings)` takes the engine through the service, so tests run the whole HTTP surface on a fake
engine. Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream=true -> server-sent events),
GET /health/live, GET /health/ready, GET /metrics, and the chat page from `mount_web`.

Errors: every refusal, ours or the framework's (bad JSON, wrong method, unknown route), goes out in the OpenAI error
shape; request validation is a 400 (FastAPI's default 422 body is replaced, and so is its /openapi.json entry).
Overload (429 + Retry-After) and shutdown (503) are decided by `Service.submit` before any stream starts.

Disconnects: a streaming response runs its body beside a listener for `http.disconnect` (Starlette does this for
ASGI < 2.4 servers such as uvicorn) and cancels it when the client leaves; the cancelled generator aborts the engine
requests. A non-streaming request polls `request.is_disconnected()` while it waits and cancels its work the same way.

Shutdown: the lifespan's exit (after uvicorn has stopped listening) marks the app draining: /health/ready answers 503
and new generation requests get 503, in-flight requests are given up to `drain_timeout_s`, then
`AsyncEngine.shutdown` aborts whatever is left. `app.state.begin_drain()` flips to draining earlier (the serve stage
calls it from its SIGTERM handler, so a load balancer sees "not ready" while streams finish).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from gptforge.serve.auth import APIKeyMiddleware
from gptforge.serve.errors import error_response
from gptforge.serve.middleware import BodyLimitMiddleware, Metrics, MetricsMiddleware
from gptforge.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
)
from gptforge.serve.service import Generation, Overloaded, Service, ServiceError, Unavailable
from gptforge.serve.streaming import build_response, sse_stream
from gptforge.serve.web import mount_web

log = logging.getLogger("gptforge.serve")


class AppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[str] = Field(default_factory=list, description="Accepted API keys; empty = an open server.")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body accepted (413 above).")
    drain_timeout_s: float = Field(30.0, ge=0, description="How long shutdown waits for in-flight requests.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503.")
    disconnect_poll_s: float = Field(0.1, gt=0, description="How often a non-streaming request checks its client.")


class ServerState:
    """Draining flag and in-flight generation count (the drain waits for it to reach zero)."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0

    def begin_drain(self) -> None:
        self.draining = True


_ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Invalid request",
        401: "Missing or invalid API key",
        404: "Unknown model or route",
        413: "Body too large",
        429: "Overloaded; see Retry-After",
        503: "Shutting down or engine stopped",
        504: "Deadline passed",
    }.items()
}
# One server-sent event (OpenAPI 3.1: the schema of a text/event-stream response describes each event).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk (the completion or chat.completion.chunk shape, or an error), or [DONE].",
        }
    },
    "required": ["data"],
}
_SSE = {"text/event-stream": {"schema": _SSE_EVENT}}


def _is_field(part) -> bool:
    """Loc parts that name fields or indexes; pydantic also puts union branch tags there (`str`, `list[...]`)."""
    return isinstance(part, int) or (part.isidentifier() and part not in ("body", "str", "int", "float", "bool"))


def _param_of(loc: tuple) -> str | None:
    parts = [p for p in loc if _is_field(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _validation_message(err: dict) -> str:
    kind, param = err.get("type", ""), _param_of(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}"
    if param is None and kind in ("missing",):
        return "the request body is empty: send a JSON object"
    if param is None:
        return f"the request body must be a JSON object ({err.get('msg', '')})"
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {msg}"


class GenerationStream(StreamingResponse):
    """A StreamingResponse that always runs `cleanup` (even if the body was never started: client gone first)."""

    def __init__(self, content, cleanup, **kw) -> None:
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._cleanup()


def create_app(service: Service, settings: AppSettings | None = None) -> FastAPI:
    """The HTTP app over `service`; the engine thread starts with the app's lifespan and is drained on exit."""
    settings = settings or AppSettings()
    state = ServerState()
    metrics = Metrics(service.engine, lambda: state.inflight)

    async def shutdown() -> None:
        state.begin_drain()
        deadline = time.monotonic() + settings.drain_timeout_s
        while state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await service.engine.shutdown(drain=True, timeout=max(0.0, deadline - time.monotonic()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        await shutdown()

    app = FastAPI(
        title="gptforge",
        summary="OpenAI-compatible completions and chat completions for a gptforge checkpoint.",
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.begin_drain = state.begin_drain
    app.state.shutdown = shutdown
    app.state.metrics = metrics
    app.state.service = service

    # ---- errors -------------------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # The deepest error is the most specific one: for a union (content: str | list of parts) it is the branch
        # that got furthest, not "should be a valid string" about the branch the client never meant.
        first = max(errors, key=lambda e: len(e.get("loc", ())), default={"msg": "invalid request"})
        param = _param_of(tuple(first.get("loc", ())))
        return error_response(400, _validation_message(first), "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        messages = {404: f"no route {path}", 405: f"method {request.method} not allowed on {path}"}
        msg = messages.get(exc.status_code, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, msg, code, headers=dict(exc.headers or {}))

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError):
        headers = None
        if isinstance(exc, Overloaded | Unavailable):
            headers = {"Retry-After": str(settings.retry_after_s)}
        return error_response(exc.status, exc.message, exc.code, exc.param, headers=headers)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal server error: {type(exc).__name__}", "server_error")

    # ---- generation ---------------------------------------------------------------------------------------------
    def finish(gen: Generation) -> None:
        if gen.first_token_at is not None:
            metrics.ttft.observe(gen.first_token_at - gen.started_at)
        metrics.prompt_tokens.inc(gen.prompt_tokens)
        metrics.completion_tokens.inc(gen.completion_tokens)

    async def run(request: Request, prepare) -> Response:
        if state.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        gen = service.submit(await prepare())
        state.inflight += 1
        done = False

        async def cleanup() -> None:
            nonlocal done
            if not done:
                done = True
                state.inflight -= 1
                await gen.close()
                finish(gen)

        if gen.plan.stream:

            async def body():
                pieces = sse_stream(gen)
                try:
                    async for piece in pieces:
                        if piece.startswith('data: {"error"'):
                            metrics.rejections.labels("stream_error").inc()
                        yield piece
                finally:  # `async for` does not close what it iterates; this aborts the engine requests now
                    await pieces.aclose()

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return GenerationStream(body(), cleanup, media_type="text/event-stream", headers=headers)
        try:
            task = asyncio.ensure_future(gen.collect())
            while True:
                done_set, _ = await asyncio.wait({task}, timeout=settings.disconnect_poll_s)
                if done_set:
                    results = task.result()
                    break
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            if not task.done():
                task.cancel()
            await cleanup()
        return JSONResponse(build_response(gen, results).model_dump())

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: {"model": CompletionResponse, "content": _SSE}, **_ERRORS},
        summary="Text completion (OpenAI /v1/completions)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await run(request, lambda: service.prepare_completion(body))

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: {"model": ChatCompletionResponse, "content": _SSE}, **_ERRORS},
        summary="Chat completion (OpenAI /v1/chat/completions)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await run(request, lambda: service.prepare_chat(body))

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[401]}, summary="The served model")
    async def models() -> ModelList:
        return service.models()

    # ---- operations ---------------------------------------------------------------------------------------------
    @app.get("/health/live", response_model=Health, summary="200 while the process runs")
    async def live() -> Health:
        return Health(status="live")

    @app.get(
        "/health/ready",
        response_model=Health,
        responses={503: {"model": Health, "description": "Draining or engine stopped"}},
        summary="200 when the engine runs and the server admits requests",
    )
    async def ready():
        eng = service.engine
        detail = {"num_running": eng.num_running, "num_waiting": eng.num_waiting, "inflight": state.inflight}
        if state.draining or not eng.is_running:
            status = "draining" if state.draining else "engine_stopped"
            return JSONResponse(Health(status=status, detail=detail).model_dump(), status_code=503)
        return Health(status="ready", detail=detail)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: _ERRORS[401]},
        summary="Prometheus metrics",
    )
    async def prometheus() -> Response:
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    mount_web(app)

    # Pure ASGI middleware, outermost last: metrics see every status (401s and 413s included); auth runs before the
    # body is read, so an unauthenticated client cannot make us buffer a megabyte.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base_openapi()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            # Document the one model id this server answers to (anything else is a 404 model_not_found).
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                model = components.get(name, {}).get("properties", {}).get("model")
                if model is not None:
                    model["enum"] = [service.model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
