"""Text <-> engine: request validation, prompt building, sampling settings, streamed text with stop strings, usage.

The service knows the tokenizer and the AsyncEngine contract, not HTTP: it raises `ServiceError` subclasses carrying
an HTTP-like status and an OpenAI error code, and the app turns those into responses. That keeps it testable with a
fake engine and reusable by the in-process `gptforge chat`.

Flow: `prepare_completion` / `prepare_chat` validate and tokenize (in a worker thread when the text is long, so the
event loop keeps serving other connections) into a `Plan`; `submit(plan)` starts one engine request per choice,
EAGERLY, so overload (429) and shutdown (503) are known before the app starts a 200 stream; the returned `Generation`
yields `ChoiceDelta`s merged from all choices until each has a finish reason. Leaving its iterator early (client gone,
deadline passed, a stop string matched) aborts the engine requests, which frees their slots at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from gptforge.engine import EngineClosed, EngineOverloaded, SamplingParams
from gptforge.serve.detok import IncrementalDetokenizer, StopMatcher
from gptforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from gptforge.tokenizer.chat import ChatFormatError, chat_prompt_ids, stop_ids

_SEED_MOD = 2**63


class ServiceError(Exception):
    """A refusal the app maps to an HTTP status and an OpenAI error body."""

    status = 500
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class BadRequest(ServiceError, ValueError):
    status, code = 400, "invalid_request"


class ModelNotFound(ServiceError, ValueError):
    status, code = 404, "model_not_found"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class GenerationTimeout(ServiceError):
    status, code = 504, "timeout"


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("gptforge", description="The id clients send as `model` and see in /v1/models.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sends none (capped to fit).")
    max_tokens_limit: int = Field(0, ge=0, description="Largest max_tokens accepted; 0 = the model's context.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline of one request, queueing included.")
    thread_tokenize_chars: int = Field(4096, ge=0, description="Tokenize text longer than this in a worker thread.")
    fault_token_sleep_s: float = Field(0.0, ge=0, description="Test-only: sleep per engine output (slow streams).")


@dataclass
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last delta of a choice


@dataclass
class Plan:
    """A validated request: prompts as ids and one SamplingParams per choice (choice k = prompt k // n)."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    stops: list[str]
    stream: bool = False
    include_usage: bool = False


@dataclass
class Generation:
    """One request's choices in flight. Iterate `events()` once (or `collect()`); `close()` aborts what is left."""

    id: str
    created: int
    model: str
    plan: Plan
    streams: list
    tok: object
    deadline: float  # loop.time()
    timeout_s: float
    fault_sleep: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    completion_counts: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.completion_counts = [0] * len(self.streams)
        self.finish_reasons = [None] * len(self.streams)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.plan.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion_counts)

    @property
    def n_choices(self) -> int:
        return len(self.streams)

    async def close(self) -> None:
        for s in self.streams:
            await s.aclose()

    async def _pump(self, i: int, stream, queue: asyncio.Queue) -> None:
        detok, stops = IncrementalDetokenizer(self.tok), StopMatcher(self.plan.stops)
        try:
            async for out in stream:
                if self.fault_sleep:
                    await asyncio.sleep(self.fault_sleep)
                self.completion_counts[i] = out.completion_tokens
                if out.token_ids and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                text, hit = stops.push(detok.push(out.token_ids)) if out.token_ids else ("", False)
                if hit:
                    await stream.aclose()  # abort: the rest of this choice would be thrown away
                    queue.put_nowait(ChoiceDelta(i, text, "stop"))
                    return
                if out.finished:
                    if out.finish_reason not in ("stop", "length"):
                        queue.put_nowait(Unavailable(f"generation ended early ({out.finish_reason}): shutting down"))
                        return
                    tail, hit = stops.push(detok.flush())
                    tail += "" if hit else stops.flush()
                    queue.put_nowait(ChoiceDelta(i, text + tail, "stop" if hit else out.finish_reason))
                    return
                if text:
                    queue.put_nowait(ChoiceDelta(i, text))
            queue.put_nowait(Unavailable("the engine ended a request without finishing it"))
        except Exception as e:  # delivered to the consumer, which raises it in the request's own task
            queue.put_nowait(e)

    async def events(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of all choices as they come; the last delta of each choice has its finish_reason. Raises
        GenerationTimeout past the deadline and aborts every engine request however the iteration ends."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(self.streams)]
        left = len(tasks)
        # One deadline around the whole wait (not a wait_for per token: that costs a task and a timer each time).
        # The yield sits outside the timeout scope, so time the consumer spends sending is not charged oddly.
        try:
            while left:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        item = await queue.get()
                except TimeoutError:
                    raise GenerationTimeout(
                        f"the request did not finish within the server's deadline of {self.timeout_s:g} s"
                    ) from None
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    self.finish_reasons[item.index] = item.finish_reason
                    left -= 1
                yield item
        finally:
            for t in tasks:
                t.cancel()
            for s in self.streams:
                await s.aclose()

    async def collect(self) -> list[tuple[str, str]]:
        """(text, finish_reason) per choice, in order."""
        texts = [[] for _ in self.streams]
        gen = self.events()
        try:
            async for d in gen:
                texts[d.index].append(d.text)
        finally:
            await gen.aclose()
        return [("".join(t), r) for t, r in zip(texts, self.finish_reasons)]


class Service:
    """Validates and runs OpenAI-shaped requests on an AsyncEngine (the contract in gptforge.engine)."""

    def __init__(self, engine, tokenizer, settings: ServiceSettings | None = None) -> None:
        self.engine, self.tok = engine, tokenizer
        self.settings = settings or ServiceSettings()
        self.context_len: int = engine.engine.max_seq_len
        self.created = int(time.time())
        self.chat_stop_ids = sorted(stop_ids(tokenizer))

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created, max_model_len=self.context_len)])

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}", param="model"
            )

    async def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if sum(len(t) for t in texts) > self.settings.thread_tokenize_chars:
            return await asyncio.to_thread(lambda: [self.tok.encode(t) for t in texts])
        return [self.tok.encode(t) for t in texts]

    async def prepare_completion(self, req: CompletionRequest) -> Plan:
        self.check_model(req.model)
        items = req.prompts
        texts = [p for p in items if isinstance(p, str)]
        encoded = iter(await self._encode_many(texts))
        prompts = []
        for i, p in enumerate(items):
            if isinstance(p, str):
                prompts.append([self.tok.bos_id] + next(encoded))
                continue
            if not p:
                raise BadRequest(f"prompt {i} is an empty list of token ids", param="prompt")
            bad = [t for t in p if not 0 <= t < self.tok.vocab_size]
            if bad:
                raise BadRequest(
                    f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{self.tok.vocab_size - 1})",
                    param="prompt",
                )
            prompts.append(list(p))
        return self._plan("completion", req, prompts, [], "prompt")

    async def prepare_chat(self, req: ChatCompletionRequest) -> Plan:
        self.check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        try:
            if sum(len(m["content"]) for m in messages) > self.settings.thread_tokenize_chars:
                ids = await asyncio.to_thread(chat_prompt_ids, self.tok, messages)
            else:
                ids = chat_prompt_ids(self.tok, messages)
        except ChatFormatError as e:
            raise BadRequest(str(e), param="messages") from None
        return self._plan("chat", req, [ids], self.chat_stop_ids, "messages", req.max_new_tokens)

    def _plan(self, kind, req, prompts, stop_token_ids, prompt_param, max_tokens=None) -> Plan:
        s, ctx = self.settings, self.context_len
        max_tokens = req.max_tokens if kind == "completion" else max_tokens
        limit = s.max_tokens_limit or ctx
        if max_tokens is not None and max_tokens > limit:
            raise BadRequest(f"max_tokens {max_tokens} exceeds this server's limit of {limit}", param="max_tokens")
        longest = max(prompts, key=len)
        if max_tokens is not None and len(longest) + max_tokens > ctx:
            raise BadRequest(
                f"prompt is {len(longest)} tokens; with max_tokens {max_tokens} that exceeds the model's context "
                f"of {ctx} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if len(longest) >= ctx:
            raise BadRequest(
                f"prompt is {len(longest)} tokens; the model's context of {ctx} tokens leaves no room for new tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        n = req.n or 1
        params = []
        for k in range(len(prompts) * n):
            new = max_tokens if max_tokens is not None else min(s.default_max_tokens, limit, ctx - len(prompts[k // n]))
            seed = None if req.seed is None else (req.seed + k % n) % _SEED_MOD
            try:
                params.append(
                    SamplingParams(
                        max_tokens=new,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        top_k=req.top_k or 0,
                        repetition_penalty=req.repetition_penalty or 1.0,
                        presence_penalty=req.presence_penalty or 0.0,
                        frequency_penalty=req.frequency_penalty or 0.0,
                        stop_token_ids=[] if req.ignore_eos else list(stop_token_ids),
                        seed=seed,
                        ignore_eos=bool(req.ignore_eos),
                    )
                )
            except ValueError as e:  # pydantic ValidationError: the schema let through what the engine refuses
                raise BadRequest(f"invalid sampling settings: {e}") from None
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Plan(kind, prompts, params, n, req.stop_list, bool(req.stream), include_usage)

    def submit(self, plan: Plan) -> Generation:
        """Start every choice now; raises Overloaded / Unavailable / BadRequest before anything is streamed."""
        gid = ("cmpl-" if plan.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        streams = []
        try:
            for k, params in enumerate(plan.params):
                streams.append(self.engine.generate(plan.prompts[k // plan.n], params, f"{gid}-{k}"))
        except BaseException as e:
            for k in range(len(streams)):  # all or nothing: a half-admitted request would hold slots for nobody
                self.engine.abort(f"{gid}-{k}")
            if isinstance(e, EngineOverloaded):
                raise Overloaded(f"the server is busy: {e}; retry shortly") from None
            if isinstance(e, EngineClosed):
                raise Unavailable(f"the server is not accepting requests: {e}") from None
            if isinstance(e, ValueError):
                raise BadRequest(str(e), param="prompt" if plan.kind == "completion" else "messages") from None
            raise
        loop = asyncio.get_running_loop()
        return Generation(
            id=gid,
            created=int(time.time()),
            model=self.model_name,
            plan=plan,
            streams=streams,
            tok=self.tok,
            deadline=loop.time() + self.settings.request_timeout_s,
            timeout_s=self.settings.request_timeout_s,
            fault_sleep=self.settings.fault_token_sleep_s,
        )

    async def completion(self, req: CompletionRequest) -> Generation:
        return self.submit(await self.prepare_completion(req))

    async def chat(self, req: ChatCompletionRequest) -> Generation:
        return self.submit(await self.prepare_chat(req))


def build_local_service(
    model,
    tok,
    settings: ServiceSettings,
    *,
    max_batch_size: int = 8,
    max_waiting: int = 64,
    device=None,
    dtype=None,
    cuda_graphs: bool | None = None,
) -> Service:
    """Engine + AsyncEngine + Service for a loaded model (the thread starts with `service.engine.start()`).
    Generation stops at the tokenizer's end-of-text and end-of-turn tokens, and never samples an id past the
    tokenizer's vocabulary (the embedding may be padded beyond it)."""
    from gptforge.engine import AsyncEngine, Engine

    engine = Engine(
        model,
        max_batch_size=max_batch_size,
        vocab_limit=tok.vocab_size,
        eos_ids=stop_ids(tok),
        device=device,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
    )
    return Service(AsyncEngine(engine, max_waiting=max_waiting), tok, settings)
