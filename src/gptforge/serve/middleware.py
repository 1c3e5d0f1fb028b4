"""Pure ASGI middleware for the server: Prometheus metrics per app, and the request body size limit.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so a streamed response passes through untouched and a client
disconnect still reaches the route. Metrics live in a `CollectorRegistry` owned by one app: two apps in one process
(tests, replicas) never share or double-register counters. Route labels use the matched route's template
(`/v1/chat/completions`), and every unmatched path is one `unmatched` label, so a scanner probing random URLs cannot
blow up the label cardinality.

The body limit reads the whole body up front (at most `max_bytes`, 1 MiB by default) and replays it to the app:
a Content-Length over the limit is refused before reading anything, and a chunked body is counted as it arrives,
so a client cannot get around the limit by leaving the header out.
"""

from __future__ import annotations

import time

from gptforge.serve.errors import error_response

# HTTP status -> the reason a refusal is counted under.
REJECTION_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    429: "overloaded",
    499: "client_disconnected",
    503: "unavailable",
    504: "timeout",
}

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The app's Prometheus collectors; `engine` (the AsyncEngine contract) feeds the running/waiting gauges."""

    def __init__(self, engine=None, inflight=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gptforge_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gptforge_http_request_duration_seconds",
            "Time from request to the end of the response (streams: the last byte).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gptforge_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("gptforge_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.completion_tokens = Counter("gptforge_completion_tokens", "Tokens generated.", registry=r)
        self.rejections = Counter(
            "gptforge_rejections", "Refused or failed requests by reason.", ["reason"], registry=r
        )
        running = Gauge("gptforge_requests_running", "Engine requests in the running batch.", registry=r)
        waiting = Gauge("gptforge_requests_waiting", "Engine requests queued for a slot.", registry=r)
        active = Gauge("gptforge_http_requests_in_flight", "Generation requests being served.", registry=r)
        if engine is not None:
            running.set_function(lambda: engine.num_running)
            waiting.set_function(lambda: engine.num_waiting)
        if inflight is not None:
            active.set_function(inflight)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            m = self.metrics
            m.requests.labels(label, scope.get("method", ""), str(status[0])).inc()
            m.latency.labels(label).observe(time.perf_counter() - t0)
            reason = REJECTION_REASONS.get(status[0], "server_error" if status[0] >= 500 else None)
            if reason:
                m.rejections.labels(reason).inc()


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str):
        return error_response(
            413,
            f"request body is {size} bytes, over this server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await error_response(400, f"invalid Content-Length header {length!r}")(scope, receive, send)
                return
            if declared > self.max_bytes:
                await self._too_large(str(declared))(scope, receive, send)
                return
        chunks, total, first = [], 0, None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body arrived: let the app see it
                first = message
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(f"more than {self.max_bytes}")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replay_receive, send)
