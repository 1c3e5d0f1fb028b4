"""One AdamW step on this CPU: eager multi-tensor, fused, and `torch.compile`d, for GPTs of ~10M and ~40M parameters.

    python bench/optim_step.py            # defaults: 2 sizes, 5 interleaved rounds of 10 steps, ~3 min on 2 cores
    python bench/optim_step.py --repeats 3 --steps 5 --out /tmp/optim_step.json     # quick look

Contenders, each with its own copy of the same model (same parameter groups: decay on linear matrices only, as
`gptforge.train.optim.param_groups` makes them), the same fixed gradients and the same changing LR (set before every
step the way the Trainer sets it):
* `eager_foreach`: `torch.optim.AdamW(..., foreach=True)`, the multi-tensor implementation (PyTorch's CUDA default).
* `eager_loop`: `foreach=False`, one tensor at a time: what `compiled` is compiled from (and the CPU default).
* `fused`: `build_optimizer(...)`, gptforge's default: the fused kernel, one pass over each tensor.
* `compiled`: `build_optimizer(..., compile_step=True)` + `compiled_step`: pretrain's `--compile_optimizer` (the
  per-tensor step traced by `torch.compile`, LR held in a tensor).
* `compiled_foreach`: the same with `foreach=True, capturable=True`, the variant the CUDA path of `compile_step`
  takes; measured here as the other way to build it on CPU. It compiles sooner and steps about as fast, but the CPU
  supports capturable only inside compiled code, so `compile_step` does not use it there (see optim.py).

Timed: the wall time of `optimizer step` (LR update included) per step, over `--steps` steps, interleaved across the
contenders (A B C D E, A B C D E, ...) `--repeats` times so drift of a shared machine hits every arm alike; the table
shows the median over repeats of each repeat's median step, and its ratio to `fused`. `first step s` is the first
call, which for the compiled ones is the compile: by default inductor starts from an empty on-disk cache (a temporary
`TORCHINDUCTOR_CACHE_DIR`), as a first run does; `--warm-cache` keeps the user's cache instead. fp32,
`torch.set_num_threads(--threads)`. The foreign CPU load seen during the run is recorded (`foreign_cpu_share`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchlib import cpu_snapshot, fmt_share, foreign_share, machine_facts, publish, wait_for_quiet

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.train.optim import build_optimizer, compiled_step, lr_at, param_groups, set_lr

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # name: GPT shape. gpt-10M: the cpu-tiny recipe scaled up; llama-40M: bench/decode.py's and bench/compress.py's.
    "gpt-10M": GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=5, n_embd=320),
    "llama-40M": GPTConfig(
        vocab_size=16384, block_size=256, n_layer=8, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1408,
        tie_embeddings=False,
    ),
}  # fmt: skip
CONTENDERS = ("eager_foreach", "eager_loop", "fused", "compiled", "compiled_foreach")
HP = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
MAX_LR, WARMUP, TOTAL = 1e-3, 5, 200


def build(name: str, model: GPT) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """(optimizer, step function) of one contender."""
    cpu = torch.device("cpu")
    if name == "fused":
        opt = build_optimizer(model, MAX_LR, device=cpu, **HP)
        return opt, opt.step
    if name == "compiled":
        opt = build_optimizer(model, MAX_LR, device=cpu, compile_step=True, **HP)
        return opt, compiled_step(opt)
    if name == "compiled_foreach":
        groups = param_groups(model, HP["weight_decay"])
        for g in groups:
            g["lr"] = torch.tensor(MAX_LR)
        betas, eps = HP["betas"], HP["eps"]
        opt = torch.optim.AdamW(groups, lr=MAX_LR, betas=betas, eps=eps, foreach=True, capturable=True)
        return opt, compiled_step(opt)
    foreach = name == "eager_foreach"
    opt = torch.optim.AdamW(param_groups(model, HP["weight_decay"]), lr=MAX_LR, foreach=foreach, **HP)
    return opt, opt.step


def bench_size(size: str, args) -> dict:
    torch.manual_seed(0)
    base = GPT(SIZES[size])
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in base.parameters()]
    arms = {}
    for name in CONTENDERS:
        model = copy.deepcopy(base)
        for p, gp in zip(model.parameters(), grads, strict=True):
            p.grad = gp.clone()
        opt, step = build(name, model)
        arms[name] = {"opt": opt, "step": step, "i": 0}

    def one_step(arm: dict) -> float:
        set_lr(arm["opt"], lr_at(arm["i"], MAX_LR, WARMUP, TOTAL))
        t0 = time.perf_counter()
        arm["step"]()
        arm["i"] += 1
        return time.perf_counter() - t0

    first = {}
    for name, arm in arms.items():
        print(f"  {size}: first step of {name}", flush=True)
        first[name] = one_step(arm)
        for _ in range(2):  # warm-up: allocator, caches, (compiled) guards settled
            one_step(arm)
    per_repeat: dict[str, list[float]] = {n: [] for n in arms}
    shares = []
    for r in range(args.repeats):
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait)
        snap = cpu_snapshot()
        order = list(arms)[r % len(arms) :] + list(arms)[: r % len(arms)]  # rotate: no arm always runs first
        for name in order:
            per_repeat[name].append(statistics.median(one_step(arms[name]) for _ in range(args.steps)))
        shares.append(foreign_share(snap, cpu_snapshot()))
    ms = {n: 1000 * statistics.median(v) for n, v in per_repeat.items()}
    return {
        "params": base.num_params(),
        "tensors": len(list(base.parameters())),
        "ms_per_step": {n: round(v, 3) for n, v in ms.items()},
        "vs_fused": {n: round(ms["fused"] / v, 3) for n, v in ms.items()},  # > 1: faster than fused
        "first_step_s": {n: round(v, 2) for n, v in first.items()},
        "runs_ms": {n: [round(1000 * t, 3) for t in v] for n, v in per_repeat.items()},
        "foreign_cpu_share_per_repeat": shares,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender per round (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=10.0, help="max seconds to wait for a quiet CPU per round")
    ap.add_argument("--warm-cache", action="store_true", help="use the user's inductor cache (compile time not cold)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "optim_step.json"))
    ap.add_argument("--no-readme", action="store_true", help="do not update the README table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    snap0 = cpu_snapshot()
    with tempfile.TemporaryDirectory() as cache:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read by inductor at its first compile, not at import
        sizes = {s: bench_size(s, args) for s in args.sizes}
    res = {
        "sizes": sizes,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "cold_compile_cache": not args.warm_cache,
        "foreign_cpu_share": foreign_share(snap0, cpu_snapshot()),
        "machine": machine_facts(),
    }
    publish(res, table(res), Path(args.out), "optim_step", readme=not args.no_readme)
    return res


def table(res: dict) -> str:
    m = res["machine"]
    lines = [
        "| model | contender | ms per step | speed vs fused | first step s |",
        "|---|---|---:|---:|---:|",
    ]
    for size, r in res["sizes"].items():
        for n in CONTENDERS:
            speed = f"**{r['vs_fused'][n]:.2f}x**" if n == "compiled" else f"{r['vs_fused'][n]:.2f}x"
            lines.append(
                f"| {size} ({r['params'] / 1e6:.1f}M, {r['tensors']} tensors) | {n} | {r['ms_per_step'][n]:.1f} | "
                f"{speed} | {r['first_step_s'][n]:.2f} |"
            )
    cache = "empty inductor cache" if res["cold_compile_cache"] else "warm inductor cache"
    lines += [
        "",
        f"One AdamW step (LR update included), fp32, median of {res['repeats']} interleaved rounds of "
        f"{res['steps']} steps, {res['threads']} threads on {m.get('cpu', 'cpu')}, torch {m.get('torch')}; "
        f"speed vs fused > 1 is faster. First step = compile for the compiled ones ({cache}). Foreign CPU load "
        f"during the run: {fmt_share(res['foreign_cpu_share'])}. `python bench/optim_step.py` regenerates this table.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
