"""Hyperparameter search helpers: grid and random trials over a small space, ranking and result files.

A search space is `{"lr": [1e-4, 3e-4], "epochs": [2, 3], ...}`. The grid is the Cartesian product with the keys in
the given order (the last key varies fastest), so trial numbers are stable across runs. Random search samples
distinct grid points by index (mixed-radix decoding), so it never materializes a huge grid and never repeats a
combination. Ranking treats a trial whose metric is missing or non-finite as failed and puts it last instead of
crashing: one diverged run must not lose the other trials' results.

`results.jsonl` is standard JSON (non-finite floats are written as null, which Python's json would otherwise emit
as the non-standard NaN/Infinity); a null metric ranks as failed when read back, as NaN did.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

from gptforge.artifacts import atomic_write_text


def _check_space(space: dict[str, list]) -> list[tuple[str, list]]:
    if not isinstance(space, dict) or not space:
        raise ValueError(f"search space must be a non-empty dict of name -> list of values, got {space!r}")
    items = []
    for key, values in space.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"search space key {key!r} must be a non-empty string")
        if not isinstance(values, list | tuple):
            raise ValueError(f"search space {key!r}: expected a list of values, got {type(values).__name__} {values!r}")
        if not values:
            raise ValueError(f"search space {key!r} has an empty list of values")
        for i, v in enumerate(values):
            if any(v == w and type(v) is type(w) for w in values[:i]):
                raise ValueError(f"search space {key!r} lists the value {v!r} twice")
        items.append((key, list(values)))
    return items


def grid_size(space: dict[str, list]) -> int:
    return math.prod(len(v) for _, v in _check_space(space))


def grid(space: dict[str, list]) -> list[dict]:
    """Every combination, keys in the given order, the last key varying fastest."""
    items = _check_space(space)
    keys = [k for k, _ in items]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in items))]


def _decode(index: int, items: list[tuple[str, list]]) -> dict:
    """The grid point at position `index` of `grid()` (mixed radix, last key fastest)."""
    out = {}
    for key, values in reversed(items):
        index, r = divmod(index, len(values))
        out[key] = values[r]
    return {k: out[k] for k, _ in items}


def random_trials(space: dict[str, list], n: int, seed: int) -> list[dict]:
    """n distinct grid points drawn without replacement (the whole grid, shuffled, when n >= its size)."""
    items = _check_space(space)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} trials: expected an integer >= 1")
    size = math.prod(len(v) for _, v in items)
    # random.Random.sample over a range draws indices without building the range, so huge grids cost nothing.
    picks = random.Random(seed).sample(range(size), min(n, size))
    return [_decode(i, items) for i in picks]


def _metric_value(row: dict, metric: str) -> float | None:
    """The row's finite metric value, or None when the trial failed to produce it."""
    metrics = row.get("metrics") if isinstance(row, dict) else None
    v = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def rank_results(rows: list[dict], metric: str, higher_is_better: bool) -> list[dict]:
    """Rows sorted best first; rows without a finite `metric` go last (in trial order). Ties keep trial order."""

    def key(row: dict) -> tuple:
        v = _metric_value(row, metric)
        trial = row.get("trial", 0) if isinstance(row, dict) else 0
        trial = trial if isinstance(trial, int | float) else 0
        if v is None:
            return (1, 0.0, trial)
        return (0, -v if higher_is_better else v, trial)

    return sorted(rows, key=key)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _fmt(v: Any, digits: str = ".4g") -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v).replace("|", "\\|").replace("\n", " ")
    if isinstance(v, int):
        return str(v)
    return format(v, digits) if math.isfinite(v) else str(v)


def _check_rows(rows: list[dict]) -> None:
    seen: dict[int, int] = {}
    for pos, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"results row {pos} is a {type(row).__name__}, expected a dict")
        trial = row.get("trial")
        if isinstance(trial, bool) or not isinstance(trial, int):
            raise ValueError(f"results row {pos}: 'trial' must be an integer, got {trial!r}")
        if trial in seen:
            raise ValueError(f"results rows {seen[trial]} and {pos} both have trial={trial}")
        seen[trial] = pos
        if not isinstance(row.get("params"), dict):
            raise ValueError(f"results row {pos} (trial {trial}): 'params' must be a dict, got {row.get('params')!r}")
        if "metrics" in row and not isinstance(row["metrics"], dict | type(None)):
            raise ValueError(f"results row {pos} (trial {trial}): 'metrics' must be a dict, got {row['metrics']!r}")


def results_table(rows: list[dict], metric: str, higher_is_better: bool) -> str:
    """Markdown, best first: rank, trial, every param, the metric, the other scalar metrics (and errors if any)."""
    ranked = rank_results(rows, metric, higher_is_better)
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    others = list(
        dict.fromkeys(
            k
            for r in rows
            for k, v in (r.get("metrics") or {}).items()
            if k != metric and isinstance(v, int | float) and not isinstance(v, bool)
        )
    )
    show_error = any("error" in r for r in rows)
    arrow = "higher is better" if higher_is_better else "lower is better"
    head = ["rank", "trial", *params, f"**{metric}** ({arrow})", *others] + (["error"] if show_error else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (2 + len(params)) + "---:|" * (1 + len(others))]
    if show_error:
        lines[1] += "---|"
    for rank, r in enumerate(ranked, 1):
        v = _metric_value(r, metric)
        m = r.get("metrics") or {}
        cells = [str(rank) if v is not None else "-", str(r["trial"])]
        cells += [_fmt(r["params"].get(p)) for p in params]
        cells.append(_fmt(v, ".4f") if v is not None else "failed")
        cells += [_fmt(m.get(k), ".4f") for k in others]
        if show_error:
            cells.append(_fmt(r.get("error")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out_dir: str | Path, metric: str, higher_is_better: bool) -> dict:
    """Write results.jsonl (trial order) and results.md (ranked) atomically; return the best row.

    The files are written even when every trial failed, so the failures are on disk; then ValueError is raised.
    """
    _check_rows(rows)
    out = Path(out_dir)
    by_trial = sorted(rows, key=lambda r: r["trial"])
    lines = []
    for r in by_trial:
        try:
            lines.append(json.dumps(_jsonable(r), ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as e:
            raise ValueError(f"trial {r['trial']}: row is not JSON-serializable ({e})") from e
    atomic_write_text(out / "results.jsonl", "".join(lines))
    atomic_write_text(out / "results.md", results_table(rows, metric, higher_is_better))
    ranked = rank_results(rows, metric, higher_is_better)
    if not ranked or _metric_value(ranked[0], metric) is None:
        raise ValueError(
            f"none of the {len(rows)} trial(s) produced a finite {metric!r}; see {out / 'results.md'} "
            f"(metrics present: {sorted({k for r in rows for k in (r.get('metrics') or {})})})"
        )
    return ranked[0]


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results.jsonl back, in file order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
