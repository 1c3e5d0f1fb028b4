"""A router in front of N replicas of the OpenAI-compatible server: least-loaded routing, health checks, failover.

`gptforge serve --replicas N` starts N single-process servers on loopback ports (see `serve_replicas`, whose process
supervision lives in replicas.py) and this app on the public port. The router holds no model; it only decides where
each request goes and what to do when a replica fails.

- Routing: the healthy replica with the fewest requests in flight *through this router* (ties round-robin). Request
  lengths vary by orders of magnitude for a language model, so round-robin alone piles requests onto a replica stuck
  on long generations; counting in-flight requests needs no cooperation from the replicas.
- Health: GET /health/ready on every replica each `health_interval_s`, from a connection pool of its own so that a
  saturated request pool cannot starve the probes into false ejections. A replica is ejected after
  `eject_after_failures` consecutive failures (probes or 5xx answers) or at once on a connection error, and re-admitted
  after `readmit_after_successes` consecutive good probes. A replica process that was just (re)started is admitted on
  its first good probe: it is new, not flapping.
- Failover: a request is retried on another replica (at most `max_retries` times) when it failed before any byte
  reached the client: connection refused or dropped, or a 5xx. A 4xx (429 included) is the client's answer and is
  passed through untouched; retrying it elsewhere would only multiply load. A read timeout is answered 504 without a
  retry: the replica may still be working, and resending a slow request to the others is how overloads cascade.
- Bodies: a non-streaming answer is read whole from the replica before the router answers, so a replica dying
  mid-body is still retried (the cost: the router holds one response body per request in memory). A streaming answer
  (text/event-stream) is forwarded event by event; once an event has reached the client the request can no longer
  move, so a replica dying mid-stream ends the stream with an explicit SSE error event and no `data: [DONE]` - a client
  must never mistake a truncated stream for a complete one. Only whole events are forwarded, so the error event is
  never glued onto half of one.

The router's own routes: /health/live, /health/ready (ready while at least one replica is healthy), /metrics
(Prometheus, registry per app), GET /router/replicas (JSON state). /v1/* and the chat page (/, /chat, /static/*) go
to the replicas; each answer names its replica in an `x-gptforge-replica` header. API keys are checked here with the
same middleware as the replicas; the replicas themselves hold an internal key only the router knows
(`upstream_headers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from gptforge.serve.auth import APIKeyMiddleware
from gptforge.serve.errors import error_body, error_response
from gptforge.serve.replicas import Lease, ReplicaPool

log = logging.getLogger("gptforge.serve.router")

# RFC 9110 section 7.6.1: connection-specific headers a proxy must not forward; host and content-length are rewritten
# by the client library for the new connection and body.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# The router's uvicorn writes its own; forwarding the replica's would send them twice.
_RESPONSE_DROP = _HOP_BY_HOP | {"server", "date"}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")


class RouterSettings(BaseModel):
    """How the router checks, routes to and fails over between replicas."""

    model_config = ConfigDict(extra="forbid")

    health_interval_s: float = Field(1.0, gt=0, description="seconds between two GET /health/ready probes of a replica")
    health_timeout_s: float = Field(2.0, gt=0, description="a probe not answered within this many seconds has failed")
    eject_after_failures: int = Field(
        3, ge=1, description="consecutive failures (probes or 5xx answers) that take a replica out of rotation"
    )
    readmit_after_successes: int = Field(
        2, ge=1, description="consecutive good probes that bring an ejected replica back into rotation"
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="attempts on other replicas for a request that failed (connection error or 5xx) before any byte "
        "reached the client",
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="seconds to open a connection to a replica")
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="seconds to wait for a replica's response headers, or between two chunks of its body; also how "
        "long a request may wait for a free upstream connection",
    )
    max_body_bytes: int = Field(4 << 20, ge=1, description="largest request body accepted (413 above it)")
    max_upstream_connections: int = Field(
        512, ge=1, description="concurrent connections to all replicas together; further requests wait for one"
    )
    api_keys: list[str] = Field(
        default_factory=list, description="keys clients must present (Bearer or x-api-key); empty = open router"
    )
    respawn: bool = Field(True, description="serve_replicas: restart a replica process that exits")
    ready_timeout_s: float = Field(
        120.0, gt=0, description="serve_replicas: seconds the replicas have to become ready at start-up"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGINT/SIGTERM: seconds in-flight requests get to finish before they are cut"
    )


class RouterMetrics:
    """Prometheus metrics on a registry of the app's own (several routers in one process must not collide). The
    per-replica ones are read from the pool at scrape time, so they cannot drift from the routing state."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.registry = CollectorRegistry()
        r = self.registry
        self.retries = Counter("gptforge_router_retries", "attempts moved to another replica", ["replica"], registry=r)
        self.rejected = Counter("gptforge_router_rejected", "answered by the router itself", ["reason"], registry=r)
        r.register(self)

    def collect(self):
        p, one, two = "gptforge_router_", ["replica"], ["replica", "status"]
        in_flight = GaugeMetricFamily(p + "replica_in_flight", "requests in flight through the router", labels=one)
        healthy = GaugeMetricFamily(p + "replica_healthy", "1 while the replica is in rotation", labels=one)
        requests = CounterMetricFamily(p + "requests", "responses sent, by replica and status", labels=two)
        failures = CounterMetricFamily(
            p + "failures", "failed attempts and probes, by kind", labels=["replica", "kind"]
        )
        ejections = CounterMetricFamily(p + "ejections", "times taken out of rotation", labels=one)
        restarts = CounterMetricFamily(p + "restarts", "processes started after the first", labels=one)
        for rep in self.pool.snapshot():
            i = str(rep["index"])
            in_flight.add_metric([i], rep["in_flight"])
            healthy.add_metric([i], float(rep["healthy"]))
            ejections.add_metric([i], rep["ejections"])
            restarts.add_metric([i], rep["restarts"])
            for status, n in rep["responses"].items():
                requests.add_metric([i, status], n)
            for kind, n in rep["failures"].items():
                failures.add_metric([i, kind], n)
        yield from (in_flight, healthy, requests, failures, ejections, restarts)


