"""The replica router: routing rules, failover and process supervision, against stub workers in subprocesses.

The stubs (stub_worker.py) stand in for `gptforge serve` replicas: they start in a fraction of a second, can be told
to die at a given token or to fail their readiness probe, and count the requests they receive, so every claim
("not retried", "no request lost", "no orphan left") is checked by counting, not by trusting the router's own report.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from gptforge.serve.replicas import ReplicaPool, ReplicaStartError
from gptforge.serve.router import RouterSettings, create_router_app, serve_replicas

PY = sys.executable
STUB = str(Path(__file__).with_name("stub_worker.py"))
LINUX = Path("/proc/self/stat").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sse_events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has exited; only its exit status is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


class Stub:
    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        key = (env or {}).get("GPTFORGE_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        argv = [PY, STUB, "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stub/stats", headers=self.headers, timeout=5).json()

    def hits(self, path: str = "/v1/completions") -> int:
        return self.stats()["hits"].get(path, 0)

    def set_ready(self, ready: bool) -> None:
        httpx.post(self.url + "/stub/ready", json={"ready": ready}, headers=self.headers, timeout=5).raise_for_status()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class RunningRouter:
    """create_router_app served by uvicorn in a thread of the test process, on a socket bound up front (no race)."""

    def __init__(self, app) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app, self.pool = app, app.state.pool
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, what="the router to start")

    def replica(self, i: int) -> dict:
        return self.pool.snapshot()[i]

    def complete(self, stream: bool = False, prompt: str = "hi", max_tokens: int = 4, **kw) -> httpx.Response:
        body = {"model": "stub", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
        return httpx.post(self.url + "/v1/completions", json=body, **{"timeout": 30} | kw)

    def metrics(self, **kw) -> str:
        return httpx.get(self.url + "/metrics", timeout=5, **kw).text

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def stubs():
    made: list[Stub] = []

    def make(*flag_sets: list[str], env: dict[str, str] | None = None) -> list[Stub]:
        new = [Stub(*flags, env=env) for flags in flag_sets]
        made.extend(new)
        for s in new:
            wait_until(lambda s=s: httpx.get(s.url + "/health/live", timeout=1).status_code == 200, what="a stub")
        return new

    yield make
    for s in made:
        s.kill()


@pytest.fixture
def router():
    made: list[RunningRouter] = []

    def make(upstreams: list[Stub], headers: dict[str, str] | None = None, **settings) -> RunningRouter:
        settings = {"health_interval_s": 0.1, "health_timeout_s": 1.0} | settings
        app = create_router_app([s.url for s in upstreams], RouterSettings(**settings), headers)
        made.append(RunningRouter(app))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def test_pool_routes_to_the_least_loaded_and_applies_the_ejection_rules():
    pool = ReplicaPool(["http://a", "http://b/", "http://c"], RouterSettings(eject_after_failures=2))
    assert pool.acquire() is None  # nothing admitted before a probe
    for i in range(3):
        pool.record_probe(i, 0, True)  # a new process is admitted on its first good probe
    leases = [pool.acquire() for _ in range(6)]
    assert [lease.index for lease in leases] == [0, 1, 2, 0, 1, 2]  # equal load: round-robin
    assert leases[1].url == "http://b"
    pool.release(leases[1])
    pool.release(leases[4])
    assert pool.acquire().index == 1 and pool.acquire().index == 1  # the idle one, until it is no longer idle
    assert pool.acquire(exclude={0, 1}).index == 2

    pool.record_probe(0, 0, False, "HTTP 503")
    assert pool.snapshot()[0]["healthy"]  # one failure is not enough
    pool.record_probe(0, 0, False, "HTTP 503")
    assert not pool.snapshot()[0]["healthy"]
    pool.record_probe(0, 0, True)
    assert not pool.snapshot()[0]["healthy"]  # an ejected replica needs readmit_after_successes (2) good probes
    pool.record_probe(0, 0, True)
    assert pool.snapshot()[0]["healthy"] and pool.snapshot()[0]["ejections"] == 1

    lease = pool.acquire(exclude={1, 2})
    pool.report_failure(lease, "connection", "refused", eject=True)  # a connection error ejects at once
    assert not pool.snapshot()[0]["healthy"]
    pool.replace(0, "http://a2", pid=123)  # a new process in the slot: reports about the old one are ignored
    pool.report_failure(lease, "connection", "late news about the old process", eject=True)
    pool.record_probe(0, 0, True)
    assert not pool.snapshot()[0]["healthy"]
    pool.record_probe(0, 1, True)
    snap = pool.snapshot()[0]
    assert snap["healthy"] and snap["url"] == "http://a2" and snap["restarts"] == 1 and snap["ejections"] == 2
    assert snap["failures"] == {"probe": 2, "connection": 2}

    for i in range(3):
        pool.mark_down(i, "gone")
    assert pool.acquire() is None and pool.num_healthy == 0


def test_least_loaded_routing_spreads_load_and_avoids_a_slow_replica(stubs, router):
    even = stubs(*[["--delay", "0.1"]] * 3)
    r = router(even)

    async def burst(n: int) -> list[int]:
        body = {"model": "stub", "prompt": "x", "max_tokens": 10}
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            rs = await asyncio.gather(*(client.post(r.url + "/v1/completions", json=body) for _ in range(n)))
        return [x.status_code for x in rs]

    assert asyncio.run(burst(30)) == [200] * 30
    assert [s.hits() for s in even] == [10, 10, 10]  # 30 at once over 3 equal replicas: 10 in flight each

    slow, fast1, fast2 = stubs(["--delay", "0.1"], ["--delay", "0.002"], ["--delay", "0.002"])
    r = router([slow, fast1, fast2])

    async def users(n_users: int, each: int) -> list[int]:
        body = {"model": "stub", "prompt": "x", "max_tokens": 5}
        async with httpx.AsyncClient(timeout=30) as client:

            async def user() -> list[int]:
                return [(await client.post(r.url + "/v1/completions", json=body)).status_code for _ in range(each)]

            return sum(await asyncio.gather(*(user() for _ in range(n_users))), [])

    assert asyncio.run(users(6, 8)) == [200] * 48
    # Round-robin would give the slow replica 16 of 48; least-loaded gives it only what the fast ones leave.
    assert slow.hits() <= 8 and fast1.hits() + fast2.hits() >= 40


def test_probes_eject_an_unready_replica_and_readmit_it(stubs, router):
    a, b = stubs([], [])
    r = router([a, b], eject_after_failures=2, readmit_after_successes=3)
    wait_until(lambda: r.pool.num_healthy == 2, what="both replicas in rotation")
    a.set_ready(False)
    wait_until(lambda: not r.replica(0)["healthy"], 5, "replica 0 ejected")
    before = a.hits()
    for _ in range(6):
        resp = r.complete()
        assert resp.status_code == 200 and resp.headers["x-gptforge-replica"] == "1"
    assert a.hits() == before  # nothing was sent to the ejected replica
    a.set_ready(True)
    wait_until(lambda: r.replica(0)["healthy"], 5, "replica 0 readmitted")
    assert {r.complete().headers["x-gptforge-replica"] for _ in range(4)} == {"0", "1"}
    metrics = r.metrics()
    assert 'gptforge_router_ejections_total{replica="0"} 1.0' in metrics
    assert 'gptforge_router_replica_healthy{replica="0"} 1.0' in metrics


def test_no_healthy_replica_is_a_503_in_openai_shape(stubs, router):
    (a,) = stubs(["--fail-ready"])
    r = router([a], readmit_after_successes=2)
    ready = httpx.get(r.url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "service_unavailable"
    resp = r.complete()
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "no_healthy_replica"
    assert a.hits() == 0
    a.set_ready(True)
    wait_until(lambda: httpx.get(r.url + "/health/ready").status_code == 200, 5, "the router to be ready")
    assert r.complete().status_code == 200
    assert httpx.get(r.url + "/health/live").json() == {"status": "alive"}


@pytest.mark.parametrize(
    ("stream", "die_after"),
    [(False, 0), (False, 2), (True, 0)],
    ids=["json-before-headers", "json-mid-body", "stream-before-first-event"],
)
def test_a_replica_dying_before_the_client_got_a_byte_is_retried(stubs, router, stream, die_after):
    a, b = stubs(["--die-after-tokens", str(die_after)], [])
    r = router([a, b])
    resp = r.complete(stream=stream, max_tokens=4)
    assert resp.status_code == 200 and resp.headers["x-gptforge-replica"] == "1"
    if stream:
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == " t0 t1 t2 t3"
    else:
        assert resp.json()["choices"][0]["text"] == " t0 t1 t2 t3"
    assert a.proc.wait(timeout=5) == 17  # replica 0 got the request first, and died with it
    assert not r.replica(0)["healthy"] and r.replica(0)["failures"]["connection"] == 1
    assert 'gptforge_router_retries_total{replica="1"} 1.0' in r.metrics()


def test_4xx_is_passed_through_and_never_retried_5xx_is_retried(stubs, router):
    a, b = stubs([], [])
    r = router([a, b])
    for status in (400, 404, 429):
        resp = r.complete(prompt=f"status:{status}")
        assert resp.status_code == status
        assert resp.json()["error"]["message"] == f"scripted {status}"
        if status == 429:
            assert resp.headers["retry-after"] == "2"
    assert a.hits() + b.hits() == 3  # one upstream request per client request
    assert r.pool.num_healthy == 2
    resp = r.complete(prompt="status:500")
    assert resp.status_code == 500 and resp.json()["error"]["message"] == "scripted 500"
    assert a.hits() + b.hits() == 5  # tried on both replicas, then the last answer passed on
    assert r.pool.num_healthy == 2  # one 5xx each is below eject_after_failures


def test_a_stream_cut_midway_ends_with_an_error_event_and_no_done(stubs, router):
    a, b = stubs(["--die-after-tokens", "3"], [])
    r = router([a, b])
    resp = r.complete(stream=True, max_tokens=8)
    assert resp.status_code == 200 and resp.headers["x-gptforge-replica"] == "0"
    events = sse_events(resp.text)
    assert "[DONE]" not in events
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [" t0", " t1", " t2"]
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "failed mid-stream" in error["message"]
    assert not r.replica(0)["healthy"]
    whole = sse_events(r.complete(stream=True, max_tokens=8).text)  # the survivor streams to the end
    assert whole[-1] == "[DONE]" and len(whole) == 10


def test_killing_one_of_three_replicas_under_load_loses_no_request(stubs, router):
    reps = stubs(*[["--delay", "0.01"]] * 3)
    r = router(reps)
    body = {"model": "stub", "prompt": "x", "max_tokens": 10}
    expected = "".join(f" t{i}" for i in range(10))

    async def load() -> list[tuple[int, str]]:
        results: list[tuple[int, str]] = []
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 3.0
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

            async def user() -> None:
                while loop.time() < stop_at:
                    resp = await client.post(r.url + "/v1/completions", json=body)
                    results.append((resp.status_code, resp.text))

            async def killer() -> None:
                await asyncio.sleep(1.0)
                reps[1].proc.kill()

            await asyncio.gather(killer(), *(user() for _ in range(30)))
        return results

    results = asyncio.run(load())
    bad = [(s, t[:200]) for s, t in results if s != 200 or json.loads(t)["choices"][0]["text"] != expected]
    assert not bad, f"{len(bad)} of {len(results)} requests failed, e.g. {bad[:3]}"
    assert len(results) >= 100
    assert not r.replica(1)["healthy"] and r.replica(1)["failures"].get("connection", 0) >= 1
    assert "gptforge_router_retries_total" in r.metrics()


def test_api_keys_guard_every_route_but_health(stubs, router):
    env = {**os.environ, "GPTFORGE_API_KEY": "internal-key"}
    a, b = stubs([], [], env=env)
    r = router([a, b], headers={"Authorization": "Bearer internal-key"}, api_keys=["outer-key"])
    routes = [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
        ("GET", "/router/replicas"),
        ("GET", "/v1/anything"),
        ("GET", "/nope"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer internal-key"}):
            resp = httpx.request(method, r.url + path, headers=headers, json={})
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["error"]["type"] == "authentication_error"
    for path in ("/health/live", "/health/ready"):
        assert httpx.get(r.url + path).status_code == 200
    outer = {"Authorization": "Bearer outer-key"}
    assert httpx.get(r.url + "/v1/models", headers=outer).json()["data"][0]["id"] == "stub"
    assert r.complete(headers=outer).status_code == 200  # the stubs accept only the internal key: it was sent
    assert r.complete(headers={"x-api-key": "outer-key"}).status_code == 200
    assert httpx.get(r.url + "/router/replicas", headers=outer).json()["healthy"] == 2
    missing = httpx.get(r.url + "/nope", headers=outer)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert "gptforge_router_replica_in_flight" in r.metrics(headers=outer)
    assert httpx.get(a.url + "/v1/models").status_code == 401  # and a replica refuses a request without it


def test_body_limit_and_client_leaving_mid_stream(stubs, router):
    (a,) = stubs(["--delay", "0.05"])
    r = router([a], max_body_bytes=1000)
    resp = r.complete(prompt="x" * 2000)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
    assert a.hits() == 0

    body = {"model": "stub", "prompt": "x", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=10) as resp:
        # Keep the line iterator alive: a discarded one gets closed, and that closes the connection (a client leaving).
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == " t0"
        assert r.replica(0)["in_flight"] == 1
    # The client hung up: the router must close the upstream stream, so the replica stops generating.
    wait_until(lambda: r.replica(0)["in_flight"] == 0 and a.stats()["in_flight"] == 0, 5, "the slot to be freed")
    assert r.replica(0)["healthy"] and r.replica(0)["failures"] == {}  # a client leaving is not a replica failure

    # The same for a non-streaming request, whose answer would only have come at the end.
    with pytest.raises(httpx.ReadTimeout):
        r.complete(max_tokens=500, timeout=0.5)
    wait_until(lambda: r.replica(0)["in_flight"] == 0 and a.stats()["in_flight"] == 0, 5, "the slot to be freed")
    assert r.replica(0)["healthy"] and r.replica(0)["failures"] == {}


ROUTER_MAIN = """
import sys
from gptforge.serve.router import RouterSettings, serve_replicas
stub, port = sys.argv[1], int(sys.argv[2])
settings = RouterSettings(api_keys=["outer"], health_interval_s=0.1, ready_timeout_s=20, drain_timeout_s=2)
serve_replicas(lambda p: [sys.executable, stub, "--port", str(p)], 2, "127.0.0.1", port, settings)
print("router returned", flush=True)
"""


def replica_state(url: str, headers: dict[str, str]) -> list[dict]:
    return httpx.get(url + "/router/replicas", headers=headers).json()["replicas"]


def start_router_process(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / "router.log"
    with log.open("w") as f:
        proc = subprocess.Popen([PY, "-c", ROUTER_MAIN, STUB, str(port)], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health/ready", timeout=1).status_code == 200, 30, "serve_replicas")
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()) from None
    return proc, url, log


@pytest.mark.skipif(not LINUX, reason="process checks read /proc")
def test_serve_replicas_respawns_a_killed_replica_and_leaves_no_orphans(tmp_path):
    proc, url, log = start_router_process(tmp_path)
    key = {"Authorization": "Bearer outer"}
    try:
        pids = [rep["pid"] for rep in replica_state(url, key)]
        helpers = [p for p in children(proc.pid) if p not in pids]  # the watchdog
        assert len(helpers) == 1 and all(alive(p) for p in pids)
        body = {"model": "stub", "prompt": "x", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body, headers=key).status_code == 200
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401

        os.kill(pids[0], signal.SIGKILL)

        def respawned() -> bool:
            rep = replica_state(url, key)[0]
            return rep["pid"] not in (None, pids[0]) and rep["healthy"] and rep["restarts"] == 1

        wait_until(respawned, 15, "replica 0 to be respawned and readmitted")
        new_pid = replica_state(url, key)[0]["pid"]
        statuses = {httpx.post(url + "/v1/completions", json=body, headers=key).status_code for _ in range(6)}
        assert statuses == {200}

        # SIGTERM with a request in flight: it is drained (finishes) before the replicas are stopped.
        long: dict[str, httpx.Response] = {}
        long_body = {"model": "stub", "prompt": "x", "max_tokens": 80}

        def send() -> None:
            long["r"] = httpx.post(url + "/v1/completions", json=long_body, headers=key, timeout=20)

        thread = threading.Thread(target=send)
        thread.start()
        wait_until(lambda: sum(x["in_flight"] for x in replica_state(url, key)) == 1, 5, "the long request in flight")
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=20)
        assert long["r"].status_code == 200 and long["r"].json()["choices"][0]["text"].endswith(" t79")
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert "router returned" in log.read_text()
        wait_until(lambda: not any(alive(p) for p in [*pids, new_pid, *helpers]), 5, "every child to be gone")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not LINUX, reason="process checks read /proc")
def test_replicas_die_with_a_crashed_router(tmp_path):
    proc, url, _ = start_router_process(tmp_path)
    pids = [
        rep["pid"] for rep in httpx.get(url + "/router/replicas", headers={"x-api-key": "outer"}).json()["replicas"]
    ]
    try:
        assert all(alive(p) for p in pids)
        proc.kill()  # no cleanup code runs: only the watchdog can stop the replicas now
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in pids), 10, "the replicas to die with the router")
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_serve_replicas_reports_a_replica_that_fails_to_start():
    boom = (
        "import sys; print('loading checkpoint'); sys.stderr.write('ValueError: no model.safetensors\\n'); sys.exit(3)"
    )
    with pytest.raises(ReplicaStartError, match="exited with status 3") as info:
        serve_replicas(lambda port: [PY, "-c", boom], 2, "127.0.0.1", free_port(), RouterSettings(ready_timeout_s=20))
    assert "no model.safetensors" in str(info.value) and "loading" in str(info.value)
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(ValueError, match="cannot listen"):
        serve_replicas(
            lambda port: [PY, STUB, "--port", str(port)], 1, "127.0.0.1", taken.getsockname()[1], RouterSettings()
        )
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        serve_replicas(lambda port: [], 0, "127.0.0.1", 0, RouterSettings())


@pytest.mark.skipif(importlib.util.find_spec("gptforge.stages.serve") is None, reason="gptforge serve not built yet")
@pytest.mark.skipif(not LINUX, reason="process checks read /proc")
def test_gptforge_serve_replicas_survive_a_killed_worker(trained_run, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_API_KEY"}
    ckpt = str(trained_run / "pretrain")
    argv = [PY, "-m", "gptforge", "serve", "--ckpt", ckpt, "--replicas", "3", "--port", str(port)]
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until(lambda: httpx.get(url + "/health/ready", timeout=2).status_code == 200, 120, "gptforge serve")
        except AssertionError:
            raise AssertionError(log.read_text()[-4000:]) from None
        wait_until(lambda: httpx.get(url + "/router/replicas").json()["healthy"] == 3, 30, "3 healthy replicas")
        pids = [rep["pid"] for rep in httpx.get(url + "/router/replicas").json()["replicas"]]
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "The", "max_tokens": 4, "temperature": 0}

        async def load() -> list[int]:
            statuses: list[int] = []
            loop = asyncio.get_running_loop()
            stop_at = loop.time() + 4.0
            async with httpx.AsyncClient(timeout=60) as client:

                async def user() -> None:
                    while loop.time() < stop_at:
                        statuses.append((await client.post(url + "/v1/completions", json=body)).status_code)

                async def killer() -> None:
                    await asyncio.sleep(1.5)
                    os.kill(pids[1], signal.SIGKILL)

                await asyncio.gather(killer(), *(user() for _ in range(12)))
            return statuses

        statuses = asyncio.run(load())
        assert statuses and set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} succeeded"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        wait_until(lambda: not any(alive(p) for p in pids), 10, "every replica to be gone")
    finally:
        if proc.poll() is None:
            proc.kill()
