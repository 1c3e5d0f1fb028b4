"""Helpers shared by the serve tests: a tokenizer-backed service over the fake engine, a real uvicorn server in a
thread, and an SSE parser."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

from gptforge.serve.service import Service, ServiceSettings
from tests.serve.fake_engine import FakeAsyncEngine

REPLY = "Hello there! 你好，世界。 A reply; with: punctuation.\n"


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_service(tok, *, settings: dict | None = None, **engine_kw) -> Service:
    """A Service over a FakeAsyncEngine whose default script spells REPLY (cycled)."""
    engine_kw.setdefault("script", tok.encode(REPLY))
    engine_kw.setdefault("vocab_size", tok.vocab_size)
    engine = FakeAsyncEngine(**engine_kw)
    return Service(engine, tok, ServiceSettings(**{"model_name": "tiny", **(settings or {})}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, timeout: float = 20):
    """Serve `app` with uvicorn on a free port in a background thread; yields (base_url, server)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout)


def sse_data(text: str) -> list:
    """The `data:` payloads of an SSE body: parsed JSON, or the raw string ([DONE])."""
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                raw = line[len("data: ") :]
                out.append(raw if raw == "[DONE]" else json.loads(raw))
    return out


def wait_until(cond, timeout: float = 10, every: float = 0.02) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    return cond()