def _request_headers(request: Request, extra: dict[str, str]) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, with the router's `extra` replacing same-named ones."""
    drop = set(_HOP_BY_HOP) | {"expect", "accept-encoding"} | {k.lower() for k in extra}
    drop |= {t.strip().lower() for t in request.headers.get("connection", "").split(",") if t.strip()}
    if "authorization" in drop:
        drop.add("x-api-key")  # the client's key stays at the router when the replicas get the internal one
    # identity: SSE events are cut at blank lines, which compressed bytes do not show (and loopback gains nothing).
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop] + [("accept-encoding", "identity")]
    if request.client is not None:
        headers.append(("x-forwarded-for", request.client.host))
    return headers + list(extra.items())


def _response_headers(resp: httpx.Response, lease: Lease) -> dict[str, str]:
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_DROP}
    headers["x-gptforge-replica"] = str(lease.index)
    return headers


def _sse_error(message: str) -> bytes:
    body = error_body(502, message, code="replica_failed")
    body["error"]["type"] = "server_error"
    return f"data: {json.dumps(body)}\n\n".encode()


def _last_event_end(buf: bytes | bytearray) -> int:
    """Index just past the last complete SSE event in `buf` (0 when there is none)."""
    return max(buf.rfind(b"\n\n") + 2 if b"\n\n" in buf else 0, buf.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in buf else 0)


