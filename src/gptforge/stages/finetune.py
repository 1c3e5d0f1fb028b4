"""`gptforge finetune`: adapt a pretrained model to a task, on the same Trainer as pretraining.

Tasks (--task): `chat` (JSONL conversations, loss on assistant tokens only, packed), `classify` (JSONL {text, label}
with string or integer labels, a classification head), `lm` (continued pretraining on domain text).
Starts from `--init`: a gptforge run or checkpoint folder (default: this run's pretrain folder) or a local Hugging
Face folder of a GPT-2, Llama or Qwen2 model (safetensors). LoRA (`--lora.rank 8`), dropout, weight decay, label
smoothing and class weights regularize; early stopping watches `--monitor` (loss, accuracy, f1_macro, ...) and keeps
the best checkpoint. `--cv.folds K` runs stratified K-fold cross-validation; `--search.method grid|random` tries
learning rates, batch sizes, epochs and LoRA ranks and saves a ranked table and the best config. `--augment.n_per_record
N` adds N augmented copies of every training text (classify), after the train/validation split. Under torchrun,
`--parallel ddp` (default) replicates the model and `--parallel fsdp` shards it (backbone blocks, then the whole task
model with head and adapters; see gptforge.train.parallel); checkpoints hold full weights either way, and the final
evaluation of the best checkpoint runs on an unsharded copy. `--activation_checkpointing` trades compute for memory.

Writes under `<run_dir>/finetune/<name>/` (name defaults to the task): checkpoints/, metrics.jsonl, loss.png,
summary.json, data_report.json, tokenizer.json, config.yaml; classify adds predictions.jsonl, metrics.md/json and
confusion.png/json on the validation split; chat adds samples.jsonl; cv/ and search/ hold their tables.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import append_ledger, save_config, sha256_file, write_json
from gptforge.data.augment import AugmentConfig
from gptforge.model.gpt import GPT
from gptforge.model.lora import LoRAConfig
from gptforge.runtime import Runtime, rng_state, seed_everything
from gptforge.train import checkpoint as ckpt_lib
from gptforge.train import parallel, tasks
from gptforge.train.autobatch import resolve_batch
from gptforge.train.metrics import MetricsLog, plot_losses
from gptforge.train.models import build_task_model, load_base, set_dropout
from gptforge.train.optim import build_optimizer, compiled_step
from gptforge.train.trainer import LoopState, TrainConfig, Trainer

FINETUNE_TRAIN = TrainConfig(
    max_steps=200,
    micro_batch_size=16,
    lr=3e-4,
    warmup_steps=10,
    weight_decay=0.01,
    eval_every=20,
    eval_batches=0,
    save_every=1_000_000,  # the best checkpoint is saved whenever it improves, and the last one at the end
    keep_last=1,
    early_stop_patience=4,
    log_every=10,
)


class CVConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folds: int = Field(0, ge=0, description="K >= 2 runs stratified K-fold cross-validation on train_file; 0 = off.")
    seed: int = Field(0, description="Seed of the fold assignment.")


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "grid", "random"] = Field("none", description="Hyperparameter search: grid or random.")
    trials: int = Field(8, gt=0, description="Trials of a random search.")
    seed: int = Field(0, description="Seed of the random search.")
    lr: list[float] = Field(default_factory=list, description="Learning rates to try.")
    micro_batch_size: list[int] = Field(default_factory=list, description="Micro-batch sizes to try.")
    epochs: list[float] = Field(default_factory=list, description="Epoch counts to try.")
    lora_rank: list[int] = Field(default_factory=list, description="LoRA ranks to try (0 = full fine-tuning).")


class Config(tasks.TaskDataFields):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/default", description="Run directory; outputs go to <run_dir>/finetune/<name>/.")
    name: str = Field("", description="Output folder name under <run_dir>/finetune/; empty = the task name.")
    task: Literal["chat", "classify", "lm"] = Field("classify", description="chat, classify or lm.")
    init: str = Field(
        "", description="Start model: gptforge run/checkpoint folder or HF folder; empty = run's pretrain."
    )
    tokenizer: str = Field("", description="tokenizer.json to use instead of the init model's.")
    train_file: str = Field(..., description="Training data (JSONL; lm also takes text folders).")
    val_file: str = Field("", description="Validation data; empty = hold out val_fraction of train_file.")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Held-out share when there is no val_file.")
    block_size: int = Field(0, ge=0, description="Context length for fine-tuning; 0 = the model's.")
    pack: bool = Field(True, description="Pack several conversations per row (chat), attention kept separate.")
    epochs: float = Field(3.0, ge=0, description="Passes over the training data; 0 = use train.max_steps.")
    evals_per_epoch: float = Field(2.0, ge=0, description="Validation passes per epoch; 0 = use train.eval_every.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout; empty keeps it.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy.")
    class_weights: str = Field("none", description="none, balanced, or per-label 'pos=2,neg=1' (classify).")
    pooling: Literal["last", "mean"] = Field("last", description="Classifier pooling: last token or mean.")
    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the classification head.")
    monitor: Literal["auto", "loss", "accuracy", "f1_macro", "f1_micro", "f1_weighted"] = Field(
        "auto", description="Validation metric for early stopping and the best checkpoint; auto = f1_macro or loss."
    )
    samples: int = Field(4, ge=0, description="Chat: replies to this many validation conversations at the end.")
    seed: int = Field(1337, description="Seed for the split, data order, head init and dropout.")
    resume: bool = Field(False, description="Continue from this run's newest finetune checkpoint.")
    overwrite: bool = Field(False, description="Delete this run's finetune checkpoints and start over.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = Field("auto", description="Autocast dtype: auto, bfloat16 or float32.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp replicates the model, fsdp shards weights and optimizer state."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward pass: less memory, ~1/3 more compute."
    )
    compile_optimizer: bool = Field(
        False, description="torch.compile the AdamW step instead of the fused kernel (see pretrain's flag)."
    )
    threads: int = Field(0, ge=0, description="CPU threads; 0 keeps torch's default.")
    progress: bool = Field(True, description="Show progress bars.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(n_per_record=0))
    cv: CVConfig = Field(default_factory=CVConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    train: TrainConfig = Field(default_factory=lambda: FINETUNE_TRAIN.model_copy())


def out_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "finetune" / (cfg.name or cfg.task)


def monitor_of(cfg: Config) -> tuple[str, bool]:
    """(metric key, higher is better)."""
    m = cfg.monitor
    if m == "auto":
        m = "f1_macro" if cfg.task == "classify" else "loss"
    if m != "loss" and cfg.task != "classify":
        raise ValueError(f"monitor={m} needs task=classify; {cfg.task} models are judged by validation loss")
    return f"val_{m}", m != "loss"


def _data_identity(cfg: Config, runtime: Runtime) -> dict:
    ident = {
        "task": cfg.task,
        "train_file (sha256)": sha256_file(cfg.train_file)[:16] if Path(cfg.train_file).is_file() else cfg.train_file,
        "val_file": cfg.val_file,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "augment.n_per_record": cfg.augment.n_per_record,
        # How many examples a step reads, not how they are split: resuming at another world size keeps the order.
        ckpt_lib.STEP_BATCH: cfg.train.micro_batch_size * cfg.train.grad_accum * runtime.world_size,
    }
    return ident


def _build_model(cfg: Config, base, n_classes: int) -> tuple[torch.nn.Module, GPT, list[str]]:
    """(task model, its GPT backbone, names of the LoRA-wrapped layers) on the CPU, from a copy of the base model."""
    gpt = copy.deepcopy(base.model)
    if cfg.dropout is not None:
        set_dropout(gpt, cfg.dropout)
    model = build_task_model(gpt, cfg.task, n_classes, cfg.pooling, cfg.head_dropout)
    lora_names: list[str] = []
    if cfg.lora.rank > 0:
        from gptforge.model.lora import apply_lora

        lora_names = apply_lora(model, cfg.lora)
        if cfg.task == "classify":
            for p in model.head.parameters():  # a new head is always trained in full
                p.requires_grad_(True)
    return model, gpt, lora_names


def _plain_copy(cfg: Config, base, n_classes: int) -> torch.nn.Module:
    """An unsharded model of the run's structure, for weights that are loaded into it right after. Its init draws
    from a forked RNG: dropout streams and bitwise resume must not depend on when a copy was built."""
    with torch.random.fork_rng(devices=[]):
        return _build_model(cfg, base, n_classes)[0]


def train_once(cfg: Config, base, prep, train_idx, val_idx, out: Path, runtime: Runtime, final: bool = True) -> dict:
    """One fine-tuning run on one split: train with early stopping, reload the best checkpoint, evaluate it."""
    from gptforge.data.sampler import IndexSampler

    tok = base.tokenizer
    block = base.model.config.block_size
    split = tasks.make_split(prep, train_idx, val_idx, cfg, tok, block, cfg.seed)
    tc = cfg.train.model_copy()
    steps_per_epoch = max(1, split.n_train // (tc.micro_batch_size * runtime.world_size) // tc.grad_accum)
    if cfg.epochs > 0:
        tc.max_steps = max(1, round(cfg.epochs * steps_per_epoch))
    if cfg.evals_per_epoch > 0:
        tc.eval_every = max(1, round(steps_per_epoch / cfg.evals_per_epoch))
    tc.warmup_steps = min(tc.warmup_steps, tc.max_steps // 5)
    monitor, higher = monitor_of(cfg)
    labels = prep.labels
    names = labels.names if labels is not None else []

    seed_everything(cfg.seed)
    model, gpt, lora_names = _build_model(cfg, base, len(names))
    model.to(runtime.device)
    torch.manual_seed(cfg.seed + runtime.rank)  # head init above used the shared seed; dropout streams differ per rank
    micro, world = tc.micro_batch_size, runtime.world_size
    sampler = IndexSampler(split.n_train, micro, cfg.seed, runtime.rank, world, tc.grad_accum)

    ckpt_dir = out / "checkpoints"
    data_id = _data_identity(cfg, runtime)
    meta_base = {
        "model": gpt.config.model_dump(),
        "stage": "finetune",
        "task": cfg.task,
        "head": {"n_classes": len(names), "pooling": cfg.pooling} if cfg.task == "classify" else None,
        "labels": labels.to_json() if labels is not None else None,
        "lora": cfg.lora.model_dump() if cfg.lora.rank > 0 else {"rank": 0},
        "init": base.info,
        "config": cfg.model_dump(mode="json"),
        "tokenizer_sha256": tok.sha256(),
        "data": data_id,
    }
    resume_from = None
    if final and cfg.resume and (newest := ckpt_lib.latest(ckpt_dir)):
        ckpt_lib.verify(newest)
        saved = ckpt_lib.read_meta(newest)
        problems = ckpt_lib.diff_fields(saved.get("data", {}), data_id, "")
        problems += ckpt_lib.step_batch_hint(saved.get("data", {}), data_id)
        problems += ckpt_lib.diff_fields(saved["model"], meta_base["model"], "model.")
        if problems:
            raise ckpt_lib.CheckpointError(f"cannot resume from {newest}: " + "; ".join(problems))
        resume_from = newest
    elif ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    trainer_sd = None
    if resume_from:
        ckpt_lib.load_weights(resume_from, model)
        trainer_sd = ckpt_lib.restore_trainer_state(resume_from, runtime, cfg.seed)
        sampler.load_state_dict(trainer_sd["sampler"])

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # counted before sharding splits them
    total = sum(p.numel() for p in model.parameters())
    fsdp = runtime.distributed and cfg.parallel == "fsdp"
    # LoRA is in place (above), so checkpointing and sharding see the final module tree. The evaluator runs `model`
    # (sharded under FSDP, the bare module under DDP): every rank evaluates the whole validation split in the same
    # batches, so under FSDP all ranks call the sharded forward equally often and its all-gathers stay in step.
    train_model = parallel.parallelize(model, gpt, runtime, cfg.parallel, cfg.activation_checkpointing)
    optimizer = build_optimizer(
        model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, runtime.device,
        compile_step=cfg.compile_optimizer,
    )  # fmt: skip
    shadow: list[torch.nn.Module] = []  # rank 0's unsharded copy that an FSDP checkpoint is written from
    metrics = None
    if runtime.is_main:
        resume_step = trainer_sd["loop"]["step"] if trainer_sd else None
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=resume_step)

    def log(record: dict) -> None:
        if metrics:
            metrics.write(record)

    def save(state: LoopState, is_best: bool) -> None:
        # The optimizer state is stored unsharded and keyed by parameter name whatever the parallel mode, so a
        # checkpoint loads into DDP, FSDP or one process alike, at any world size.
        module = model
        if fsdp:  # collective: the full weights into rank 0's plain copy, which it writes like 1 process would
            if runtime.is_main and not shadow:
                shadow.append(_plain_copy(cfg, base, len(names)))
            into = shadow[0] if runtime.is_main else None
            optim = parallel.gather_full_state(model, optimizer, into)
            module = into if into is not None else model
        else:
            optim = parallel.full_optimizer_state(model, optimizer)
        sd = {"optimizer": optim, "loop": asdict(state), "sampler": sampler.state_dict()}
        path = ckpt_lib.save(
            ckpt_dir,
            state.step,
            module,
            sd,
            meta_base,
            rng_state(),
            runtime,
            out_dir(cfg) / "tokenizer.json",
            tc.keep_last,
        )
        if is_best and runtime.is_main:
            ckpt_lib.mark_best(ckpt_dir, path, {"step": state.step, monitor: state.best_val})

    weights = tasks.class_weights(cfg, split, names) if cfg.task == "classify" else None
    batch = max(1, tc.micro_batch_size * 2)
    trainer = Trainer(
        train_model,
        optimizer,
        tc,
        runtime,
        tasks.make_batcher(split, sampler, tok.pad_id, runtime.device),
        tasks.make_loss(cfg.task, cfg.label_smoothing, weights),
        tasks.batch_tokens(cfg.task),
        evaluate=tasks.make_evaluator(model, split, labels, tok.pad_id, batch, runtime),
        save=save,
        log=log,
        monitor=monitor,
        higher_is_better=higher,
        progress=cfg.progress,
        step_fn=compiled_step(optimizer) if cfg.compile_optimizer else None,
    )
    if trainer_sd:
        parallel.load_full_optimizer_state(model, optimizer, trainer_sd["optimizer"])
        trainer.state = LoopState(**trainer_sd["loop"])
    if runtime.is_main:
        what = f"LoRA rank {cfg.lora.rank} on {len(lora_names)} layers" if lora_names else "full fine-tuning"
        unit = {"classify": "examples", "chat": "packed rows", "lm": "windows"}[cfg.task]
        print(
            f"{cfg.task}: {split.n_train} training {unit}, {tc.max_steps} steps ({steps_per_epoch} per epoch, "
            f"eval every {tc.eval_every}); {what}: {trainable:,} of {total:,} parameters trained"
        )
        if fsdp:
            print(parallel.describe_fsdp(runtime))
    t0 = time.perf_counter()
    try:
        state = trainer.fit()
    finally:
        if metrics:
            metrics.close()
    best = ckpt_lib.best(ckpt_dir) or ckpt_lib.latest(ckpt_dir)
    if fsdp:
        # The final evaluation runs on an unsharded copy of the best weights on every rank: chat samples are
        # generated on rank 0 alone, which a sharded forward (an all-gather per call) would deadlock, and the copy
        # needs no collective at all. It holds the weights only: 4 bytes a parameter next to the 16 / world_size
        # of sharded fp32 weights, gradients and AdamW moments, so it fits wherever an inference load fits.
        model = _plain_copy(cfg, base, len(names)).to(runtime.device)
    ckpt_lib.load_weights(best, model)
    model.eval()
    result = {
        "steps": state.step,
        "epochs": round(state.step * tc.grad_accum * tc.micro_batch_size * runtime.world_size / split.n_train, 2),
        "best_step": ckpt_lib.read_meta(best)["step"],
        "monitor": monitor,
        "best": state.best_val,
        "stop_reason": trainer.stop_reason,
        "seconds": round(time.perf_counter() - t0, 1),
        "checkpoint": str(best),
        "split": split.report,
    }
    result["val"] = _final_eval(cfg, model, tok, prep, split, names, batch, out, runtime, final)
    if runtime.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    return result


def _final_eval(cfg, model, tok, prep, split, names, batch, out: Path, runtime: Runtime, final: bool) -> dict:
    """Validation metrics of the best checkpoint; the full classification report and chat replies for a final run."""
    if cfg.task == "classify":
        from gptforge.eval.classification import metrics_table, plot_confusion_matrix, write_confusion_json

        flat, full, probs = tasks.classify_metrics(model, split.val, names, tok.pad_id, batch, runtime)
        if final and runtime.is_main:
            tasks.write_predictions(out / "predictions.jsonl", split.val, probs, names)
            write_json(out / "metrics.json", full)
            (out / "metrics.md").write_text(metrics_table(full) + "\n", encoding="utf-8")
            write_confusion_json(full["confusion_matrix"], names, out / "confusion.json")
            plot_confusion_matrix(full["confusion_matrix"], names, out / "confusion.png", title="validation")
        return flat
    val = tasks.make_evaluator(model, split, None, tok.pad_id, batch, runtime)()
    if cfg.task == "chat" and final and cfg.samples and runtime.is_main:
        replies = tasks.chat_samples(model, tok, prep, split.val["samples"], cfg.samples, runtime, cfg.seed)
        import json

        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies)
        (out / "samples.jsonl").write_text(text, encoding="utf-8")
        val = {**val, "samples": replies}
    return val


def _split(cfg: Config, prep) -> tuple[np.ndarray, np.ndarray]:
    from gptforge.data.sft import split_train_val

    if prep.val_items is not None:
        return np.arange(len(prep.items)), np.arange(0)
    return split_train_val(len(prep.items), cfg.val_fraction, cfg.seed, tasks.split_labels(prep))


def run_cv(cfg: Config, base, prep, out: Path, runtime: Runtime) -> dict:
    from gptforge.eval.cv import folds_table, stratified_kfold, summarize_folds

    if prep.val_items is not None:
        raise ValueError("cv.folds splits train_file into folds itself; drop val_file (or cv.folds)")
    labels = tasks.split_labels(prep) or [0] * len(prep.items)
    folds = stratified_kfold(labels, cfg.cv.folds, cfg.cv.seed)
    per_fold = []
    for k, (tr, va) in enumerate(folds):
        print(f"--- fold {k + 1}/{len(folds)}: {len(tr)} train, {len(va)} validation")
        r = train_once(cfg, base, prep, tr, va, out / "cv" / f"fold-{k}", runtime, final=False)
        per_fold.append({k2: v for k2, v in r["val"].items() if isinstance(v, float)})
    summary = summarize_folds(per_fold)
    if runtime.is_main:
        write_json(out / "cv" / "cv.json", {"folds": cfg.cv.folds, "metrics": summary})
        (out / "cv" / "cv.md").write_text(folds_table(summary) + "\n", encoding="utf-8")
        print(folds_table(summary))
    return summary


SEARCH_KEYS = ("lr", "micro_batch_size", "epochs", "lora_rank")


def with_params(cfg: Config, params: dict) -> Config:
    """The config of one search trial."""
    c = cfg.model_copy(deep=True)
    for k, v in params.items():
        if k == "lr":
            c.train.lr = float(v)
        elif k == "micro_batch_size":
            c.train.micro_batch_size = int(v)
        elif k == "epochs":
            c.epochs = float(v)
        elif k == "lora_rank":
            c.lora.rank = int(v)
    c.search = SearchConfig()
    return c


def run_search(cfg: Config, base, prep, out: Path, runtime: Runtime) -> dict:
    from gptforge.eval.search import grid, random_trials, write_results

    space = {k: getattr(cfg.search, k) for k in SEARCH_KEYS if getattr(cfg.search, k)}
    if not space:
        raise ValueError(
            "search needs at least one list: search.lr, search.micro_batch_size, search.epochs, "
            "search.lora_rank (e.g. --search.lr=[1e-4,3e-4])"
        )
    combos = grid(space) if cfg.search.method == "grid" else random_trials(space, cfg.search.trials, cfg.search.seed)
    monitor, higher = monitor_of(cfg)
    rows = []
    for t, params in enumerate(combos):
        print(f"--- trial {t + 1}/{len(combos)}: {params}")
        tcfg = with_params(cfg, params)
        folder = out / "search" / f"trial-{t:03d}"
        try:
            if cfg.cv.folds >= 2:
                summ = run_cv(tcfg, base, prep, folder, runtime)
                m = {k: v["mean"] for k, v in summ.items()}
            else:
                m = train_once(tcfg, base, prep, *_split(tcfg, prep), folder, runtime, final=False)["val"]
                m = {k: v for k, v in m.items() if isinstance(v, float)}
            rows.append({"trial": t, "params": params, "metrics": m})
        except (ValueError, RuntimeError) as e:  # one bad combination (e.g. a batch larger than the data) is a row
            rows.append({"trial": t, "params": params, "metrics": {}, "error": str(e)})
            print(f"trial {t} failed: {e}")
    best = write_results(rows, out / "search", monitor, higher)
    best_cfg = with_params(cfg, best["params"])
    save_config(best_cfg, out / "search")
    (out / "search" / "config.yaml").replace(out / "search" / "best.yaml")
    print(f"best trial {best['trial']}: {best['params']} {monitor}={best['metrics'][monitor]:.4f}")
    print(f"results: {out / 'search' / 'results.md'}; best config: {out / 'search' / 'best.yaml'}")
    return {"best": best, "trials": rows}


def _print_data_report(report: dict) -> None:
    for name, rep in report.items():
        skipped = rep.get("skipped") or {}
        line = f"data ({name}): {rep.get('read', '?')} read, {rep.get('used', '?')} used"
        if skipped:
            line += ", skipped " + ", ".join(f"{k}={v}" for k, v in skipped.items())
        trunc = (rep.get("tokenize") or {}).get("truncated") or rep.get("truncated")
        if trunc:
            line += f", truncated to the context: {trunc}"
        print(line)


def run(cfg: Config, runtime: Runtime) -> dict:
    out = out_dir(cfg)
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if cfg.resume and (cfg.cv.folds >= 2 or cfg.search.method != "none"):
        raise ValueError("resume continues a single fine-tuning run; cross-validation and search start over")
    newest = ckpt_lib.latest(out / "checkpoints")
    if newest and not (cfg.resume or cfg.overwrite):
        raise ckpt_lib.CheckpointError(
            f"{out / 'checkpoints'} already holds checkpoints (newest: {newest.name}); pass --resume to continue, "
            "--overwrite to start over, or --name to write elsewhere"
        )
    init = cfg.init or str(Path(cfg.run_dir) / "pretrain")
    base = load_base(init, cfg.tokenizer, cfg.block_size)
    resumed = newest if cfg.resume else None
    sharded = cfg.parallel == "fsdp"
    packed = cfg.task == "chat" and cfg.pack  # packed rows carry a block-diagonal mask per layer
    train, _ = resolve_batch(cfg.train, base.model, base.model.config.block_size, runtime, sharded, resumed, packed)
    cfg = cfg.model_copy(update={"train": train})
    tok = base.tokenizer
    prep = tasks.prepare(cfg, tok, base.model.config.block_size)
    out.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        save_config(cfg, out)
        tok.save(out / "tokenizer.json")
        write_json(out / "data_report.json", prep.report)
        _print_data_report(prep.report)
        print(f"init: {base.info.get('kind')} model from {base.info.get('path')}; {runtime.describe()}")
    runtime.barrier()
    if cfg.search.method != "none":
        result = run_search(cfg, base, prep, out, runtime)
        summary = {"search": result["best"]}
    elif cfg.cv.folds >= 2:
        summary = {"cv": run_cv(cfg, base, prep, out, runtime)}
    else:
        result = train_once(cfg, base, prep, *_split(cfg, prep), out, runtime, final=True)
        summary = {k: v for k, v in result.items() if k != "split"}
        summary["data"] = result["split"]
        if prep.labels is not None:
            summary["labels"] = prep.labels.names
    if runtime.is_main:
        write_json(out / "summary.json", summary)
        append_ledger(cfg.run_dir, f"finetune/{cfg.name or cfg.task}", "ok", _scalars(summary))
        _print_result(cfg, summary, out)
    return summary


def _scalars(summary: dict) -> dict:
    val = summary.get("val") or {}
    return {k: v for k, v in val.items() if isinstance(v, float) and math.isfinite(v)}


def _print_result(cfg: Config, summary: dict, out: Path) -> None:
    if "val" not in summary:
        return
    val = summary["val"]
    shown = "  ".join(f"{k[4:]}={v:.4f}" for k, v in val.items() if isinstance(v, float))
    print(f"best checkpoint (step {summary['best_step']}): {shown}")
    if summary.get("stop_reason"):
        print(summary["stop_reason"])
    if cfg.task == "classify":
        print((out / "metrics.md").read_text(encoding="utf-8"))
        print(f"predictions: {out / 'predictions.jsonl'}; confusion matrix: {out / 'confusion.png'}")
    for s in val.get("samples", []) if isinstance(val, dict) else []:
        print(f"--- {s['prompt']!r}\n{s['reply']}")
