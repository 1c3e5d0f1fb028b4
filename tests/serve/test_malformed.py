"""Malformed requests get a 4xx in the OpenAI error shape, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from gptforge.serve.app import AppSettings, create_app
from tests.serve.utils import make_service

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def with_(**kw):
    return json.dumps({**GOOD, **kw})


CASES = [
    # (path, raw body, content type, expected status, words expected in the message)
    (CHAT, "{not json", "application/json", 400, "not valid JSON"),
    (CHAT, "", "application/json", 400, "empty"),
    (CHAT, "[1, 2]", "application/json", 400, "JSON object"),
    (CHAT, '"text"', "application/json", 400, "JSON object"),
    (CHAT, "null", "application/json", 400, "JSON object"),
    (CHAT, "\xff\xfe", "application/json", 400, ""),
    (CHAT, with_(max_tokens=-5), "application/json", 400, "max_tokens"),
    (CHAT, with_(max_tokens=10**30), "application/json", 400, "max_tokens"),
    (CHAT, with_(max_tokens="many"), "application/json", 400, "max_tokens"),
    (CHAT, with_(max_tokens=100_000), "application/json", 400, "exceeds"),
    (CHAT, with_(temperature="NaN").replace('"NaN"', "NaN"), "application/json", 400, "temperature"),
    (CHAT, with_(temperature=5), "application/json", 400, "temperature"),
    (CHAT, with_(top_p=-1), "application/json", 400, "top_p"),
    (CHAT, with_(messages=[]), "application/json", 400, "messages"),
    (CHAT, with_(messages="hello"), "application/json", 400, "messages"),
    (CHAT, with_(messages=[{"role": "wizard", "content": "x"}]), "application/json", 400, "messages[0].role"),
    (CHAT, with_(messages=[{"role": "user"}]), "application/json", 400, "messages[0].content"),
    (CHAT, with_(messages=[{"role": "user", "content": 5}]), "application/json", 400, "messages[0].content"),
    (CHAT, with_(model="gpt-9"), "application/json", 404, "does not exist"),
    (CHAT, with_(model=None), "application/json", 400, "model"),
    (CHAT, with_(n=0), "application/json", 400, "n"),
    (CHAT, with_(n=1000), "application/json", 400, "n"),
    (CHAT, with_(n="two"), "application/json", 400, "n"),
    (CHAT, with_(stop=[1, 2]), "application/json", 400, "stop"),
    (CHAT, with_(seed=2**70), "application/json", 400, "seed"),
    (CHAT, with_(stream="yes please"), "application/json", 400, "stream"),
    (CHAT, with_(frobnicate=True), "application/json", 400, "unrecognized request argument supplied: frobnicate"),
    (CHAT, with_(logprobs=True), "application/json", 400, "logprobs"),
    (CHAT, json.dumps({"model": "tiny"}), "application/json", 400, "messages"),
    (CHAT, with_(), "text/plain", 400, ""),
    (COMP, json.dumps({"model": "tiny", "prompt": [[1], [999999]]}), "application/json", 400, "vocabulary"),
    (COMP, json.dumps({"model": "tiny", "prompt": 5}), "application/json", 400, "prompt"),
    (COMP, json.dumps({"model": "tiny", "prompt": "x", "best_of": 2}), "application/json", 400, "best_of"),
    (COMP, json.dumps({"model": "tiny", "prompt": "xy " * 600}), "application/json", 400, "context"),
]


@pytest.fixture(scope="module")
def client(tokenizer_run):
    from gptforge.tokenizer.bpe import Tokenizer

    tok = Tokenizer.load(tokenizer_run / "tokenizer")
    app = create_app(make_service(tok, max_seq_len=64), AppSettings(max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_alive(c: TestClient) -> None:
    assert c.get("/health/live").status_code == 200
    assert c.post(CHAT, json=GOOD).status_code == 200


@pytest.mark.parametrize(("path", "body", "ctype", "status", "words"), CASES, ids=range(len(CASES)))
def test_malformed_body_is_a_4xx_in_openai_shape(client, path, body, ctype, status, words):
    r = client.post(path, content=body.encode("utf-8", "surrogateescape"), headers={"content-type": ctype})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"]
    assert_alive(client)


def test_body_limits(client):
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 5000}]})
    r = client.post(CHAT, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post(CHAT, content=b"{}", headers={"content-type": "application/json", "content-length": "abc"})
    assert r.status_code == 400
    assert_alive(client)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", CHAT, 405), ("PUT", COMP, 405), ("DELETE", "/v1/models", 405), ("GET", "/v2/x", 404), ("POST", "/", 404)],
)
def test_wrong_route_or_method(client, method, path, status):
    r = client.request(method, path)
    if path == "/" and r.status_code == 405:  # the chat page (mount_web) may own GET /
        status = 405
    assert r.status_code == status and r.json()["error"]["message"]
    assert_alive(client)
