"""`gptforge chat`: streamed replies from a server (--url) or an in-process checkpoint (--ckpt), piped stdin,
conversation kept across turns, /reset and /exit."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys

import httpx
import pytest

from gptforge.serve.app import AppSettings, create_app
from gptforge.stages.chat import Config, chat_loop, http_backend
from tests.serve.utils import REPLY, make_service, running_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tok(tokenizer_run):
    from gptforge.tokenizer.bpe import Tokenizer

    return Tokenizer.load(tokenizer_run / "tokenizer")


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_url_backend_streams_and_keeps_the_conversation(tok):
    n = len(tok.encode(REPLY))
    service = make_service(tok, max_seq_len=512, token_delay=0.001)
    cfg = Config(url="http://x", max_tokens=n, temperature=0, system="Be kind.")
    lines = io.StringIO("first question\n\n  \nsecond\n/reset\nthird\n/exit\nnever sent\n")
    out, err = Recorder(), io.StringIO()

    async def main(url):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer k"}) as client:
            return await chat_loop(http_backend(cfg, client), cfg, lines, out, err)

    with running_server(create_app(service, AppSettings(api_keys=["k"]))) as (url, _):
        result = asyncio.run(main(url))
    assert result == {"turns": 3, "failed_turns": 0}
    assert out.getvalue() == REPLY + "\n" + REPLY + "\n" + REPLY + "\n"
    assert len(out.writes) > 3 * 5  # token by token, not one write per reply
    prompts = [tok.decode(p) for p, _ in service.engine.submitted]
    assert len(prompts) == 3 and "never sent" not in "".join(prompts)
    assert "Be kind." in prompts[0] and "first question" in prompts[1] and REPLY.strip() in prompts[1]
    assert "first question" not in prompts[2] and "Be kind." in prompts[2]  # /reset keeps only the system prompt
    assert "(conversation reset)" in err.getvalue()


def test_url_errors_are_reported_and_the_loop_goes_on(tok):
    cfg = Config(url="http://x", model="nope", max_tokens=4)
    out, err = io.StringIO(), io.StringIO()

    async def main(url):
        async with httpx.AsyncClient(base_url=url) as client:
            return await chat_loop(http_backend(cfg, client), cfg, io.StringIO("a\nb\n"), out, err)

    with running_server(create_app(make_service(tok))) as (url, _):
        assert asyncio.run(main(url)) == {"turns": 0, "failed_turns": 2}
    assert "HTTP 404: the model 'nope' does not exist" in err.getvalue()


def test_cli_with_piped_stdin_against_a_server(tok):
    service = make_service(tok, max_seq_len=512)
    with running_server(create_app(service, AppSettings(api_keys=["sekret"]))) as (url, _):
        env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "GPTFORGE_API_KEY": "sekret"}
        p = subprocess.run(
            [sys.executable, "-m", "gptforge", "chat", f"--url={url}", "--max_tokens=8", "--temperature=0"],
            input="hello\n你好\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert p.returncode == 0, p.stderr
    want = tok.decode(tok.encode(REPLY)[:8], skip_special=True)
    assert p.stdout == f"{want}\n{want}\n" and "error" not in p.stderr


def test_cli_in_process_checkpoint(trained_run, monkeypatch, capsys):
    from gptforge.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Shall I compare thee\n/reset\n春眠不觉晓\n"))
    rc = main(["chat", f"--ckpt={trained_run / 'pretrain'}", "--max_tokens=6", "--temperature=0", "--device=cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and "error" not in err and "base model" in err
    assert len(out.splitlines()) >= 2 and out.endswith("\n")


def test_needs_exactly_one_back_end():
    from gptforge.stages.chat import run

    with pytest.raises(ValueError, match="exactly one of --ckpt"):
        run(Config())
    with pytest.raises(ValueError, match="exactly one of --ckpt"):
        run(Config(ckpt="a", url="http://b"))
    with pytest.raises(ValueError, match="must start with http"):
        run(Config(url="localhost:8000"))
