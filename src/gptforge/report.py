"""One page for a whole run: `report.md` and a self-contained `report.html` rendered from a run directory.

Reads whatever the stages left (ledger.jsonl, clean/, augment/, tokenizer/, pretrain/, finetune/*/, evaluate/*/,
generate/, compress/*/, export/, serve/) and writes one section per stage present, in pipeline order, plus its own
loss plots. No other stage imports this module: the report is a view over files, so it can be rendered again at any
time, on another machine, from a copied run folder.

This module collects: it reads the files and builds the page as a small list of blocks (heading, paragraph, table,
image, link, code, sample); `gptforge.report_render` writes those blocks out as Markdown and as self-contained HTML
(and holds the escaping and inlining trade-offs).

Trade-offs:
- Sections are built once as blocks and rendered twice, so the Markdown and the HTML cannot drift apart; numbers
  are formatted here (`fmt`), once, so both pages show the same digits.
- A missing stage is an absent section; a malformed file becomes a warning naming the file, never a crash: a report
  is most needed for the run that went wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.artifacts import atomic_write_text
from gptforge.report_render import Block, render_html, render_markdown

STAGE_DIRS = ("clean", "augment", "tokenizer", "pretrain", "finetune", "evaluate", "generate", "compress", "export")
# Ledger headline: the first three of these keys (dotted paths into a stage's metrics) that the stage reported.
HEADLINE_KEYS = (
    "records.kept", "records.in", "records_out", "vocab_size", "zh.chars_per_token", "en.chars_per_token",
    "val.val_loss", "val.val_ppl", "val_f1_macro", "val_accuracy", "val_loss", "val_ppl", "accuracy", "f1_macro",
    "loss", "ppl", "bpb", "size_ratio", "ppl_delta_pct", "accuracy_delta", "decode_speedup", "bytes",
)  # fmt: skip
MODEL_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "norm", "mlp", "pos", "dropout")
TRAIN_KEYS = ("max_steps", "micro_batch_size", "grad_accum", "lr", "warmup_steps", "decay", "weight_decay")
SUMMARY_KEYS = ("steps", "tokens", "params", "seconds", "tokens_per_s", "skipped_steps", "stop_reason", "best_val_loss")
VAL_KEYS = ("val_loss", "val_ppl", "val_bpb", "val_accuracy", "val_f1_macro")
FT_KEYS = ("steps", "epochs", "best_step", "monitor", "best", "stop_reason", "seconds")
EXPORT_KEYS = ("format", "out", "architecture", "model_type", "qtype", "dtype", "num_params", "checkpoint", "step")
# Compression table columns: (heading, part of report.json, key); sizes print in MB.
COMPRESS_COLS = (
    ("size before", "before", "size_bytes"), ("size after", "after", "size_bytes"),
    ("size ratio", "change", "size_ratio"), ("ppl before", "before", "ppl"), ("ppl after", "after", "ppl"),
    ("ppl change", "change", "ppl_delta_pct"), ("accuracy change", "change", "accuracy_delta"),
    ("decode speedup", "change", "decode_speedup"),
)  # fmt: skip
MAX_SAMPLES = 3  # per evaluation or fine-tuning run; the generate stage's prompts are all shown, up to 8
MAX_SAMPLE_CHARS = 600


@dataclass
class _Ctx:
    """What the section builders share: where things are, the plots made, and what went wrong so far."""

    run: Path
    out: Path
    warnings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    current: str = ""  # the file read last, named by the warning if its section fails

    def rel(self, p: Path) -> str:
        return Path(os.path.relpath(p, self.run)).as_posix()

    def text(self, path: Path) -> str | None:
        self.current = self.rel(path)
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.warnings.append(f"{self.current}: unreadable ({e}); skipped")
            return None

    def parse(self, path: Path, loads: Any, what: str) -> Any:
        if (text := self.text(path)) is None:
            return None
        try:
            return loads(text)
        except Exception as e:  # noqa: BLE001 - json and yaml raise different errors; both mean "malformed"
            self.warnings.append(f"{self.current}: not valid {what} ({str(e).splitlines()[0]}); skipped")
            return None

    def json(self, path: Path, kind: type = dict) -> Any:
        obj = self.parse(path, json.loads, "JSON")
        if obj is not None and not isinstance(obj, kind):
            self.warnings.append(f"{self.current}: expected a JSON {kind.__name__}, found {type(obj).__name__}")
            return None
        return obj

    def yaml(self, path: Path) -> dict:
        import yaml

        obj = self.parse(path, yaml.safe_load, "YAML")
        return obj if isinstance(obj, dict) else {}

    def jsonl(self, path: Path) -> list[dict]:
        """The records of a JSONL file; bad lines are counted in one warning (file:first bad line), not lost."""
        rows, bad = [], []
        for i, line in enumerate((self.text(path) or "").splitlines(), 1):
            try:
                rec = json.loads(line) if line.strip() else {}
            except ValueError:
                rec = None
            if isinstance(rec, dict) and rec:
                rows.append(rec)
            elif rec != {}:
                bad.append(i)
        if bad:
            self.warnings.append(f"{self.current}:{bad[0]}: {len(bad)} line(s) not a JSON object; skipped")
        return rows


def fmt(v: Any, key: str = "") -> str:
    """The one number format of both pages (tests trace numbers in the Markdown back to the JSON with it)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if key.endswith("_pct"):
            return f"{v:+.3f} %"
        if key.endswith("_delta"):
            return f"{v:+.4f}"
        if key.endswith(("ratio", "speedup")):
            return f"{v:.3f}x"
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.3g}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"  # a learning rate of 3e-05 must not print as 0
    if isinstance(v, (dict, list)):
        return _clip(json.dumps(v, ensure_ascii=False), 160)
    return str(v)


