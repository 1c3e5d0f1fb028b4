"""Read a folder (or file) of text into documents for the tokenizer and pretraining, and cut them into pieces for
the train/validation split.

This is the strict reader: it decodes every format and encoding the `clean` stage reads (through the same
`sources` module), but it does not clean. A record the clean stage would quarantine (bad JSON, undecodable bytes,
an unknown encoding) is an error here naming the file and line, never a silent skip; files of other types (images,
unknown extensions) and empty files are not inputs. Run `gptforge clean` first to get past bad records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptforge.data.sources import FileRejected, InputConfig, InputFile, Quarantined, discover, iter_file


class DataError(ValueError):
    """Unreadable or unusable input data; the message names the file."""


@dataclass(frozen=True)
class Document:
    source: str  # stable id: relative path, plus ":line" for records of line-based formats
    text: str


def _discover(path: str | Path) -> list[InputFile]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"input path does not exist: {p}")
    try:
        return discover([str(p)])
    except ValueError as e:
        raise DataError(f"no readable text files (.txt, .md, .jsonl, .json, .csv, .parquet, ...) in {p}: {e}") from None


def list_files(path: str | Path) -> list[Path]:
    """Readable files under `path`, sorted so every run sees the same order."""
    files = [f for f in _discover(path) if f.fmt]
    if not files:
        if Path(path).is_file():
            raise DataError(f"unsupported file type '{Path(path).suffix}' for {path}")
        raise DataError(f"no readable text files (.txt, .md, .jsonl, .json, .csv, .parquet, ...) found in {path}")
    return [f.path for f in files]


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    cfg = InputConfig(text_field=text_field)
    files = [f for f in _discover(path) if f.fmt]
    if not files:
        list_files(path)  # raises the "nothing to read" error
    for f in files:
        try:
            for item in iter_file(f, cfg):
                if isinstance(item, Quarantined):
                    where = f"{f.path}:{item.line}" if item.line else str(f.path)
                    raise DataError(f"{where}: {item.reason}: {item.detail} {_HINT}")
                if item.text.strip():
                    yield Document(f"{item.source}:{item.line}" if item.line else item.source, item.text)
        except FileRejected as e:
            if e.reason != "empty":
                raise DataError(f"{f.path}: {e.reason}: {e.detail} {_HINT}") from None


_HINT = "(`gptforge clean` sets such input aside, with the reason, and keeps the rest)"


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
