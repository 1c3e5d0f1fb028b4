"""`gptforge compress --ckpt DIR`: quantize and/or prune a checkpoint, with a before/after report.

One run applies, in this order: pruning (`--prune magnitude | wanda | 2:4 | structured`), an optional short recovery
fine-tuning of the pruned model through the same trainer as pretraining (`--recover_steps N`; pruned weights stay
exactly zero), then quantization (`--quantize int8 | int8_dynamic | int4`). Modules are chosen by name globs
(`--include`, `--exclude`, relative to the GPT body, e.g. `h.*.mlp.*`); pruning never touches the output layer
(`lm_head`), where sparsity costs the most quality.

The result is an ordinary checkpoint under `<run_dir>/compress/<name>/checkpoints/`: `gptforge generate`, `evaluate`,
`serve` and `export` load it unchanged (quantized modules are rebuilt from `meta.json`). Next to it, `report.json` and
`report.md` compare the source and the result: size on disk, parameters, loss / perplexity / bits per byte on
held-out text (or accuracy and F1 for a classifier), and batch-1 decode tokens/s through the serving engine.

Data: `--eval_data` (held-out text, a pretraining token folder, or labelled JSONL for a classifier) and
`--calib_data` (text or a token folder). Wanda and recovery need calibration data; 2:4 and structured pruning rank by
activations when there is some and by weight norms otherwise. Left empty, both come from the pretraining token
shards of the checkpoint's own run (`<run_dir>/pretrain/tokens`): validation windows for the report, training windows
for calibration, so the report never measures on calibration text (the same file for both is refused). Structured
pruning acts on every layer; with it, `--include`/`--exclude` select what is quantized.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from gptforge.artifacts import append_ledger, save_config, write_json
from gptforge.compress import report as rep
from gptforge.compress.quantize import INT4_GROUP_SIZES
from gptforge.runtime import Runtime
from gptforge.train import checkpoint as ckpt_lib
from gptforge.train import tasks
from gptforge.train.models import load_for_inference


class Config(tasks.TaskDataFields):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(..., description="Checkpoint folder, or a stage folder holding checkpoints (best, else newest).")
    run_dir: str = Field("runs/default", description="Outputs go to <run_dir>/compress/<name>/.")
    name: str = Field("", description="Output folder name; empty = derived from the methods, e.g. wanda50-int8.")
    quantize: Literal["none", "int8", "int8_dynamic", "int4"] = Field("int8", description="Weight quantization.")
    group_size: int = Field(64, description="int4: inputs per scale/zero group (32, 64, 128 or 256).")
    prune: Literal["none", "magnitude", "wanda", "2:4", "structured"] = Field("none", description="Pruning method.")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="magnitude/wanda: fraction of weights set to zero.")
    heads_keep: float = Field(1.0, gt=0.0, le=1.0, description="structured: fraction of attention heads kept.")
    mlp_keep: float = Field(0.75, gt=0.0, le=1.0, description="structured: fraction of MLP channels kept.")
    include: list[str] = Field(["*"], description="Globs of module names to compress, relative to the GPT body.")
    exclude: list[str] = Field([], description="Globs of module names left alone.")
    eval_data: str = Field("", description="Held-out text, token folder or labelled JSONL; empty = the run's val.")
    calib_data: str = Field("", description="Calibration text or token folder; empty = the run's train split.")
    calib_samples: int = Field(256, gt=0, description="Calibration sequences (Wanda, structured, recovery data).")
    eval_windows: int = Field(128, gt=0, description="At most this many held-out windows of block_size tokens.")
    recover_steps: int = Field(0, ge=0, description="Recovery fine-tuning steps after pruning (0 = none).")
    recover_lr: float = Field(1e-4, gt=0, description="Peak learning rate of recovery fine-tuning.")
    recover_batch: int = Field(8, gt=0, description="Sequences per recovery step.")
    decode_tokens: int = Field(64, ge=0, description="Tokens generated per decode-speed run; 0 skips the measurement.")
    repeats: int = Field(3, gt=0, description="Timed decode runs (median reported).")
    seed: int = Field(1337, description="Seed of calibration sampling and recovery.")
    device: str = Field("cpu", description="cpu, cuda, mps or auto (the int8/int4 kernels are CPU kernels).")
    dtype: str = Field("float32", description="Autocast of measurements and recovery: float32 or bfloat16.")
    threads: int = Field(0, ge=0, description="CPU threads; 0 keeps torch's default.")
    overwrite: bool = Field(False, description="Replace an existing output folder of the same name.")


def default_name(cfg: Config) -> str:
    parts = []
    if cfg.prune in ("magnitude", "wanda"):
        parts.append(f"{cfg.prune}{round(cfg.sparsity * 100)}")
    elif cfg.prune == "2:4":
        parts.append("sparse24")
    elif cfg.prune == "structured":
        parts.append(f"structured-h{round(cfg.heads_keep * 100)}-m{round(cfg.mlp_keep * 100)}")
    if cfg.quantize != "none":
        parts.append(cfg.quantize if cfg.quantize != "int4" else f"int4-g{cfg.group_size}")
    return "-".join(parts)


# --- data ---------------------------------------------------------------------------------------------------------


class _ArrayWindows:
    """In-memory (N, T+1) windows with the interface the trainer's WindowSampler reads."""

    def __init__(self, windows: np.ndarray) -> None:
        self.data, self.seq_len = windows, windows.shape[1] - 1

    def __len__(self) -> int:
        return len(self.data)

    def window(self, i: int) -> np.ndarray:
        return self.data[i]


