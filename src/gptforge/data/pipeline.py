"""Execution of the `clean` stage: a plan of shards, then scan -> dedup -> write, each step restartable.

Steps are the datatrove shape (a list of steps over a document stream), split where a global view is needed:

1. **scan** (parallel, per shard): read -> normalize -> filter -> decontaminate. Survivors go to the shard's
   `docs.jsonl` with their exact-hash key, MinHash signature and line hashes; everything else is written out with
   its reason at once.
2. **dedup** (one process): exact and near-duplicate clusters over all shards (the smallest global index of a
   cluster is kept), boilerplate lines (in many documents) and repeated lines (kept in their first document only).
3. **write** (parallel, per shard): drop the duplicates, remove boilerplate/repeated lines, write the output shard.

A shard's outputs are written to temporary names and renamed into place before its marker file, so a killed run
redoes only the shards without a marker and never duplicates or loses a record. The global order of documents is
(shard, position in shard), fixed by the plan, so the output is identical whatever the worker count or rank split.
Memory is bounded by one shard, except the dedup step, which holds 16 bytes + one signature per document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import atomic_write_text, fsync_dir
from gptforge.data.decontam import DecontamConfig, Decontaminator
from gptforge.data.dedup import DedupConfig, MinHasher, exact_duplicate_reps, exact_key, near_duplicate_clusters
from gptforge.data.filters import FilterConfig, Filters, detect_language, script_mix
from gptforge.data.normalize import NormalizeConfig, Normalizer
from gptforge.data.text import UNIT_RE
from gptforge.data.sources import FileRejected, InputConfig, InputFile, Quarantined, iter_file, split_points
from gptforge.faults import fault_seconds

# Document lengths (characters) are histogrammed into fixed bins so shard statistics add up exactly.
LENGTH_BINS = [0, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000]
EXAMPLES_PER_REASON = 3
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")


class BoilerplateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Remove lines that recur across many documents (licenses, navigation, ads)."
    )
    min_docs: int = Field(5, ge=2, description="A line in at least this many distinct documents is boilerplate.")
    min_units: int = Field(
        8,
        ge=1,
        description="Lines with fewer units (CJK characters or words) are never boilerplate: short structural lines "
        "such as '作者：陆游（1125-1210）' or 'Exit Ghost.' recur legitimately.",
    )


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = Field("jsonl", pattern="^(jsonl|parquet)$", description="jsonl or parquet (needs gptforge[parquet]).")
    keep_work: bool = Field(True, description="Keep clean/work/ (signatures, markers) so a re-run skips finished work.")


class Settings(BaseModel):
    """Everything that decides the output; a change here makes a previous run's work unusable."""

    model_config = ConfigDict(extra="forbid")

    read: InputConfig = Field(default_factory=InputConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    boilerplate: BoilerplateConfig = Field(default_factory=BoilerplateConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


@dataclass(frozen=True)
class Piece:
    file: int  # index into the plan's file list
    start: int
    end: int | None
    first_line: int


def plan_shards(files: list[InputFile], read: InputConfig, shard_bytes: int) -> list[list[Piece]]:
    """Consecutive small files share a shard; a big splittable file is cut into shard-sized pieces."""
    shards: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for i, f in enumerate(files):
        cuts = split_points(f, read, shard_bytes) if f.fmt else [(0, f.size, 1)]
        for start, end, first in cuts:
            if current and size + (end - start) > shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(Piece(i, start, end if len(cuts) > 1 else None, first))
            size += end - start
    if current:
        shards.append(current)
    return shards


def plan_fingerprint(inputs: list[str], files: list[InputFile], shards: list[list[Piece]], settings: Settings) -> dict:
    return {
        "inputs": inputs,
        "settings": settings.model_dump(mode="json"),
        "files": [[f.rel, f.size, os.stat(f.path).st_mtime_ns] for f in files],
        "shards": [[asdict(p) for p in s] for s in shards],
    }


def part(i: int) -> str:
    return f"part-{i:05d}"


def length_bin(n: int) -> int:
    return int(np.searchsorted(LENGTH_BINS, n, side="right")) - 1


def line_hash(line: str) -> int:
    """Stable 64-bit hash of a stripped line (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class _ShardFiles:
    """jsonl files of one shard, written under temporary names and renamed into place by commit()."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}

    def write(self, path: Path, row: dict) -> None:
        fh = self._open.get(path)
        if fh is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = self._open[path] = open(_tmp(path), "w", encoding="utf-8")
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        for path, fh in self._open.items():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(_tmp(path), path)
            fsync_dir(path.parent)
        self._open.clear()

    def abort(self) -> None:
        for path, fh in self._open.items():
            fh.close()
            _tmp(path).unlink(missing_ok=True)
        self._open.clear()


def _remove_stale(out: Path, index: int) -> None:
    """Temporary files a killed run left behind for this shard (a redo may not write the same reasons)."""
    for sub in ("rejects", "quarantine", "data"):
        for p in (out / sub).rglob(f".{part(index)}.*.tmp") if (out / sub).is_dir() else ():
            p.unlink(missing_ok=True)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


@functools.lru_cache(maxsize=2)
def _tools(settings_json: str) -> tuple:
    """The steps, built once per worker process (the decontamination index reads the evaluation files)."""
    s = Settings.model_validate_json(settings_json)
    normalizer = Normalizer(s.normalize)
    decontam = None
    if s.decontam.paths:
        decontam = Decontaminator(s.decontam, s.read, lambda text, fmt: normalizer(text, fmt)[0])
    hasher = MinHasher(s.dedup.num_perm, s.dedup.ngram, s.dedup.seed) if s.dedup.near else None
    return s, normalizer, Filters(s.filters), decontam, hasher


def _line_min_chars(s: Settings) -> int | None:
    lengths = []
    if s.boilerplate.enabled:
        lengths.append(s.boilerplate.min_units)  # a line of k units has at least k characters
    if s.dedup.lines:
        lengths.append(s.dedup.line_min_chars)
    return min(lengths) if lengths else None


def _new_stats() -> dict:
    return {
        "files": {},
        "records_in": 0,
        "quarantined": Counter(),
        "dropped": Counter(),
        "candidates": 0,
        "normalized": Counter(),
        "lengths_before": [0] * len(LENGTH_BINS),
        "languages_before": Counter(),
        "examples": {},
        "contaminated": [],
    }


def _example(stats: dict, reason: str, row: dict) -> None:
    ex = stats["examples"].setdefault(reason, [])
    if len(ex) < EXAMPLES_PER_REASON:
        ex.append({k: (v[:300] if isinstance(v, str) else v) for k, v in row.items()})


def scan_shard(index: int, pieces: list[Piece], files: list[InputFile], settings_json: str, out: Path) -> dict:
    """Step 1 for one shard; returns its statistics (also saved as the shard's completion marker)."""
    s, normalizer, filters, decontam, hasher = _tools(settings_json)
    work = out / "work" / "scan" / part(index)
    work.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, index)
    sink, stats = _ShardFiles(), _new_stats()
    min_line = _line_min_chars(s)
    texts, ids, keys, line_rows, sigs = [], [], [], [], []
    try:
        for piece in pieces:
            f = files[piece.file]
            row = stats["files"].setdefault(f.rel, {"records": 0, "bytes": f.size, "format": f.fmt})
            try:
                for item in iter_file(f, s.read, piece.start, piece.end, piece.first_line):
                    if isinstance(item, Quarantined):
                        stats["quarantined"][item.reason] += 1
                        q = {"source": item.source, "line": item.line, "reason": item.reason, "detail": item.detail}
                        q["preview"] = item.preview
                        sink.write(out / "quarantine" / f"{part(index)}.jsonl", q)
                        _example(stats, item.reason, q)
                        row["records"] += 1
                        stats["records_in"] += 1
                        continue
                    row["records"] += 1
                    row.setdefault("encoding", item.encoding)
                    stats["records_in"] += 1
                    stats["lengths_before"][length_bin(len(item.text))] += 1
                    text, changed = normalizer(item.text, item.fmt)
                    stats["normalized"].update(changed)
                    lang = detect_language(text)
                    stats["languages_before"][lang] += 1
                    base = {"id": item.id, "source": item.source, "line": item.line}
                    reason = filters.check(text)
                    hit = decontam.check(text) if decontam and reason is None else None
                    if hit and s.decontam.action == "drop":
                        reason = "contaminated"
                    if reason:
                        stats["dropped"][reason] += 1
                        rej = {**base, "reason": reason, "detail": _detail(reason, hit), "text": text}
                        sink.write(out / "rejects" / reason / f"{part(index)}.jsonl", rej)
                        _example(stats, reason, rej)
                        if hit:
                            stats["contaminated"].append({"id": item.id, **hit})
                        continue
                    doc = {**base, "lang": lang, "text": text}
                    if hit:
                        doc["contaminated_with"] = hit["eval_id"]
                        stats["contaminated"].append({"id": item.id, **hit})
                    local = len(ids)
                    ids.append(item.id)
                    sink.write(work / "docs.jsonl", doc)
                    keys.append(exact_key(text))
                    if min_line is not None:
                        for line in {ln.strip() for ln in text.split("\n")}:
                            if len(line) >= min_line:
                                line_rows.append((line_hash(line), local, len(line), len(UNIT_RE.findall(line))))
                    if hasher is not None:
                        texts.append(text)
                        if len(texts) >= 512:
                            sigs.append(hasher.signatures(texts))
                            texts = []
                if piece.start == 0:
                    row["status"] = "ok"
            except FileRejected as e:
                if piece.start == 0:
                    row.update(status=e.kind, reason=e.reason, detail=e.detail)
                if e.kind == "quarantined":
                    q = {"source": f.rel, "line": None, "reason": e.reason, "detail": e.detail, "scope": "file"}
                    sink.write(out / "quarantine" / f"{part(index)}.jsonl", q)
                    _example(stats, e.reason, q)
        if hasher is not None and texts:
            sigs.append(hasher.signatures(texts))
        stats["candidates"] = len(ids)
        if not ids:
            (work / "docs.jsonl").touch()
        _save_npy(work / "exact.npy", np.array(keys, dtype="S16").reshape(-1))
        if hasher is not None:
            sig = np.concatenate(sigs) if sigs else np.zeros((0, s.dedup.num_perm), dtype=np.uint32)
            _save_npy(work / "sig.npy", sig)
        lines = np.array(line_rows, dtype=np.uint64).reshape(-1, 4)  # hash, doc, characters, units
        _save_npy(work / "lines.npy", lines)
        atomic_write_text(work / "ids.json", json.dumps(ids, ensure_ascii=False))
        time.sleep(fault_seconds("clean_shard_sleep"))  # reliability tests widen the window for a kill here
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    stats = _jsonable(stats)
    atomic_write_text(work / "stats.json", json.dumps(stats, ensure_ascii=False))  # the completion marker, last
    return stats


def _detail(reason: str, hit: dict | None) -> str:
    if reason == "contaminated" and hit:
        what = "the exact text" if hit.get("exact") else f"{hit.get('ngrams', 0)} long n-gram(s)"
        return f"shares {what} with evaluation document {hit['eval_id']}"
    return ""


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _jsonable(stats: dict) -> dict:
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in stats.items()}


