"""Execution of the `clean` stage: a plan of shards, then scan -> dedup -> write, each step restartable.

Steps are the datatrove shape (a list of steps over a document stream), split where a global view is needed:

1. **scan** (parallel, per shard): read -> normalize -> filter -> decontaminate. Survivors go to the shard's
   `docs.jsonl` with their exact-hash key, MinHash signature and line hashes; everything else is written out with
   its reason at once.
2. **dedup** (one process): exact and near-duplicate clusters over all shards (the smallest global index of a
   cluster is kept), boilerplate lines (in many documents) and repeated lines (kept in their first document only).
3. **write** (parallel, per shard): drop the duplicates, remove boilerplate/repeated lines, write the output shard.

A shard's outputs are written to temporary names and renamed into place before its marker file, so a killed run
redoes only the shards without a marker and never duplicates or loses a record (`clean_io`). The global order of
documents is (shard, position in shard), fixed by the plan, so the output is identical whatever the worker count or
rank split. Memory does not grow with the corpus, nor with a shard's text: documents, ids and signatures stream
through files, and a shard holds 16 bytes per document and 32 per long line in memory (a single big compressed file
is one shard). The dedup step is the exception: it holds 16 bytes + one signature per document, the line table, and
the ids of the documents that duplicates point at.
"""

from __future__ import annotations

import functools
import json
import os
import time
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import atomic_write_text
from gptforge.data.clean_io import ShardFiles, load_npy, save_npy
from gptforge.data.decontam import DecontamConfig, Decontaminator
from gptforge.data.dedup import (
    DedupConfig,
    MinHasher,
    exact_duplicate_reps,
    exact_key,
    line_hash,
    lsh_bands,
    near_duplicate_clusters,
)
from gptforge.data.filters import FilterConfig, Filters, detect_language, script_mix
from gptforge.data.normalize import NormalizeConfig, Normalizer
from gptforge.data.sources import FileRejected, InputConfig, InputFile, Quarantined, discover, iter_file, split_points
from gptforge.data.text import UNIT_RE
from gptforge.faults import fault_seconds

# Document lengths (characters) are histogrammed into fixed bins so shard statistics add up exactly.
LENGTH_BINS = [0, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000]
EXAMPLES_PER_REASON = 3
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")
MAX_LISTED = 200  # files or contaminated documents listed in stats.json; all of them are in the files on disk


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


def eval_files_stamp(paths: list[str]) -> list[list]:
    """[path, size, mtime] of every evaluation file: what is contaminated depends on their content."""
    if not paths:
        return []
    try:
        found = discover(paths)
    except ValueError as e:
        raise ValueError(f"decontam.paths: {e}") from None
    return [[f.rel, f.size, os.stat(f.path).st_mtime_ns] for f in found]


def plan_fingerprint(inputs: list[str], files: list[InputFile], shards: list[list[Piece]], settings: Settings) -> dict:
    return {
        "inputs": inputs,
        "settings": settings.model_dump(mode="json"),
        "files": [[f.rel, f.size, os.stat(f.path).st_mtime_ns] for f in files],
        "shards": [[asdict(p) for p in s] for s in shards],
        "eval_files": eval_files_stamp(settings.decontam.paths),
    }


def part(i: int) -> str:
    return f"part-{i:05d}"


def length_bin(n: int) -> int:
    return int(np.searchsorted(LENGTH_BINS, n, side="right")) - 1


def _tools(settings_json: str) -> tuple:
    s = Settings.model_validate_json(settings_json)
    # keyed by the evaluation files too: a process that runs twice must not reuse an index of files since changed
    return _build_tools(settings_json, json.dumps(eval_files_stamp(s.decontam.paths)))


@functools.lru_cache(maxsize=2)
def _build_tools(settings_json: str, eval_stamp: str) -> tuple:
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
        "files": {},  # by index in the plan's file list: two inputs may hold the same relative path
        "records_in": 0,
        "quarantined": Counter(),
        "dropped": Counter(),
        "candidates": 0,
        "normalized": Counter(),
        "lengths_before": [0] * len(LENGTH_BINS),
        "languages_before": Counter(),
        "examples": {},
        "contaminated": [],  # the first MAX_LISTED; all of them are in rejects/contaminated or marked in data
        "contaminated_count": 0,
    }


def _example(stats: dict, reason: str, row: dict) -> None:
    ex = stats["examples"].setdefault(reason, [])
    if len(ex) < EXAMPLES_PER_REASON:
        ex.append({k: (v[:300] if isinstance(v, str) else v) for k, v in row.items()})


def _contaminated(stats: dict, doc_id: str, hit: dict) -> None:
    stats["contaminated_count"] += 1
    if len(stats["contaminated"]) < MAX_LISTED:
        stats["contaminated"].append({"id": doc_id, **hit})


