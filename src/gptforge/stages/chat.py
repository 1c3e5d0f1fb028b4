"""`gptforge chat`: talk to a model in the terminal, the reply streamed token by token.

Two back ends, one loop: `--ckpt DIR` loads the checkpoint in this process (the serving engine and service, no HTTP);
`--url http://host:port` talks to a running `gptforge serve` (or any OpenAI-compatible server) over its streaming chat
API, with `--api_key` (default $GPTFORGE_API_KEY). The conversation is kept and sent whole each turn.

Input is read line by line, so a pipe works as well as a keyboard: `printf 'hi\\n/exit\\n' | gptforge chat --ckpt D`.
Commands: /reset forgets the conversation (the --system prompt stays), /exit (or end of input) quits. When the
conversation outgrows the model's context the error says so; /reset starts over.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field

NEEDS_TORCH = False  # cli: --url needs no model; run() builds the runtime only for --ckpt

Reply = Callable[[list[dict]], AsyncIterator[str]]


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field("", description="Checkpoint folder to load in-process (or use --url).")
    url: str = Field("", description="Base URL of a running server, e.g. http://127.0.0.1:8000 (or use --ckpt).")
    api_key: str = Field("", description="Key for --url; empty = $GPTFORGE_API_KEY.")
    model: str = Field("", description="Model id for --url; empty = the first one the server lists.")
    system: str = Field("", description="System prompt placed before the conversation.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables.")
    max_tokens: int = Field(256, ge=1, description="Longest reply in tokens (capped to what the context has left).")
    seed: int | None = Field(None, description="Sampling seed for reproducible replies; none = random.")
    timeout_s: float = Field(300.0, gt=0, description="Per-reply deadline.")
    device: str = Field("auto", description="--ckpt: auto, cpu, cuda or mps.")
    dtype: str = Field("float32", description="--ckpt: float32, bfloat16 or auto.")
    threads: int = Field(0, ge=0, description="--ckpt: CPU threads for torch; 0 = torch's default.")


class ChatError(ValueError):
    """A turn that failed (the server refused it, the context is full...); the loop reports it and goes on."""


def _request_body(cfg: Config, model: str, messages: list[dict]) -> dict:
    body = {"model": model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p, "stream": True}
    body["max_tokens"] = cfg.max_tokens
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    return body


async def _fit_max_tokens(service, req_kw: dict):
    """max_tokens capped to the room the context leaves (a chat loop should not fail on a long conversation
    merely because --max_tokens was generous)."""
    from gptforge.serve.protocol import ChatCompletionRequest
    from gptforge.serve.service import BadRequest

    req = ChatCompletionRequest(**req_kw)
    try:
        return await service.prepare_chat(req)
    except BadRequest as e:
        if e.code != "context_length_exceeded":
            raise ChatError(e.message) from None
    req = ChatCompletionRequest(**{**req_kw, "max_tokens": None})
    try:
        return await service.prepare_chat(req)
    except BadRequest as e:
        raise ChatError(f"{e.message} (type /reset to start a new conversation)") from None


def local_backend(cfg: Config, service) -> Reply:
    """Replies from an in-process Service (its engine thread must be started)."""

    async def reply(messages: list[dict]) -> AsyncIterator[str]:
        from gptforge.serve.service import ServiceError

        kw = {k: v for k, v in _request_body(cfg, service.model_name, messages).items() if k != "stream"}
        try:
            gen = service.submit(await _fit_max_tokens(service, kw))
            async for d in gen.events():
                if d.text:
                    yield d.text
        except ServiceError as e:
            raise ChatError(e.message) from None

    return reply


def http_backend(cfg: Config, client) -> Reply:
    """Replies streamed from POST {url}/v1/chat/completions over an httpx.AsyncClient."""
    state = {"model": cfg.model}

    async def reply(messages: list[dict]) -> AsyncIterator[str]:
        import httpx

        try:
            if not state["model"]:
                r = await client.get("/v1/models")
                _raise_for(r, await r.aread())
                state["model"] = r.json()["data"][0]["id"]
            body = _request_body(cfg, state["model"], messages)
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    _raise_for(r, await r.aread())
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise ChatError(f"the server stopped the reply: {event['error'].get('message')}")
                    for choice in event.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
            raise ChatError("the stream ended without [DONE]: the reply may be cut short")
        except httpx.HTTPError as e:
            raise ChatError(f"cannot reach {cfg.url}: {e}") from None

    return reply


def _raise_for(r, body: bytes) -> None:
    if r.status_code == 200:
        return
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    raise ChatError(f"HTTP {r.status_code}: {message}")


async def chat_loop(reply: Reply, cfg: Config, inp: TextIO, out: TextIO, err: TextIO) -> dict:
    """Read lines from `inp`, stream replies to `out`; returns turn counts."""
    history: list[dict] = []
    interactive = inp.isatty()
    turns = failed = 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = await asyncio.to_thread(inp.readline)
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history.clear()
            err.write("(conversation reset)\n")
            continue
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        messages = system + history + [{"role": "user", "content": text}]
        if interactive:
            out.write("assistant> ")
        pieces = []
        try:
            async for piece in reply(messages):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except ChatError as e:
            out.write("\n")
            err.write(f"error: {e}\n")
            err.flush()
            failed += 1
            continue
        out.write("\n")
        out.flush()
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
        turns += 1
    return {"turns": turns, "failed_turns": failed}


async def _run_url(cfg: Config) -> dict:
    import httpx

    from gptforge.serve.auth import resolve_api_keys

    keys = resolve_api_keys(cfg.api_key)
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=timeout) as client:
        return await chat_loop(http_backend(cfg, client), cfg, sys.stdin, sys.stdout, sys.stderr)


async def _run_local(cfg: Config, runtime) -> dict:
    from pathlib import Path

    from gptforge.serve.service import ServiceSettings, build_local_service
    from gptforge.train.models import load_for_inference

    model, tok, meta = await asyncio.to_thread(load_for_inference, cfg.ckpt, runtime.device)
    if meta.get("task") == "classify":
        raise ValueError(f"{meta['checkpoint']} is a classifier; `gptforge chat` needs a language or chat model")
    if meta.get("task") != "chat":
        print(
            f"note: {meta['checkpoint']} is a base model (task {meta.get('task') or 'lm'}): replies continue text "
            "rather than answer; fine-tune with `gptforge finetune --task chat` for a chat model",
            file=sys.stderr,
        )
    settings = ServiceSettings(
        model_name=Path(cfg.ckpt).resolve().name, default_max_tokens=cfg.max_tokens, request_timeout_s=cfg.timeout_s
    )
    service = build_local_service(
        model.to(runtime.dtype),
        tok,
        settings,
        max_batch_size=1,
        max_waiting=1,
        device=runtime.device,
        dtype=runtime.dtype,
    )
    service.engine.start()
    try:
        return await chat_loop(local_backend(cfg, service), cfg, sys.stdin, sys.stdout, sys.stderr)
    finally:
        await service.engine.shutdown(drain=False)


def run(cfg: Config, runtime=None) -> dict:
    if bool(cfg.ckpt) == bool(cfg.url):
        raise ValueError("give exactly one of --ckpt DIR (load the model here) or --url http://host:port (a server)")
    if cfg.url:
        if not cfg.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {cfg.url!r}")
        return asyncio.run(_run_url(cfg))
    from gptforge.runtime import build_runtime

    runtime = runtime or build_runtime(cfg.device, cfg.dtype, cfg.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(_run_local(cfg, runtime))
