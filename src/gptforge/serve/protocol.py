"""The OpenAI wire format: pydantic schemas for completions, chat completions, their stream chunks, models and usage.

Requests are strict where it matters and lenient where it does not. A field the official client may send that cannot
change the answer (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, `stream_options` without a
stream) is accepted and ignored. A field that would change the answer and that we cannot honour (`logprobs`, `tools`,
`response_format` other than text, `logit_bias`, `suffix`, `echo`, `best_of` > n, non-text content parts...) is
refused with a 400 naming the parameter: silently ignoring it would hand back an answer the client did not ask for.
Anything else unknown is refused too ("unrecognized request argument", as OpenAI does), which also catches typos.
`top_k` and `repetition_penalty` are accepted as extensions (vLLM does the same).

NaN and infinity are refused everywhere (Python's json module parses the bare `NaN` literal, and NaN passes every
`ge`/`le` check). The response models are used both to build responses and to document them in /openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per prompt: each is one engine request, so n is also a fan-out multiplier for load
MAX_PROMPTS = 16  # prompts in one /v1/completions batch
MAX_STOP = 8  # stop strings; OpenAI allows 4, a few more cost nothing

# strict: "5" is not an int and "true" not a bool, as the published JSON schema says (lax pydantic would accept both).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _refuse(name: str, value: Any, ok: bool, hint: str = "") -> Any:
    if not ok:
        raise ValueError(f"'{name}' is not supported by this server (got {value!r}){hint}")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = Field(False, description="Send a last chunk with usage (and no choices) before [DONE].")


class _SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = _STRICT

    model: str = Field(..., description="The served model's id (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most; default: the server's default.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    n: int | None = Field(None, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool | None = Field(None, description="Server-sent events, one chunk per piece of text.")
    stream_options: StreamOptions | None = Field(None, description="Only include_usage is honoured.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} strings that end the text (excluded).")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Same seed and request, same text; choice i uses seed + i."
    )
    user: str | None = Field(None, description="Accepted and ignored.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (refused unless empty).")
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k most likely tokens; 0 = off.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Extension: > 1 discourages repeats.")
    ignore_eos: bool | None = Field(
        None, description="Extension (as in vLLM): generate past the end-of-text token, up to max_tokens."
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        return _refuse("logit_bias", v, not v)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description=f"Text, token ids, or a batch (up to {MAX_PROMPTS}) of either."
    )
    suffix: str | None = Field(None, description="Not supported (refused unless null).")
    echo: bool | None = Field(None, description="Not supported (refused if true).")
    logprobs: int | None = Field(None, description="Not supported (refused unless null).")
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is accepted (no re-ranking).")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is an empty list")
            if isinstance(v[0], list | str) and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _refuse("suffix", v, v is None)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        return _refuse("echo", v, not v)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        return _refuse("logprobs", v, v is None)

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, v, info):
        n = info.data.get("n") or 1  # n is declared before best_of, so it is already validated here
        if v is not None and v != n:
            raise ValueError(f"best_of ({v}) must equal n ({n}): choices are not re-ranked")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch as a list: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    # The schema says enum ["text"]; validation stays a plain str so other types get the message below.
    type: str = Field(..., description="Only 'text' is supported.", json_schema_extra={"enum": ["text"]})
    text: str | None = Field(None, description="The text of a 'text' part.")

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (this model reads text only)")
        if self.text is None:
            raise ValueError("a 'text' content part needs a 'text' string")
        return self


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="'developer' is treated as 'system'. Tool messages are not supported."
    )
    content: str | list[ContentPart] = Field(..., description="Text, or a list of text parts (joined).")
    name: str | None = Field(None, description="Accepted and ignored.")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str = Field(..., description="Only 'text' is supported.")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported (refused if true).")
    top_logprobs: int | None = Field(None, description="Not supported (refused unless null or 0).")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported (refused unless empty).")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none'.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported (refused unless empty).")
    function_call: str | dict[str, Any] | None = Field(None, description="Only 'none'.")
    modalities: list[str] | None = Field(None, description="Only ['text'].")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        return _refuse("logprobs", v, not v)

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v):
        return _refuse("top_logprobs", v, not v)

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v):
        return _refuse("response_format", v and v.type, v is None or v.type == "text", " (only {'type': 'text'})")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        return _refuse(info.field_name, v, not v, " (no tool calling)")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info):
        return _refuse(info.field_name, v, v is None or v == "none", " (only 'none')")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v):
        return _refuse("modalities", v, v is None or set(v) <= {"text"}, " (only ['text'])")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one of them")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


# ---- responses ---------------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A /v1/completions answer; with stream=true each chunk has this shape too (text = the new piece)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptforge"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)