def scan_shard(
    index: int, pieces: list[Piece], files: Mapping[int, InputFile] | Sequence[InputFile], settings_json: str, out: Path
) -> dict:
    """Step 1 for one shard; returns its statistics (also saved as the shard's completion marker). `files[i]` is
    the plan's file i: the whole list, or only this shard's files."""
    s, normalizer, filters, decontam, hasher = _tools(settings_json)
    work = out / "work" / "scan" / part(index)
    work.mkdir(parents=True, exist_ok=True)
    sink, stats = ShardFiles(), _new_stats()
    min_line = _line_min_chars(s)
    # Per document only 16 bytes of key and 32 per long line stay in memory; texts, ids and signatures stream to disk.
    keys, line_rows, texts, n_docs = bytearray(), array("Q"), [], 0
    try:
        docs_out, ids_out = sink.open(work / "docs.jsonl"), sink.open(work / "ids.jsonl")
        sig_out = sink.open(work / "sig.u32", "raw") if hasher is not None else None
        for piece in pieces:
            f = files[piece.file]
            row = stats["files"].setdefault(
                str(piece.file), {"file": f.rel, "records": 0, "bytes": f.size, "format": f.fmt}
            )
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
                    if hit:
                        _contaminated(stats, item.id, hit)
                    if reason:
                        stats["dropped"][reason] += 1
                        rej = {**base, "reason": reason, "detail": _detail(reason, hit), "text": text}
                        sink.write(out / "rejects" / reason / f"{part(index)}.jsonl", rej)
                        _example(stats, reason, rej)
                        continue
                    doc = {**base, "lang": lang, "text": text}
                    if hit:
                        doc["contaminated_with"] = hit["eval_id"]
                    local, n_docs = n_docs, n_docs + 1
                    docs_out.write(doc)
                    ids_out.write(item.id)
                    keys += exact_key(text)
                    if min_line is not None:
                        for line in dict.fromkeys(ln.strip() for ln in text.split("\n")):
                            if len(line) >= min_line:
                                line_rows.extend((line_hash(line), local, len(line), len(UNIT_RE.findall(line))))
                    if sig_out is not None:
                        texts.append(text)
                        if len(texts) >= 512:
                            sig_out.write(np.ascontiguousarray(hasher.signatures(texts), dtype=np.uint32))
                            texts = []
                if piece.start == 0:
                    row["status"] = "ok"
            except FileRejected as e:
                if piece.start == 0:  # every piece of a file sees the same head, so report the file once
                    row.update(status=e.kind, reason=e.reason, detail=e.detail)
                    if e.kind == "quarantined":
                        q = {"source": f.rel, "line": None, "reason": e.reason, "detail": e.detail, "scope": "file"}
                        sink.write(out / "quarantine" / f"{part(index)}.jsonl", q)
                        _example(stats, e.reason, q)
        if sig_out is not None and texts:
            sig_out.write(np.ascontiguousarray(hasher.signatures(texts), dtype=np.uint32))
        stats["candidates"] = n_docs
        save_npy(work / "exact.npy", np.frombuffer(bytes(keys), dtype="S16"))
        lines = np.frombuffer(line_rows, dtype=np.uint64).reshape(-1, 4)  # hash, doc, characters, units
        save_npy(work / "lines.npy", lines)
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


def _jsonable(stats: dict) -> dict:
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in stats.items()}


def _signatures(scan: Path, index: int, count: int, num_perm: int) -> np.ndarray:
    sig = np.fromfile(scan / part(index) / "sig.u32", dtype=np.uint32)
    if sig.size != count * num_perm:
        raise RuntimeError(f"clean: {scan / part(index)} holds {sig.size} signature values for {count} documents")
    return sig.reshape(count, num_perm)


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
        del keys
    if s.dedup.near and n:
        uniq = np.flatnonzero(reason == 0)
        bounds = np.searchsorted(uniq, offsets)
        sig = np.concatenate(  # one shard's signatures at a time, only the documents that are not exact copies
            [
                _signatures(scan, i, counts[i], s.dedup.num_perm)[uniq[bounds[i] : bounds[i + 1]] - offsets[i]]
                for i in range(n_shards)
            ]
        )
        near = near_duplicate_clusters(sig, s.dedup.threshold, s.dedup.bands, s.dedup.verify)
        del sig
        moved = near != np.arange(len(uniq))
        reason[uniq[moved]] = 2
        rep[uniq[moved]] = uniq[near[moved]]
    root = rep.copy()
    for _ in range(4):  # an exact copy of a near-duplicate points at a document that points on; follow to the root
        root = root[root]
    boilerplate, repeated = _line_decisions(s, scan, n_shards, offsets, reason)
    folder = out / "work" / "dedup"
    folder.mkdir(parents=True, exist_ok=True)
    save_npy(folder / "boilerplate.npy", boilerplate)
    save_npy(folder / "repeated.npy", repeated)
    dups = np.flatnonzero(reason)
    top = _largest_clusters(root, dups)
    wanted = [rep[dups]] + [np.array([r, *members], dtype=np.int64) for r, _, members in top]
    ids = _column(scan, "ids.jsonl", offsets, np.unique(np.concatenate(wanted)))  # each shard read once at most
    cut = np.searchsorted(dups, offsets)
    for i in range(n_shards):
        rows = [
            [g - int(offsets[i]), DUPLICATE_REASONS[reason[g] - 1], ids[int(rep[g])]]
            for g in dups[cut[i] : cut[i + 1]].tolist()
        ]
        atomic_write_text(folder / f"{part(i)}.json", json.dumps(rows, ensure_ascii=False))
    docs = _column(scan, "docs.jsonl", offsets, np.unique(np.array([r for r, _, _ in top], dtype=np.int64)))
    clusters = [
        {"size": size, "kept": ids[r], "removed": [ids[m] for m in members], "preview": docs[r]["text"][:200]}
        for r, size, members in top
    ]
    stats = {
        "documents": n,
        "lsh": dict(
            zip(("bands", "rows"), lsh_bands(s.dedup.threshold, s.dedup.num_perm, s.dedup.bands, s.dedup.verify))
        ),
        "exact_duplicate": int((reason == 1).sum()),
        "near_duplicate": int((reason == 2).sum()),
        "clusters": int(len(np.unique(root[dups]))),
        "largest_clusters": clusters,
        "boilerplate_lines": int(len(boilerplate)),
        "repeated_lines": int(len(repeated)),
    }
    atomic_write_text(out / "work" / "dedup" / "stats.json", json.dumps(stats, ensure_ascii=False))  # marker, last
    return stats