def _mb(v: Any) -> str:
    return f"{v / 1e6:.2f} MB" if _is_num(v) else "–"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else f"{text[:n]}… ({len(text) - n} more characters)"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _obj(d: Any, key: str) -> dict:
    """d[key] when it is a JSON object, else {} (a missing or odd part renders as absent, not as a crash)."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _kv(d: dict, keys: Any = None, prefix: str = "") -> list[list[str]]:
    """[name, value] rows of d's scalar entries (all, or those of `keys` present)."""
    keys = d.keys() if keys is None else [k for k in keys if k in d]
    return [[f"{prefix}{k}", fmt(d[k], k)] for k in keys if not isinstance(d[k], (dict, list))]


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []


def _img(path: Path, caption: str) -> list[Block]:
    return [("img", path, caption)] if path.is_file() else []


def _links(ctx: _Ctx, d: Path, names: tuple[str, ...]) -> list[Block]:
    return [("link", ctx.rel(d / n), d / n) for n in names if (d / n).is_file()]


def _samples(rows: list, fields: tuple[str, ...], where: str, most: int = MAX_SAMPLES) -> list[Block]:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return []
    out: list[Block] = [("p", f"{min(len(rows), most)} of {len(rows)} samples (all in {where}):")]
    for r in rows[:most]:
        out.append(("sample", [(f, _clip(str(r[f]), MAX_SAMPLE_CHARS)) for f in fields if r.get(f) is not None]))
    return out


# ---------------------------------------------------------------- sections, in pipeline order


def _overview(ctx: _Ctx) -> list[Block]:
    out: list[Block] = [("p", f"Run directory {ctx.run.resolve()}; report written {time.strftime('%Y-%m-%d %H:%M')}.")]
    if not (ctx.run / "ledger.jsonl").is_file():
        return out + [("p", "No ledger.jsonl: the sections below are read from the stage folders alone.")]
    rows = []
    for e in ctx.jsonl(ctx.run / "ledger.jsonl"):
        m = _flat(_obj(e, "metrics"))
        keys = [k for k in HEADLINE_KEYS if k in m and not isinstance(m[k], (dict, list))][:3]
        headline = ", ".join(f"{k} = {fmt(m[k], k)}" for k in keys or [k for k, v in m.items() if _is_num(v)][:2])
        rows.append([fmt(e.get("stage")), fmt(e.get("status")), fmt(e.get("time")), headline])
    return out + [("table", ["stage", "status", "time", "headline"], rows)]


