"""Read a folder (or file) of .txt/.md/.jsonl into documents, and cut them into pieces for the train/val split.

This is the simple reader the pretraining spine needs; the full cleaning pipeline (encodings, filters, dedup) is the
`clean` stage's job. Here a file that is not UTF-8 text is an error naming the file and the byte offset, never a
silent skip, and a folder with no readable text is an error too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
SUPPORTED = TEXT_SUFFIXES | JSONL_SUFFIXES


class DataError(ValueError):
    """Unreadable or unusable input data; the message names the file."""


@dataclass(frozen=True)
class Document:
    source: str  # stable id: relative path, plus ":line" for jsonl records
    text: str


def list_files(path: str | Path) -> list[Path]:
    """Supported files under `path`, sorted so every run sees the same order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"input path does not exist: {p}")
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED:
            raise DataError(f"unsupported file type '{p.suffix}' for {p} (supported: {', '.join(sorted(SUPPORTED))})")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
    files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(p).parts)]
    if not files:
        raise DataError(f"no .txt, .md or .jsonl files found in {p}")
    return files


def decode_text(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (NUL bytes); pass text files only")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 (e.g. with iconv)"
        ) from None
    return text.removeprefix("\ufeff")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    root = Path(path)
    base = root if root.is_dir() else root.parent
    for f in list_files(root):
        rel = f.relative_to(base).as_posix()
        text = decode_text(f.read_bytes(), f)
        if f.suffix.lower() in JSONL_SUFFIXES:
            # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and others, which are legal raw
            # characters inside a JSON string.
            for lineno, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise DataError(f"{f}:{lineno}: record has no string field '{text_field}'")
                if _has_surrogate(rec[text_field]):
                    raise DataError(
                        f"{f}:{lineno}: text holds an unpaired surrogate escape (e.g. \\ud83d), not valid text"
                    )
                if rec[text_field].strip():
                    yield Document(f"{rel}:{lineno}", rec[text_field])
        elif text.strip():
            yield Document(rel, text)


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def split_pieces(doc: Document, max_chars: int) -> list[Document]:
    """Cut a long document at line boundaries into pieces of about `max_chars`, so that a corpus made of a few
    big files still gets a meaningful document-level train/validation split."""
    if len(doc.text) <= max_chars:
        return [doc]
    pieces, buf, size = [], [], 0
    for line in doc.text.splitlines(keepends=True):
        buf.append(line)
        size += len(line)
        if size >= max_chars:
            pieces.append("".join(buf))
            buf, size = [], 0
    if buf:
        pieces.append("".join(buf))
    return [Document(f"{doc.source}#{i}", t) for i, t in enumerate(pieces)]
