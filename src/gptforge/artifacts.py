"""Run-directory layout, atomic writes, hashes and the ledger of stage runs.

A run directory holds one folder per stage (`<run_dir>/<stage>/`), each with the stage's resolved `config.yaml`.
`ledger.jsonl` at the top records every stage run (stage, time, status, metrics) so a report can be rendered later
without any stage importing another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gptforge.config import dump


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600; other ranks/users on a shared folder must read it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_config(cfg: BaseModel, folder: str | Path) -> Path:
    """The resolved config beside the stage's outputs; `gptforge <stage> --config` accepts it back."""
    path = Path(folder) / "config.yaml"
    atomic_write_text(path, dump(cfg))
    return path


def append_ledger(run_dir: str | Path, stage: str, status: str, metrics: dict[str, Any] | None = None) -> None:
    """One JSON line per stage run. Appends are small single writes, so concurrent stages cannot interleave bytes."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": stage, "status": status, "metrics": metrics or {}}
    path = Path(run_dir) / "ledger.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
