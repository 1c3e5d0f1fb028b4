"""The same server app under Ray Serve, for replicas on several machines (optional extra: `pip install gptforge[ray]`).

`serve_replicas` (router.py) runs N replicas on one machine behind a router of our own, with no dependency. Ray Serve
is the step up when one machine is not enough: it places replicas on the nodes of a cluster (one per GPU with
`num_gpus=1`), runs an HTTP proxy on every node that balances over all replicas, calls each replica's `check_health`
(here: the app's own GET /health/ready, answered in-process) and replaces a replica that fails it or dies. The app is
the very FastAPI app `gptforge serve` runs alone, built on each replica by `app_factory` (so the model is loaded where
the replica runs, never pickled across the cluster); its routes, API keys, errors and metrics are unchanged.

Trade-offs against serve_replicas: Ray's proxy routes by its own queue-length policy and caps in-flight requests per
replica (`max_ongoing_requests`, queued beyond that), and a request that already reached a replica which then dies is
not retried by us; Ray brings ~300 MB of dependencies and its own processes (GCS, raylet, dashboard agent).

One machine:

    gptforge serve --ckpt runs/x/finetune --replicas 4 ...        # the stage calls run_ray_serve(...) for its Ray mode

Several machines (the same command, once a cluster is up):

    # on the head node
    ray start --head --port=6379
    # on every other node (the checkpoint must be readable at the same path on every node: shared disk or a copy)
    ray start --address=HEAD_IP:6379
    # on the head node (or any node with RAY_ADDRESS=HEAD_IP:6379 set): the same command as on one machine
    gptforge serve --ckpt runs/x/finetune --replicas 8 ...
    # every node now answers on --host/--port; put a load balancer (or DNS) in front of the nodes
    ray stop                                                    # on each node, when done

`run_ray_serve` joins a running cluster when there is one (`ray.init()` finds the `ray start` instance on this node,
or $RAY_ADDRESS, or `address=`), and otherwise starts a one-machine Ray instance for the duration of the call.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

INSTALL_HINT = "Ray Serve is an optional extra: pip install gptforge[ray]"


class RayNotInstalledError(ImportError):
    """ray[serve] is missing; the message says how to install it."""


def _import_serve():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RayNotInstalledError(f"{INSTALL_HINT} ({e})") from None
    return ray, serve


def build_ray_app(
    app_factory: Callable[[], Any],
    replicas: int,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int = 64,
    health_check_period_s: float = 10.0,
    health_check_timeout_s: float = 30.0,
    name: str = "gptforge",
):
    """A bound Ray Serve application: `replicas` copies of the ASGI app that `app_factory()` builds on each replica."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    _, serve = _import_serve()

    # A plain nested function: Ray evaluates a builder *function* on each replica (anything else it would treat as
    # an ASGI app and pickle from here, model and all).
    def build_app():
        return app_factory()

    @serve.ingress(build_app)
    class GptforgeReplica:
        async def check_health(self) -> None:
            """Ray calls this every health_check_period_s; raising marks the replica unhealthy and replaces it."""
            import httpx

            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
                resp = await client.get("/health/ready", timeout=health_check_timeout_s)
            if resp.status_code != 200:
                raise RuntimeError(f"replica not ready: HTTP {resp.status_code} {resp.text[:300]}")

    deployment = serve.deployment(
        GptforgeReplica,
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=health_check_timeout_s,
    )
    return deployment.bind()


def run_ray_serve(
    app_factory: Callable[[], Any],
    replicas: int,
    host: str,
    port: int,
    *,
    address: str | None = None,
    blocking: bool = True,
    name: str = "gptforge",
    **deployment_options: Any,
) -> None:
    """Serve `app_factory()`'s app with `replicas` Ray Serve replicas on host:port (every node of the cluster).

    `deployment_options` go to build_ray_app (num_cpus, num_gpus, max_ongoing_requests, health_check_period_s,
    health_check_timeout_s). `blocking=True` waits for SIGINT/SIGTERM, then removes the application (and stops Ray if
    this call started it); `blocking=False` returns once every replica is up, leaving cleanup to the caller
    (`serve.delete(name)`; `ray.shutdown()`)."""
    ray, serve = _import_serve()
    app = build_ray_app(app_factory, replicas, name=name, **deployment_options)
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")  # returns when every replica has passed its first health check
    if not blocking:
        return
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.delete(name)
        ray.shutdown()
