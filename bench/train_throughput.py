"""Training throughput, side by side: gptforge's Trainer vs a plain Hugging Face Llama loop vs a nanoGPT-style loop.

    python bench/train_throughput.py                 # defaults: 60 steps x 3 repeats, about 6-8 minutes on 2 cores
    python bench/train_throughput.py --steps 20 --repeats 1 --out /tmp/tp.json   # quick look

Contenders (same model shape, data, micro-batch, context and hyperparameters):

* ``gptforge``: the package as a user gets it. `GPT` (Llama-style: RoPE, RMSNorm, SwiGLU, GQA), `build_optimizer`
  (fused AdamW, no decay on norms/embeddings), `build_runtime(device="cpu", dtype="auto")` (bf16 autocast where the
  CPU has native bf16, fp32 otherwise) and `Trainer.fit()`.
* ``hf_llama``: `transformers.LlamaForCausalLM` with the equivalent `LlamaConfig` (same parameter count; the
  weight-for-weight equivalence is tested in tests/model/test_gpt.py), in a plain fp32 loop with
  `torch.optim.AdamW` at its default implementation.
* ``nanogpt_fp32``: a compact nanoGPT-style GPT defined below (learned positions, LayerNorm, GELU 4x MLP, fused
  c_attn, SDPA causal attention, tied embeddings) in the same plain fp32 loop.

Fairness choices:

* Seeds: repeat r uses seed 1337 + r for model init and data order, the same for all three contenders, so losses are
  paired within a repeat and averaged over 3 seeds (one lucky initialization decides nothing).
* Data: every run builds a fresh `WindowSampler` with its repeat's seed and draws its micro-batch inside the loop, so
  all three see the identical batch sequence and pay the same data cost. A checksum of every batch is compared
  within each repeat and the script fails if any run saw different data.
* Init: `torch.manual_seed(seed)` right before each model is built; each model uses its own library's init.
* Hyperparameters: the same peak LR, warmup, cosine-to-0.1x schedule (`gptforge.train.optim.lr_at`), betas, eps,
  weight decay, grad clipping at 1.0 and no dropout for all. The peers decay every matrix (dim >= 2, embeddings
  included), which is what nanoGPT and the HF Trainer do; gptforge decays linear weights only, its own choice.
* Loss: every contender's training loss is the mean cross-entropy of the logits at every position against y (the
  inputs shifted by one). HF's ``labels=`` path shifts internally and would score one target fewer per row, so the
  peers compute `F.cross_entropy(logits, y)` themselves.
* Timing: identical for all three. A timestamp is taken after every optimizer step, once the step's loss is a Python
  float (gptforge's Trainer reads the loss every step anyway; its `log` callback is called every step with
  `log_every=1`, and the peers call `.item()`). Tokens/s counts the steps after the first `WARMUP_STEPS` (allocator
  and oneDNN kernel warmup), wall clock from the end of the last warmup step to the end of the last step. No eval, no
  checkpoints and no progress bar inside the timed loop for anyone. Each contender runs `--repeats` times,
  interleaved (A, B, C, A, B, C, ...) so slow drift of the machine hits all of them alike; the headline is the median
  over runs. The median of per-step times is also reported: when it disagrees with the run medians, the machine was
  noisy.
* Contention: on a shared host another tenant, invisible to `ps`, can take a whole core; with two OpenMP threads
  spinning at barriers every step then runs several times slower. Before each run the script waits (up to
  `--quiet-wait` seconds) until other processes use under 10% of the CPUs, and it measures, for each run's timed
  window, the share of machine CPU time that went to other processes (/proc/stat minus this process). Runs above 5%
  are flagged; the JSON also carries the median over unflagged runs. Numbers from a flagged run are not trustworthy.
* Loss at equal tokens: each run trains on exactly `steps * micro_batch * block_size` tokens. Reported: the mean
  training loss over the last 10 steps, and the loss on all held-out validation windows evaluated after training by
  one shared fp32 function (no autocast, same windows, same batching) for all three.

Writes the JSON (`--out`), a Markdown table next to it, prints the table, and replaces the table between the
markers in the top-level README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import cpu_snapshot, fmt_share, foreign_share, machine_facts, update_readme, wait_for_quiet
from peers import NanoGPT, build_hf, decay_groups, logits_fn
from torch import nn

import gptforge
from gptforge.data.sampler import WindowSampler
from gptforge.data.shards import TokenWindows, build_token_shards
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import build_runtime, seed_everything
from gptforge.stages import tokenizer as tokenizer_stage
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.train.optim import build_optimizer, lr_at
from gptforge.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "train_throughput.json"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- train_throughput:begin -->", "<!-- train_throughput:end -->"
CONTENDERS = ("gptforge", "hf_llama", "nanogpt_fp32")
WARMUP_STEPS = 2  # untimed: first-touch allocation and oneDNN primitive creation
LAST_N = 10  # "loss at equal tokens" = mean training loss over this many final steps
GOAL_RATIO = 1.5
LOSS_TOLERANCE = 0.02  # nats: "equal or better" loss allows this much run-to-run noise
CONTENDED = 0.05  # a run during which other processes used over 5% of all CPU time is flagged as contended


@dataclass
class Hyper:
    """Everything shared by the three contenders."""

    steps: int = 60
    micro_batch: int = 16
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # gptforge and HF Llama only; nanoGPT is plain multi-head attention
    n_embd: int = 256
    vocab_size: int = 0  # filled from the tokenizer, rounded up to 64 like gptforge's pretrain stage
    tokenizer_vocab: int = 8192
    lr: float = 2e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1337  # model init and data order
    dropout: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.block_size


def lr_for(hp: Hyper, step: int) -> float:
    return lr_at(step, hp.lr, hp.warmup, hp.steps, "cosine", hp.min_lr_ratio)


# --------------------------------------------------------------------------------------------------------------------
# Data


def prepare_data(workdir: Path, vocab: int) -> Path:
    """Train the tokenizer on the bundled sample and build the token shards, with gptforge's own stages."""
    tok_path = workdir / "tokenizer" / "tokenizer.json"
    if not tok_path.is_file():
        with contextlib.redirect_stdout(io.StringIO()):  # the stage prints its stats table; not ours to show
            tokenizer_stage.run(tokenizer_stage.Config(run_dir=str(workdir), vocab_size=vocab), None)
    tok = Tokenizer.load(tok_path)
    build_token_shards(gptforge.resolve_input(gptforge.SAMPLE), tok, workdir / "tokens")  # reused when up to date
    return tok_path