def _run_tokens(meta: dict[str, Any], tok) -> Path | None:
    """The pretraining token folder of the checkpoint's run, when it exists and was made with this tokenizer."""
    run_dir = (meta.get("config") or {}).get("run_dir")
    folder = Path(run_dir) / "pretrain" / "tokens" if run_dir else None
    if folder and (folder / "meta.json").is_file():
        if json.loads((folder / "meta.json").read_text()).get("tokenizer_sha256") == tok.sha256():
            return folder
    return None


def _windows(path: str, split: str, cfg: Config, tok, meta: dict, block: int, limit: int, field: str):
    """(windows (N, T+1) int64, UTF-8 bytes per token) from a token folder split or a text file/folder."""
    from gptforge.data.shards import TokenWindows

    source = Path(path) if path else _run_tokens(meta, tok)
    if source is None:
        raise ValueError(
            f"--{field} is empty and the checkpoint's run has no pretraining token folder made with its tokenizer; "
            f"pass --{field} (a text file/folder or a token folder)"
        )
    folder_meta = json.loads((source / "meta.json").read_text()) if (source / "meta.json").is_file() else {}
    if "val_files" in folder_meta:
        if folder_meta.get("tokenizer_sha256") != tok.sha256():
            raise ValueError(f"--{field} {source}: its token ids come from another tokenizer than the checkpoint's")
        tw = TokenWindows(source, split, block)
        rng = np.random.default_rng(cfg.seed)
        # Evaluation takes the first windows (the same every run); calibration a seeded random sample.
        idx = np.arange(min(limit, len(tw))) if split == "val" else np.sort(rng.permutation(len(tw))[:limit])
        return np.stack([tw.window(int(i)) for i in idx]), tw.bytes / max(1, tw.tokens)
    report: dict = {}
    docs, nbytes = tasks.read_lm(str(source), cfg, tok, report, field)
    win = tasks.windows(docs, block)
    if split != "val":
        win = win[np.sort(np.random.default_rng(cfg.seed).permutation(len(win))[:limit])]
    return win[:limit], sum(nbytes) / max(1, sum(len(d) - 2 for d in docs))


# --- the stage ----------------------------------------------------------------------------------------------------


