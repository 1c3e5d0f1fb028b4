"""The HTTP app on the fake engine: OpenAI shapes (checked with the openai package's own types), SSE, health,
metrics, error shapes, drain."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gptforge.serve.app import AppSettings, create_app
from tests.serve.utils import REPLY, make_service, sse_data

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}


@pytest.fixture
def client(tok):
    app = create_app(make_service(tok), AppSettings())
    with TestClient(app) as c:
        yield c


def decode_prefix(tok, n: int) -> str:
    return tok.decode(tok.encode(REPLY)[:n], skip_special=True)


def test_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny"] and r.json()["object"] == "list"


def test_chat_completion_matches_openai_types(client, tok):
    r = client.post("/v1/chat/completions", json={**CHAT, "user": "u1", "store": False})
    assert r.status_code == 200, r.text
    c = ChatCompletion.model_validate(r.json())
    assert c.choices[0].message.content == decode_prefix(tok, 12) and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 12 and c.usage.total_tokens == c.usage.prompt_tokens + 12
    assert c.id.startswith("chatcmpl-") and c.model == "tiny"


def test_chat_stream_equals_non_stream(client, tok):
    body = {**CHAT, "n": 2, "seed": 3, "temperature": 0.5}
    whole = client.post("/v1/chat/completions", json=body).json()
    r = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    texts, finish = {0: "", 1: ""}, {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        assert ch.usage is None
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]  # role first, per choice
    assert texts == {i: whole["choices"][i]["message"]["content"] for i in (0, 1)}
    assert finish == {0: "length", 1: "length"}
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.model_dump(exclude_none=True) == whole["usage"]


def test_completion_and_its_stream(client, tok):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 30, "stop": "。"}
    r = client.post("/v1/completions", json=body)
    c = Completion.model_validate(r.json())
    want = REPLY[: REPLY.index("。")]
    assert c.choices[0].text == want and c.choices[0].finish_reason == "stop"
    events = sse_data(client.post("/v1/completions", json={**body, "stream": True}).text)
    # Completion types finish_reason as non-null, though the API streams null until the last chunk: validate that one.
    last = Completion.model_validate(events[-2])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want and events[-1] == "[DONE]"
    assert last.choices[0].finish_reason == "stop" and all("usage" not in e for e in events[:-1])
    assert {e["object"] for e in events[:-1]} == {"text_completion"}


def test_health_and_drain(tok):
    service = make_service(tok)
    app = create_app(service)
    with TestClient(app) as c:
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        app.state.begin_drain()
        assert c.get("/health/ready").status_code == 503
        r = c.post("/v1/chat/completions", json=CHAT)
        assert (
            r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable" and "Retry-After" in r.headers
        )
        assert c.get("/health/live").status_code == 200
    assert not service.engine.is_running  # the lifespan shut the engine down


def test_engine_stopped_is_not_ready(tok):
    service = make_service(tok)
    with TestClient(create_app(service)) as c:
        service.engine._closed = True
        assert c.get("/health/ready").json()["status"] == "engine_stopped"
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 503


def test_metrics_per_app_registry(tok):
    a, b = create_app(make_service(tok)), create_app(make_service(tok))
    with TestClient(a) as ca, TestClient(b) as cb:
        for _ in range(2):
            assert ca.post("/v1/chat/completions", json=CHAT).status_code == 200
        ca.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        ca.get("/no/such/route")
        text = ca.get("/metrics").text
        assert 'gptforge_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2.0' in text
        assert 'gptforge_rejections_total{reason="not_found"} 2.0' in text  # unknown model + unknown route
        assert 'route="unmatched"' in text and "/no/such/route" not in text
        assert "gptforge_completion_tokens_total 24.0" in text
        assert "gptforge_time_to_first_token_seconds_count 2.0" in text
        assert "gptforge_requests_running 0.0" in text and "gptforge_requests_waiting 0.0" in text
        other = cb.get("/metrics").text
        assert "gptforge_completion_tokens_total 0.0" in other


def test_error_shapes(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/chat/completions")
    assert (
        r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["type"] == "invalid_request_error"
    )
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "tools" in r.json()["error"]["message"]


def test_openapi_documents_400_not_422(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in op["responses"] and "400" in op["responses"] and "429" in op["responses"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