def _data(ctx: _Ctx) -> list[Block]:
    d, out = ctx.run / "clean", []
    stats = ctx.json(d / "stats.json")
    if stats is not None:
        rec, files = _obj(stats, "records"), _obj(stats, "files")
        rows, total = [["kept", fmt(rec.get("kept"))]], rec.get("kept") or 0
        for outcome in ("dropped", "deduplicated", "quarantined"):
            for reason, n in _obj(rec, outcome).items():
                rows.append([f"{outcome}: {reason}", fmt(n)])
                total += n if _is_num(n) else 0
        rows.append(["total in", fmt(rec.get("in"))])
        out += [("p", "Records (clean/stats.json):"), ("table", ["outcome", "records"], rows)]
        if _is_num(rec.get("in")) and total != rec["in"]:
            ctx.warnings.append(f"clean/stats.json: the outcomes add up to {total} records, not {rec['in']}")
        frows = [["ok", fmt(files.get("ok"))]]
        frows += [[f"{o}: {r}", fmt(n)] for o in ("skipped", "quarantined") for r, n in _obj(files, o).items()]
        out += [("table", ["files", "count"], frows + [["total in", fmt(files.get("in"))]])]
        if langs := {k: v for k, v in _obj(stats, "languages").items() if isinstance(v, dict)}:
            names = list(dict.fromkeys(n for v in langs.values() for n in v))  # languages (columns: before, after)
            out += [("table", ["documents", *langs], [[n] + [fmt(v.get(n)) for v in langs.values()] for n in names])]
        if enc := _obj(stats, "encodings"):
            out += [("table", ["encoding", "files"], _kv(enc))]
        out += _img(d / "report" / "outcomes.png", "record outcomes (the clean stage's plot)")
        out += _links(ctx, d, ("report.html", "report.md"))
    aug = ctx.json(ctx.run / "augment" / "stats.json")
    if aug is not None:
        rows = _kv(aug, ("records_in", "copies_out", "records_out", "seconds"))
        out += [("p", "Augmentation (augment/stats.json):"), ("table", ["", "value"], rows)]
    return out


def _tokenizer(ctx: _Ctx) -> list[Block]:
    s = ctx.json(ctx.run / "tokenizer" / "stats.json")
    if s is None:
        return []
    rows = _kv(s, ("vocab_size", "requested_vocab_size", "train_seconds", "measured_on"))
    cols = ("chars", "bytes", "tokens", "chars_per_token", "bytes_per_token")
    langs = [[k] + [fmt(v.get(c), c) for c in cols] for k, v in s.items() if isinstance(v, dict) and "tokens" in v]
    return [("table", ["", "value"], rows)] + ([("table", ["language", *cols], langs)] if langs else [])


def _curves(ctx: _Ctx, d: Path, stem: str, label: str) -> list[Block]:
    """Final and best evaluation of metrics.jsonl, tokens/s, and our loss plot (else the stage's loss.png)."""
    rows = ctx.jsonl(d / "metrics.jsonl")
    evals = [r for r in rows if _is_num(r.get("val_loss")) and _is_num(r.get("step"))]
    out: list[Block] = []
    if evals:
        cols = [k for k in VAL_KEYS if any(k in r for r in evals)]
        pick = (("final", evals[-1]), ("lowest val_loss", min(evals, key=lambda r: r["val_loss"])))
        table = [[name, fmt(r["step"])] + [fmt(r.get(k), k) for k in cols] for name, r in pick]
        out += [("p", f"Evaluations ({ctx.rel(d / 'metrics.jsonl')}):"), ("table", ["eval", "step", *cols], table)]
    if speeds := [r["tok_s"] for r in rows if _is_num(r.get("tok_s"))]:
        out.append(("p", f"Mean speed {fmt(sum(speeds) / len(speeds))} tokens/s over {len(speeds)} logged intervals."))
    if png := _plot_losses(ctx, rows, stem):
        return out + [("img", png, f"{label}: train and validation loss")]
    return out + _img(d / "loss.png", f"{label}: loss (the stage's plot)")


