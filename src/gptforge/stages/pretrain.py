"""`gptforge pretrain`: tokenize a folder of text into shards and train a GPT on it, resumably.

Reads `<run_dir>/tokenizer/tokenizer.json` (or `tokenizer=PATH`) and writes under `<run_dir>/pretrain/`:
`tokens/` (memory-mapped shards, reused while input and tokenizer are unchanged), `checkpoints/step-*/`,
`checkpoints/best.json`, `metrics.jsonl`, `loss.png`, `summary.json` and the resolved `config.yaml`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gptforge import SAMPLE, resolve_input
from gptforge.artifacts import append_ledger, save_config, stage_dir, write_json
from gptforge.data.sampler import WindowSampler
from gptforge.data.shards import TokenWindows, build_token_shards, input_fingerprint
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.runtime import Runtime, peak_flops, rng_state, seed_everything
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.train import checkpoint as ckpt_lib
from gptforge.train import parallel
from gptforge.train.metrics import MetricsLog, plot_losses
from gptforge.train.optim import build_optimizer, compiled_step
from gptforge.train.trainer import LoopState, TrainConfig, Trainer


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="Share of text pieces held out for validation.")
    seed: int = Field(1337, description="Seed of the train/validation split.")
    piece_chars: int = Field(4000, gt=0, description="Long documents are cut into pieces of about this many chars.")
    shard_tokens: int = Field(50_000_000, gt=0, description="Tokens per shard file.")
    text_field: str = Field("text", description="Field holding the text in .jsonl records.")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/default", description="Run directory; outputs go to <run_dir>/pretrain/.")
    input: str = Field(SAMPLE, description="Folder or file of .txt/.md/.jsonl text; @sample is the bundled corpus.")
    tokenizer: str = Field("", description="tokenizer.json or its folder; empty = <run_dir>/tokenizer/.")
    seed: int = Field(1337, description="Seed for weights init, data order and dropout.")
    resume: bool = Field(False, description="Continue from the newest committed checkpoint of this run.")
    overwrite: bool = Field(False, description="Delete this run's checkpoints and start over (never implied).")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = Field("auto", description="Autocast dtype: auto (bf16 where fast), bfloat16 or float32.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp replicates the model, fsdp shards weights and optimizer state."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward pass: less memory, ~1/3 more compute."
    )
    compile: bool = Field(
        False, description="torch.compile the model (pays off on GPU; little gain on small CPU runs)."
    )
    compile_optimizer: bool = Field(
        False,
        description="torch.compile the AdamW step instead of the fused kernel (for CUDA; on CPU it measured no "
        "faster, bench/optim_step.py). The first step compiles; checkpoints stay interchangeable with plain runs.",
    )
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files (needs gptforge[viz]).")
    progress: bool = Field(True, description="Show the progress bar.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: GPTConfig = Field(default_factory=GPTConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _tokenizer_path(cfg: Config) -> Path:
    p = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.run_dir) / "tokenizer"
    return p / "tokenizer.json" if p.is_dir() or not p.suffix else p


def resolve_model_config(cfg: Config, tok: Tokenizer) -> GPTConfig:
    """Fill vocab_size from the tokenizer (rounded up to a multiple of 64 for matmul-friendly shapes)."""
    model = cfg.model.model_copy()
    if model.vocab_size == 0:
        model.vocab_size = 64 * math.ceil(tok.vocab_size / 64)
    elif model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    return model


def data_identity(cfg: Config, fingerprint: str, runtime: Runtime) -> dict:
    """Everything that decides which token the data cursor points at. A resumed run must match it exactly, or the
    saved cursor would index a different split or order and silently replay or skip text."""
    return {
        "input (content hash)": fingerprint[:16],
        "data.val_fraction": cfg.data.val_fraction,
        "data.seed": cfg.data.seed,
        "data.piece_chars": cfg.data.piece_chars,
        "data.text_field": cfg.data.text_field,
        "seed": cfg.seed,
        # How many sequences a step reads, not how they are split: resuming at another world size keeps the order.
        ckpt_lib.STEP_BATCH: cfg.train.micro_batch_size * cfg.train.grad_accum * runtime.world_size,
    }


def _check_resume(meta: dict, model_cfg: GPTConfig, tok: Tokenizer, data: dict, ckpt: Path) -> None:
    problems = ckpt_lib.diff_fields(meta["model"], model_cfg.model_dump(), "model.")
    if meta.get("tokenizer_sha256") != tok.sha256():
        problems.append("tokenizer: checkpoint was trained with a different tokenizer.json")
    problems += ckpt_lib.diff_fields(meta.get("data", {}), data, "")
    problems += ckpt_lib.step_batch_hint(meta.get("data", {}), data)
    if problems:
        raise ckpt_lib.CheckpointError(
            f"cannot resume from {ckpt}: " + "; ".join(problems) + " (use a new run_dir to train with other settings)"
        )


def _check_start(cfg: Config, ckpt_dir: Path, model_cfg: GPTConfig, tok: Tokenizer, data: dict) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuses anything that would mix two runs."""
    newest = ckpt_lib.latest(ckpt_dir)
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if cfg.resume and newest:
        ckpt_lib.verify(newest)
        _check_resume(ckpt_lib.read_meta(newest), model_cfg, tok, data, newest)
        return newest
    if newest and not cfg.overwrite:
        raise ckpt_lib.CheckpointError(
            f"{ckpt_dir} already holds checkpoints (newest: {newest.name}); pass --resume to continue that run, "
            "--overwrite to delete them and start over, or use another run_dir"
        )
    return None


