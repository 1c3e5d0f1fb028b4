"""A tiny OpenAI-like worker for the router tests: fake tokens at a set pace, SSE streaming, health routes.

Run as a subprocess: `python tests/serve/stub_worker.py --port P [--delay S] [--die-after-tokens K] [--fail-ready]`.
It starts in a tenth of a second (starlette + uvicorn, no model), so a test can start several and kill them at will.

- Token i is the text " t{i}"; `max_tokens` (default 8) of them, one every `--delay` seconds.
- `--die-after-tokens K`: the process exits (os._exit, like a crash) once K tokens of a completion were produced.
  K = 0 dies as soon as a completion request arrives, before any byte is sent. A non-streaming answer is sent as it
  is produced (a JSON prefix, then the text piece by piece), so K >= 1 cuts a non-streaming body in the middle too.
- A prompt (or last message) "status:NNN" is answered with that HTTP status and an OpenAI error body (429 carries
  Retry-After), so tests can script 4xx/5xx answers.
- `--fail-ready`: /health/ready answers 503 until `POST /stub/ready {"ready": true}`; `{"ready": false}` flips back.
- GET /stub/stats: {"pid", "hits" (by path, counted on arrival), "in_flight"}.
- If $GPTFORGE_API_KEY is set, every route but /health/* needs `Authorization: Bearer <it>` (the router's internal
  key), as the real server does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(delay: float, die_after_tokens: int, ready: bool) -> Starlette:
    state = {"ready": ready, "hits": {}, "in_flight": 0}
    key = os.environ.get("GPTFORGE_API_KEY")

    async def tokens(n: int):
        for i in range(n):
            if i == die_after_tokens:
                os._exit(17)
            await asyncio.sleep(delay)
            yield f" t{i}"
        if die_after_tokens == n:
            os._exit(17)

    async def completions(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = json.loads(await request.body())
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            n = int(body.get("max_tokens") or 8)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return _error(400, f"bad request: {e}")
        if isinstance(prompt, str) and prompt.startswith("status:"):
            status = int(prompt.split(":")[1])
            return _error(status, f"scripted {status}", {"Retry-After": "2"} if status == 429 else None)
        if die_after_tokens == 0:
            os._exit(17)
        cid, created, kind = f"cmpl-{os.getpid()}-{time.monotonic_ns()}", int(time.time()), "text_completion"
        if chat:
            kind = "chat.completion"

        def choice(text: str | None, finish: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            key = "delta" if stream else "message"
            content = {"content": text} if text is not None else {}
            return {"index": 0, key: ({"role": "assistant"} | content), "finish_reason": finish}

        async def sse():
            state["in_flight"] += 1
            try:
                async for tok in tokens(n):
                    event = {"id": cid, "object": kind + ".chunk" * chat, "created": created, "model": "stub"}
                    yield f"data: {json.dumps(event | {'choices': [choice(tok, None, True)]})}\n\n"
                last = {"id": cid, "object": kind + ".chunk" * chat, "created": created, "model": "stub"}
                yield f"data: {json.dumps(last | {'choices': [choice(None, 'length', True)]})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        async def whole():
            # Sent as produced, so that a death after K tokens cuts the body in the middle.
            state["in_flight"] += 1
            try:
                head = {"id": cid, "object": kind, "created": created, "model": "stub"}
                opening = '"message": {"role": "assistant", "content": "' if chat else '"text": "'
                yield json.dumps(head)[:-1] + ', "choices": [{"index": 0, ' + opening
                async for tok in tokens(n):
                    yield json.dumps(tok)[1:-1]
                usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
                yield ('"}' if chat else '"') + f', "finish_reason": "length"}}], "usage": {json.dumps(usage)}}}'
            finally:
                state["in_flight"] -= 1

        headers = {"x-stub-pid": str(os.getpid())}
        if body.get("stream"):
            return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)
        return StreamingResponse(whole(), media_type="application/json", headers=headers)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "test"}]})

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready_route(request: Request) -> Response:
        if not state["ready"]:
            return _error(503, "not ready")
        return JSONResponse({"status": "ready"})

    async def set_ready(request: Request) -> Response:
        state["ready"] = bool((await request.json())["ready"])
        return JSONResponse({"ready": state["ready"]})

    async def stats(request: Request) -> Response:
        return JSONResponse({"pid": os.getpid(), "hits": state["hits"], "in_flight": state["in_flight"]})

    app = Starlette(
        routes=[
            Route("/health/live", live),
            Route("/health/ready", ready_route),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/stub/ready", set_ready, methods=["POST"]),
            Route("/stub/stats", stats),
        ]
    )

    async def asgi(scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if not path.startswith(("/health/", "/stub/")):
                state["hits"][path] = state["hits"].get(path, 0) + 1
            if key and not path.startswith("/health/"):
                auth = dict(scope["headers"]).get(b"authorization", b"").decode()
                if auth != f"Bearer {key}":
                    await _error(401, "stub: missing or wrong internal key")(scope, receive, send)
                    return
        await app(scope, receive, send)

    return asgi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--delay", type=float, default=0.01, help="seconds per token")
    ap.add_argument("--die-after-tokens", type=int, default=-1, help="exit after K tokens of a completion")
    ap.add_argument("--fail-ready", action="store_true", help="/health/ready is 503 until POST /stub/ready")
    args = ap.parse_args()
    app = build_app(args.delay, args.die_after_tokens, not args.fail_ready)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
