"""Serving under load: throughput and latency of `gptforge serve` at 1, 8, 32 and 64 concurrent clients.

    python bench/serve_load.py                # builds two small checkpoints, then ~6 min of load on 2 cores
    python bench/serve_load.py --sizes demo-5M --requests 64 --out /tmp/serve.json   # quick look

Models: the demo's shape (5M parameters, briefly trained on the bundled sample) and a serving-sized Llama shape
(8 layers x 512, GQA, ~40M parameters, 2 pretraining steps: speed does not depend on what the weights learned).
What runs: the real server (`python -m gptforge serve --ckpt ... --max_batch_size 64`) in a subprocess on loopback,
and in this process an asyncio load generator (httpx): C clients, each sending streaming `/v1/completions` requests
back to back until `--requests` requests (at least 2 per client) have completed at that concurrency. Every request
asks for exactly `--max-tokens` tokens (`ignore_eos`, so a model that happens to stop early does not flatter a
level), with prompts drawn from the bundled sample corpus.

Measured per level: completion tokens/s and requests/s over the level's wall time, p50/p99 of request latency and of
time to first token, and errors (any non-200, or a stream without [DONE]: the run fails if there is one). The
headline `throughput_ratio_32_vs_1` = tokens/s with 32 clients / tokens/s with one client at a time: what continuous
batching buys (each decode step serves every running request). The peer is the same server one request at a time,
in the same run. Client and server share the machine's cores, so the absolute numbers are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchlib import cpu_snapshot, foreign_share, machine_facts, publish

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 8, 32, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIZES = {
    # name: (model overrides on the demo's shape, pretraining steps). Quality is irrelevant here, speed is not:
    # "demo-5M" is the demo's model (briefly trained), "llama-40M" a serving-sized one (2 steps: nearly random).
    "demo-5M": ({}, 60),
    "llama-40M": ({"n_layer": 8, "n_embd": 512, "n_head": 8, "n_kv_head": 4}, 2),
}
HEADLINE = "llama-40M"


def build_checkpoint(workdir: Path, size: str) -> str:
    """clean -> tokenizer -> pretrain on the bundled sample with the demo's settings and this size's shape."""
    import contextlib

    from gptforge import SAMPLE
    from gptforge.demo import DEMO_MODEL, DEMO_TRAIN
    from gptforge.runtime import build_runtime
    from gptforge.stages import clean, pretrain, tokenizer

    update, steps = SIZES[size]
    runtime = build_runtime("cpu", "float32")
    run_dir = str(workdir / size)
    with open(workdir / f"{size}.log", "w") as log, contextlib.redirect_stdout(log):
        clean.run(clean.Config(run_dir=run_dir, input=[SAMPLE], overwrite=True, progress=False), None)
        text = str(Path(run_dir) / "clean" / "data")
        tokenizer.run(tokenizer.Config(run_dir=run_dir, input=text, overwrite=True), runtime)
        train = DEMO_TRAIN.model_copy(
            update={"max_steps": steps, "warmup_steps": 1, "eval_every": steps, "save_every": steps}
        )
        model = DEMO_MODEL.model_copy(update=update)
        cfg = pretrain.Config(run_dir=run_dir, input=text, model=model, train=train, overwrite=True, progress=False)
        pretrain.run(cfg, runtime)
    return str(Path(run_dir) / "pretrain")


def prompts() -> list[str]:
    from gptforge import SAMPLE

    lines = []
    for f in sorted(Path(SAMPLE).rglob("*.txt"))[:20]:
        lines += [ln.strip() for ln in f.read_text(encoding="utf-8", errors="ignore").splitlines() if len(ln) > 8]
    return lines or ["Shall I compare thee to a summer's day?"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code, "detail": r.text[:200]}
        # Cheap parsing on purpose: the client shares the CPUs with the server, so it decodes JSON only for the
        # rare chunks that matter (the usage chunk, an error) and spots text chunks by substring.
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            if '"usage":{' in line or '"error"' in line:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 200, "detail": str(chunk["error"])[:200]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and '"text":"' in line and '"text":""' not in line:
                ttft = time.perf_counter() - t0
    return {"ok": done, "latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def level(url: str, concurrency: int, n_requests: int, max_tokens: int, texts: list[str]) -> dict:
    n_requests = max(n_requests, 2 * concurrency)
    rng = random.Random(concurrency)
    todo = iter(range(n_requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker():
            for _ in todo:
                results.append(await one_request(client, rng.choice(texts)[:200], max_tokens, model))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    errors = [r for r in results if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "latency_p50_s": round(pct([r["latency"] for r in ok], 0.5), 3) if ok else None,
        "latency_p99_s": round(pct([r["latency"] for r in ok], 0.99), 3) if ok else None,
        "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 3) if ok else None,
        "ttft_p99_s": round(pct([r["ttft"] for r in ok], 0.99), 3) if ok else None,
    }


def start_server(ckpt: str, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptforge", "serve", "--ckpt", ckpt, "--port", str(port)]
    cmd += ["--max_batch_size", str(max_batch), "--max_waiting", "1024", "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready in 180 s")


def table(res: dict) -> str:
    lines = [
        "| model | clients | tokens/s | vs 1 client | requests/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in res["sizes"].items():
        base = r["levels"][0]["tokens_per_s"] or 1
        for lv in r["levels"]:
            lines.append(
                f"| {size} | {lv['concurrency']} | {lv['tokens_per_s']} | {lv['tokens_per_s'] / base:.2f}x | "
                f"{lv['requests_per_s']} | {lv['latency_p50_s']} s | {lv['latency_p99_s']} s | {lv['ttft_p50_s']} s | "
                f"{lv['ttft_p99_s']} s | {lv['errors']} |"
            )
    c = res["config"]
    ratios = ", ".join(f"{k} {v['throughput_ratio_32_vs_1']}x" for k, v in res["sizes"].items())
    lines += [
        "",
        f"`throughput_ratio_32_vs_1` ({res['headline_size']}) = **{res['throughput_ratio_32_vs_1']}x** "
        f"(per size: {ratios}). {c['max_tokens']} tokens per streamed request, engine max_batch_size "
        f"{c['max_batch_size']}, server and load generator on the same {res['machine']['logical_cpus']} CPUs.",
    ]
    return "\n".join(lines)


def run_size(size: str, ckpt: str, args) -> dict:
    port = free_port()
    proc = start_server(ckpt, port, args.max_batch_size, args.threads)
    try:
        texts = prompts()
        url = f"http://127.0.0.1:{port}"
        asyncio.run(level(url, 4, 8, args.max_tokens, texts))  # warm-up
        levels = []
        for c in args.levels:
            lv = asyncio.run(level(url, c, args.requests, args.max_tokens, texts))
            print(f"  {size} {c:>3} clients: {lv['tokens_per_s']} tok/s, p50 {lv['latency_p50_s']} s", flush=True)
            levels.append(lv)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    by = {lv["concurrency"]: lv for lv in levels}
    ratio = None
    if 1 in by and 32 in by and by[1]["tokens_per_s"] > 0:
        ratio = round(by[32]["tokens_per_s"] / by[1]["tokens_per_s"], 2)
    return {"checkpoint": ckpt, "throughput_ratio_32_vs_1": ratio, "levels": levels}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    ap.add_argument("--requests", type=int, default=96, help="requests per level (at least 2 per client)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="", help="keep the built checkpoints here (reused when present)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    snap = cpu_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sizes = {}
        for size in args.sizes:
            ckpt = work / size / "pretrain"
            if not ckpt.exists():
                build_checkpoint(work, size)
            sizes[size] = run_size(size, str(ckpt), args)
    head = HEADLINE if HEADLINE in sizes else next(iter(sizes))
    res = {
        "benchmark": "serve_load",
        "throughput_ratio_32_vs_1": sizes[head]["throughput_ratio_32_vs_1"],
        "headline_size": head,
        "sizes": sizes,
        "config": vars(args) | {"out": None, "workdir": None},
        "foreign_cpu_share_including_server": foreign_share(snap, cpu_snapshot()),
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "serve_load", readme=not args.no_readme)
    return res


if __name__ == "__main__":
    res = main()
    errors = sum(lv["errors"] for r in res["sizes"].values() for lv in r["levels"])
    if errors:
        print(f"{errors} failed requests during the load run: see error_samples in the JSON", file=sys.stderr)
    sys.exit(1 if errors else 0)