def _pretraining(ctx: _Ctx) -> list[Block]:
    d, out = ctx.run / "pretrain", []
    if not d.is_dir():
        return []
    if cfg := ctx.yaml(d / "config.yaml"):
        rows = _kv(_obj(cfg, "model"), MODEL_KEYS, "model.") + _kv(_obj(cfg, "train"), TRAIN_KEYS, "train.")
        out += [("p", "Configuration (pretrain/config.yaml):"), ("table", ["setting", "value"], rows)]
    if (s := ctx.json(d / "summary.json")) is not None:
        rows = _kv(s, SUMMARY_KEYS) + _kv(_obj(s, "val"), None, "final ")
        out += [("p", "Summary (pretrain/summary.json):"), ("table", ["", "value"], rows)]
    return out + _curves(ctx, d, "loss_pretrain", "pretrain")


def _finetuning(ctx: _Ctx) -> list[Block]:
    table, detail = [], []
    for d in _subdirs(ctx.run / "finetune"):
        if not (d / "summary.json").is_file() and not (d / "metrics.jsonl").is_file():
            continue
        s = ctx.json(d / "summary.json") or {}
        data, val = _obj(s, "data"), _obj(s, "val")
        row = [d.name, fmt(ctx.yaml(d / "config.yaml").get("task"))] + [fmt(s.get(k)) for k in FT_KEYS]
        table.append(row + [fmt(data.get("train_items")), fmt(data.get("val_items"))])
        detail.append(("h", 3, f"finetune/{d.name}", ""))
        if rows := _kv(val):
            detail += [("p", f"Final validation ({d.name}/summary.json):"), ("table", ["metric", "value"], rows)]
        # Plot names must be safe file names and distinct even for runs whose names differ only in non-ASCII.
        stem = "loss_finetune_" + re.sub(r"[^A-Za-z0-9_.-]", "_", d.name)
        stem += "" if stem.endswith(d.name) else "_" + hashlib.sha1(d.name.encode()).hexdigest()[:8]
        detail += _curves(ctx, d, stem, f"finetune/{d.name}")
        detail += _img(d / "confusion.png", f"finetune/{d.name}: confusion matrix (validation split)")
        chat = val["samples"] if isinstance(val.get("samples"), list) else ctx.jsonl(d / "samples.jsonl")
        detail += _samples(chat, ("prompt", "reference", "reply"), ctx.rel(d))
        detail += _links(ctx, d, ("metrics.md", "cv/cv.md", "search/results.md"))
    head = ["run", "task", "steps", "epochs", "best step", "monitor", "best", "stop reason", "seconds", "train", "val"]
    return [("table", head, table), *detail] if table else []


