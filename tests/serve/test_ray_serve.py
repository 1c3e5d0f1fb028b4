"""The app under Ray Serve: two replicas answer, and a killed replica actor is survived (slow: starts Ray)."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_missing_ray_names_the_extra(monkeypatch):
    import sys

    from gptforge.serve import ray_app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install gptforge\[ray\]"):
        ray_app.build_ray_app(lambda: None, 2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's own pydantic v1-style fields
def test_two_replicas_serve_and_survive_a_killed_actor():
    ray = pytest.importorskip("ray")
    from ray import serve

    from gptforge.serve.ray_app import run_ray_serve

    def factory():
        # Built on each replica. Stands in for the server app: readiness route, an API route, the API-key middleware.
        import os

        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        from gptforge.serve.auth import APIKeyMiddleware

        app = FastAPI()
        app.add_middleware(APIKeyMiddleware, keys=["k"])

        app.state.ready = True

        @app.get("/health/ready")
        def ready():
            if not app.state.ready:
                return JSONResponse({"error": {"message": "not ready"}}, status_code=503)
            return {"status": "ready"}

        @app.post("/v1/unready")
        def unready() -> dict:
            app.state.ready = False
            return {"pid": os.getpid()}

        @app.post("/v1/completions")
        def complete(body: dict) -> dict:
            return {"choices": [{"text": body["prompt"][::-1]}], "pid": os.getpid()}

        return app

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/completions"
    key = {"Authorization": "Bearer k"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_ray_serve(factory, 2, "127.0.0.1", port, blocking=False, num_cpus=0.5, health_check_period_s=1.0)
        assert httpx.post(url, json={"prompt": "abc"}).status_code == 401
        pids = set()
        for _ in range(40):
            resp = httpx.post(url, json={"prompt": "abc"}, headers=key, timeout=30)
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "cba"
            pids.add(resp.json()["pid"])
        assert len(pids) == 2  # both replicas answered

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]
        assert len(names) == 2
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)

        # Every request after the kill is answered (by the survivor, then by the replacement too).
        deadline, seen = time.monotonic() + 60, set()
        while time.monotonic() < deadline:
            resp = httpx.post(url, json={"prompt": "xyz"}, headers=key, timeout=30)
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "zyx"
            seen.add(resp.json()["pid"])
            if len(seen - pids) >= 1 and len(seen & pids) >= 1:
                break  # the replacement replica serves next to the survivor
            time.sleep(0.05)
        assert seen - pids, "no replacement replica answered within 60 s"

        # A replica whose readiness fails is replaced by Ray (check_health -> the app's GET /health/ready).
        known = pids | seen
        bad = httpx.post(base + "/v1/unready", headers=key, timeout=30).json()["pid"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (seen - known):
            resp = httpx.post(url, json={"prompt": "xyz"}, headers=key, timeout=30)
            assert resp.status_code == 200
            seen.add(resp.json()["pid"])
            time.sleep(0.1)
        assert seen - known, "the unready replica was not replaced within 60 s"
        wait_gone = time.monotonic() + 30
        while time.monotonic() < wait_gone and _alive(bad):
            time.sleep(0.2)
        assert not _alive(bad)
    finally:
        serve.shutdown()
        ray.shutdown()