def _column(scan: Path, name: str, offsets: np.ndarray, wanted: np.ndarray) -> dict[int, Any]:
    """Global document index -> its row of each shard's `name` (jsonl, one row per document) for the sorted
    indices `wanted`, reading each shard's file once at most and only up to the last row needed."""
    found: dict[int, Any] = {}
    shard_of = np.searchsorted(offsets, wanted, side="right") - 1
    for shard in np.unique(shard_of).tolist():
        lo = int(offsets[shard])
        need = set((wanted[shard_of == shard] - lo).tolist())
        last = max(need)
        with open(scan / part(shard) / name, encoding="utf-8") as fh:
            for local, line in enumerate(fh):
                if local in need:
                    found[lo + local] = json.loads(line)
                if local >= last:
                    break
    return found


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
    return hashes[bp], rep  # both sorted by hash (np.unique): writers look lines up with searchsorted


def _largest_clusters(root: np.ndarray, dups: np.ndarray, top: int = 10) -> list[tuple[int, int, list[int]]]:
    """(kept document, cluster size, first 5 removed members) of the `top` largest duplicate clusters."""
    if not len(dups):
        return []
    roots, counts = np.unique(root[dups], return_counts=True)
    order = np.lexsort((roots, -counts))[:top]
    return [
        (r, c + 1, dups[root[dups] == r][:5].tolist()) for r, c in zip(roots[order].tolist(), counts[order].tolist())
    ]


def _in_sorted(table: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of `values` found in the sorted `table`, their positions)."""
    if not len(table):
        return np.zeros(len(values), dtype=bool), np.zeros(len(values), dtype=np.int64)
    pos = np.minimum(np.searchsorted(table, values), len(table) - 1)
    return np.asarray(table[pos]) == values, pos


def _shard_line_tables(work: Path, index: int) -> tuple[frozenset, dict]:
    """The boilerplate hashes and repeated lines (hash -> first document) that occur in this shard: the corpus-wide
    tables are searched (memory-mapped when large), and only this shard's share is held."""
    own = np.unique(np.load(work / "scan" / part(index) / "lines.npy")[:, 0])
    bp = load_npy(work / "dedup" / "boilerplate.npy")
    rep = load_npy(work / "dedup" / "repeated.npy")
    in_bp, _ = _in_sorted(bp, own)
    in_rep, pos = _in_sorted(rep[:, 0], own)
    firsts = np.asarray(rep[pos[in_rep], 1]) if in_rep.any() else np.zeros(0, dtype=np.uint64)
    return frozenset(own[in_bp].tolist()), dict(zip(own[in_rep].tolist(), firsts.tolist()))


def write_shard(index: int, settings_json: str, out: Path, offset: int) -> dict:
    """Step 3 for one shard: drop duplicates, strip boilerplate/repeated lines, stream the output part."""
    s = Settings.model_validate_json(settings_json)
    work = out / "work"
    dropped = {r[0]: (r[1], r[2]) for r in json.loads((work / "dedup" / f"{part(index)}.json").read_text("utf-8"))}
    min_line = _line_min_chars(s)
    boilerplate, repeated = _shard_line_tables(work, index) if min_line is not None else (frozenset(), {})
    sink = ShardFiles()
    stats = {"kept": 0, "dropped": Counter(), "lines_removed": Counter(), "lengths_after": [0] * len(LENGTH_BINS)}
    stats.update(languages_after=Counter(), chars_after={"cjk": 0.0, "latin": 0.0, "other": 0.0}, examples={})
    try:
        data = sink.open(out / "data" / f"{part(index)}.{s.output.format}", s.output.format)
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
                data.write(doc)
                stats["kept"] += 1
                stats["lengths_after"][length_bin(len(doc["text"]))] += 1
                stats["languages_after"][doc["lang"]] += 1
                n = len(doc["text"])
                for k, v in script_mix(doc["text"]).items():
                    stats["chars_after"][k] = stats["chars_after"].get(k, 0.0) + v * n
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
