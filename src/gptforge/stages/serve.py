"""`gptforge serve --ckpt DIR`: an OpenAI-compatible HTTP server with continuous batching.

Routes: POST /v1/completions, POST /v1/chat/completions (stream=true for server-sent events), GET /v1/models,
GET /health/live, GET /health/ready, GET /metrics (Prometheus), and the chat page at /. Any OpenAI client works:
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.

API keys: --api_key (several: comma-separated), else $GPTFORGE_API_KEY; with neither the server is open to anyone who
can reach it, which is said loudly at start-up. SIGTERM / Ctrl-C drains: readiness turns 503, the port stops
accepting, in-flight requests get up to --drain_timeout_s to finish, then the engine stops; the exit status is 0.
`--replicas N` runs N single-process servers on loopback ports behind a router on --port (least-loaded routing,
health checks, failover); the replicas are this same command with `--replicas 1`.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from typing import Literal

import uvicorn
from pydantic import BaseModel, ConfigDict, Field

NEEDS_TORCH = False  # cli: the router of --replicas N holds no model; run() builds the runtime when it loads one


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(..., description="Checkpoint folder, or a stage folder (RUN/pretrain): its best, else newest.")
    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    model_name: str = Field(
        "", description="Model id clients send and /v1/models lists; empty = the --ckpt folder name."
    )
    api_key: str = Field(
        "", description="Accepted key(s), comma-separated; empty = $GPTFORGE_API_KEY, else an open server."
    )
    max_batch_size: int = Field(8, ge=1, description="Requests decoded together in one forward pass.")
    max_waiting: int = Field(64, ge=0, description="Requests queued for a batch slot; more get 429 + Retry-After.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens for requests that send none.")
    max_tokens_limit: int = Field(0, ge=0, description="Largest max_tokens a request may ask for; 0 = the context.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline per request, queueing included (then 504).")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body (413 above).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On shutdown, how long in-flight requests may finish.")
    replicas: int = Field(1, ge=1, description="Server processes behind a router on --port (1 = no router).")
    backend: Literal["router", "ray"] = Field(
        "router",
        description="How --replicas run: router (ours, one machine) or ray (Ray Serve, one machine or a cluster; "
        "pip install gptforge[ray]).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = Field("float32", description="Weights and KV cache dtype: float32, bfloat16 or auto.")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default.")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="Replay decode steps as CUDA graphs (fewer kernel launches); auto = on for a CUDA device."
    )


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port is one clear error, not a traceback after a minute."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def model_name_of(cfg: Config) -> str:
    return cfg.model_name or Path(cfg.ckpt).resolve().name


def worker_argv(cfg: Config, port: int) -> list[str]:
    """The command line of one replica: this config, one process, loopback only. The API key is not passed: the
    router gives each replica an internal key through $GPTFORGE_API_KEY and checks the clients' keys itself."""
    keep = cfg.model_dump(exclude={"api_key", "replicas", "host", "port", "backend"})
    keep["model_name"] = model_name_of(cfg)
    flags = [f"--{k}={v}" for k, v in keep.items()]
    return [
        sys.executable,
        "-m",
        "gptforge",
        "serve",
        *flags,
        "--replicas",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _banner(url: str, name: str, keys: list[str], replicas: int) -> None:
    print(f"gptforge serve: model '{name}' at {url}/v1 ({replicas} replica{'s' if replicas > 1 else ''})", flush=True)
    print(f"  chat page: {url}/   health: {url}/health/ready   metrics: {url}/metrics", flush=True)
    if keys:
        print(f"  auth: ON ({len(keys)} key{'s' if len(keys) > 1 else ''}; send 'Authorization: Bearer <key>')")
    else:
        print("  auth: OFF. WARNING: anyone who can reach this port can use the model.", file=sys.stderr)
        print("        Set --api_key or $GPTFORGE_API_KEY to require a key.", file=sys.stderr, flush=True)


def _run_replicas(cfg: Config, keys: list[str]) -> dict:
    from gptforge.serve.router import RouterSettings, serve_replicas

    settings = RouterSettings(
        api_keys=keys,
        request_timeout_s=cfg.request_timeout_s + 5,  # the replica's own deadline answers first
        max_body_bytes=cfg.max_body_bytes,
        drain_timeout_s=cfg.drain_timeout_s,
    )
    _banner(f"http://{cfg.host}:{cfg.port}", model_name_of(cfg), keys, cfg.replicas)
    serve_replicas(lambda port: worker_argv(cfg, port), cfg.replicas, cfg.host, cfg.port, settings)
    return {"replicas": cfg.replicas}


def build_app(cfg: Config, keys: list[str], runtime=None):
    """Load the checkpoint and build engine, service and app (the engine thread starts with the app's lifespan).
    Returns (app, service, meta, runtime)."""
    from gptforge.faults import fault_seconds
    from gptforge.runtime import build_runtime
    from gptforge.serve.app import AppSettings, create_app
    from gptforge.serve.service import ServiceSettings, build_local_service
    from gptforge.train.models import load_for_inference

    runtime = runtime or build_runtime(cfg.device, cfg.dtype, cfg.threads)
    model, tok, meta = load_for_inference(cfg.ckpt, runtime.device)
    if meta.get("task") == "classify":
        raise ValueError(
            f"{meta['checkpoint']} is a classifier (labels {meta.get('labels')}); `gptforge serve` serves "
            "language and chat models. Use `gptforge evaluate` for classifiers."
        )
    # The engine has no autocast: weights and KV cache simply live in the chosen dtype.
    model = model.to(runtime.dtype)
    settings = ServiceSettings(
        model_name=model_name_of(cfg),
        default_max_tokens=cfg.default_max_tokens,
        max_tokens_limit=cfg.max_tokens_limit,
        request_timeout_s=cfg.request_timeout_s,
        fault_token_sleep_s=fault_seconds("serve_token_sleep"),
    )
    service = build_local_service(
        model,
        tok,
        settings,
        max_batch_size=cfg.max_batch_size,
        max_waiting=cfg.max_waiting,
        device=runtime.device,
        dtype=runtime.dtype,
        cuda_graphs=None if cfg.cuda_graphs == "auto" else cfg.cuda_graphs == "on",
    )
    app = create_app(
        service,
        AppSettings(api_keys=keys, max_body_bytes=cfg.max_body_bytes, drain_timeout_s=cfg.drain_timeout_s),
    )
    return app, service, meta, runtime


def _ray_app(cfg_json: str, keys: list[str]):
    """Built on each Ray replica (module level and fed plain data, so Ray can pickle it)."""
    return build_app(Config.model_validate_json(cfg_json), keys)[0]


def _run_ray(cfg: Config, keys: list[str]) -> dict:
    from gptforge.serve.ray_app import run_ray_serve

    _banner(f"http://{cfg.host}:{cfg.port}", model_name_of(cfg), keys, cfg.replicas)
    named = cfg.model_copy(update={"model_name": model_name_of(cfg), "ckpt": str(Path(cfg.ckpt).resolve())})
    factory = functools.partial(_ray_app, named.model_dump_json(), keys)
    run_ray_serve(factory, cfg.replicas, cfg.host, cfg.port, max_ongoing_requests=cfg.max_batch_size + cfg.max_waiting)
    return {"replicas": cfg.replicas, "backend": "ray"}


def run(cfg: Config, runtime=None) -> dict:
    from gptforge.serve.auth import resolve_api_keys

    keys = resolve_api_keys(cfg.api_key)
    if cfg.backend == "ray":
        return _run_ray(cfg, keys)
    if cfg.replicas > 1:
        return _run_replicas(cfg, keys)
    sock = _listen(cfg.host, cfg.port)
    try:
        app, service, meta, runtime = build_app(cfg, keys, runtime)
        name = model_name_of(cfg)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        print(
            f"  checkpoint {meta['checkpoint']} (step {meta.get('step')}, task {meta.get('task')}), "
            f"{runtime.describe()}, context {service.context_len} tokens, batch {cfg.max_batch_size}",
            flush=True,
        )
        _banner(url, name, keys, 1)
        config = uvicorn.Config(
            app,
            log_level=os.environ.get("GPTFORGE_LOG_LEVEL", "info"),
            access_log=False,
            timeout_graceful_shutdown=cfg.drain_timeout_s,
        )
        DrainingServer(config, app.state.begin_drain).run(sockets=[sock])
    finally:
        sock.close()
    return {"model": name, "url": url}


class DrainingServer(uvicorn.Server):
    """uvicorn's server that (1) marks the app draining the moment a signal arrives, so /health/ready says 503 while
    streams finish, and (2) does not re-raise the signal after a clean shutdown (uvicorn does, and the process would
    then die by SIGTERM instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, on_signal) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        self._on_signal()
        if self.should_exit:  # a second signal: stop waiting for connections
            self.force_exit = True
        self.should_exit = True
