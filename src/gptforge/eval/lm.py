"""Language-model evaluation: mean token loss, perplexity and bits per byte.

Loss is summed in float64 over every target token that is not ignored (-100) and divided once at the end, so the
number does not depend on how the rows were batched. Bits per byte divide the total nats by the UTF-8 bytes of the
text the tokens encode: unlike perplexity it compares models with different tokenizers fairly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.runtime import Runtime


@torch.no_grad()
def token_nll(
    model: torch.nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    segments: np.ndarray | None,
    batch_size: int,
    runtime: Runtime,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of target tokens) over rows (N, T); targets -100 are skipped."""
    total, count = 0.0, 0
    for b in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[b : b + batch_size])).long().to(runtime.device)
        y = torch.from_numpy(np.ascontiguousarray(targets[b : b + batch_size])).long().to(runtime.device)
        seg = None
        if segments is not None:
            seg = torch.from_numpy(np.ascontiguousarray(segments[b : b + batch_size])).long().to(runtime.device)
        with runtime.autocast():
            logits, _ = model(x, segment_ids=seg)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        total += float(loss.double())
        count += int((y != -100).sum())
    return total, count


def lm_metrics(nll: float, tokens: int, n_bytes: int | None = None, prefix: str = "val_") -> dict[str, float]:
    """loss (nats/token), perplexity and, given the bytes the tokens encode, bits per byte."""
    if tokens == 0:
        raise ValueError("no target tokens to evaluate (every sequence was empty or fully masked)")
    loss = nll / tokens
    out = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0))}
    if n_bytes:
        out[f"{prefix}bpb"] = nll / math.log(2) / n_bytes
    return out


def windows_to_rows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, T+1) token windows -> inputs (N, T) and next-token targets (N, T)."""
    return windows[:, :-1], windows[:, 1:]
