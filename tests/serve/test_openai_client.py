"""The official `openai` client against a real uvicorn server running the REAL engine on a tiny random GPT."""

from __future__ import annotations

import openai
import pytest

from gptforge.serve.app import AppSettings, create_app
from gptforge.serve.service import Service, ServiceSettings
from tests.serve.utils import running_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tokenizer_run):
    import torch

    from gptforge.engine import AsyncEngine, Engine
    from gptforge.model.gpt import GPT, GPTConfig
    from gptforge.tokenizer.bpe import Tokenizer
    from gptforge.tokenizer.chat import stop_ids

    tok = Tokenizer.load(tokenizer_run / "tokenizer")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=96)).eval()
    engine = AsyncEngine(Engine(model, max_batch_size=4, vocab_limit=tok.vocab_size, eos_ids=stop_ids(tok)))
    service = Service(engine, tok, ServiceSettings(model_name="tiny-gpt", default_max_tokens=20))
    with running_server(create_app(service, AppSettings(api_keys=[KEY]))) as (url, _):
        yield url, tok


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny-gpt"]


def test_chat_and_its_stream_agree(client):
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "春天"}]
    r = client.chat.completions.create(model="tiny-gpt", messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 16
    stream = client.chat.completions.create(
        model="tiny-gpt",
        messages=msgs,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_completion_and_its_stream_agree(client):
    r = client.completions.create(model="tiny-gpt", prompt="Shall I compare", max_tokens=12, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    s = client.completions.create(model="tiny-gpt", prompt="Shall I compare", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kw = {"model": "tiny-gpt", "prompt": "A", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_errors_map_to_client_exceptions(server, client):
    anon = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 96 tokens"):
        client.completions.create(model="tiny-gpt", prompt="x", max_tokens=95)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="tiny-gpt", messages=[{"role": "user", "content": "x"}], logprobs=True)
