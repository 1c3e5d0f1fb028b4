"""A Generation -> OpenAI JSON: whole responses and server-sent-event streams of chunks.

Chunks are built as plain dicts rather than pydantic models: they are small, made once per token, and the exact key
set matters to strict clients (a chat delta carries `role` only in its first chunk, `content` only when there is
text). The stream is `data: {chunk}\\n\\n` per piece, one chunk with the finish_reason per choice, an optional usage
chunk (stream_options.include_usage; its `choices` is empty, as OpenAI sends it), then `data: [DONE]`. A failure after
the 200 status line has gone out can only be told inside the stream: `data: {"error": {...}}`, which the official
client raises as an APIError; no [DONE] follows it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from gptforge.serve.errors import error_body
from gptforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from gptforge.serve.service import Generation, ServiceError

log = logging.getLogger("gptforge.serve")

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_of(gen: Generation) -> Usage:
    p, c = gen.prompt_tokens, gen.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def build_response(gen: Generation, results: list[tuple[str, str]]) -> CompletionResponse | ChatCompletionResponse:
    """The non-streaming answer from `Generation.collect()`'s (text, finish_reason) per choice."""
    if gen.plan.kind == "completion":
        choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(results)]
        return CompletionResponse(id=gen.id, created=gen.created, model=gen.model, choices=choices, usage=usage_of(gen))
    chat = [
        ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r) for i, (t, r) in enumerate(results)
    ]
    return ChatCompletionResponse(id=gen.id, created=gen.created, model=gen.model, choices=chat, usage=usage_of(gen))


def error_event(e: BaseException) -> str:
    if isinstance(e, ServiceError):
        return sse(error_body(e.status, e.message, e.code, e.param))
    log.exception("generation failed mid-stream", exc_info=e)
    return sse(error_body(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))


async def sse_stream(gen: Generation) -> AsyncIterator[str]:
    """SSE text for `gen`; always aborts the engine requests when it ends (normally, on error, or when closed)."""
    chat = gen.plan.kind == "chat"
    base = {
        "id": gen.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": gen.created,
        "model": gen.model,
    }
    if gen.plan.include_usage:
        base["usage"] = None

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    events = gen.events()
    try:
        if chat:  # OpenAI opens every choice with a role-only delta
            for i in range(gen.n_choices):
                yield chunk(i, None, None, role=True)
        async for d in events:
            if chat:
                if d.text:
                    yield chunk(d.index, d.text, None)
                if d.finish_reason:
                    yield chunk(d.index, None, d.finish_reason)
            elif d.text or d.finish_reason:
                yield chunk(d.index, d.text, d.finish_reason)
        if gen.plan.include_usage:
            yield sse({**base, "choices": [], "usage": usage_of(gen).model_dump()})
        yield DONE
    except Exception as e:
        yield error_event(e)
    finally:
        await events.aclose()
