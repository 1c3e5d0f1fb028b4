"""The clean stage's accounting and data report: shard statistics summed into `stats.json`, then rendered as
Markdown and as one self-contained HTML page (charts embedded, no CDN) that a user can open offline.

The accounting is checked here, not trusted: files in = ok + skipped + quarantined, and records in = kept +
dropped + deduplicated + quarantined, or the stage fails loudly (that would be a bug, never a user error).
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path

from gptforge.artifacts import atomic_write_text
from gptforge.data.pipeline import DUPLICATE_REASONS, EXAMPLES_PER_REASON, LENGTH_BINS, MAX_LISTED, part


def _load(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))


def aggregate(out: Path, n_shards: int, files: list) -> dict:
    work = out / "work"
    scans = [_load(work / "scan" / part(i) / "stats.json") for i in range(n_shards)]
    writes = [_load(work / "write" / f"{part(i)}.json") for i in range(n_shards)]
    dedup = _load(work / "dedup" / "stats.json")
    # keyed by the file's index in the plan, not its relative path: two input folders may both hold "a.jsonl"
    table: dict[int, dict] = {}
    for s in scans:
        for key, row in s["files"].items():
            t = table.setdefault(int(key), {"records": 0})
            t["records"] += row.pop("records")
            t.update({k: v for k, v in row.items() if k not in t})
    file_counts = {"in": len(files), "ok": 0, "skipped": Counter(), "quarantined": Counter()}
    for i in range(len(files)):
        status = table.get(i, {}).get("status")
        if status is None:  # every file has a first piece, and that piece sets the status
            raise RuntimeError(f"clean: file accounting: no shard reported on {files[i].rel}")
        row = table[i]
        if status == "ok":
            file_counts["ok"] += 1
        else:
            file_counts[status][row.get("reason", "?")] += 1
    quarantined, dropped, normalized = Counter(), Counter(), Counter()
    lines_removed, langs_before, langs_after = Counter(), Counter(), Counter()
    before, after = [0] * len(LENGTH_BINS), [0] * len(LENGTH_BINS)
    chars = Counter()
    examples: dict[str, list] = {}
    contaminated: list = []
    n_contaminated = 0
    for s in scans:
        quarantined.update(s["quarantined"])
        dropped.update(s["dropped"])
        normalized.update(s["normalized"])
        langs_before.update(s["languages_before"])
        before = [a + b for a, b in zip(before, s["lengths_before"])]
        contaminated += s["contaminated"][: MAX_LISTED - len(contaminated)]
        n_contaminated += s["contaminated_count"]
        _merge_examples(examples, s["examples"])
    deduplicated = Counter()
    for w in writes:
        for reason, n in w["dropped"].items():
            (deduplicated if reason in DUPLICATE_REASONS else dropped)[reason] += n
        lines_removed.update(w["lines_removed"])
        langs_after.update(w["languages_after"])
        after = [a + b for a, b in zip(after, w["lengths_after"])]
        chars.update(w["chars_after"])
        _merge_examples(examples, w["examples"])
    records = {
        "in": sum(s["records_in"] for s in scans),
        "kept": sum(w["kept"] for w in writes),
        "dropped": dict(dropped.most_common()),
        "deduplicated": dict(deduplicated.most_common()),
        "quarantined": dict(quarantined.most_common()),
    }
    accounted = records["kept"] + sum(dropped.values()) + sum(deduplicated.values()) + sum(quarantined.values())
    if accounted != records["in"]:
        raise RuntimeError(f"clean: record accounting does not balance: {records['in']} in, {accounted} accounted")
    if file_counts["ok"] + sum(file_counts["skipped"].values()) + sum(file_counts["quarantined"].values()) != len(
        files
    ):
        raise RuntimeError("clean: file accounting does not balance")
    total_chars = sum(chars.values()) or 1
    rows = [{"file": row.get("file"), **row} for _, row in sorted(table.items())]  # input order
    atomic_write_text(out / "files.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {
        "files": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in file_counts.items()},
        "records": records,
        "normalized": dict(normalized.most_common()),
        "lines_removed": dict(lines_removed),
        "dedup": dedup,
        "contaminated": {"count": n_contaminated, "documents": contaminated},
        "lengths": {"bins": LENGTH_BINS, "before": before, "after": after},
        "languages": {"before": dict(langs_before.most_common()), "after": dict(langs_after.most_common())},
        "script_mix": {k: round(chars[k] / total_chars, 4) for k in ("cjk", "latin", "other")},
        "encodings": dict(Counter(r.get("encoding", "-") for r in rows if r.get("status") == "ok")),
        "problem_files": [row for row in rows if row.get("status") != "ok"][:MAX_LISTED],
        "examples": examples,
    }


def _merge_examples(into: dict, new: dict) -> None:
    for reason, rows in new.items():
        have = into.setdefault(reason, [])
        have.extend(rows[: EXAMPLES_PER_REASON - len(have)])


def _bin_labels() -> list[str]:
    def fmt(n: int) -> str:
        return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)

    edges = LENGTH_BINS
    return [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges, edges[1:])] + [f"{fmt(edges[-1])}+"]


def _charts(folder: Path, stats: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    r = stats["records"]
    outcomes = {
        "kept": r["kept"],
        **r["dropped"],
        **r["deduplicated"],
        **{f"q:{k}": v for k, v in r["quarantined"].items()},
    }
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(outcomes) + 1.2))
    names = list(outcomes)[::-1]
    ax.barh(names, [outcomes[n] for n in names], color=["#4c9f70" if n == "kept" else "#c8553d" for n in names])
    ax.set_xlabel("records")
    ax.set_title("What happened to every record")
    fig.tight_layout()
    paths["outcomes"] = folder / "outcomes.png"
    fig.savefig(paths["outcomes"], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = _bin_labels()
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], stats["lengths"]["before"], width=0.4, label="before (all records)")
    ax.bar([i + 0.2 for i in x], stats["lengths"]["after"], width=0.4, label="after (kept)")
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("characters per document")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("Document lengths")
    fig.tight_layout()
    paths["lengths"] = folder / "lengths.png"
    fig.savefig(paths["lengths"], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    before, after = stats["languages"]["before"], stats["languages"]["after"]
    langs = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
    x = range(len(langs))
    ax.bar([i - 0.2 for i in x], [before.get(k, 0) for k in langs], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [after.get(k, 0) for k in langs], width=0.4, label="after")
    ax.set_xticks(list(x), langs)
    ax.set_ylabel("documents")
    ax.set_title("Languages (script + stopword detection)")
    ax.legend()
    fig.tight_layout()
    paths["languages"] = folder / "languages.png"
    fig.savefig(paths["languages"], dpi=100)
    plt.close(fig)
    return paths


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    text = str(value).replace("\n", " ⏎ ").replace("|", "\\|")
    return text[:160] + ("…" if len(text) > 160 else "")


def markdown(stats: dict, charts: dict[str, Path], base: Path) -> str:
    r, f, d = stats["records"], stats["files"], stats["dedup"]
    rel = {k: p.relative_to(base).as_posix() for k, p in charts.items()}
    parts = [
        "# Data report (gptforge clean)",
        f"{r['in']:,} records from {f['in']:,} files in {stats.get('seconds', 0)} s "
        f"({stats.get('docs_per_s', 0):,} records/s, {stats.get('workers', 1)} workers, "
        f"{stats.get('shards', 0)} shards).",
        "## Accounting",
        _md_table(
            ["outcome", "records"],
            [["kept", r["kept"]]]
            + [[f"dropped: {k}", v] for k, v in r["dropped"].items()]
            + [[f"deduplicated: {k}", v] for k, v in r["deduplicated"].items()]
            + [[f"quarantined: {k}", v] for k, v in r["quarantined"].items()]
            + [["**total in**", r["in"]]],
        ),
        _md_table(
            ["files", "count"],
            [["ok", f["ok"]]]
            + [[f"skipped: {k}", v] for k, v in f["skipped"].items()]
            + [[f"quarantined: {k}", v] for k, v in f["quarantined"].items()]
            + [["**total in**", f["in"]]],
        ),
        f"![outcomes]({rel['outcomes']})",
    ]
    if stats["problem_files"]:
        parts += [
            "### Files not used",
            _md_table(
                ["file", "status", "reason", "detail"],
                [[p["file"], p.get("status"), p.get("reason"), p.get("detail", "")] for p in stats["problem_files"]],
            ),
        ]
    parts += [
        "## Encodings and normalization",
        _md_table(["encoding", "files"], list(stats["encodings"].items())),
        _md_table(["normalization step", "documents changed"], list(stats["normalized"].items()) or [["-", 0]]),
        "## Lengths",
        f"![lengths]({rel['lengths']})",
        "## Script mix and languages",
        f"Kept text by characters: CJK {stats['script_mix']['cjk']:.1%}, Latin {stats['script_mix']['latin']:.1%}, "
        f"other {stats['script_mix']['other']:.1%}.",
        _md_table(
            ["language", "before", "after"],
            [[k, v, stats["languages"]["after"].get(k, 0)] for k, v in stats["languages"]["before"].items()],
        ),
        f"![languages]({rel['languages']})",
        "## Duplicates",
        f"{d['exact_duplicate']} exact and {d['near_duplicate']} near duplicates in {d['clusters']} clusters; "
        f"{d['boilerplate_lines']} boilerplate lines and {d['repeated_lines']} repeated lines found "
        f"({', '.join(f'{v} {k} line removals' for k, v in stats['lines_removed'].items()) or 'none removed'}).",
    ]
    if d["largest_clusters"]:
        parts.append(
            _md_table(
                ["size", "kept", "removed (first 5)", "text"],
                [[c["size"], c["kept"], ", ".join(c["removed"]), c["preview"]] for c in d["largest_clusters"]],
            )
        )
    c = stats["contaminated"]
    parts += ["## Decontamination", f"{c['count']} training documents overlap the evaluation files."]
    if c["documents"]:
        parts.append(
            _md_table(
                ["document", "evaluation document", "exact", "shared n-grams"],
                [[x["id"], x.get("eval_id"), x.get("exact"), x.get("ngrams")] for x in c["documents"][:50]],
            )
        )
    parts.append("## Examples by reason")
    for reason, rows in sorted(stats["examples"].items()):
        parts.append(f"### {reason}")
        parts.append(
            _md_table(
                ["record", "detail", "text"],
                [
                    [
                        x.get("id") or (f"{x.get('source')}:{x['line']}" if x.get("line") else x.get("source")),
                        x.get("detail", ""),
                        x.get("text", x.get("preview", "")),
                    ]
                    for x in rows
                ],
            )
        )
    return "\n\n".join(parts) + "\n"


def to_html(md: str, charts: dict[str, Path], base: Path) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to HTML, images inlined as data URIs."""
    inline = {p.relative_to(base).as_posix(): base64.b64encode(p.read_bytes()).decode() for p in charts.values()}
    body = []
    for block in md.split("\n\n"):
        lines = block.strip().split("\n")
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            body.append(f"<h{level}>{html.escape(block.lstrip('#').strip())}</h{level}>")
        elif block.startswith("!["):
            src = block[block.index("(") + 1 : block.rindex(")")]
            body.append(f'<img alt="{html.escape(src)}" src="data:image/png;base64,{inline.get(src, "")}">')
        elif block.startswith("|"):
            rows = [ln.strip("|").split(" | ") for ln in lines if not ln.startswith("|---")]
            head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
            trs = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c.strip().replace(chr(92) + '|', '|'))}</td>" for c in r) + "</tr>"
                for r in rows[1:]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        else:
            body.append(f"<p>{html.escape(block)}</p>")
    style = (
        "body{font-family:system-ui,'Noto Sans CJK SC',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
        "vertical-align:top;font-size:14px}th{background:#f2f2f2}img{max-width:100%}"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>gptforge data report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def render(out: Path, stats: dict) -> None:
    charts = _charts(out / "report", stats)
    md = markdown(stats, charts, out)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", to_html(md, charts, out))


def summary(stats: dict, out: Path) -> str:
    r, f = stats["records"], stats["files"]
    dropped = ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "none"
    dup = ", ".join(f"{k} {v}" for k, v in r["deduplicated"].items()) or "none"
    quar = ", ".join(f"{k} {v}" for k, v in r["quarantined"].items()) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in {**f["skipped"], **f["quarantined"]}.items()) or "none"
    encodings = ", ".join(f"{k} {v}" for k, v in stats["encodings"].items()) or "none"
    changed = ", ".join(f"{k} {v}" for k, v in stats["normalized"].items()) or "none"
    lines = ", ".join(f"{k} {v}" for k, v in stats["lines_removed"].items()) or "none"
    return "\n".join(
        [
            f"clean: {r['in']:,} records from {f['in']} files ({f['ok']} read; not used: {skipped})",
            f"  encodings     {encodings} (files)",
            f"  normalized    {changed} (documents changed per step)",
            f"  lines removed {lines}",
            f"  kept          {r['kept']:,}",
            f"  dropped       {dropped}",
            f"  deduplicated  {dup}",
            f"  quarantined   {quar}",
            f"  script mix    CJK {stats['script_mix']['cjk']:.0%}, Latin {stats['script_mix']['latin']:.0%}",
            f"  output        {out / 'data'}",
            f"  report        {out / 'report.html'} "
            f"({stats.get('seconds', 0)} s, {stats.get('docs_per_s', 0):,} records/s)",
        ]
    )
