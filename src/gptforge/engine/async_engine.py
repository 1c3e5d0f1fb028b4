"""AsyncEngine: the engine's step loop in one background thread, with an asyncio face for the server.

Why a thread and not the event loop: a forward pass takes milliseconds to seconds of CPU, and any of that on the loop
would stall every other connection (health checks included). torch releases the GIL inside its kernels, so the loop
stays responsive while the thread computes. Outputs cross back with `loop.call_soon_threadsafe`.

Admission control lives here: `generate()` refuses eagerly (before the caller starts an HTTP 200 stream) when the
waiting queue is full (EngineOverloaded -> 429) or the engine is shutting down (EngineClosed -> 503). A stream that
is abandoned (break, aclose, task cancellation, garbage collection) aborts its request, so a disconnected client
frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from gptforge.engine.engine import Engine, RequestOutput
from gptforge.engine.sampling import SamplingParams


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or has stopped."""


class EngineError(RuntimeError):
    """The step loop failed while this request was in flight."""


class RequestStream:
    """Async iterator of one request's RequestOutputs; the last has finished=True."""

    def __init__(self, owner: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.owner, self.request_id, self._queue = owner, request_id, queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:  # cancelled while waiting: the client is gone
            self._abandon()
            raise
        if isinstance(out, BaseException):
            self._done = True
            raise out
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        self._abandon()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self.owner.abort(self.request_id)

    def __del__(self) -> None:  # `async for ...: break` leaves the iterator to the garbage collector
        if not self._done:
            self.owner.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 64) -> None:
        self.engine, self.max_waiting = engine, max_waiting
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def stats(self) -> dict:
        c = self.engine.counters
        return {
            **c,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "max_batch_size": self.engine.max_batch_size,
            "max_waiting": self.max_waiting,
        }

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Submit a request; raises ValueError / EngineOverloaded / EngineClosed now, before any output."""
        if self._closed or self._thread is None or not self._thread.is_alive():
            raise EngineClosed("the engine is shutting down" if self._closed else "the engine is not running")
        self.engine.validate(prompt_ids)  # a bad request is a 400 whatever the load
        if self.engine.num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"{self.engine.num_waiting} requests are already waiting (limit {self.max_waiting})")
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in flight")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt_ids, params, rid)
        except BaseException:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        self._wake.set()
        return RequestStream(self, rid, queue)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with drain, let in-flight requests finish (up to timeout), then abort the rest and stop."""
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and self.engine.has_unfinished() and self._thread is not None and self._thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.abort(rid)
        # Let the loop deliver the abort outputs before stopping it.
        for _ in range(100):
            if not self.engine.has_unfinished():
                break
            self._wake.set()
            await asyncio.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- the background thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not hang every client: fail them all and carry on
                self.last_error = f"{type(e).__name__}: {e}"
                self.engine.abort_all()
                self._fail_all(EngineError(f"generation failed: {self.last_error}"))
                continue
            self._deliver_all(outputs)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One wake-up per event loop per step, not one per request: with 32 streams that is 1 self-pipe write
        and 1 loop callback instead of 32."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                entry = self._streams.get(out.request_id)
                if entry is None:
                    continue
                if out.finished:
                    self._streams.pop(out.request_id, None)
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _deliver(self, out: RequestOutput | BaseException, rid: str | None = None) -> None:
        rid = rid or out.request_id
        with self._lock:
            entry = self._streams.get(rid)
            if entry is not None and (isinstance(out, BaseException) or out.finished):
                self._streams.pop(rid, None)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._deliver(err, rid)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
