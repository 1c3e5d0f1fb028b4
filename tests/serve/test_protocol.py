"""Request schemas: what the official client sends is accepted, meaningful unsupported fields are refused by name."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from gptforge.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return ChatCompletionRequest(**{"model": "m", "messages": MSG, **kw})


def comp(**kw):
    return CompletionRequest(**{"model": "m", "prompt": "x", **kw})


def test_harmless_client_fields_are_accepted():
    r = chat(
        user="u",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=False,
        stream_options={"include_usage": True, "future_option": 1},
        response_format={"type": "text"},
        tool_choice="none",
        tools=[],
        modalities=["text"],
        logprobs=False,
        top_logprobs=0,
        max_completion_tokens=5,
        n=2,
        seed=-3,
        top_k=4,
        repetition_penalty=1.1,
    )
    assert r.max_new_tokens == 5 and r.stream_options.include_usage
    assert comp(best_of=1, user="u", logprobs=None, echo=False).best_of == 1


def test_message_content_forms():
    r = chat(
        messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert r.messages[0].text == "ab"


@pytest.mark.parametrize(
    ("kind", "field", "value", "needle"),
    [
        ("chat", "logprobs", True, "'logprobs' is not supported"),
        ("chat", "top_logprobs", 3, "'top_logprobs' is not supported"),
        ("chat", "tools", [{"type": "function", "function": {"name": "f"}}], "no tool calling"),
        ("chat", "functions", [{"name": "f"}], "'functions' is not supported"),
        ("chat", "tool_choice", "auto", "only 'none'"),
        ("chat", "response_format", {"type": "json_object"}, "'response_format' is not supported"),
        ("chat", "modalities", ["text", "audio"], "'modalities' is not supported"),
        ("chat", "logit_bias", {"50": 10}, "'logit_bias' is not supported"),
        ("chat", "audio", {"voice": "x"}, "Extra inputs are not permitted"),
        ("chat", "messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        ("chat", "messages", [{"role": "tool", "content": "x"}], "role"),
        ("chat", "messages", [], "at least 1 item"),
        ("chat", "max_completion_tokens", 0, "greater than or equal to 1"),
        ("comp", "logprobs", 2, "'logprobs' is not supported"),
        ("comp", "echo", True, "'echo' is not supported"),
        ("comp", "suffix", "end", "'suffix' is not supported"),
        ("comp", "best_of", 3, "best_of (3) must equal n (1)"),
        ("comp", "prompt", [], "prompt is an empty list"),
        ("comp", "prompt", ["a"] * 17, "at most 16 prompts"),
        ("comp", "temperature", math.nan, "finite number"),
        ("comp", "temperature", math.inf, "finite number"),
        ("comp", "temperature", 2.5, "less than or equal to 2"),
        ("comp", "top_p", 0.0, "greater than 0"),
        ("comp", "n", 17, "less than or equal to 16"),
        ("comp", "max_tokens", -1, "greater than or equal to 1"),
        ("comp", "stop", [""], "must not be empty"),
        ("comp", "stop", ["a"] * 9, "at most 8 stop strings"),
        ("comp", "presence_penalty", 3, "less than or equal to 2"),
        ("comp", "seed", 2**64, "less than or equal to"),
        ("comp", "max_token", 5, "Extra inputs are not permitted"),
    ],
)
def test_refusals_name_the_parameter(kind, field, value, needle):
    with pytest.raises(ValidationError) as e:
        (chat if kind == "chat" else comp)(**{field: value})
    assert needle in str(e.value)
    assert e.value.errors()[0]["loc"][0] == field


def test_max_tokens_aliases_must_agree():
    with pytest.raises(ValidationError, match="disagree"):
        chat(max_tokens=3, max_completion_tokens=4)
    assert chat(max_tokens=3).max_new_tokens == 3


def test_prompt_forms():
    assert comp(prompt="a").prompts == ["a"]
    assert comp(prompt=["a", "b"]).prompts == ["a", "b"]
    assert comp(prompt=[1, 2]).prompts == [[1, 2]]
    assert comp(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]


def test_responses_parse_as_openai_types():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    c = ChatCompletionResponse(
        id="x",
        created=1,
        model="m",
        usage=usage,
        choices=[{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
    )
    assert ChatCompletion.model_validate(c.model_dump()).choices[0].message.content == "hi"
    t = CompletionResponse(
        id="x", created=1, model="m", usage=usage, choices=[{"index": 0, "text": "t", "finish_reason": "length"}]
    )
    assert Completion.model_validate(t.model_dump()).choices[0].text == "t"