def run(cfg: Config, runtime: Runtime) -> dict:
    if cfg.quantize == "none" and cfg.prune == "none":
        raise ValueError("nothing to do: set --quantize (int8, int8_dynamic, int4) and/or --prune")
    if cfg.quantize == "int4" and cfg.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for int4, got {cfg.group_size}")
    if cfg.recover_steps and cfg.prune == "none":
        raise ValueError("recover_steps: recovery fine-tuning follows pruning; set --prune too")
    filtered = cfg.include != ["*"] or cfg.exclude
    if cfg.prune == "structured" and cfg.quantize == "none" and filtered:
        raise ValueError(
            "include/exclude: structured pruning cuts whole heads and channels of every layer; the filters select "
            "modules for quantization only"
        )
    name = cfg.name or default_name(cfg)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name {name!r} must be one folder name (letters, digits, '.', '_', '-')")
    if cfg.eval_data and cfg.calib_data and Path(cfg.eval_data).resolve() == Path(cfg.calib_data).resolve():
        raise ValueError("eval_data and calib_data are the same; the report must not measure on calibration text")
    out = Path(cfg.run_dir) / "compress" / name
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite or --name to write elsewhere")
        if not (out / "report.json").is_file():
            raise ValueError(f"{out} is not the output of a compress run (no report.json); refusing to replace it")
    model, tok, meta = load_for_inference(cfg.ckpt, runtime.device)
    if (meta.get("compression") or {}).get("quantization"):
        raise ValueError(f"{meta['checkpoint']} is already quantized; compress its float source instead")
    task = meta.get("task", "lm")
    gpt = getattr(model, "gpt", model)
    block = gpt.config.block_size
    if cfg.recover_steps and task == "classify":
        raise ValueError("recover_steps: recovery fine-tuning is for language models; fine-tune the classifier instead")

    lm_rows, bpt, classify = None, 0.0, None
    if task == "classify":
        from gptforge.data.sft import LabelMap

        if not cfg.eval_data:
            raise ValueError("a classifier's report needs labelled examples: pass --eval_data FILE.jsonl")
        labels = LabelMap.from_json(meta["labels"])
        examples, _ = tasks.read_classify(cfg.eval_data, cfg, tok, block, labels, {}, "eval_data")
        classify = {"examples": examples, "names": labels.names, "pad_id": tok.pad_id}
    else:
        win, bpt = _windows(cfg.eval_data, "val", cfg, tok, meta, block, cfg.eval_windows, "eval_data")
        lm_rows = (win[:, :-1], win[:, 1:])
    measure = dict(
        task=task, lm_rows=lm_rows, bytes_per_token=bpt, classify=classify, vocab_limit=tok.vocab_size,
        decode_tokens=cfg.decode_tokens, repeats=cfg.repeats,
    )  # fmt: skip
    print(f"measuring the source {meta['checkpoint']} ...", flush=True)
    before = rep.measure(model, runtime, **measure)

    # Wanda and recovery need data; 2:4 and structured rank by activations when there is data, by weights otherwise.
    calib = None
    needs = cfg.prune == "wanda" or cfg.recover_steps > 0
    wants = cfg.prune in ("2:4", "structured") and (cfg.calib_data or _run_tokens(meta, tok))
    if needs or wants:
        calib, _ = _windows(cfg.calib_data, "train", cfg, tok, meta, min(block, 256), cfg.calib_samples, "calib_data")
    pruning = None
    if cfg.prune != "none":
        model, pruning = _prune(cfg, model, calib)
    gpt = getattr(model, "gpt", model)
    recovery = _recover(cfg, gpt, calib, runtime) if cfg.recover_steps else None  # validated: only after pruning
    quant = None
    if cfg.quantize != "none":
        from gptforge.compress.quantize import quantize_model

        quant = quantize_model(model, cfg.quantize, cfg.include, cfg.exclude, cfg.group_size)
    model.eval()
    print("measuring the result ...", flush=True)
    after = rep.measure(model, runtime, **measure)

    new_meta = {k: v for k, v in meta.items() if k not in ("checkpoint", "time", "world_size", "step")}
    new_meta.update(model=gpt.config.model_dump(), lora=None, stage="compress")
    new_meta["compression"] = {
        "source": meta["checkpoint"], "quantization": quant, "pruning": pruning, "recovery": recovery,
    }  # fmt: skip
    # Everything is written to a temporary folder that replaces the old output only once complete: a crash leaves
    # the previous result intact.
    tmp = out.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = ckpt_lib.save(
        tmp / "checkpoints", int(meta.get("step") or 0), model, {}, new_meta, {}, runtime,
        tokenizer_file=Path(meta["checkpoint"]) / "tokenizer.json", keep_last=1,
    )  # fmt: skip
    after["size_bytes"] = (ckpt / "model.safetensors").stat().st_size  # the real file, to the byte
    change = rep.compare(before, after)
    final_ckpt = out / "checkpoints" / ckpt.name
    result = {"checkpoint": str(final_ckpt), "source": meta["checkpoint"], "task": task, "before": before}
    result.update(after=after, change=change, quantization=quant, pruning=pruning, recovery=recovery)
    write_json(tmp / "report.json", result)
    table = rep.markdown(before, after, change, f"compress {name}: {meta['checkpoint']}")
    (tmp / "report.md").write_text(table, encoding="utf-8")
    save_config(cfg, tmp)
    old = out.with_name(f".old-{name}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    ckpt = final_ckpt
    append_ledger(cfg.run_dir, f"compress/{name}", "ok", change)
    print(table)
    print(f"compressed checkpoint: {ckpt}\nreport: {out / 'report.md'}")
    return result


def _prune(cfg: Config, model: torch.nn.Module, calib: np.ndarray | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the pruned model, what was done). Structured pruning builds a new, smaller GPT (a classifier keeps its head)."""
    from gptforge.compress import prune

    gpt = getattr(model, "gpt", model)
    exclude = [*cfg.exclude, "lm_head"]
    batches = None
    if calib is not None:  # batches of 16 sequences: the calibration forward passes stay small
        batches = [torch.from_numpy(b[:, :-1]).long() for b in np.array_split(calib, max(1, len(calib) // 16))]
    info: dict[str, Any] = {"method": cfg.prune}
    if cfg.prune == "magnitude":
        info["sparsity"] = prune.magnitude_prune(gpt, cfg.sparsity, cfg.include, exclude)["overall"]
    elif cfg.prune == "wanda":
        info["sparsity"] = prune.wanda_prune(gpt, batches, cfg.sparsity, cfg.include, exclude)["overall"]
    elif cfg.prune == "2:4":
        info["sparsity"] = prune.semi_structured_prune(gpt, batches, 2, 4, cfg.include, exclude)["overall"]
    else:
        before = gpt.config
        small = prune.structured_prune(gpt, cfg.heads_keep, cfg.mlp_keep, batches)
        info.update(heads=[before.n_head, small.config.n_head], mlp=[before.hidden_dim, small.config.hidden_dim])
        if gpt is model:
            model = small
        else:
            model.gpt = small
    info["calibration_sequences"] = 0 if calib is None else len(calib)
    if cfg.prune in ("2:4", "structured"):
        info["importance"] = "activations" if calib is not None else "weights (no calibration data)"
    return model.eval(), info


def _recover(cfg: Config, gpt, calib: np.ndarray, runtime: Runtime) -> dict[str, Any]:
    """A short fine-tuning of the pruned model on the calibration windows: the pretraining loss, the shared trainer,
    and gradient masks that keep pruned weights at exactly zero."""
    from gptforge.compress.prune import mask_gradients
    from gptforge.data.sampler import WindowSampler
    from gptforge.train.optim import build_optimizer
    from gptforge.train.trainer import TrainConfig, Trainer

    tc = TrainConfig(
        max_steps=cfg.recover_steps, micro_batch_size=min(cfg.recover_batch, len(calib)), lr=cfg.recover_lr,
        warmup_steps=max(1, cfg.recover_steps // 10), weight_decay=0.0, log_every=max(1, cfg.recover_steps // 5),
        eval_every=cfg.recover_steps, save_every=cfg.recover_steps,
    )  # fmt: skip
    sampler = WindowSampler(_ArrayWindows(calib), tc.micro_batch_size, cfg.seed)
    handles = mask_gradients(gpt)
    optimizer = build_optimizer(gpt, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, runtime.device)
    losses: list[float] = []

    def log(rec: dict) -> None:
        if rec.get("loss") is not None:
            losses.append(rec["loss"])

    def next_batch():
        x, y = sampler.next_batch()
        return x.to(runtime.device), y.to(runtime.device)

    trainer = Trainer(
        gpt, optimizer, tc, runtime, next_batch, lambda m, b: m(b[0], b[1])[1], lambda b: b[0].numel(), log=log,
    )  # fmt: skip
    try:
        trainer.fit()
    finally:
        for h in handles:
            h.remove()
    gpt.eval()
    return {"steps": cfg.recover_steps, "lr": cfg.recover_lr, "first_loss": losses[0], "last_loss": losses[-1]}
