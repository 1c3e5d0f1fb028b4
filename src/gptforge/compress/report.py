"""Before/after measurements of a compressed model, and the table that puts them side by side.

Every compress run measures the source and the result the same way: size of the weights file on disk, parameter
count, loss / perplexity / bits per byte on the same held-out windows (language models) or accuracy / F1 on the
same labelled examples (classifiers), and batch-1 greedy decode speed through the serving engine (the path
`gptforge serve` runs). Decode speed is the median of `repeats` timed runs after one warm-up run, so one slow
moment of a shared machine does not decide it; it is still a wall-clock number, so compare the ratio, not the value.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model

from gptforge.compress.quantize import logical_params
from gptforge.runtime import Runtime


def file_size(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as one safetensors file (what a checkpoint stores; shared tensors once)."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        save_model(model, str(f))
        return f.stat().st_size


@torch.no_grad()
def decode_speeds(
    models: dict[str, torch.nn.Module],
    vocab_limit: int,
    new_tokens: int = 64,
    prompt_tokens: int = 16,
    repeats: int = 3,
) -> dict[str, float]:
    """Median tokens/s of batch-1 greedy decoding with the serving engine (prefill included, EOS ignored), per model.
    Timed runs are interleaved across the models (A B C, A B C, ...) so drift of a shared machine hits all alike."""
    from gptforge.engine import Engine, SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_limit, (prompt_tokens,), generator=gen).tolist()
    block = min(m.config.block_size for m in models.values())
    new_tokens = max(1, min(new_tokens, block - prompt_tokens))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engines = {
        k: Engine(m, max_batch_size=1, max_seq_len=prompt_tokens + new_tokens, vocab_limit=vocab_limit)
        for k, m in models.items()
    }
    for e in engines.values():
        e.generate([prompt], params)  # warm-up: allocations, packed kernels, thread pools
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):
        for k, e in engines.items():
            t0 = time.perf_counter()
            out = e.generate([prompt], params)
            times[k].append(time.perf_counter() - t0)
            assert len(out[0]) == new_tokens  # the timed call really produced every token
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def decode_tokens_per_s(
    model: torch.nn.Module, vocab_limit: int, new_tokens: int = 64, prompt_tokens: int = 16, repeats: int = 3
) -> float:
    return decode_speeds({"model": model}, vocab_limit, new_tokens, prompt_tokens, repeats)["model"]


def lm_quality(model: torch.nn.Module, rows: tuple[np.ndarray, np.ndarray], bytes_per_token: float, runtime: Runtime):
    """loss, ppl and bpb of `model` on fixed (inputs, targets) rows."""
    from gptforge.eval.lm import lm_metrics, token_nll

    x, y = rows
    nll, n = token_nll(model, x, y, None, 8, runtime)
    return lm_metrics(nll, n, int(round(bytes_per_token * n)), prefix="")


def measure(
    model: torch.nn.Module,
    runtime: Runtime,
    task: str,
    lm_rows: tuple[np.ndarray, np.ndarray] | None = None,
    bytes_per_token: float = 0.0,
    classify: dict[str, Any] | None = None,
    vocab_limit: int = 0,
    decode_tokens: int = 64,
    repeats: int = 3,
) -> dict[str, Any]:
    """One column of the report. `classify` = {examples, names, pad_id, batch_size} for classifiers."""
    out: dict[str, Any] = {"size_bytes": file_size(model), "params": logical_params(model)}
    if task == "classify" and classify:
        from gptforge.train.tasks import classify_metrics

        flat, _, _ = classify_metrics(model, classify["examples"], classify["names"], classify["pad_id"], 16, runtime)
        out.update({k.removeprefix("val_"): v for k, v in flat.items()})
    elif lm_rows is not None:
        out.update(lm_quality(model, lm_rows, bytes_per_token, runtime))
    if task != "classify" and decode_tokens > 0:
        out["decode_tok_s"] = decode_tokens_per_s(model, vocab_limit, decode_tokens, repeats=repeats)
    return out


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Ratios and changes: size_ratio, params_ratio, ppl_delta_pct, bpb_delta_pct, decode_speedup, metric deltas."""
    out: dict[str, Any] = {
        "size_ratio": after["size_bytes"] / before["size_bytes"],
        "params_ratio": after["params"] / before["params"],
    }
    for k in ("ppl", "bpb", "loss"):
        if k in before and k in after:
            out[f"{k}_delta_pct"] = 100.0 * (after[k] - before[k]) / before[k]
    if before.get("decode_tok_s") and after.get("decode_tok_s"):
        out["decode_speedup"] = after["decode_tok_s"] / before["decode_tok_s"]
    for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        if k in before and k in after:
            out[f"{k}_delta"] = after[k] - before[k]
    return out


def markdown(before: dict[str, Any], after: dict[str, Any], change: dict[str, Any], title: str) -> str:
    def fmt(k: str, v: Any) -> str:
        if v is None:
            return "-"
        if k == "size_bytes":
            return f"{v / 1e6:,.2f} MB"
        if k == "params":
            return f"{v / 1e6:,.2f} M"
        if isinstance(v, float):
            return f"{v:,.1f}" if k == "decode_tok_s" else f"{v:.4f}"
        return str(v)

    keys = [k for k in before if isinstance(before[k], (int, float))]
    names = {"size_bytes": "size on disk", "params": "parameters", "decode_tok_s": "decode tokens/s (batch 1)"}
    rows = [f"## {title}", "", "| | before | after |", "|---|---:|---:|"]
    rows += [f"| {names.get(k, k)} | {fmt(k, before.get(k))} | {fmt(k, after.get(k))} |" for k in keys]
    rows += ["", "| change | value |", "|---|---:|"]
    for k, v in change.items():
        unit = " %" if k.endswith("_pct") else ("x" if k.endswith(("ratio", "speedup")) else "")
        rows.append(f"| {k} | {v:+.3f}{unit} |" if k.endswith(("_pct", "_delta")) else f"| {k} | {v:.3f}{unit} |")
    return "\n".join(rows) + "\n"
