"""Limits on a real uvicorn server (fake engine): overload, disconnects, deadlines, API keys, drain on shutdown."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from gptforge.serve.app import AppSettings, create_app
from gptforge.serve.auth import is_allowlisted
from tests.serve.utils import make_service, running_server, sse_data, wait_until

CHAT = "/v1/chat/completions"


def body(max_tokens: int, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **kw}


def test_burst_beyond_max_waiting_gets_fast_429s(tok):
    service = make_service(tok, max_batch_size=1, max_waiting=2, token_delay=0.02)
    app = create_app(service, AppSettings(retry_after_s=2))

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def one(i):
                t0 = time.monotonic()
                r = await c.post(CHAT, json=body(15, stream=i % 2 == 1))
                return r, time.monotonic() - t0

            return await asyncio.gather(*(one(i) for i in range(10)))

    with running_server(app) as (url, _):
        results = asyncio.run(burst(url))
        refused = [(r, dt) for r, dt in results if r.status_code == 429]
        served = [r for r, _ in results if r.status_code == 200]
        assert len(refused) + len(served) == 10 and 2 <= len(served) <= 3
        for r, dt in refused:  # refused before any stream started, quickly, with a hint when to come back
            assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "rate_limit_error" and dt < 1.0
        assert all(sse_data(r.text)[-1] == "[DONE]" for r in served if "event-stream" in r.headers["content-type"])
        metrics = httpx.get(url + "/metrics").text
        assert f'gptforge_rejections_total{{reason="overloaded"}} {len(refused)}.0' in metrics
    assert service.engine.num_running == service.engine.num_waiting == 0


def test_client_disconnect_frees_the_slot(tok):
    service = make_service(tok, max_batch_size=2, token_delay=0.02, max_seq_len=1024)
    engine = service.engine
    with running_server(create_app(service)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", CHAT, json=body(500, stream=True)) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept alive: a discarded iterator closes the connection early
                first = next(lines)
                # The role chunk goes out before the engine's first step: wait for the request to be running.
                assert first.startswith("data: ") and wait_until(lambda: engine.num_running == 1, timeout=3)
            # Closed after one event; the 500 tokens would take 10 s.
            assert wait_until(lambda: engine.num_running == 0, timeout=3)
            finished = engine.counters["tokens_generated"]
            assert finished < 100
            # Non-streaming: the client gives up (timeout) and the server notices while waiting.
            with pytest.raises(httpx.ReadTimeout):
                c.post(CHAT, json=body(500), timeout=0.3)
            assert wait_until(lambda: engine.num_running == 0, timeout=3)
            assert engine.counters["tokens_generated"] - finished < 100
            assert c.post(CHAT, json=body(3)).status_code == 200  # and the server goes on


def test_deadline_non_stream_504_and_stream_error_event(tok):
    service = make_service(tok, token_delay=0.05, settings={"request_timeout_s": 0.3})
    with running_server(create_app(service)) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as c:
            t0 = time.monotonic()
            r = c.post(CHAT, json=body(100))
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
            assert time.monotonic() - t0 < 2
            r = c.post(CHAT, json=body(100, stream=True))
            events = sse_data(r.text)
            assert r.status_code == 200 and "deadline" in events[-1]["error"]["message"] and "[DONE]" not in events
            assert wait_until(lambda: service.engine.num_running == 0, timeout=2)
            assert 'gptforge_rejections_total{reason="stream_error"} 1.0' in c.get("/metrics").text


def test_api_key_guards_every_route_but_the_allowlist(tok):
    app = create_app(make_service(tok), AppSettings(api_keys=["k1", "sekret"]))
    routes = [(r.path, m) for r in app.routes if isinstance(r, Route) for m in sorted(r.methods or [])]
    guarded = [(p, m) for p, m in routes if not is_allowlisted(p) and m != "HEAD"]
    assert {"/v1/models", CHAT, "/v1/completions", "/metrics", "/openapi.json"} <= {p for p, _ in guarded}
    payload = {CHAT: body(2), "/v1/completions": {"model": "tiny", "prompt": "a", "max_tokens": 2}}
    with TestClient(app) as c:
        for path, method in guarded:
            r = c.request(method, path, json=payload.get(path))
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            bad = c.request(method, path, json=payload.get(path), headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and "invalid API key" in bad.json()["error"]["message"]
            ok = c.request(method, path, json=payload.get(path), headers={"Authorization": "Bearer sekret"})
            assert ok.status_code == 200, (path, ok.text)
            assert c.request(method, path, json=payload.get(path), headers={"x-api-key": "k1"}).status_code == 200
        assert c.get("/health/live").status_code == 200 and c.get("/health/ready").status_code == 200


def test_shutdown_lets_an_in_flight_stream_finish(tok):
    service = make_service(tok, token_delay=0.02)
    app = create_app(service, AppSettings(drain_timeout_s=10))
    with running_server(app) as (url, server):
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", CHAT, json=body(40, stream=True)) as r:
                lines = iter(r.iter_lines())
                assert next(lines).startswith("data: ")
                app.state.begin_drain()
                server.should_exit = True  # what SIGTERM does
                rest = "\n".join(lines)
    assert rest.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse_data(rest)[:-1] if e["choices"])
    assert len(tok.encode(text)) >= 35  # the rest of the 40 tokens did arrive
    assert not service.engine.is_running
