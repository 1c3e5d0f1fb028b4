"""Crash-safe files for the `clean` stage: every file of a shard is written under a temporary name and renamed into
place by `ShardFiles.commit()`, before the shard's marker is written.

Trade-offs:
- Temporary names are unique per writer (process id + random suffix), not per shard. Two processes that work on the
  same shard at once (a scheduler retry while the old job still runs, ranks started with different world sizes)
  then each write their own file and rename it into place; both produce the same bytes, so the result is the same
  whichever rename wins. With fixed names one would truncate or delete the other's file. The price: a killed
  writer's temporary files are not overwritten by the redo; `remove_stale_tmp` deletes them once every shard is
  done (the report step) or when a run folder is cleared.
- Output shards stream to disk (jsonl line by line, parquet in row groups), so writing one shard holds one row
  group in memory, not the whole shard: a single big compressed file is one shard however large it is.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.artifacts import fsync_dir

PARQUET_ROWS = 2048  # a parquet row group ends after this many rows or PARQUET_CHARS characters of text,
PARQUET_CHARS = 32 << 20  # whichever comes first: what the writer holds in memory
OUTPUT_COLUMNS = ("id", "text", "source", "line", "lang", "contaminated_with")


def tmp_name(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this writer (readers and `discover` skip hidden files)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files that killed writers left under `folder`; only safe when nobody is writing there."""
    n = 0
    if folder.is_dir():
        for p in folder.rglob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_npy(path: Path) -> np.ndarray:
    """np.load, memory-mapped when large (the dedup tables are searched, not read whole, by each writer)."""
    return np.load(path, mmap_mode="r" if path.stat().st_size > 1 << 20 else None)


class _Jsonl:
    def __init__(self, tmp: Path):
        self.fh = open(tmp, "w", encoding="utf-8")

    def write(self, row: Any) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


class _Raw(_Jsonl):
    def __init__(self, tmp: Path):
        self.fh = open(tmp, "wb")

    def write(self, data: Any) -> None:
        self.fh.write(memoryview(data))


class _Parquet:
    def __init__(self, tmp: Path):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("output.format=parquet needs pyarrow: pip install 'gptforge[parquet]'") from None
        self.pa, self.tmp, self.rows, self.chars = pa, tmp, [], 0
        self.schema = pa.schema(
            [
                ("id", pa.string()),
                ("text", pa.string()),
                ("source", pa.string()),
                ("line", pa.int64()),
                ("lang", pa.string()),
                ("contaminated_with", pa.string()),
            ]
        )
        self.writer = pq.ParquetWriter(tmp, self.schema)

    def write(self, doc: dict) -> None:
        self.rows.append(doc)
        self.chars += len(doc["text"])
        if len(self.rows) >= PARQUET_ROWS or self.chars >= PARQUET_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            cols = {c: [d.get(c) for d in self.rows] for c in OUTPUT_COLUMNS}
            self.writer.write_table(self.pa.table(cols, schema=self.schema))
            self.rows, self.chars = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())

    def abort(self) -> None:
        self.writer.close()


class ShardFiles:
    """The files one shard writes, under temporary names until commit() renames them all into place."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[Any, Path]] = {}

    def open(self, path: Path, kind: str = "jsonl") -> Any:
        """The writer for `path` ("jsonl", "raw" bytes or "parquet"), created now, so it exists even if empty."""
        entry = self._open.get(path)
        if entry is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_name(path)
            entry = self._open[path] = ({"jsonl": _Jsonl, "raw": _Raw, "parquet": _Parquet}[kind](tmp), tmp)
        return entry[0]

    def write(self, path: Path, row: Any) -> None:
        self.open(path).write(row)

    def commit(self) -> None:
        for path in list(self._open):
            writer, tmp = self._open[path]
            writer.close()
            os.replace(tmp, path)
            del self._open[path]
            fsync_dir(path.parent)

    def abort(self) -> None:
        for writer, tmp in self._open.values():
            try:
                writer.abort()
            finally:
                tmp.unlink(missing_ok=True)
        self._open.clear()
