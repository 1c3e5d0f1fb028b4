"""Stratified k-fold splits and the summary of per-fold metrics.

Folds are built the way scikit-learn's `StratifiedKFold` allocates them: list the examples class by class
(classes in order of first appearance), shuffle within each class with the seed, and deal them to folds round-robin
with one running counter. Hence every class is spread over the folds as evenly as possible (its counts differ by at
most 1), the fold sizes differ by at most 1 too, and the per-class fold sizes equal scikit-learn's fold for fold.
Unlike scikit-learn, a class with fewer members than folds is an error, not a warning: some folds would have no
example of it and their per-class metrics would be meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def stratified_kfold(labels: Sequence[int], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, val_idx) per fold, both sorted int64 arrays; each index is in exactly one val fold."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of class indices, got shape {y.shape}")
    n = len(y)
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer number of folds, got {k!r}")
    if k < 2:
        raise ValueError(f"k={k} folds: cross-validation needs k >= 2")
    if k > n:
        raise ValueError(f"k={k} folds but only n={n} examples: expected k <= n")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    classes, counts = np.unique(y, return_counts=True)
    small = [(int(c), int(m)) for c, m in zip(classes, counts) if m < k]
    if small:
        c, m = small[0]
        worst = min(m for _, m in small)
        hint = f"use k <= {worst}" if worst >= 2 else "merge or drop that class, or add examples"
        raise ValueError(
            f"class {c} has only {m} example(s), fewer than k={k} folds "
            f"({len(small)} class(es) too small: {small[:10]}); {hint}"
        )

    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)
    pos = 0  # one counter across classes keeps the total fold sizes within 1 of each other
    first_seen = np.unique(y, return_index=True)[1]
    for c in y[np.sort(first_seen)]:  # classes in order of first appearance, as scikit-learn deals them
        members = rng.permutation(np.flatnonzero(y == c))
        fold_of[members] = (pos + np.arange(len(members))) % k
        pos += len(members)

    everything = np.arange(n, dtype=np.int64)
    return [(everything[fold_of != f], everything[fold_of == f]) for f in range(k)]


def summarize_folds(fold_metrics: list[dict[str, float]]) -> dict[str, dict]:
    """{metric: {"mean", "std", "values"}} for every metric present in all folds (in the first fold's order).

    `std` is the *sample* standard deviation (ddof=1): the folds are a small sample of the train/val splits one
    could have drawn, and the number is read as "how much would the score move on another split". With k=5 the
    population formula (ddof=0, numpy's default) would understate that by a factor sqrt(4/5). One fold has no spread
    to estimate, so its std is 0.0 rather than NaN.
    """
    if not fold_metrics:
        raise ValueError("summarize_folds got no folds")
    common = [key for key in fold_metrics[0] if all(key in fm for fm in fold_metrics[1:])]
    out: dict[str, dict] = {}
    for key in common:
        values = []
        for i, fm in enumerate(fold_metrics):
            v = fm[key]
            if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
                raise ValueError(f"fold {i}: metric {key!r} = {v!r} is not a number")
            values.append(float(v))
        mean = math.fsum(values) / len(values)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "values": values}
    return out


def folds_table(summary: dict[str, dict]) -> str:
    """Markdown: metric | mean | std | per-fold values (4 decimals)."""
    lines = ["| metric | mean | std | per-fold values |", "|---|---:|---:|---|"]
    for key, s in summary.items():
        vals = ", ".join(f"{v:.4f}" for v in s["values"])
        lines.append(f"| {key} | {s['mean']:.4f} | {s['std']:.4f} | {vals} |")
    return "\n".join(lines) + "\n"
