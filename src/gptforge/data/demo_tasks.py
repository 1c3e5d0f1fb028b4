"""Two small fine-tuning tasks derived from the bundled sample, for `gptforge demo`.

- classify: which collection a text comes from: 唐诗三百首 (Tang poems), 宋词一百首 (the Song collection), a
  Shakespeare sonnet, or a 14-line passage of a Shakespeare play. Titles and authors are stripped: the model sees
  only the verse.
- chat: a title and author in, the poem out ("请背诵李白的《静夜思》。" -> the poem; "Recite Shakespeare's sonnet
  XVIII." -> the sonnet).

Each task is written as train and test JSONL files. The test split (about 15%) is chosen by a hash of the text, so
it is stable across runs and machines, and fine-tuning never sees it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from gptforge.artifacts import atomic_write_text

SONNET_RE = re.compile(r"^\s*([IVXLC]+)\s*$")


def _is_test(text: str, fraction: float = 0.15) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _poems(sample: Path) -> list[dict]:
    out = []
    for name in ("tang300.jsonl", "song100.jsonl"):
        for line in (sample / "zh" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                body = "\n".join(rec["text"].splitlines()[2:]).strip()  # drop the title and author lines
                author = re.sub(r"（.*?）", "", rec["author"]).strip()  # "柳开（９４６－９９９）" -> "柳开"
                if body:
                    out.append({"body": body, "title": rec["title"], "author": author, "collection": rec["collection"]})
    return out


def _sonnets(sample: Path) -> list[dict]:
    out, number, lines = [], None, []
    for line in (sample / "en" / "sonnets.txt").read_text(encoding="utf-8").splitlines():
        m = SONNET_RE.match(line)
        if m:
            if number and lines:
                out.append({"number": number, "body": "\n".join(lines).strip()})
            number, lines = m.group(1), []
        elif number and (line.strip() or lines):
            lines.append(line.strip())
    if number and lines:
        out.append({"number": number, "body": "\n".join(lines).strip()})
    return [s for s in out if s["body"].count("\n") >= 8]


def _play_passages(sample: Path, per_play: int = 15, lines_per: int = 14) -> list[str]:
    """Passages of `lines_per` consecutive non-empty lines, spread evenly through each play."""
    out = []
    for f in sorted((sample / "en").glob("*.txt")):
        if f.name == "sonnets.txt":
            continue
        lines = [ln.rstrip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        span = len(lines) - lines_per
        for k in range(per_play):
            start = span * (k + 1) // (per_play + 1)
            out.append("\n".join(lines[start : start + lines_per]))
    return out


def build_demo_tasks(sample: Path, out: Path) -> dict[str, Path]:
    """Write classify_{train,test}.jsonl and chat_{train,test}.jsonl under `out`; return their paths."""
    poems, sonnets = _poems(sample), _sonnets(sample)
    classify = [{"text": p["body"], "label": p["collection"]} for p in poems]
    classify += [{"text": s["body"], "label": "Shakespeare sonnet"} for s in sonnets]
    classify += [{"text": t, "label": "Shakespeare play"} for t in _play_passages(sample)]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"请背诵{p['author']}的{p['title']}。"},
                {"role": "assistant", "content": p["body"]},
            ]
        }
        for p in poems
    ]
    chat += [
        {
            "messages": [
                {"role": "user", "content": f"Recite Shakespeare's sonnet {s['number']}."},
                {"role": "assistant", "content": s["body"]},
            ]
        }
        for s in sonnets
    ]
    paths = {}
    for name, records, key in (("classify", classify, "text"), ("chat", chat, None)):
        for part in ("train", "test"):
            rows = [r for r in records if _is_test(r[key] if key else r["messages"][1]["content"]) == (part == "test")]
            path = out / f"{name}_{part}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            paths[f"{name}_{part}"] = path
    return paths