class Batches:
    """A fresh sampler per run (same seed within a repeat, so the same sequence) plus a checksum of what was drawn."""

    def __init__(self, windows: TokenWindows, hp: Hyper, seed: int) -> None:
        self.sampler = WindowSampler(windows, hp.micro_batch, seed)
        self.sums: list[int] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next_batch()
        # A position-weighted sum would be stronger, but a plain sum over 4096 int64s costs microseconds and any
        # sampler mismatch (other seed, other cursor) changes it.
        self.sums.append(int(x.sum()))
        return x, y


# --------------------------------------------------------------------------------------------------------------------
# Models


def gptforge_config(hp: Hyper) -> GPTConfig:
    return GPTConfig(
        vocab_size=hp.vocab_size,
        block_size=hp.block_size,
        n_layer=hp.n_layer,
        n_head=hp.n_head,
        n_kv_head=hp.n_kv_head,
        n_embd=hp.n_embd,
        dropout=hp.dropout,
        tie_embeddings=True,
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# --------------------------------------------------------------------------------------------------------------------
# Training runs


@dataclass
class Run:
    name: str
    repeat: int
    dtype: str
    params: int
    step_end: list[float] = field(default_factory=list)  # perf_counter after each step
    losses: list[float] = field(default_factory=list)
    start: float = 0.0
    val_loss: float = math.nan
    batch_sums: list[int] = field(default_factory=list)
    cpu_at_timed_start: tuple[int, int, int] | None = None
    cpu_at_end: tuple[int, int, int] | None = None
    quiet_wait_s: float = 0.0

    def record(self, loss: float) -> None:
        self.step_end.append(time.perf_counter())
        self.losses.append(loss)
        if len(self.step_end) == WARMUP_STEPS:  # the timed window starts here; reading /proc costs ~0.1 ms
            self.cpu_at_timed_start = cpu_snapshot()

    def finish(self) -> None:
        self.cpu_at_end = cpu_snapshot()

    def summary(self, hp: Hyper) -> dict:
        t = self.step_end
        timed = len(t) - WARMUP_STEPS
        step_s = np.diff(t[WARMUP_STEPS - 1 :])  # durations of the timed steps
        return {
            "repeat": self.repeat,
            "tokens_per_s": timed * hp.tokens_per_step / (t[-1] - t[WARMUP_STEPS - 1]),
            "tokens_per_s_from_median_step": hp.tokens_per_step / float(np.median(step_s)),
            "timed_steps": timed,
            "wall_s_all_steps": t[-1] - self.start,
            "step_s_min": float(step_s.min()),
            "step_s_median": float(np.median(step_s)),
            "step_s_max": float(step_s.max()),
            "train_loss_last10": statistics.fmean(self.losses[-LAST_N:]),
            "final_loss": self.losses[-1],
            "val_loss": self.val_loss,
            "foreign_cpu_share": foreign_share(self.cpu_at_timed_start, self.cpu_at_end),
            "quiet_wait_s": round(self.quiet_wait_s, 1),
        }


def run_gptforge(hp: Hyper, train: TokenWindows, run: Run) -> nn.Module:
    runtime = build_runtime(device="cpu", dtype="auto")
    run.dtype = f"{str(runtime.dtype).removeprefix('torch.')} autocast" if runtime.dtype != torch.float32 else "fp32"
    seed_everything(hp.seed + run.repeat)  # one seed per repeat, shared by all contenders
    model = GPT(gptforge_config(hp))
    run.params = n_params(model)
    opt = build_optimizer(model, hp.lr, hp.weight_decay, hp.betas, hp.eps, runtime.device)
    cfg = TrainConfig(
        max_steps=hp.steps,
        micro_batch_size=hp.micro_batch,
        grad_accum=1,
        lr=hp.lr,
        min_lr_ratio=hp.min_lr_ratio,
        warmup_steps=hp.warmup,
        decay="cosine",
        weight_decay=hp.weight_decay,
        beta1=hp.betas[0],
        beta2=hp.betas[1],
        eps=hp.eps,
        grad_clip=hp.grad_clip,
        # Per-step log records give the per-step timestamps; eval and checkpoints are off for every contender.
        log_every=1,
        eval_every=hp.steps + 1,
        save_every=hp.steps + 1,
    )
    batches = Batches(train, hp, hp.seed + run.repeat)

    def log(record: dict) -> None:
        if "tok_s" in record:  # the per-step metrics line (eval lines and skipped-step lines have no tok_s)
            run.record(record["loss"])

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return m(x, y)[1]

    trainer = Trainer(
        model,
        opt,
        cfg,
        runtime,
        batches.next,
        loss_fn,
        tokens_per_batch=lambda b: b[0].numel(),
        evaluate=None,
        save=None,
        log=log,
        progress=False,
    )
    run.start = time.perf_counter()
    state = trainer.fit()
    run.finish()
    if state.skipped_total or len(run.losses) != hp.steps:
        raise RuntimeError(f"gptforge run skipped {state.skipped_total} non-finite steps; timings would be unequal")
    run.batch_sums = batches.sums
    return model


def run_plain(hp: Hyper, train: TokenWindows, run: Run) -> nn.Module:
    """The straightforward fp32 loop a user writes by hand, shared by the HF and nanoGPT contenders."""
    seed_everything(hp.seed + run.repeat)  # one seed per repeat, shared by all contenders
    model = build_hf(hp, gptforge_config(hp).hidden_dim) if run.name == "hf_llama" else NanoGPT(hp)
    run.dtype, run.params = "fp32", n_params(model)
    get_logits = logits_fn(run.name)
    # Default implementation on purpose: no fused=/foreach= flags, as in a plain loop (on CPU that is the
    # per-tensor for-loop path).
    opt = torch.optim.AdamW(decay_groups(model, hp.weight_decay), lr=hp.lr, betas=hp.betas, eps=hp.eps)
    batches = Batches(train, hp, hp.seed + run.repeat)
    model.train()
    run.start = time.perf_counter()
    for step in range(hp.steps):
        for g in opt.param_groups:
            g["lr"] = lr_for(hp, step)
        x, y = batches.next()
        logits = get_logits(model, x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.record(loss.item())
    run.finish()
    run.batch_sums = batches.sums
    return model


@torch.no_grad()
def val_loss(model: nn.Module, name: str, val: TokenWindows, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over every validation window, in fp32 for every contender."""
    get_logits = logits_fn(name)
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(val), batch_size):
        d = torch.from_numpy(np.stack([val.window(i) for i in range(b, min(b + batch_size, len(val)))]))
        x, y = d[:, :-1], d[:, 1:]
        logits = get_logits(model, x).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------------------------------------------------
# Reporting


def aggregate(hp: Hyper, runs: list[Run]) -> dict:
    per = {name: [r.summary(hp) for r in runs if r.name == name] for name in CONTENDERS}
    med = {name: statistics.median(s["tokens_per_s"] for s in rows) for name, rows in per.items()}
    med_step = {name: statistics.median(s["tokens_per_s_from_median_step"] for s in rows) for name, rows in per.items()}
    # Losses: mean over the repeats, which use different seeds (init and data order), so one lucky init decides nothing.
    train_loss = {name: statistics.fmean(s["train_loss_last10"] for s in rows) for name, rows in per.items()}
    val = {name: statistics.fmean(s["val_loss"] for s in rows) for name, rows in per.items()}
    ratio_hf, ratio_base = med["gptforge"] / med["hf_llama"], med["gptforge"] / med["nanogpt_fp32"]
    loss_ok = {
        peer: val["gptforge"] <= val[peer] + LOSS_TOLERANCE
        and train_loss["gptforge"] <= train_loss[peer] + LOSS_TOLERANCE
        for peer in ("hf_llama", "nanogpt_fp32")
    }
    spread = {
        name: max(s["tokens_per_s"] for s in rows) / min(s["tokens_per_s"] for s in rows) for name, rows in per.items()
    }
    contended = {
        name: sum(1 for s in rows if (s["foreign_cpu_share"] or 0.0) > CONTENDED) for name, rows in per.items()
    }
    clean = {
        name: [s["tokens_per_s"] for s in rows if (s["foreign_cpu_share"] or 0.0) <= CONTENDED]
        for name, rows in per.items()
    }
    clean_med = {name: statistics.median(v) if v else None for name, v in clean.items()}
    clean_ok = all(clean_med.values())
    first = {r.name: r for r in runs}
    return {
        "tokens_per_s": med,
        "ratio_vs_hf": ratio_hf,
        "ratio_vs_baseline": ratio_base,
        "loss_at_equal_tokens": {
            "tokens": hp.steps * hp.tokens_per_step,
            "train_loss_last10": train_loss,
            "val_loss": val,
        },
        "goal": {
            "min_ratio": GOAL_RATIO,
            "loss_tolerance_nats": LOSS_TOLERANCE,
            "ratio_met": {"hf_llama": ratio_hf >= GOAL_RATIO, "nanogpt_fp32": ratio_base >= GOAL_RATIO},
            "loss_equal_or_better": loss_ok,
            "met": ratio_hf >= GOAL_RATIO and ratio_base >= GOAL_RATIO and all(loss_ok.values()),
        },
        "robustness": {
            "tokens_per_s_from_median_step": med_step,
            "ratio_vs_hf_from_median_step": med_step["gptforge"] / med_step["hf_llama"],
            "ratio_vs_baseline_from_median_step": med_step["gptforge"] / med_step["nanogpt_fp32"],
            "max_over_min_tokens_per_s": spread,
            "contended_runs": contended,
            "contended_threshold": CONTENDED,
            "tokens_per_s_uncontended_median": clean_med,
            "ratio_vs_hf_uncontended": clean_med["gptforge"] / clean_med["hf_llama"] if clean_ok else None,
            "ratio_vs_baseline_uncontended": clean_med["gptforge"] / clean_med["nanogpt_fp32"] if clean_ok else None,
            "noisy": any(v > 1.15 for v in spread.values()) or any(contended.values()),
        },
        "contenders": {name: {"dtype": first[name].dtype, "params": first[name].params} for name in CONTENDERS},
        "runs": per,
    }


def table(result: dict) -> str:
    tps, loss = result["tokens_per_s"], result["loss_at_equal_tokens"]
    rows = [
        (
            "| contender | compute | params | median tok/s | tok/s per run | gptforge speedup | train loss (last 10) "
            "| val loss |"
        ),
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name in CONTENDERS:
        c = result["contenders"][name]
        per_run = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in result["runs"][name])
        speedup = "-" if name == "gptforge" else f"{tps['gptforge'] / tps[name]:.2f}x"
        rows.append(
            f"| {name} | {c['dtype']} | {c['params'] / 1e6:.2f}M | {tps[name]:,.0f} | {per_run} | {speedup} "
            f"| {loss['train_loss_last10'][name]:.4f} | {loss['val_loss'][name]:.4f} |"
        )
    cfg, m, goal = result["config"], result["machine"], result["goal"]
    rob = result["robustness"]
    rows += [
        "",
        (
            f"{cfg['steps']} steps x {cfg['micro_batch']} x {cfg['block_size']} tokens = "
            f"{loss['tokens']:,} tokens per run, {cfg['repeats']} interleaved runs each, first {WARMUP_STEPS} steps "
            f"untimed; {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, {m['date'][:10]}."
        ),
        f"Ratios (median tok/s): vs hf_llama {result['ratio_vs_hf']:.2f}x, vs nanogpt_fp32 "
        f"{result['ratio_vs_baseline']:.2f}x; from median step times: {rob['ratio_vs_hf_from_median_step']:.2f}x, "
        f"{rob['ratio_vs_baseline_from_median_step']:.2f}x. Goal (>= {GOAL_RATIO}x both at equal or better loss, "
        f"tolerance {LOSS_TOLERANCE} nats): {'met' if goal['met'] else 'NOT met'}."
        + (
            f" The machine was noisy (runs with other load > {CONTENDED:.0%} of the CPUs: "
            + ", ".join(f"{k} {v}" for k, v in rob["contended_runs"].items())
            + "; max/min tok/s per contender: "
            + ", ".join(f"{k} {v:.2f}" for k, v in rob["max_over_min_tokens_per_s"].items())
            + ")."
            if rob["noisy"]
            else ""
        ),
    ]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=Hyper.steps, help="optimizer steps per run (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per contender, interleaved (default %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md table is written next to it")
    ap.add_argument("--workdir", type=Path, default=None, help="keep tokenizer and shards here (default: a temp dir)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each run wait up to this many seconds for other load to drop (0: don't)",
    )
    ap.add_argument(
        "--readme",
        type=Path,
        default=README,
        help="README whose marked table is replaced (default %(default)s; '' to skip)",
    )
    args = ap.parse_args(argv)
    if args.steps < WARMUP_STEPS + LAST_N:
        ap.error(f"--steps must be at least {WARMUP_STEPS + LAST_N}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    hp = Hyper(steps=args.steps)
    t_total = time.perf_counter()
    machine = machine_facts()  # before the runs: the git commit and date describe the code that was measured
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptforge-bench-")))
        tok_path = prepare_data(workdir, hp.tokenizer_vocab)
        hp.vocab_size = 64 * math.ceil(Tokenizer.load(tok_path).vocab_size / 64)
        train = TokenWindows(workdir / "tokens", "train", hp.block_size)
        val = TokenWindows(workdir / "tokens", "val", hp.block_size)
        print(
            f"data: {len(train)} train / {len(val)} val windows of {hp.block_size} tokens; "
            f"{hp.steps} steps x {hp.tokens_per_step} tokens per run; torch threads {torch.get_num_threads()}",
            flush=True,
        )

        runs: list[Run] = []
        for rep in range(args.repeats):
            for name in CONTENDERS:
                run = Run(name=name, repeat=rep, dtype="", params=0)
                run.quiet_wait_s = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                model = (run_gptforge if name == "gptforge" else run_plain)(hp, train, run)
                run.val_loss = val_loss(model, name, val, hp.micro_batch)
                runs.append(run)
                s = run.summary(hp)
                print(
                    f"  [{rep + 1}/{args.repeats}] {name:<13} {s['tokens_per_s']:>8,.0f} tok/s  "
                    f"(median step {s['step_s_median']:.3f}s, max {s['step_s_max']:.3f}s)  "
                    f"train loss {s['train_loss_last10']:.4f}  val loss {run.val_loss:.4f}  "
                    f"other load {fmt_share(s['foreign_cpu_share'])}",
                    flush=True,
                )
                del model
                gc.collect()  # free the previous model's tensors before the next contender allocates its own

    reference = {r.repeat: r.batch_sums for r in runs if r.name == CONTENDERS[0]}
    bad = [f"{r.name}#{r.repeat}" for r in runs if r.batch_sums != reference[r.repeat]]
    if bad:
        raise RuntimeError(f"runs {bad} saw different batches than {runs[0].name}#0; the comparison is void")

    result = aggregate(hp, runs)
    cfg = asdict(hp)
    cfg.update(
        repeats=args.repeats,
        warmup_untimed_steps=WARMUP_STEPS,
        last_n_loss_steps=LAST_N,
        tokens_per_step=hp.tokens_per_step,
        lr_schedule="linear warmup, cosine to min_lr_ratio (lr_at)",
        gptforge_model=gptforge_config(hp).model_dump(),
        swiglu_hidden=gptforge_config(hp).hidden_dim,
        nanogpt_mlp_hidden=4 * hp.n_embd,
        data="@sample, gptforge BPE tokenizer, WindowSampler(seed)",
        val_windows=len(val),
        train_windows=len(train),
    )
    result = {
        "benchmark": "train_throughput",
        **result,
        "config": cfg,
        "machine": machine,
        "script_seconds": round(time.perf_counter() - t_total, 1),
    }
    result["identical_batches"] = True

    md = table(result)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md_path = args.out.with_suffix(".md")
    md_path.write_text("# Training throughput\n\n" + md + "\n")
    print(f"\nwrote {args.out} and {md_path}")
    if str(args.readme) not in ("", ".") and update_readme(args.readme, md, README_BEGIN, README_END):
        print(f"updated the table in {args.readme}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
