"""A fake AsyncEngine that keeps the gptforge.engine contract exactly, without a model.

Tokens come from a deterministic rule (by default: cycle through a script of token ids, offset by the seed), one per
`token_delay` seconds per request. Admission is the real one's: at most `max_batch_size` running, at most
`max_waiting` queued (EngineOverloaded beyond, raised eagerly), EngineClosed before start and after shutdown,
ValueError for an empty / out-of-vocab / too-long prompt. Leaving a stream early (break, aclose, cancellation)
aborts its request and frees its slot. Everything runs on the event loop (no thread): it is a fake.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gptforge.engine import EngineClosed, EngineOverloaded, RequestOutput, SamplingParams

Rule = Callable[[list[int], SamplingParams, int], int]


@dataclass
class FakeCore:
    """Stands in for `AsyncEngine.engine` (the synchronous Engine): the attributes the server reads."""

    max_seq_len: int
    max_batch_size: int
    vocab_size: int
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class _Req:
    id: str
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    task: asyncio.Task | None = None
    done: bool = False
    admitted: bool = False
    n: int = 0
    reason: str | None = "abort"
    produced: list[int] = field(default_factory=list)


class FakeStream:
    def __init__(self, owner: FakeAsyncEngine, req: _Req) -> None:
        self.owner, self.req, self.request_id = owner, req, req.id
        self._done = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self.req.queue.get()
        except BaseException:
            self._abandon()
            raise
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self.owner.abort(self.request_id)

    def __del__(self) -> None:
        if not self._done:
            self.owner.abort(self.request_id)


class FakeAsyncEngine:
    def __init__(
        self,
        *,
        script: list[int] | None = None,
        rule: Rule | None = None,
        eos_ids: tuple[int, ...] = (),
        max_seq_len: int = 128,
        max_batch_size: int = 4,
        max_waiting: int = 8,
        vocab_size: int = 1024,
        token_delay: float = 0.0,
    ) -> None:
        self.engine = FakeCore(max_seq_len, max_batch_size, vocab_size)
        self.max_waiting = max_waiting
        self.script = script or [300 + i for i in range(20)]
        self.rule = rule or self._script_rule
        self.eos_ids = frozenset(eos_ids)
        self.token_delay = token_delay
        self._reqs: dict[str, _Req] = {}
        self._slots: asyncio.Semaphore | None = None
        self._started = self._closed = False
        self.counters = {"requests_finished": 0, "tokens_generated": 0, "prompt_tokens": 0, "steps": 0}
        self.counters["batch_size_sum"] = 0
        self.submitted: list[tuple[list[int], SamplingParams]] = []  # for tests: what the service sent

    def _script_rule(self, prompt: list[int], params: SamplingParams, i: int) -> int:
        offset = 0 if params.seed is None or params.temperature == 0 else params.seed
        return self.script[(i + offset) % len(self.script)]

    # ---- the contract -----------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def is_running(self) -> bool:
        return self._started and not self._closed

    def start(self) -> None:
        self._started = True

    def stats(self) -> dict:
        return {
            **self.counters,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "max_batch_size": self.engine.max_batch_size,
            "max_waiting": self.max_waiting,
        }

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> FakeStream:
        if self._closed or not self._started:
            raise EngineClosed("the engine is shutting down" if self._closed else "the engine is not running")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.engine.vocab_size - 1})")
        if len(prompt) >= self.engine.max_seq_len:
            raise ValueError(f"prompt is {len(prompt)} tokens; the context is {self.engine.max_seq_len}")
        if self.engine.num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"{self.engine.num_waiting} requests are already waiting (limit {self.max_waiting})")
        rid = request_id or uuid.uuid4().hex
        if rid in self._reqs:
            raise ValueError(f"request id {rid!r} is already in flight")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.engine.max_batch_size)
        req = _Req(rid, prompt, params, asyncio.Queue())
        self._reqs[rid] = req
        self.submitted.append((prompt, params))
        self.engine.num_waiting += 1
        req.task = asyncio.get_running_loop().create_task(self._run(req))
        req.task.add_done_callback(lambda t: self._finish(req, t))
        return FakeStream(self, req)

    def abort(self, request_id: str) -> None:
        req = self._reqs.get(request_id)
        if req is not None and req.task is not None and not req.done:
            req.task.cancel()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self._closed = True
        tasks = [r.task for r in self._reqs.values() if r.task is not None]
        if drain and tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for r in list(self._reqs.values()):
            self.abort(r.id)
        tasks = [r.task for r in self._reqs.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # ---- the "step loop" ----------------------------------------------------------------------------------------
    async def _run(self, req: _Req) -> None:
        await self._slots.acquire()
        req.admitted = True
        self.engine.num_waiting -= 1
        self.engine.num_running += 1
        self.counters["prompt_tokens"] += len(req.prompt)
        stops = self.eos_ids | frozenset(req.params.stop_token_ids)
        while True:
            if req.n >= req.params.max_tokens or len(req.prompt) + req.n >= self.engine.max_seq_len:
                req.reason = "length"
                return
            await asyncio.sleep(self.token_delay)
            self.counters["steps"] += 1
            tok = self.rule(req.prompt, req.params, req.n)
            if tok in stops:
                req.reason = "stop"
                return
            req.n += 1
            self.counters["tokens_generated"] += 1
            last = req.n >= req.params.max_tokens or len(req.prompt) + req.n >= self.engine.max_seq_len
            req.produced.append(tok)
            req.queue.put_nowait(RequestOutput(req.id, [tok], last, "length" if last else None, len(req.prompt), req.n))
            if last:
                req.reason = None  # the finishing output has been sent
                return

    def _finish(self, req: _Req, task: asyncio.Task) -> None:
        """Bookkeeping as a done-callback: it also runs for a task cancelled before it ever started."""
        if req.admitted:
            self.engine.num_running -= 1
            self._slots.release()
        else:
            self.engine.num_waiting -= 1
        req.done = True
        self._reqs.pop(req.id, None)
        self.counters["requests_finished"] += 1
        reason = "abort" if task.cancelled() else req.reason
        if reason is not None:
            req.queue.put_nowait(RequestOutput(req.id, [], True, reason, len(req.prompt), req.n))