def make_evaluator(model: torch.nn.Module, val: TokenWindows, cfg: Config, runtime: Runtime):
    """Validation loss, perplexity and bits per byte on a fixed, evenly spread set of validation windows."""
    n = len(val)
    want = cfg.train.eval_batches * cfg.train.micro_batch_size if cfg.train.eval_batches else n
    idx = np.unique(np.linspace(0, n - 1, num=min(want, n)).astype(np.int64))
    # Shard the windows over ranks; every rank's sum is all-reduced so all ranks see the same numbers.
    micro = cfg.train.micro_batch_size
    # FSDP gathers parameters inside every forward, so every rank must run as many batches as the busiest one.
    lockstep = runtime.distributed and cfg.parallel == "fsdp"
    n_batches = math.ceil(math.ceil(len(idx) / runtime.world_size) / micro)
    idx = idx[runtime.rank :: runtime.world_size]
    bytes_per_token = val.bytes / max(1, val.tokens)

    @torch.no_grad()
    def evaluate(_: LoopState) -> dict[str, float]:
        total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
        for b in range(0, n_batches * micro if lockstep else len(idx), micro):
            part = idx[b : b + micro]
            if len(part) == 0:  # lockstep filler: the forward keeps the collectives in step, its loss is unused
                data = torch.from_numpy(val.window(0)[None]).to(runtime.device)
                with runtime.autocast():
                    model(data[:, :-1], data[:, 1:])
                continue
            data = torch.from_numpy(np.stack([val.window(int(i)) for i in part])).to(runtime.device)
            with runtime.autocast():
                _, loss = model(data[:, :-1], data[:, 1:])
            total[0] += loss.double() * data[:, 1:].numel()
            total[1] += data[:, 1:].numel()
        if runtime.distributed:
            torch.distributed.all_reduce(total)
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}

    return evaluate


def _resolve_batch(cfg: Config, model_cfg: GPTConfig, ckpt_dir: Path, runtime: Runtime):
    """train.global_batch_size / micro_batch_size 0 -> concrete values (see gptforge.train.autobatch)."""
    from gptforge.train.autobatch import resolve_batch

    with torch.device("meta"):  # parameter count and shapes only: no memory, no init
        probe = GPT(model_cfg)
    resumed = ckpt_lib.latest(ckpt_dir) if cfg.resume else None
    return resolve_batch(cfg.train, probe, model_cfg.block_size, runtime, cfg.parallel == "fsdp", resumed)[0]


