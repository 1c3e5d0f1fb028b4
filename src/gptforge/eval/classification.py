"""Classification metrics, their Markdown table and a confusion-matrix plot.

Everything derives from one confusion matrix over *all* classes of the task (`labels`), including classes absent
from this sample: a macro average that silently left out a never-predicted class would flatter the model. Division
by zero gives 0.0, exactly like scikit-learn's `zero_division=0`, and F1 is computed as `2 tp / (2 tp + fp + fn)`
(scikit-learn's formula) so the numbers match it to the last bit in practice; the tests use scikit-learn as oracle,
but it is never a runtime dependency.

The plot uses matplotlib's object API (no pyplot, so no global backend switch and no state shared between calls).
Labels are often Chinese and many machines have no CJK font: rather than let matplotlib draw empty boxes and warn
"Glyph missing", we look for an installed font that covers every character and otherwise draw indices on the axes
with an ASCII-escaped index -> label caption underneath. The trade-off is a less direct picture on such machines in
exchange for a plot that is always readable and a log that is always quiet.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.artifacts import atomic_write_bytes, write_json

AVERAGES = ("macro", "micro", "weighted")
SCORES = ("precision", "recall", "f1")
FLAT_KEYS = ("accuracy",) + tuple(f"{s}_{a}" for a in AVERAGES for s in SCORES)


def _as_indices(y: Sequence[int] | np.ndarray, name: str, n_labels: int) -> np.ndarray:
    """1-D int64 array of class indices; ValueError naming the first bad value and its position."""
    arr = np.asarray(y)
    if not isinstance(y, np.ndarray) and arr.dtype.kind not in "iu":
        arr = np.asarray(y, dtype=object)  # keep the items as given, so an error can show the offending one
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        # Check the original items (not a coerced copy, where [0, "b"] would become strings): integral floats like
        # 2.0 are accepted since they come out of numpy pipelines; 2.5, "b" or True are not.
        for pos, v in enumerate(arr.tolist()):
            ok = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
            if not ok or not float(v).is_integer():
                expected = f"expected an integer in 0..{n_labels - 1}"
                raise ValueError(f"{name}[{pos}] = {v!r} is not a class index ({expected})")
        arr = np.array([int(v) for v in arr.tolist()], dtype=np.int64)
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= n_labels))
    if bad.size:
        pos = int(bad[0])
        raise ValueError(
            f"{name}[{pos}] = {int(arr[pos])} is out of range for {n_labels} labels (expected 0..{n_labels - 1}); "
            f"{bad.size} such value(s) in total"
        )
    return arr


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den == 0 (scikit-learn's zero_division=0)."""
    num, den = num.astype(np.float64), den.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) int64 counts, rows = true class, columns = predicted class."""
    flat = np.bincount(y_true * n_labels + y_pred, minlength=n_labels * n_labels)
    return flat.reshape(n_labels, n_labels).astype(np.int64)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (per class and macro/micro/weighted) and the confusion matrix.

    `y_true`/`y_pred` are indices into `labels`, which lists every class of the task (absent ones included).
    """
    labels = [str(x) for x in labels]
    if not labels:
        raise ValueError("labels is empty: expected the list of every class name of the task")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"labels must be distinct, got duplicates {dup}")
    k = len(labels)
    t = _as_indices(y_true, "y_true", k)
    p = _as_indices(y_pred, "y_pred", k)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} items but y_pred has {len(p)}; expected one prediction per example")
    if len(t) == 0:
        raise ValueError("y_true and y_pred are empty: no examples to score")

    cm = confusion_matrix(t, p, k)
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    per = {
        "precision": _safe_div(tp, predicted),
        "recall": _safe_div(tp, support),
        "f1": _safe_div(2 * tp, support + predicted),
    }
    n = int(len(t))
    out: dict[str, Any] = {"n": n, "accuracy": float(tp.sum() / n), "labels": labels}
    for s in SCORES:
        out[f"{s}_macro"] = float(np.mean(per[s]))
        out[f"{s}_weighted"] = float(np.average(per[s], weights=support))  # sum(support) = n > 0
    # Micro averages pool the counts; with one label per example they all equal accuracy, computed the general way
    # anyway so a reader can check it.
    tp_all, pred_all, true_all = tp.sum(), predicted.sum(), support.sum()
    out["precision_micro"] = float(_safe_div(np.array([tp_all]), np.array([pred_all]))[0])
    out["recall_micro"] = float(_safe_div(np.array([tp_all]), np.array([true_all]))[0])
    out["f1_micro"] = float(_safe_div(np.array([2 * tp_all]), np.array([true_all + pred_all]))[0])
    out["per_class"] = {
        lab: {
            "precision": float(per["precision"][i]),
            "recall": float(per["recall"][i]),
            "f1": float(per["f1"][i]),
            "support": int(support[i]),
        }
        for i, lab in enumerate(labels)
    }
    out["confusion_matrix"] = cm.tolist()
    return out