def _evaluation(ctx: _Ctx) -> list[Block]:
    out: list[Block] = []
    for d in _subdirs(ctx.run / "evaluate"):
        if (r := ctx.json(d / "metrics.json")) is None:
            continue
        m = _obj(r, "metrics")
        what = f"task {fmt(r.get('task'))}; checkpoint {fmt(r.get('checkpoint'))}; data {fmt(r.get('data'))}"
        out += [("h", 3, f"evaluate/{d.name}", ""), ("p", what)]
        if per_class := _obj(m, "per_class"):
            cols = ("precision", "recall", "f1", "support")
            rows = [[str(c)] + [fmt(_obj(per_class, c).get(k), k) for k in cols] for c in per_class]
            for avg in ("macro", "micro", "weighted"):
                rows.append([f"{avg} avg"] + [fmt(m.get(f"{k}_{avg}")) for k in cols[:3]] + [fmt(m.get("n"))])
            out += [("table", ["class", *cols], rows + [["accuracy", "", "", fmt(m.get("accuracy")), fmt(m.get("n"))]])]
        else:
            out += [("table", ["metric", "value"], _kv(m))]
        for split in (reports := _obj(r, "data_report")):
            rep = _obj(reports, split)
            skipped = ", ".join(f"{k} {fmt(v)}" for k, v in _obj(rep, "skipped").items()) or "none"
            used = f"read {fmt(rep.get('read'))}, used {fmt(rep.get('used'))}"
            out.append(("p", f"Data ({split}): {used}, skipped {skipped}."))
        out += _img(d / "confusion.png", f"evaluate/{d.name}: confusion matrix")
        out += _samples(ctx.jsonl(d / "samples.jsonl"), ("prompt", "reference", "reply"), ctx.rel(d / "samples.jsonl"))
        out += _links(ctx, d, ("metrics.md",))
    return out


def _generation(ctx: _Ctx) -> list[Block]:
    d = ctx.run / "generate"
    if not (rows := ctx.jsonl(d / "samples.jsonl")):
        return []
    step = fmt((ctx.json(d / "summary.json") or {}).get("checkpoint_step"))
    for r in rows:
        r["speed"] = f"{fmt(r.get('new_tokens'))} new tokens at {fmt(r.get('tokens_per_s'))} tokens/s"
    where = ctx.rel(d / "samples.jsonl")
    return [("p", f"Sampled from the checkpoint of step {step}.")] + _samples(
        rows, ("prompt", "completion", "speed"), where, 8
    )


def _method(r: dict) -> str:
    parts = [_obj(r, "pruning"), _obj(r, "quantization")]
    names = [" ".join(str(p[k]) for k in ("method", "scheme", "sparsity", "group_size") if p.get(k)) for p in parts]
    return " + ".join(n for n in names if n) or "–"


def _compression(ctx: _Ctx) -> list[Block]:
    rows, links = [], []
    for d in _subdirs(ctx.run / "compress"):
        if (r := ctx.json(d / "report.json")) is None:
            continue
        cells = [(_obj(r, part).get(k), k) for _, part, k in COMPRESS_COLS]
        rows.append([d.name, _method(r)] + [_mb(v) if k == "size_bytes" else fmt(v, k) for v, k in cells])
        links += _links(ctx, d, ("report.md",))
    head = ["run", "method", *(h for h, _, _ in COMPRESS_COLS)]
    return [("table", head, rows), ("p", "Full before/after reports:"), *links] if rows else []


def _export(ctx: _Ctx) -> list[Block]:
    d, out = ctx.run / "export", []
    for p in sorted(d.glob("*.export.json")) if d.is_dir() else []:
        if (e := ctx.json(p)) is None:
            continue
        rows = _kv(e, EXPORT_KEYS) + [["size", _mb(e.get("size_bytes"))]]
        rows += [["files", ", ".join(map(str, e["files"]))]] if isinstance(e.get("files"), list) else []
        out += [("h", 3, ctx.rel(p), ""), ("table", ["", "value"], rows)]
        out += [("p", "How to load:"), ("pre", str(e["load"]))] if e.get("load") else []
    return out


def _scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))


def _json_blocks(obj: Any, title: str, depth: int = 0) -> list[Block]:
    """Any JSON as tables: a dict's scalars as name/value rows, a list of objects as one row per object."""
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        cols = list(dict.fromkeys(k for x in obj for k, v in x.items() if _scalar(v)))
        return [("table", cols, [[fmt(x.get(c), c) for c in cols] for x in obj])]
    if not isinstance(obj, dict):
        return [("p", f"{title}: {fmt(obj)}")]
    out: list[Block] = [("table", ["name", "value"], rows)] if (rows := _kv(obj)) else []
    for k, v in obj.items():
        if not _scalar(v):
            sub = f"{title}.{k}"
            out += [("p", f"{sub}: {fmt(v)}")] if depth >= 3 else [("p", f"{sub}:"), *_json_blocks(v, sub, depth + 1)]
    return out


