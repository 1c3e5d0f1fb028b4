"""`gptforge serve` as a real process on the tiny trained checkpoint: ready, answers, drains on SIGTERM, exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.utils import free_port, sse_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src"), "GPTFORGE_LOG_LEVEL": "warning", **env_extra}
    env.pop("GPTFORGE_API_KEY", None)
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


def test_serve_answers_then_drains_on_sigterm(trained_run):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # serve_token_sleep slows each streamed token so the SIGTERM surely lands mid-stream.
    proc = start(
        [f"--ckpt={trained_run / 'pretrain'}", f"--port={port}", "--model_name=tiny", "--device=cpu"],
        {"GPTFORGE_FAULT": "serve_token_sleep=0.03", "GPTFORGE_API_KEY": "k"},
    )
    try:
        wait_ready(url, proc)
        headers = {"Authorization": "Bearer k"}
        msgs = [{"role": "user", "content": "Shall I compare thee"}]
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "tiny", "messages": msgs, "max_tokens": 5},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        assert httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs}).status_code == 401
        body = {
            "model": "tiny",
            "prompt": "Shall",
            "max_tokens": 30,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=30) as s:
            lines = s.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = "\n".join(lines)
        events = sse_data(first + "\n\n" + rest)
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        # The stream was not cut: it ran to max_tokens or to a stop token, and usage says so.
        finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"]][-1]
        assert finish in ("length", "stop") and (finish == "stop" or usage["completion_tokens"] == 30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert "auth: ON" in out and f"{url}/v1" in out


def test_serve_refuses_a_taken_port(trained_run):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = start([f"--ckpt={trained_run / 'pretrain'}", f"--port={port}"], {})
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.parametrize("replicas", [1, 3])
def test_worker_argv_round_trips_the_config(replicas):
    from gptforge.config import load
    from gptforge.stages.serve import Config, worker_argv

    cfg = Config(ckpt="/x/run", api_key="secret", max_batch_size=3, request_timeout_s=7.5, replicas=replicas)
    argv = worker_argv(cfg, 9001)
    assert argv[:4] == [sys.executable, "-m", "gptforge", "serve"] and "secret" not in " ".join(argv)
    again = load(Config, None, argv[4:])
    assert again == cfg.model_copy(update={"api_key": "", "replicas": 1, "port": 9001, "model_name": "run"})