def flat_metrics(m: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only: what a trainer logs per eval, CV averages and early stopping monitors."""
    missing = [key for key in FLAT_KEYS if key not in m]
    if missing:
        raise ValueError(f"not a classification_metrics() result: missing {missing}")
    return {key: float(m[key]) for key in FLAT_KEYS}


def _md_cell(text: str) -> str:
    """A label made safe for one Markdown table cell (pipes escaped, line breaks flattened)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def metrics_table(m: dict[str, Any]) -> str:
    """Markdown: one row per class, then macro / micro / weighted averages and accuracy (3 decimals)."""
    n = m["n"]
    lines = ["| class | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    for lab in m["labels"]:
        c = m["per_class"][lab]
        lines.append(f"| {_md_cell(lab)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    names = {"macro": "macro avg", "micro": "micro avg (= accuracy, single-label)", "weighted": "weighted avg"}
    for a in AVERAGES:
        p, r, f = (m[f"{s}_{a}"] for s in SCORES)
        lines.append(f"| **{names[a]}** | {p:.3f} | {r:.3f} | {f:.3f} | {n} |")
    lines.append(f"| **accuracy** |  |  | {m['accuracy']:.3f} | {n} |")
    return "\n".join(lines) + "\n"


def _check_cm(cm: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str]) -> np.ndarray:
    arr = np.asarray(cm)
    k = len(labels)
    if arr.ndim != 2 or arr.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {arr.shape}, expected ({k}, {k}) for {k} labels")
    if arr.size and (arr.dtype.kind not in "iuf" or (arr < 0).any()):
        raise ValueError("confusion matrix must hold non-negative counts")
    return arr


def write_confusion_json(cm: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], path: str | Path) -> None:
    """{"labels": [...], "matrix": [[...]]} with rows = true class, columns = predicted; written atomically."""
    arr = _check_cm(cm, labels)
    labels = [str(x) for x in labels]
    write_json(path, {"labels": labels, "rows": "true", "columns": "predicted", "matrix": arr.tolist()})


@functools.cache
def _charmap(fname: str) -> frozenset[int]:
    """Code points a font file covers (cached: reading a charmap costs a few ms and fonts do not change)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(fname).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def find_font_for(text: str) -> str | None:
    """Path of an installed font covering every character of `text`: the default font first, then any other.

    matplotlib's "Last Resort" font maps every code point to a placeholder box, so it does not count as coverage.
    """
    from matplotlib import font_manager

    needed = {ord(ch) for ch in text if ch not in "\n"}
    default = font_manager.findfont(font_manager.FontProperties(), fallback_to_default=True)
    others = sorted({f.fname for f in font_manager.fontManager.ttflist})
    for fname in [default, *others]:
        if "lastresort" in Path(fname).name.lower():
            continue
        if needed <= _charmap(fname):
            return fname
    return None


def display_labels(labels: Sequence[str], font_for=find_font_for) -> tuple[list[str], str | None, str]:
    """(tick labels, font path or None, caption) for the plot.

    With a covering font the ticks are the labels themselves. Without one they are indices "0", "1", ... and the
    caption maps each index to `ascii(label)` (e.g. '\\u4f53\\u80b2'), which any font can draw.
    """
    labels = [str(x) for x in labels]
    font = font_for("".join(labels))
    if font is not None:
        return labels, font, ""
    per_line = 4 if max(len(ascii(x)) for x in labels) < 28 else 2
    entries = [f"{i}: {ascii(x)}" for i, x in enumerate(labels)]
    rows = ["    ".join(entries[i : i + per_line]) for i in range(0, len(entries), per_line)]
    caption = "No installed font covers these labels; index -> label:\n" + "\n".join(rows)
    return [str(i) for i in range(len(labels))], None, caption


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """A PNG of the matrix: counts in the cells, shading by row-normalized rate (recall per true class).

    Row-normalizing the colour keeps a rare class's mistakes visible next to a frequent class's; the counts stay
    printed so nothing is hidden. Works for 2..50 classes (the figure and fonts scale with the class count).
    """
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    arr = _check_cm(cm, labels)
    k = len(labels)
    if k < 1:
        raise ValueError("plot_confusion_matrix needs at least one label")
    rows = arr.sum(axis=1, keepdims=True).astype(np.float64)
    rate = np.divide(arr, rows, out=np.zeros(arr.shape, dtype=np.float64), where=rows != 0)

    ticks, font, caption = display_labels(labels)
    tick_font = FontProperties(fname=font) if font else None
    if title and find_font_for(title) is None:
        title = ascii(title)[1:-1]  # escaped, without the quotes repr adds

    side = max(4.0, min(24.0, 0.45 * k + 2.5))  # inches; 50 classes -> 24 in
    # A cell is ~0.45 in (32 pt) wide, so 8 pt fits a three-digit count at 50 classes.
    cell_font = 10.0 if k <= 10 else 8.0
    tick_size = 10.0 if k <= 10 else 8.0
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row-normalized rate")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    # parse_math=False: a label like "$5 off" must not go through mathtext (which logs missing glyphs on its own).
    rotate = 90 if (k > 8 or max(len(t) for t in ticks) > 6) else 0
    ax.set_xticklabels(ticks, fontproperties=tick_font, fontsize=tick_size, rotation=rotate, parse_math=False)
    ax.set_yticklabels(ticks, fontproperties=tick_font, fontsize=tick_size, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, parse_math=False)
    for i in range(k):
        for j in range(k):
            if arr[i, j] or k <= 20:  # zeros are printed while they still help, and left blank when they clutter
                val = arr[i, j]
                txt = str(int(val)) if float(val).is_integer() else f"{val:.2g}"
                color = "white" if rate[i, j] > 0.5 else "black"
                ax.text(j, i, txt, ha="center", va="center", fontsize=cell_font, color=color, parse_math=False)
    if caption:
        # Anchored under the x-axis label (whatever height the rotated ticks take), left-aligned with the axes.
        ax.annotate(
            caption,
            xy=(0.0, 0.0),
            xycoords=("axes fraction", ax.xaxis.label),
            xytext=(0, -8),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            family="monospace",
            parse_math=False,
            annotation_clip=False,
        )

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())  # temp file + rename: a reader never sees half a PNG
    return path