def _serving(ctx: _Ctx) -> list[Block]:
    d, out = ctx.run / "serve", []
    for p in sorted(d.rglob("*.json")) if d.is_dir() else []:
        if (obj := ctx.json(p, object)) is not None:
            out += [("h", 3, ctx.rel(p), ""), *_json_blocks(obj, p.stem)]
    return out


SECTIONS = (
    ("overview", "Overview", _overview), ("data", "Data", _data), ("tokenizer", "Tokenizer", _tokenizer),
    ("pretraining", "Pretraining", _pretraining), ("fine-tuning", "Fine-tuning", _finetuning),
    ("evaluation", "Evaluation", _evaluation), ("generation", "Generation samples", _generation),
    ("compression", "Compression", _compression), ("export", "Export", _export),
    ("serving", "Serving benchmark", _serving),
)  # fmt: skip


def _plot_losses(ctx: _Ctx, rows: list[dict], stem: str) -> Path | None:
    curves = [
        ([(r["step"], r[k]) for r in rows if _is_num(r.get("step")) and _is_num(r.get(k))], style, name)
        for k, style, name in (("loss", "-", "train"), ("val_loss", "o-", "validation"))
    ]
    if not any(pts for pts, _, _ in curves):
        return None
    import matplotlib

    matplotlib.use("Agg")  # here, not at import time: importing this module must not choose a backend for anyone
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for pts, style, name in curves:
        if pts:
            ax.plot(*zip(*pts), style, linewidth=1.5, markersize=3, label=name)
    ax.set(xlabel="step", ylabel="cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = ctx.out / f"{stem}.png"
    fig.savefig(png)
    plt.close(fig)
    ctx.plots.append(png)
    return png


def build_report(run_dir: Path, out_dir: Path | None = None) -> dict:
    """Write report.md, report.html and loss plots for a run directory (default out_dir: <run_dir>/report/).

    Returns {"md", "html", "out_dir", "plots", "sections", "warnings"}: paths, the keys of the sections rendered
    (overview, warnings, data, tokenizer, pretraining, fine-tuning, evaluation, generation, compression, export,
    serving) and the warnings shown on the page. Raises ValueError for a missing run_dir or one with no ledger.jsonl
    and no stage folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist or is not a folder")
    if not (run_dir / "ledger.jsonl").is_file() and not any((run_dir / s).is_dir() for s in (*STAGE_DIRS, "serve")):
        names = ", ".join((*STAGE_DIRS, "serve"))
        raise ValueError(f"{run_dir} has no ledger.jsonl and no stage folder ({names}): not a gptforge run directory")
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"report output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(run_dir, out_dir)
    blocks: list[Block] = []
    sections: list[str] = []
    for key, heading, build in SECTIONS:
        try:
            body = build(ctx)
        except Exception as err:  # noqa: BLE001 - a file of an unexpected shape costs its section, not the report
            ctx.warnings.append(f"{heading}: could not render {ctx.current or key} ({type(err).__name__}: {err})")
            continue
        if body:
            blocks += [("h", 2, heading, key), *body]
            sections.append(key)
    if ctx.warnings:  # right after the overview, where they are seen
        at = next((i for i, b in enumerate(blocks) if i and b[0] == "h" and b[1] == 2), len(blocks))
        blocks[at:at] = [("h", 2, "Warnings", "warnings"), ("warn", list(ctx.warnings))]
        sections.insert(1, "warnings")
    title = f"gptforge report: {run_dir.resolve().name}"
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, render_markdown(title, blocks, out_dir))
    atomic_write_text(page, render_html(title, blocks, out_dir, run_dir))
    return dict(md=md, html=page, out_dir=out_dir, plots=ctx.plots, sections=sections, warnings=ctx.warnings)
