"""Deterministic zh/en corpus with planted exact and near-duplicates, for bench/data_pipeline.py.

Base documents are built from the public-domain text bundled with gptforge (src/gptforge/sample_data, provenance
in the README): Chinese documents from Tang/Song poem clauses, English documents from Shakespeare verse lines. The
sources are small (about 29k Chinese characters, 30k distinct English lines) and the corpus needs tens of
megabytes, so documents cannot be disjoint passages: overlapping passages would be real near-duplicates nobody
planted. Instead every document is a fresh random draw of short pieces (two poem clauses make a sentence; a verse
line is a line), without repeats inside a document. Two unrelated documents then share only a few pieces: their
3-unit shingle Jaccard similarity stays under 0.1 (the benchmark prints the largest one among 20,000 sampled
pairs), far below any duplicate threshold.

Planted duplicates are pairs (base, copy); each base has at most one copy, so the truth is a set of disjoint pairs:

* ``exact``: the copy is the base text byte for byte.
* ``r01`` ... ``r20``: the copy has edit operations at random places until `rate` x (number of units) units were
  touched. Units are those of gptforge.data.text.units: a CJK character (zh) or a word (en). Each operation replaces,
  inserts or deletes a span of 1-3 units (a typo is one unit, a changed phrase a few); replacement units are drawn
  from the same language's pool. The measured shingle Jaccard of every rate is reported by the benchmark.

The order is a seeded shuffle in which the base of each pair comes before its copy, so "keep the first" keeps the base.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

RATES = {"r01": 0.01, "r03": 0.03, "r05": 0.05, "r10": 0.10, "r20": 0.20}
EXACT_SHARE = 0.05  # share of all documents that are exact copies
NEAR_SHARE = 0.025  # share of all documents that are near copies, per edit rate
ZH_CLAUSE_RE = re.compile(r"[\u3400-\u9fff\U00020000-\U0003134f]{3,}")
ZH_CHAR_RE = re.compile(r"[\u3400-\u9fff]")
EN_WORD_RE = re.compile(r"[A-Za-z']+|[^A-Za-z']+")  # words and the separators between them, to edit in place


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    langs: list[str]
    kind: list[str]  # "base" | "exact" | "r01" ... for each document
    partner: list[int]  # index of the other member of its pair, -1 for unpaired bases
    meta: dict = field(default_factory=dict)

    def write(self, folder: Path, shards: int = 2) -> list[Path]:
        """jsonl shards of contiguous slices, so the global order is shard order then line order."""
        folder.mkdir(parents=True, exist_ok=True)
        n, paths = len(self.texts), []
        for s in range(shards):
            path = folder / f"part-{s:04d}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for i in range(s * n // shards, (s + 1) * n // shards):
                    f.write(json.dumps({"id": self.ids[i], "text": self.texts[i]}, ensure_ascii=False) + "\n")
            paths.append(path)
        return paths


def _zh_pools(root: Path) -> tuple[list[str], list[str]]:
    poems = [
        json.loads(line)["text"] for p in sorted((root / "zh").glob("*.jsonl")) for line in p.open(encoding="utf-8")
    ]
    body = "\n".join("\n".join(poem.split("\n")[2:]) for poem in poems)  # lines 1-2: title and author
    clauses = sorted(set(ZH_CLAUSE_RE.findall(body)))
    return clauses, ZH_CHAR_RE.findall(body)


def _en_pools(root: Path) -> tuple[list[str], list[str]]:
    lines: set[str] = set()
    for p in sorted((root / "en").glob("*.txt")):
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            # verse and prose lines; speaker tags ("Ham.") and stage directions ("[Exit.]") are too short or bracketed
            if len(line.split()) >= 4 and not line.startswith("[") and not line.isupper():
                lines.add(line)
    pool = sorted(lines)
    return pool, [w for line in pool for w in re.findall(r"[A-Za-z']+", line)]


def _zh_doc(rng: random.Random, clauses: list[str], target: int) -> str:
    out, n = [], 0
    used: set[int] = set()
    while n < target:
        a, b = rng.randrange(len(clauses)), rng.randrange(len(clauses))
        if a in used or b in used or a == b:
            continue
        used.update((a, b))
        sent = f"{clauses[a]}，{clauses[b]}{rng.choice('。。。！？；')}"
        out.append(sent + ("\n" if len(out) % 2 else ""))
        n += len(sent)
    return "".join(out).strip()


def _en_doc(rng: random.Random, lines: list[str], target: int) -> str:
    out: list[str] = []
    n = 0
    for i in rng.sample(range(len(lines)), k=min(len(lines), 200)):
        out.append(lines[i] + ("\n\n" if rng.random() < 0.2 else "\n"))
        n += len(out[-1])
        if n >= target:
            break
    return "".join(out).strip()


def edit(rng: random.Random, text: str, lang: str, rate: float, vocab: list[str]) -> str:
    """Touch about rate x units with replace/insert/delete ops of 1-3 units each; the result always differs."""
    for _ in range(100):
        out = _edit_once(rng, text, lang, rate, vocab)
        if out != text:  # a replacement can draw the very unit it replaces
            return out
    raise RuntimeError("could not edit a text")


def _edit_once(rng: random.Random, text: str, lang: str, rate: float, vocab: list[str]) -> str:
    if lang == "zh":
        toks = list(text)
        is_unit = [bool(ZH_CHAR_RE.fullmatch(t)) for t in toks]
    else:
        toks = EN_WORD_RE.findall(text)
        is_unit = [t[0].isalpha() or t[0] == "'" for t in toks]
    unit_pos = [i for i, u in enumerate(is_unit) if u]
    budget = max(1, round(rate * len(unit_pos)))
    ops: dict[int, tuple[str, int]] = {}  # unit ordinal -> (op, span)
    for _ in range(50 * len(unit_pos)):  # bounded: a short text may not fit the whole budget
        if budget <= 0:
            break
        span = min(budget, rng.randint(1, 3))
        k = rng.randrange(len(unit_pos))
        if any(j in ops for j in range(k - 3, k + span + 1)):  # keep ops apart so each touches fresh units
            continue
        ops[k] = (rng.choice(("replace", "insert", "delete")), span)
        budget -= span
    sep = "" if lang == "zh" else " "
    for k in sorted(ops, reverse=True):  # right to left: earlier positions stay valid
        op, span = ops[k]
        pos = unit_pos[k : k + span]
        new = sep.join(rng.choice(vocab) for _ in range(span))
        if op == "insert":
            toks.insert(pos[0], new + sep)
        elif op == "replace":
            toks[pos[0]] = new
            for p in pos[1:]:
                toks[p] = ""
        else:
            for p in pos:
                toks[p] = ""
    out = "".join(toks)
    return out if lang == "zh" else re.sub(r"[ ]{2,}", " ", out)


def build(n_docs: int, seed: int = 20261124, root: Path | None = None) -> Corpus:
    from gptforge import sample_data_dir

    root = root or sample_data_dir()
    rng = random.Random(seed)
    zh_clauses, zh_chars = _zh_pools(root)
    en_lines, en_words = _en_pools(root)
    n_exact = round(EXACT_SHARE * n_docs)
    n_near = {k: round(NEAR_SHARE * n_docs) for k in RATES}
    n_base = n_docs - n_exact - sum(n_near.values())
    texts, langs = [], []
    for i in range(n_base):
        lang = "zh" if i % 2 == 0 else "en"
        target = rng.randint(200, 1500)
        texts.append(_zh_doc(rng, zh_clauses, target) if lang == "zh" else _en_doc(rng, en_lines, target))
        langs.append(lang)
    kind, partner = ["base"] * n_base, [-1] * n_base
    plan = ["exact"] * n_exact + [k for k, v in n_near.items() for _ in range(v)]
    for b, k in zip(rng.sample(range(n_base), k=len(plan)), plan, strict=True):
        vocab = zh_chars if langs[b] == "zh" else en_words
        texts.append(texts[b] if k == "exact" else edit(rng, texts[b], langs[b], RATES[k], vocab))
        langs.append(langs[b])
        kind.append(k)
        partner.append(b)
        partner[b] = len(texts) - 1
    # Shuffle, then within each pair give the base the earlier of the two slots.
    order = list(range(len(texts)))
    rng.shuffle(order)
    slot = {doc: s for s, doc in enumerate(order)}
    for c in range(n_base, len(texts)):
        b = partner[c]
        if slot[b] > slot[c]:
            order[slot[b]], order[slot[c]] = c, b
            slot[b], slot[c] = slot[c], slot[b]
    new_index = {doc: s for s, doc in enumerate(order)}
    return Corpus(
        ids=[f"d{s:06d}" for s in range(len(order))],
        texts=[texts[d] for d in order],
        langs=[langs[d] for d in order],
        kind=[kind[d] for d in order],
        partner=[new_index[partner[d]] if partner[d] >= 0 else -1 for d in order],
        meta={"seed": seed, "zh_clauses": len(zh_clauses), "en_lines": len(en_lines), "n_base": n_base},
    )