def run(cfg: Config, runtime: Runtime) -> dict:
    out = stage_dir(cfg.run_dir, "pretrain")
    tok = Tokenizer.load(_tokenizer_path(cfg))
    model_cfg = resolve_model_config(cfg, tok)
    src = resolve_input(cfg.input)
    ckpt_dir = out / "checkpoints"
    cfg = cfg.model_copy(update={"train": _resolve_batch(cfg, model_cfg, ckpt_dir, runtime)})
    fingerprint = input_fingerprint(src)
    data_id = data_identity(cfg, fingerprint, runtime)
    # Every check that can refuse the run happens before anything in the run directory is (re)written.
    resume_from = _check_start(cfg, ckpt_dir, model_cfg, tok, data_id)
    if runtime.is_main:
        meta_shards = build_token_shards(
            src,
            tok,
            out / "tokens",
            cfg.data.val_fraction,
            cfg.data.seed,
            cfg.data.piece_chars,
            cfg.data.shard_tokens,
            text_field=cfg.data.text_field,
            fingerprint=fingerprint,
        )
        print(
            f"data: {meta_shards['documents']} documents -> {meta_shards['train_tokens']:,} train / "
            f"{meta_shards['val_tokens']:,} val tokens ({meta_shards['dtype']} shards in {out / 'tokens'})"
        )
    runtime.barrier()
    seq = model_cfg.block_size
    train_windows = TokenWindows(out / "tokens", "train", seq)
    val_windows = TokenWindows(out / "tokens", "val", seq)
    sampler = WindowSampler(
        train_windows, cfg.train.micro_batch_size, cfg.seed, runtime.rank, runtime.world_size, cfg.train.grad_accum
    )
    if runtime.is_main:
        save_config(cfg, out)  # only now: a refused or failed start leaves the previous config in place
        if cfg.overwrite:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    runtime.barrier()

    seed_everything(cfg.seed)
    model = GPT(model_cfg).to(runtime.device)
    # Same init on every rank, then per-rank RNG streams, so dropout masks differ across ranks (rank 0 keeps the
    # single-process stream).
    torch.manual_seed(cfg.seed + runtime.rank)
    trainer_sd = None
    if resume_from:
        ckpt_lib.load_weights(resume_from, model)
        trainer_sd = ckpt_lib.restore_trainer_state(resume_from, runtime, cfg.seed)
        sampler.load_state_dict(trainer_sd["sampler"])
    elif cfg.resume and runtime.is_main:
        print(f"no committed checkpoint in {ckpt_dir}; starting from scratch")

    raw_model = model
    fsdp = runtime.distributed and cfg.parallel == "fsdp"
    if cfg.activation_checkpointing:
        parallel.apply_activation_checkpointing(raw_model)
    if fsdp:
        parallel.shard_fsdp(raw_model, runtime)  # in place: the parameters become this rank's shards
    # Evaluation runs the (compiled) bare model: DDP's forward may broadcast buffers, a collective that would
    # deadlock when a rank has no validation windows to run. (FSDP's forward is collective too: the evaluator then
    # runs the same number of batches on every rank.)
    eval_model = torch.compile(raw_model) if cfg.compile else raw_model
    model = eval_model
    if runtime.distributed and not fsdp:
        model = parallel.wrap_ddp(raw_model, runtime)
        if cfg.compile:
            # Compiled around DDP, not inside it: dynamo then splits the graph at DDP's gradient buckets, so each
            # bucket's all-reduce overlaps the rest of the backward instead of waiting for all of it.
            model = torch.compile(model)
    # After sharding: FSDP2 replaces the parameters, and the optimizer must hold the sharded ones.
    optimizer = build_optimizer(
        raw_model, cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2), cfg.train.eps,
        runtime.device, compile_step=cfg.compile_optimizer,
    )  # fmt: skip
    shadow: list[GPT] = []  # rank 0's plain copy that an FSDP checkpoint is written from, built on first save

    metrics = None
    if runtime.is_main:
        resume_step = ckpt_lib.read_meta(resume_from)["step"] if resume_from else None
        tb_dir = out / "tensorboard" if cfg.tensorboard else None
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=resume_step, tensorboard_dir=tb_dir)

    peak, _ = peak_flops(runtime.device)
    flops_per_token = raw_model.flops_per_token()

    def log(record: dict) -> None:
        if peak and record.get("tok_s"):
            # Model FLOPs utilization (PaLM): achieved training FLOP/s over the bf16 peak of all devices in the run.
            record["mfu"] = flops_per_token * record["tok_s"] / (peak * runtime.world_size)
        if metrics:
            metrics.write(record)
            if "val_loss" in record:
                plot_losses(metrics.path, out / "loss.png")

    def save(state: LoopState, is_best: bool) -> None:
        # The optimizer state is stored unsharded and keyed by parameter name whatever the parallel mode, so a
        # checkpoint loads into DDP, FSDP or one process alike, at any world size.
        module = raw_model
        if fsdp:  # collective: the full weights into rank 0's plain copy, which it writes like 1 process would
            if runtime.is_main and not shadow:
                with torch.random.fork_rng(devices=[]):  # building it must not move the dropout streams
                    shadow.append(GPT(model_cfg))
            into = shadow[0] if runtime.is_main else None
            optim = parallel.gather_full_state(raw_model, optimizer, into)
            module = into if into is not None else raw_model
        else:
            optim = parallel.full_optimizer_state(raw_model, optimizer)
        sd = {"optimizer": optim, "loop": asdict(state)}
        sd["sampler"] = sampler.state_dict()
        meta = {
            "model": model_cfg.model_dump(),
            "stage": "pretrain",
            "config": cfg.model_dump(mode="json"),
            "tokenizer_sha256": tok.sha256(),
            "data": data_id,
            "tokens": state.tokens,
        }
        path = ckpt_lib.save(
            ckpt_dir,
            state.step,
            module,
            sd,
            meta,
            rng_state(),
            runtime,
            tokenizer_file=tok.path,
            keep_last=cfg.train.keep_last,
        )
        if is_best and runtime.is_main:
            ckpt_lib.mark_best(ckpt_dir, path, {"step": state.step, "val_loss": state.best_val})

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return m(x, y)[1]

    def next_batch():
        x, y = sampler.next_batch()
        return x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)

    trainer = Trainer(
        model,
        optimizer,
        cfg.train,
        runtime,
        next_batch,
        loss_fn,
        tokens_per_batch=lambda b: b[0].numel(),
        evaluate=make_evaluator(eval_model, val_windows, cfg, runtime),
        save=save,
        log=log,
        progress=cfg.progress,
        step_fn=compiled_step(optimizer) if cfg.compile_optimizer else None,
    )
    if trainer_sd:
        parallel.load_full_optimizer_state(raw_model, optimizer, trainer_sd["optimizer"])
        trainer.state = LoopState(**trainer_sd["loop"])
    n_params = raw_model.num_params()
    if runtime.is_main:
        print(
            f"model: {n_params / 1e6:.2f}M parameters ({raw_model.num_params(non_embedding=True) / 1e6:.2f}M "
            f"non-embedding), {raw_model.flops_per_token() / 1e6:.1f} MFLOPs/token; {runtime.describe()}"
        )
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * seq * runtime.world_size
        print(
            f"train: {cfg.train.max_steps} steps x {tokens_per_step:,} tokens = "
            f"{cfg.train.max_steps * tokens_per_step / 1e6:.1f}M tokens; {len(train_windows):,} windows per epoch"
        )
        if fsdp:
            print(parallel.describe_fsdp(runtime))
        if cfg.compile_optimizer:  # else the first step's long pause looks like a hang
            print("optimizer: AdamW step compiled by torch.compile; the first step includes the compile")
    t0 = time.perf_counter()
    start_step = trainer.state.step
    try:
        state = trainer.fit()
    finally:
        if metrics:
            metrics.close()
    elapsed = time.perf_counter() - t0
    summary = {
        "steps": state.step,
        "tokens": state.tokens,
        "params": n_params,
        "best_val_loss": state.best_val,
        "val": trainer.last_eval,
        "skipped_steps": state.skipped_total,
        "stop_reason": trainer.stop_reason,
        "seconds": round(elapsed, 1),
        "flops_per_token": raw_model.flops_per_token(),
        "tokens_per_s": round(
            (state.step - start_step)
            * cfg.train.micro_batch_size
            * cfg.train.grad_accum
            * seq
            * runtime.world_size
            / max(elapsed, 1e-9),
            1,
        ),
        "checkpoint": str(ckpt_lib.latest(ckpt_dir)),
        "best_checkpoint": str(ckpt_lib.best(ckpt_dir)),
    }
    if peak:
        summary["mfu"] = flops_per_token * summary["tokens_per_s"] / (peak * runtime.world_size)
    if runtime.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        write_json(out / "summary.json", summary)
        append_ledger(cfg.run_dir, "pretrain", "ok", summary)
        if trainer.stop_reason:
            print(trainer.stop_reason)
        print(f"checkpoint: {summary['checkpoint']}  (best: {summary['best_checkpoint']})")
        print(f"loss curve: {out / 'loss.png'}")
    return summary