async def _read_body(request: Request, limit: int) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return error_response(400, f"invalid Content-Length header: {declared!r}")
        if int(declared) > limit:
            return error_response(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return error_response(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class _Failed:
    """An attempt that may move to another replica; `response` is a 5xx to fall back on when none is left."""

    error: str
    response: Response | None = None


class _Proxy:
    """Sends one client request to replicas until one answers, following the retry rules in the module docstring."""

    def __init__(self, pool: ReplicaPool, settings: RouterSettings, extra_headers: dict[str, str]) -> None:
        self.pool, self.settings, self.extra_headers = pool, settings, extra_headers
        self.metrics = RouterMetrics(pool)
        self.client: httpx.AsyncClient | None = None  # opened by the app's lifespan

    async def __call__(self, request: Request) -> Response:
        body = await _read_body(request, self.settings.max_body_bytes)
        if not isinstance(body, bytes):
            self.metrics.rejected.labels("body_too_large").inc()
            return body
        headers = _request_headers(request, self.extra_headers)
        # The path as the client sent it (still percent-encoded), so nothing is decoded twice on the way.
        path = request.scope.get("raw_path") or request.url.path.encode()
        target = path.decode("latin-1") + (f"?{request.url.query}" if request.url.query else "")
        tried: set[int] = set()
        fallback: tuple[int, Response] | None = None
        last_error = "no attempt made"
        for attempt in range(1 + self.settings.max_retries):
            lease = self.pool.acquire(tried)
            if lease is None:
                break
            tried.add(lease.index)
            if attempt:
                self.metrics.retries.labels(str(lease.index)).inc()
            outcome = await _unless_client_leaves(request, self._attempt(request.method, lease, target, headers, body))
            if outcome is None:
                self.metrics.rejected.labels("client_left").inc()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            if not isinstance(outcome, _Failed):
                return outcome
            last_error = outcome.error
            if outcome.response is not None:
                fallback = (lease.index, outcome.response)
        if fallback is not None:  # every replica tried answered 5xx: the last answer is the most useful one
            self.pool.count_response(fallback[0], fallback[1].status_code)
            return fallback[1]
        if not tried:
            self.metrics.rejected.labels("no_healthy_replica").inc()
            retry = {"Retry-After": "1"}
            return error_response(503, "no healthy replica is available", "no_healthy_replica", headers=retry)
        self.metrics.rejected.labels("all_attempts_failed").inc()
        return error_response(502, f"{len(tried)} replica(s) failed this request; last: {last_error}", "replica_failed")

    async def _attempt(self, method: str, lease: Lease, target: str, headers: list, body: bytes) -> Response | _Failed:
        resp: httpx.Response | None = None
        handed_over = False  # True once a stream response owns the lease and the upstream response
        try:
            req = self.client.build_request(method, lease.url + target, headers=headers, content=body)
            resp = await self.client.send(req, stream=True)
            if resp.status_code >= 500:
                content = await resp.aread()
                error = f"replica {lease.index} answered HTTP {resp.status_code}"
                self.pool.report_failure(lease, "http_5xx", error, eject=False)
                return _Failed(error, _buffered(resp, content, lease))
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                first = await self._first_events(resp)
                handed_over = True
                done = _Once(self.pool, lease, resp)
                stream = self._stream(resp, lease, first, done)
                headers = _response_headers(resp, lease)
                return ProxyStream(stream, status_code=resp.status_code, headers=headers, on_close=done)
            content = b"".join([c async for c in resp.aiter_raw()])
            self.pool.report_success(lease, resp.status_code)
            return _buffered(resp, content, lease)
        except httpx.PoolTimeout:  # the router's own limit, not the replica's fault
            self.metrics.rejected.labels("router_saturated").inc()
            return error_response(503, "the router has no free upstream connection; retry later", "saturated")
        except httpx.TimeoutException as e:
            # Connecting timed out: the replica is unreachable, try another. Reading timed out: it may be busy with
            # this very request, so do not hand the same work to a second replica.
            connect = isinstance(e, httpx.ConnectTimeout)
            error = f"replica {lease.index}: {type(e).__name__}"
            self.pool.report_failure(lease, "timeout", error, eject=connect)
            if connect:
                return _Failed(error)
            return error_response(504, f"{error} after {self.settings.request_timeout_s}s", "timeout")
        except httpx.TransportError as e:
            error = f"replica {lease.index}: {type(e).__name__}: {e}"
            self.pool.report_failure(lease, "connection", error, eject=True)
            return _Failed(error)
        finally:
            if not handed_over:
                self.pool.release(lease)
                if resp is not None:
                    await _shielded(resp.aclose())

    async def _first_events(self, resp: httpx.Response) -> tuple[bytes, bytes, AsyncIterator[bytes]]:
        """Read until at least one whole event (or the end): a failure up to here can still be retried."""
        chunks = resp.aiter_raw()
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
            if _last_event_end(buf):
                break
        cut = _last_event_end(buf)
        return bytes(buf[:cut]), bytes(buf[cut:]), chunks

    async def _stream(
        self, resp: httpx.Response, lease: Lease, first: tuple[bytes, bytes, AsyncIterator[bytes]], done: _Once
    ) -> AsyncIterator[bytes]:
        ready, pending, chunks = first
        buf = bytearray(pending)
        try:
            if ready:
                yield ready
            async for chunk in chunks:
                buf += chunk
                cut = _last_event_end(buf)
                if cut:
                    yield bytes(buf[:cut])
                    del buf[:cut]
            if buf:
                yield bytes(buf)  # a tail without the blank line: the replica's business, forwarded as sent
            self.pool.report_success(lease, resp.status_code)
        except httpx.HTTPError as e:
            error = f"replica {lease.index} failed mid-stream: {type(e).__name__}: {e}"
            self.pool.report_failure(lease, "mid_stream", error, eject=not isinstance(e, httpx.TimeoutException))
            self.pool.count_response(lease.index, "mid_stream_error")
            yield _sse_error(f"{error}; the answer is incomplete, resend the request")
        finally:
            await done()


async def _unless_client_leaves(request: Request, attempt: Awaitable[Any], poll_s: float = 0.25) -> Any:
    """`await attempt`, or cancel it and return None once the client has hung up. A non-streaming answer arrives in
    one piece at the end, so without this a client that gave up would keep a replica generating for nobody - and
    clients that time out under load and resend are exactly how an overload feeds itself."""
    task = asyncio.ensure_future(attempt)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # its cleanup closes the upstream connection, which aborts the generation there
                return None
    finally:
        task.cancel()  # a no-op when done; when we are cancelled ourselves, the attempt goes with us


class _Once:
    """Releases a streamed attempt's lease and upstream response exactly once: from the stream's end, or from the
    response's own cleanup when the stream never ran (a generator closed before its first step skips its finally)."""

    def __init__(self, pool: ReplicaPool, lease: Lease, resp: httpx.Response) -> None:
        self.pool, self.lease, self.resp, self.done = pool, lease, resp, False

    async def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.pool.release(self.lease)
            await _shielded(self.resp.aclose())


async def _shielded(aw: Awaitable[Any]) -> None:
    """Await cleanup even while the task is being cancelled (client gone), so no upstream connection leaks."""
    with anyio.CancelScope(shield=True):
        await aw


def _buffered(resp: httpx.Response, content: bytes, lease: Lease) -> Response:
    return Response(content, status_code=resp.status_code, headers=_response_headers(resp, lease))


class ProxyStream(StreamingResponse):
    """Closes its body iterator and upstream deterministically: starlette leaves that to garbage collection when the
    client disconnects, which would keep the replica's connection (and its generation slot) busy until then."""

    def __init__(self, *args, on_close: Callable[[], Awaitable[None]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _shielded(self.body_iterator.aclose())
            await self.on_close()


def create_router_app(
    upstreams: list[str], settings: RouterSettings, upstream_headers: dict[str, str] | None = None
) -> FastAPI:
    """The router app over replicas at `upstreams` (base URLs); `upstream_headers` go with every upstream request
    and probe (the internal API key). `app.state.pool` is the routing state; set `app.state.draining = True` to
    turn /health/ready to 503 during shutdown."""
    extra = dict(upstream_headers or {})
    pool = ReplicaPool(upstreams, settings)
    proxy = _Proxy(pool, settings, extra)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        s = settings
        timeout = httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s, pool=s.request_timeout_s)
        # keepalive_expiry below uvicorn's 5 s keep-alive: reusing a connection the replica is closing would read
        # as a connection error and eject a healthy replica.
        limits = httpx.Limits(
            max_connections=s.max_upstream_connections,
            max_keepalive_connections=s.max_upstream_connections,
            keepalive_expiry=2.0,
        )
        probe_limits = httpx.Limits(max_connections=4 * len(upstreams), keepalive_expiry=2.0)
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback traffic to the replicas.
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client,
            httpx.AsyncClient(timeout=s.health_timeout_s, limits=probe_limits, trust_env=False) as probe_client,
        ):
            proxy.client = client
            await pool.probe_all(probe_client, extra)  # readiness reflects the replicas from the first request on

            async def probe_loop() -> None:
                while True:
                    await asyncio.sleep(s.health_interval_s)
                    try:
                        await pool.probe_all(probe_client, extra)
                    except Exception:  # a bug here must not stop the probes for good, silently
                        log.exception("replica probes failed")

            task = asyncio.create_task(probe_loop())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="gptforge router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.draining = False
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)

    @app.get("/health/live")
    async def live() -> dict:
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready():
        healthy = pool.num_healthy
        if app.state.draining:
            return error_response(503, "the router is shutting down", "draining")
        if healthy == 0:
            return error_response(503, "no healthy replica is available", "no_healthy_replica")
        return {"status": "ready", "healthy_replicas": healthy, "replicas": len(pool.replicas)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/replicas")
    async def replicas() -> dict:
        return {"healthy": pool.num_healthy, "draining": app.state.draining, "replicas": pool.snapshot()}

    @app.api_route("/v1/{path:path}", methods=list(_METHODS))
    async def forward(request: Request) -> Response:
        return await proxy(request)

    # The replicas' chat page (no data in it: it asks for the key and calls /v1 like any client).
    for page in ("/", "/chat", "/static/{path:path}"):
        app.add_api_route(page, forward, methods=["GET", "HEAD"], include_in_schema=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    return app


def serve_replicas(
    worker_argv: Callable[[int], list[str]], replicas: int, host: str, port: int, settings: RouterSettings
) -> None:
    """Run `replicas` worker processes (`worker_argv(port)` must make a server listen on 127.0.0.1:port) behind the
    router on host:port, until SIGINT/SIGTERM. Blocking; see replicas.py for the process side."""
    from gptforge.serve.replicas import run_replicas

    run_replicas(worker_argv, replicas, host, port, settings)