def dedup_all(n_shards: int, settings_json: str, out: Path) -> dict:
    """Step 2: decide, over every shard, which documents are duplicates and which lines are boilerplate."""
    s = Settings.model_validate_json(settings_json)
    scan = out / "work" / "scan"
    counts = [json.loads((scan / part(i) / "stats.json").read_text("utf-8"))["candidates"] for i in range(n_shards)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    reason = np.zeros(n, dtype=np.int8)  # 0 kept, 1 exact, 2 near
    rep = np.arange(n, dtype=np.int64)
    if s.dedup.exact and n:
        keys = np.concatenate([np.load(scan / part(i) / "exact.npy") for i in range(n_shards)])
        rep = exact_duplicate_reps(keys).astype(np.int64)
        reason[rep != np.arange(n)] = 1
    if s.dedup.near and n:
        uniq = np.flatnonzero(reason == 0)
        sig = np.concatenate([np.load(scan / part(i) / "sig.npy") for i in range(n_shards)])[uniq]
        near = near_duplicate_clusters(sig, s.dedup.threshold, s.dedup.bands, s.dedup.verify)
        moved = near != np.arange(len(uniq))
        reason[uniq[moved]] = 2
        rep[uniq[moved]] = uniq[near[moved]]
    root = rep.copy()
    for _ in range(4):  # an exact copy of a near-duplicate points at a document that points on; follow to the root
        root = root[root]
    boilerplate, repeated = _line_decisions(s, scan, n_shards, offsets, reason)
    folder = out / "work" / "dedup"
    folder.mkdir(parents=True, exist_ok=True)
    _save_npy(folder / "boilerplate.npy", boilerplate)
    _save_npy(folder / "repeated.npy", repeated)
    ids = _IdLookup(scan, offsets)
    for i in range(n_shards):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        rows = [
            [local, DUPLICATE_REASONS[reason[lo + local] - 1], ids(int(rep[lo + local]))]
            for local in np.flatnonzero(reason[lo:hi]).tolist()
        ]
        atomic_write_text(folder / f"{part(i)}.json", json.dumps(rows, ensure_ascii=False))
    clusters = _largest_clusters(root, reason, ids, scan)
    stats = {
        "documents": n,
        "exact_duplicate": int((reason == 1).sum()),
        "near_duplicate": int((reason == 2).sum()),
        "clusters": int(len(np.unique(root[reason > 0]))),
        "largest_clusters": clusters,
        "boilerplate_lines": int(len(boilerplate)),
        "repeated_lines": int(len(repeated)),
    }
    atomic_write_text(out / "work" / "dedup" / "stats.json", json.dumps(stats, ensure_ascii=False))  # marker, last
    return stats


class _IdLookup:
    """Global document index -> its id, loading one shard's id list at a time."""

    def __init__(self, scan: Path, offsets: np.ndarray):
        self.scan, self.offsets = scan, offsets
        self._shard, self._ids = -1, []

    def locate(self, g: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return shard, g - int(self.offsets[shard])

    def __call__(self, g: int) -> str:
        shard, local = self.locate(g)
        if shard != self._shard:
            self._shard, self._ids = shard, json.loads((self.scan / part(shard) / "ids.json").read_text("utf-8"))
        return self._ids[local]


def _line_decisions(s: Settings, scan: Path, n_shards: int, offsets: np.ndarray, reason: np.ndarray):
    """Boilerplate: a line in >= min_docs distinct surviving documents, removed everywhere. Repeated lines: any
    other long line in >= 2 documents, kept only in the first (CCNet-style paragraph dedup)."""
    empty_bp = np.zeros(0, dtype=np.uint64)
    empty_rep = np.zeros((0, 2), dtype=np.uint64)
    if _line_min_chars(s) is None:
        return empty_bp, empty_rep
    parts = []
    for i in range(n_shards):
        a = np.load(scan / part(i) / "lines.npy")
        if len(a):
            a = a.copy()
            a[:, 1] += np.uint64(offsets[i])
            parts.append(a)
    if not parts:
        return empty_bp, empty_rep
    rows = np.concatenate(parts)
    rows = rows[reason[rows[:, 1].astype(np.int64)] == 0]  # duplicates would inflate the counts
    order = np.lexsort((rows[:, 1], rows[:, 0]))
    rows = rows[order]
    hashes, first, counts = np.unique(rows[:, 0], return_index=True, return_counts=True)
    lengths, n_units = rows[first, 2], rows[first, 3]
    bp = np.zeros(len(hashes), dtype=bool)
    if s.boilerplate.enabled:
        bp = (counts >= s.boilerplate.min_docs) & (n_units >= s.boilerplate.min_units)
    repeated = np.zeros(len(hashes), dtype=bool)
    if s.dedup.lines:
        repeated = ~bp & (counts >= 2) & (lengths >= s.dedup.line_min_chars)
    rep = np.stack([hashes[repeated], rows[first[repeated], 1]], axis=1) if repeated.any() else empty_rep
    return hashes[bp], rep


def _largest_clusters(root: np.ndarray, reason: np.ndarray, ids: _IdLookup, scan: Path, top: int = 10) -> list[dict]:
    members = np.flatnonzero(reason > 0)
    if not len(members):
        return []
    roots, counts = np.unique(root[members], return_counts=True)
    order = np.lexsort((roots, -counts))[:top]
    out = []
    for r, c in zip(roots[order].tolist(), counts[order].tolist()):
        shard, local = ids.locate(r)
        removed = [ids(m) for m in members[root[members] == r][:5].tolist()]
        preview = _doc_text(scan / part(shard) / "docs.jsonl", local)[:200]
        out.append({"size": c + 1, "kept": ids(r), "removed": removed, "preview": preview})
    return out


def _doc_text(path: Path, local: int) -> str:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i == local:
                return json.loads(line)["text"]
    return ""


@functools.lru_cache(maxsize=2)
def _line_tables(dedup_dir: str) -> tuple[frozenset, dict]:
    bp = np.load(Path(dedup_dir) / "boilerplate.npy")
    rep = np.load(Path(dedup_dir) / "repeated.npy")
    return frozenset(bp.tolist()), dict(zip(rep[:, 0].tolist(), rep[:, 1].tolist()))


def write_shard(index: int, settings_json: str, out: Path, offset: int) -> dict:
    """Step 3 for one shard: drop duplicates, strip boilerplate/repeated lines, write the output part."""
    s = Settings.model_validate_json(settings_json)
    work = out / "work"
    _remove_stale(out, index)
    dropped = {r[0]: (r[1], r[2]) for r in json.loads((work / "dedup" / f"{part(index)}.json").read_text("utf-8"))}
    boilerplate, repeated = _line_tables(str(work / "dedup"))
    min_line = _line_min_chars(s)
    sink = _ShardFiles()
    stats = {"kept": 0, "dropped": Counter(), "lines_removed": Counter(), "lengths_after": [0] * len(LENGTH_BINS)}
    stats.update(languages_after=Counter(), chars_after={"cjk": 0.0, "latin": 0.0, "other": 0.0}, examples={})
    kept: list[dict] = []
    try:
        with open(work / "scan" / part(index) / "docs.jsonl", encoding="utf-8") as fh:
            for local, line in enumerate(fh):
                doc = json.loads(line)
                if local in dropped:
                    why, of = dropped[local]
                    row = {k: doc[k] for k in ("id", "source", "line")}
                    row.update(reason=why, detail=f"duplicate of {of}", dup_of=of, text=doc["text"])
                    sink.write(out / "rejects" / why / f"{part(index)}.jsonl", row)
                    stats["dropped"][why] += 1
                    _example(stats, why, row)
                    continue
                if min_line is not None and (boilerplate or repeated):
                    text, removed = _strip_lines(doc["text"], min_line, boilerplate, repeated, offset + local)
                    if removed:
                        stats["lines_removed"].update(removed)
                        if len(text) < s.filters.min_chars:
                            why = "boilerplate" if removed.get("boilerplate") else "repeated_lines"
                            row = {k: doc[k] for k in ("id", "source", "line")}
                            row.update(reason=why, detail=f"{sum(removed.values())} line(s) removed", text=doc["text"])
                            sink.write(out / "rejects" / why / f"{part(index)}.jsonl", row)
                            stats["dropped"][why] += 1
                            _example(stats, why, row)
                            continue
                        doc["text"] = text
                kept.append(doc)
                stats["kept"] += 1
                stats["lengths_after"][length_bin(len(doc["text"]))] += 1
                stats["languages_after"][doc["lang"]] += 1
                n = len(doc["text"])
                for k, v in script_mix(doc["text"]).items():
                    stats["chars_after"][k] = stats["chars_after"].get(k, 0.0) + v * n
        _write_output(out / "data", index, kept, s.output.format)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    stats = _jsonable(stats)
    atomic_write_text(work / "write" / f"{part(index)}.json", json.dumps(stats, ensure_ascii=False))  # marker
    return stats


def _strip_lines(text: str, min_line: int, boilerplate: frozenset, repeated: dict, g: int) -> tuple[str, Counter]:
    removed: Counter = Counter()
    keep = []
    for ln in text.split("\n"):
        st = ln.strip()
        if len(st) >= min_line:
            h = line_hash(st)
            if h in boilerplate:
                removed["boilerplate"] += 1
                continue
            first = repeated.get(h)
            if first is not None and first != g:
                removed["repeated_lines"] += 1
                continue
        keep.append(ln)
    if not removed:
        return text, removed
    out = "\n".join(keep)
    while "\n\n\n" in out:
        out = out.replace("\n\n\n", "\n\n")
    return out.strip(), removed


def _write_output(folder: Path, index: int, docs: list[dict], fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{part(index)}.{fmt}"
    tmp = _tmp(path)
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("output.format=parquet needs pyarrow: pip install 'gptforge[parquet]'") from None
        cols = ["id", "text", "source", "line", "lang", "contaminated_with"]
        table = pa.table({c: [d.get(c) for d in docs] for c in cols}, schema=_parquet_schema(pa))
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for d in docs:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def _parquet_schema(pa):
    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("source", pa.string()),
            ("line", pa.int64()),
            ("lang", pa.string()),
            ("contaminated_with", pa.string()),
        ]
    )
