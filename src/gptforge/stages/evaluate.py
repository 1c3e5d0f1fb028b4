"""`gptforge evaluate --ckpt DIR --data FILE`: measure a checkpoint on held-out data.

What is measured follows the checkpoint's task (or `--task`):
- `lm` (pretrained or continued-pretrained models, on text files/folders): loss, perplexity and bits per byte.
- `chat` (on JSONL conversations): loss and perplexity on the assistant tokens, and the model's replies to the first
  `--samples` conversations next to the reference answers (samples.jsonl).
- `classify` (on JSONL {text, label}): accuracy, precision, recall and F1 (macro, micro, weighted and per class), a
  confusion matrix (confusion.png and confusion.json) and every prediction with its probabilities (predictions.jsonl).
  A label the model was never trained on is an error naming it (or, with --bad_records skip, a counted skip).

Writes under `<run_dir>/evaluate/<name>/` (name defaults to the task): metrics.json, metrics.md, config.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from gptforge.artifacts import append_ledger, save_config, write_json
from gptforge.runtime import Runtime
from gptforge.train import tasks
from gptforge.train.models import load_for_inference


class Config(tasks.TaskDataFields):
    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(..., description="Checkpoint folder, or a stage folder holding checkpoints (best, else newest).")
    data: str = Field(..., description="Held-out data: text file/folder (lm) or JSONL (chat, classify).")
    run_dir: str = Field("runs/default", description="Outputs go to <run_dir>/evaluate/<name>/.")
    name: str = Field("", description="Output folder name; empty = the task name.")
    task: Literal["auto", "lm", "chat", "classify"] = Field("auto", description="auto = the checkpoint's task.")
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass.")
    samples: int = Field(8, ge=0, description="Chat: conversations to generate replies for.")
    seed: int = Field(1337, description="Seed of generation.")
    device: str = Field("auto", description="auto, cpu, cuda or mps.")
    dtype: str = Field("float32", description="float32 or bfloat16 autocast.")


def run(cfg: Config, runtime: Runtime) -> dict:
    model, tok, meta = load_for_inference(cfg.ckpt, runtime.device)
    model_task = meta.get("task", "lm")
    task = model_task if cfg.task == "auto" else cfg.task
    if (task == "classify") != (model_task == "classify"):
        raise ValueError(f"task={task} does not fit checkpoint {meta['checkpoint']}, a {model_task} model")
    out = Path(cfg.run_dir) / "evaluate" / (cfg.name or task)
    out.mkdir(parents=True, exist_ok=True)
    block = model.config.block_size if task != "classify" else model.gpt.config.block_size
    report: dict = {}
    result: dict = {"checkpoint": meta["checkpoint"], "task": task, "data": cfg.data}
    if task == "classify":
        from gptforge.data.sft import LabelMap
        from gptforge.eval.classification import metrics_table, plot_confusion_matrix, write_confusion_json

        labels = LabelMap.from_json(meta["labels"])
        examples, _ = tasks.read_classify(cfg.data, cfg, tok, block, labels, report, "data")
        if not examples:
            raise ValueError(f"{cfg.data}: no usable labelled examples")
        flat, full, probs = tasks.classify_metrics(model, examples, labels.names, tok.pad_id, cfg.batch_size, runtime)
        tasks.write_predictions(out / "predictions.jsonl", examples, probs, labels.names)
        write_confusion_json(full["confusion_matrix"], labels.names, out / "confusion.json")
        plot_confusion_matrix(full["confusion_matrix"], labels.names, out / "confusion.png", title=Path(cfg.data).name)
        table = metrics_table(full)
        result["metrics"] = full
        print(table)
        print(f"predictions: {out / 'predictions.jsonl'}; confusion matrix: {out / 'confusion.png'}")
    elif task == "chat":
        from gptforge.data.sft import pack
        from gptforge.eval.lm import lm_metrics, token_nll

        messages: dict = {}
        samples = tasks.read_chat(cfg.data, cfg, tok, block, report, "data", messages)
        if not samples:
            raise ValueError(f"{cfg.data}: no usable conversations")
        rows = pack(samples, block, tok.pad_id, True)
        nll, n = token_nll(model, rows.inputs, rows.targets, rows.segments, cfg.batch_size, runtime)
        result["metrics"] = lm_metrics(nll, n, prefix="")
        prep = tasks.Prepared("chat", samples, None, messages=messages)
        replies = tasks.chat_samples(model, tok, prep, samples, cfg.samples, runtime, cfg.seed)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in replies)
        (out / "samples.jsonl").write_text(text, encoding="utf-8")
        table = _scalar_table(result["metrics"])
        print(table)
        for r in replies:
            print(f"--- {r['prompt']!r}\nreference: {r['reference']}\nmodel:     {r['reply']}")
    else:
        from gptforge.eval.lm import lm_metrics, token_nll, windows_to_rows

        docs, nbytes = tasks.read_lm(cfg.data, cfg, tok, report, "data")
        windows = tasks.windows(docs, block)
        x, y = windows_to_rows(windows)
        nll, n = token_nll(model, x, y, None, cfg.batch_size, runtime)
        text_tokens = sum(len(d) - 2 for d in docs)
        result["metrics"] = lm_metrics(nll, n, int(round(sum(nbytes) / text_tokens * n)), prefix="")
        table = _scalar_table(result["metrics"])
        print(table)
    result["data_report"] = report
    write_json(out / "metrics.json", result)
    (out / "metrics.md").write_text(table + "\n", encoding="utf-8")
    save_config(cfg, out)
    scalars = {k: v for k, v in result["metrics"].items() if isinstance(v, float)}
    append_ledger(cfg.run_dir, f"evaluate/{cfg.name or task}", "ok", scalars)
    return result


def _scalar_table(metrics: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    return "\n".join(rows)
