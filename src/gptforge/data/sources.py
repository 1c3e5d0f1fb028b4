"""Find input files and turn each into a stream of records for the `clean` stage.

`discover` lists files (folders, files, globs, "@sample"); `iter_file` yields one `Record` per document or one
`Quarantined` per bad record, or raises `FileRejected` before yielding when the whole file is not used (binary, empty,
unknown encoding, unsupported, too large, unreadable); `split_points` cuts big line-based files into byte ranges that
workers read in parallel with absolute line numbers.

Trade-offs:
- Line-based formats (jsonl, csv/tsv, txt/md by line or paragraph) stream: memory stays flat however big the file.
  Whole-file formats (json, html, txt/md as one document, and anything compressed when read whole) are read up to
  `max_file_mb`; above that they are quarantined "too_large" instead of exhausting memory. Compressed line-based
  files stream like plain ones; a single line longer than `max_file_mb` is skipped unread and quarantined "too_large".
- Lines are split as bytes on b"\\n" and decoded one by one, so one corrupt line costs one record, not the file.
  UTF-16/32 files cannot be split as bytes; they are decoded as a stream, and a corrupt spot ends the file there.
- Only uncompressed jsonl and txt/md with txt_unit="line" are splittable: a csv quoted field may span lines, a
  paragraph may straddle a cut, and a compressed stream has no random access.
- Empty/whitespace-only records are yielded (the filters count them), so every input is accounted for; blank lines
  in jsonl/txt-line are separators, not records, but still count for line numbers.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gptforge import resolve_input
from gptforge.data import encodings as enc
from gptforge.data.encodings import Detection, Undecodable, preview

FORMATS = {".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
FORMATS |= {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
_GLOB_MAGIC = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Record:
    source: str  # posix path relative to the input root (a single-file input: its name)
    line: int  # 1-based start line / parquet row / json array index; 0 for a whole-file document
    id: str  # cfg.id_field value when present, else "source:line", or source when line == 0
    text: str
    fmt: str
    encoding: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    source: str
    line: int
    reason: str  # snake_case: invalid_json, undecodable_bytes, missing_text_field, text_not_string, ...
    detail: str  # one human line saying what exactly is wrong
    preview: str  # up to 200 characters of the raw record, undecodable bytes as \xNN


class FileRejected(Exception):
    """Raised by iter_file before it yields anything when the whole file is not used.

    kind "skipped" (binary, empty, unsupported_format) or "quarantined" (encoding_unknown, too_large, read_error,
    invalid_json, missing_text_field)."""

    def __init__(self, kind: str, reason: str, detail: str):
        super().__init__(f"{kind} ({reason}): {detail}")
        self.kind, self.reason, self.detail = kind, reason, detail


@dataclass(frozen=True)
class InputFile:
    path: Path
    rel: str  # posix path relative to its input root
    size: int  # bytes on disk
    fmt: str | None  # from the extension after stripping .gz/.zst; None when unsupported
    compression: str | None  # "gz" | "zst" | None


class InputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_field: str = Field("text", min_length=1, description="field/column with the text (jsonl/json/csv/tsv/parquet)")
    id_field: str | None = Field(None, description="field/column used as the record id; default source:line")
    encoding: str = Field("auto", description="'auto' to detect per file, or a Python codec forced for every file")
    legacy_encodings: list[str] = Field(["gb18030", "big5"], description="tried, if plausible, when not UTF-8")
    txt_unit: Literal["file", "paragraph", "line"] = Field("file", description="what one document is in .txt/.md")
    max_file_mb: float = Field(1024, gt=0, description="cap for whole-file reads and for one line (too_large)")

    @field_validator("encoding", "legacy_encodings")
    @classmethod
    def _known_codecs(cls, v: str | list[str], info: ValidationInfo) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            try:
                if name != "auto" or info.field_name != "encoding":
                    enc.canonical(name)
            except LookupError:
                raise ValueError(f"{info.field_name}: unknown codec {name!r} (e.g. 'gb18030')") from None
        return v


def discover(paths: list[str]) -> list[InputFile]:
    """Input files under `paths` (folders walked recursively, files, globs, "@sample"), each list sorted by relative
    path, hidden names skipped, the same file reached twice listed once. Unsupported extensions are included (fmt
    None) so the stage can count them. ValueError names a path that matches nothing."""
    if not paths:
        raise ValueError("input: no paths given")
    out, seen = [], set()
    for p in paths:
        for path, rel in _expand(p):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(_input_file(path, rel))
    return out


def _expand(p: str) -> list[tuple[Path, str]]:
    root = resolve_input(p)
    if root.is_dir():
        found = _walk(root, root)
        if not found:
            raise ValueError(f"input path {p!r} contains no input files")
        return found
    if root.is_file():
        return [(root, root.name)]
    if not _GLOB_MAGIC.search(p):
        raise ValueError(f"input path {p!r} does not exist")
    parts = Path(p).parts
    n_plain = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    base = Path(*parts[:n_plain]) if n_plain else Path(".")
    found = []
    for m in glob.glob(p, recursive=True):
        mp = Path(m)
        if mp.is_dir():
            found += _walk(mp, base)
        elif mp.is_file():
            found.append((mp, Path(os.path.relpath(mp, base)).as_posix()))
    if not found:
        raise ValueError(f"input glob {p!r} matches no files")
    return sorted(found, key=lambda pr: pr[1])


def _walk(folder: Path, base: Path) -> list[tuple[Path, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            # is_file() is False for broken symlinks, FIFOs and sockets: no text to read, and a FIFO would block.
            if not name.startswith(".") and path.is_file():
                found.append((path, Path(os.path.relpath(path, base)).as_posix()))
    return sorted(found, key=lambda pr: pr[1])


def _input_file(path: Path, rel: str) -> InputFile:
    stem, ext = os.path.splitext(path.name.lower())
    compression = COMPRESSIONS.get(ext)
    if compression:
        ext = os.path.splitext(stem)[1]
    # Absolute, so that worker processes and a changed working directory still find the file.
    return InputFile(path.absolute(), rel, path.stat().st_size, FORMATS.get(ext), compression)


def iter_file(
    f: InputFile, cfg: InputConfig, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[Record | Quarantined]:
    """Records and quarantined records of one file, in file order.

    `start`/`end`/`first_line` select one piece from `split_points` (line numbers stay absolute). Raises
    FileRejected before the first item when the whole file is not used; a stream that breaks after some items ends
    with a Quarantined(reason="read_error") item instead."""
    if not _splittable(f, cfg):
        if start != 0 or end not in (None, f.size):
            raise ValueError(f"{f.rel}: byte ranges are only for uncompressed jsonl or txt with txt_unit='line'")
        end = None  # f.size counts compressed bytes; a whole-file read must not stop there
    last_line, yielded = first_line - 1, False
    try:
        for item in _iter(f, cfg, start, end, first_line):
            yielded, last_line = True, item.line
            yield item
    except enc.stream_errors(f.compression) as e:
        if not yielded:
            raise FileRejected("quarantined", "read_error", f"cannot read: {e}") from None
        yield Quarantined(f.rel, last_line + 1, "read_error", f"stream broke after line {last_line}: {e}", "")


def split_points(f: InputFile, cfg: InputConfig, target_bytes: int) -> list[tuple[int, int, int]]:
    """[(start, end, first_line)] covering the file, each cut right after a newline, about `target_bytes` long.

    One piece when the file is small or not splittable. Counting first_line reads the file once (fast: bytes.count)."""
    if target_bytes <= 0:
        raise ValueError(f"split_points: target_bytes must be > 0, got {target_bytes}")
    whole = [(0, f.size, 1)]
    if f.size <= target_bytes or not _splittable(f, cfg):
        return whole
    try:
        with open(f.path, "rb") as fh:
            head = fh.read(enc.HEAD_BYTES)
            det = _detect(head, len(head) >= f.size, cfg)
            if det.codec is None or not enc.line_safe(det.codec) or enc.binary_reason(head):
                return whole  # iter_file rejects it or reads it as a stream
            fh.seek(0)
            cuts, size = enc.newline_cuts(fh, target_bytes)
    except OSError:
        return whole  # iter_file reports the error
    starts = [(0, 0), *cuts]
    ends = [c for c, _ in cuts] + [size]
    return [(s, e, n + 1) for (s, n), e in zip(starts, ends)]


def _splittable(f: InputFile, cfg: InputConfig) -> bool:
    return f.compression is None and (f.fmt == "jsonl" or (f.fmt in ("txt", "md") and cfg.txt_unit == "line"))


def _detect(head: bytes, complete: bool, cfg: InputConfig) -> Detection:
    forced = None if cfg.encoding == "auto" else cfg.encoding
    return enc.detect_encoding(head, cfg.legacy_encodings, complete=complete, forced=forced)


def _iter(f: InputFile, cfg: InputConfig, start: int, end: int | None, first_line: int) -> Iterator:
    max_bytes = int(cfg.max_file_mb * 2**20)
    whole = f.fmt in ("json", "html") or (f.fmt in ("txt", "md") and cfg.txt_unit == "file")
    # Compressed line-based files stream like plain ones; only whole-file reads (and compressed parquet) are capped.
    if f.fmt is not None and f.size > max_bytes and (whole or (f.compression and f.fmt == "parquet")):
        raise FileRejected("quarantined", "too_large", f"{f.size / 2**20:.1f} MB > max_file_mb={cfg.max_file_mb}")
    if f.fmt is not None and f.size == 0:
        raise FileRejected("skipped", "empty", "0 bytes")
    if f.fmt == "parquet":
        yield from _parquet(f, cfg, max_bytes)
        return
    with enc.open_stream(f.path, f.compression) as fh:
        data = fh.read(max_bytes + 1 if whole else enc.HEAD_BYTES + 1)
    head = data[: enc.HEAD_BYTES]
    if why := enc.binary_reason(head, None if cfg.encoding == "auto" else cfg.encoding):
        raise FileRejected("skipped", "binary", why)
    if f.fmt is None:
        raise FileRejected("skipped", "unsupported_format", f"extension of {Path(f.rel).name!r} is not a known format")
    if not data:
        raise FileRejected("skipped", "empty", "0 bytes")
    if whole and len(data) > max_bytes:
        raise FileRejected("quarantined", "too_large", f"more than max_file_mb={cfg.max_file_mb} MB once decompressed")
    det = _detect(head, len(data) <= enc.HEAD_BYTES, cfg)
    if det.codec is None:
        raise FileRejected("quarantined", "encoding_unknown", det.detail)
    if not whole and len(data) <= enc.HEAD_BYTES and not data[det.bom :].decode(det.codec, "replace").strip():
        raise FileRejected("skipped", "empty", "whitespace only")
    if whole:
        yield from _whole_file(f, cfg, det, data)
        return
    lines = _lines(f, det, start, end, max_bytes)
    if f.fmt == "jsonl":
        yield from _jsonl(f, cfg, det, lines, first_line)
    elif f.fmt in ("csv", "tsv"):
        yield from _csv(f, cfg, det, lines, first_line)
    elif cfg.txt_unit == "line":
        yield from _txt_lines(f, det, lines, first_line)
    else:
        yield from _paragraphs(f, det, lines, first_line)


def _lines(f: InputFile, det: Detection, start: int, end: int | None, max_line: int) -> Iterator[str | Undecodable]:
    assert det.codec is not None
    with enc.open_stream(f.path, f.compression) as fh:
        skip = start or len(fh.read(det.bom))  # the BOM counts against the first piece's byte budget
        if start:
            fh.seek(start)
        yield from enc.decode_lines(fh, det.codec, None if end is None else end - skip, max_line)


def _bad_bytes(src: str, line: int, bad: Undecodable, label: str) -> Quarantined:
    return Quarantined(src, line, bad.reason, bad.describe(label), preview(bad.raw, label))


def _record(f: InputFile, det: Detection, line: int, text: str, rid: object = None) -> Record:
    rid = str(rid) if rid is not None and rid != "" else (f"{f.rel}:{line}" if line else f.rel)
    return Record(f.rel, line, rid, text, f.fmt or "txt", det.label)


def _id(obj: object, cfg: InputConfig) -> object:
    return obj.get(cfg.id_field) if cfg.id_field and isinstance(obj, dict) else None


def _text_of(
    f: InputFile, cfg: InputConfig, line: int, obj: object, raw: str | None, escapes: bool
) -> Quarantined | str:
    """The text of a json(l) object or string, or why it has none. `raw` is the source line (None: dump `obj` for the
    preview); `escapes` says the source holds "\\u" escapes, the only way JSON can produce a lone surrogate (strict
    decoding rejects raw ones), so the regex scan is skipped for almost every record."""
    why = None
    if isinstance(obj, str):
        text = obj
    elif not isinstance(obj, dict):
        reason, why = "not_an_object", f"expected an object, got {type(obj).__name__}"
    elif not isinstance(text := obj.get(cfg.text_field), str):
        reason = "missing_text_field" if text is None else "text_not_string"
        why = f"field {cfg.text_field!r} " + ("is null" if text is None else f"is {type(text).__name__}, not a string")
        if cfg.text_field not in obj:
            why = f"field {cfg.text_field!r} is missing (keys: {', '.join(list(obj)[:10])})"
    if why is None and escapes and (m := _SURROGATE.search(text)):
        reason, why = "invalid_unicode", f"unpaired surrogate U+{ord(m.group()):04X} at character {m.start() + 1}"
    if why is None:
        return text
    raw = json.dumps(obj, ensure_ascii=False)[:800] if raw is None else raw
    return Quarantined(f.rel, line, reason, why, preview(raw))


def _json_error(e: Exception, with_line: bool = False) -> str:
    if not isinstance(e, json.JSONDecodeError):
        return f"{type(e).__name__}: {e}"  # nesting too deep, integer too long
    where = f"line {e.lineno}, column {e.colno}" if with_line else f"column {e.colno}"
    return f"{e.msg.removesuffix(' at')} at {where}"


def _jsonl(f: InputFile, cfg: InputConfig, det: Detection, lines, first_line: int) -> Iterator[Record | Quarantined]:
    for lineno, line in enumerate(lines, first_line):
        if type(line) is Undecodable:
            yield _bad_bytes(f.rel, lineno, line, det.label)
            continue
        if line.startswith("\ufeff"):  # files joined with `cat` keep each one's BOM at the start of a line
            line = line[1:]
        if not line or line.isspace():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            yield Quarantined(f.rel, lineno, "invalid_json", _json_error(e), preview(line))
            continue
        text = _text_of(f, cfg, lineno, obj, line, "\\u" in line)
        yield text if type(text) is Quarantined else _record(f, det, lineno, text, _id(obj, cfg))


def _txt_lines(f: InputFile, det: Detection, lines, first_line: int) -> Iterator[Record | Quarantined]:
    for lineno, line in enumerate(lines, first_line):
        if type(line) is Undecodable:
            yield _bad_bytes(f.rel, lineno, line, det.label)
        elif line.strip():
            yield _record(f, det, lineno, _chomp(line))


def _chomp(line: str) -> str:
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line


def _paragraphs(f: InputFile, det: Detection, lines, first_line: int) -> Iterator[Record | Quarantined]:
    """Blank-line separated paragraphs; one undecodable line quarantines its paragraph."""
    buf: list[str] = []
    bad: Quarantined | None = None
    start = first_line
    for lineno, line in enumerate(chain(lines, [None]), first_line):  # None flushes the last paragraph
        if line is not None and (type(line) is Undecodable or line.strip()):
            if not buf and bad is None:
                start = lineno
            if type(line) is not Undecodable:
                buf.append(line)
            elif bad is None:
                q = _bad_bytes(f.rel, start, line, det.label)
                bad = Quarantined(f.rel, start, q.reason, f"line {lineno}: {q.detail}", q.preview)
            continue
        if bad is not None:
            yield bad
        elif buf:
            yield _record(f, det, start, _chomp("".join(buf)))
        buf, bad = [], None


def _csv(f: InputFile, cfg: InputConfig, det: Detection, lines, first_line: int) -> Iterator[Record | Quarantined]:
    bad_lines: dict[int, Undecodable] = {}

    def feed() -> Iterator[str]:
        for lineno, line in enumerate(lines, first_line):
            if type(line) is Undecodable:  # keep the bytes as surrogates so the csv parser stays in step; flagged below
                bad_lines[lineno] = line
                line = line.raw.decode(det.codec or "utf-8", "surrogateescape")
            yield line

    # Documents are often longer than csv's default 128 KiB field limit; allow up to the whole-file limit.
    csv.field_size_limit(max(csv.field_size_limit(), int(cfg.max_file_mb * 2**20)))
    reader = csv.reader(feed(), dialect="excel-tab" if f.fmt == "tsv" else "excel")
    try:  # with the raised field limit csv.Error is next to impossible; treat it like a broken stream
        yield from _csv_rows(f, cfg, det, reader, first_line, bad_lines)
    except csv.Error as e:
        raise OSError(f"csv parser: {e} (after line {first_line + reader.line_num - 1})") from None


def _csv_rows(f: InputFile, cfg: InputConfig, det: Detection, reader, first_line: int, bad_lines: dict):
    header = next((row for row in reader if row), None)
    if header is None:
        return
    if cfg.text_field not in header:
        raise FileRejected("quarantined", "missing_text_field", f"no column {cfg.text_field!r} in header {header[:20]}")
    col = header.index(cfg.text_field)
    id_col = header.index(cfg.id_field) if cfg.id_field in header else None
    done = reader.line_num
    for row in reader:
        lineno, done = first_line + done, reader.line_num  # a quoted field may span lines: the row starts after done
        if not row:
            continue
        raw = ("\t" if f.fmt == "tsv" else ",").join(row)
        if bad_lines and (bad := [bad_lines[n] for n in range(lineno, first_line + done) if n in bad_lines]):
            what = "bytes that do not decode" if bad[0].err else "a line over max_file_mb"
            detail = f"{det.label}: {what} in lines {lineno}-{first_line + done - 1}"
            yield Quarantined(f.rel, lineno, bad[0].reason, detail, preview(raw))
        elif col >= len(row):
            detail = f"row has {len(row)} fields, column {cfg.text_field!r} is field {col + 1}"
            yield Quarantined(f.rel, lineno, "missing_text_field", detail, preview(raw))
        else:
            yield _record(f, det, lineno, row[col], row[id_col] if id_col is not None and id_col < len(row) else None)


def _whole_file(f: InputFile, cfg: InputConfig, det: Detection, data: bytes) -> Iterator[Record | Quarantined]:
    assert det.codec is not None
    body = data[det.bom :]
    try:
        text = body.decode(det.codec)
    except UnicodeDecodeError as e:
        line = body.count(b"\n", 0, e.start) + 1
        col = e.start - body.rfind(b"\n", 0, e.start)
        detail = f"{det.label}: {e.reason} (byte 0x{body[e.start]:02x}) at line {line}, column {col}"
        yield Quarantined(f.rel, 0, "undecodable_bytes", detail, preview(body, det.codec))
        return
    if not text.strip():
        raise FileRejected("skipped", "empty", "whitespace only")
    if f.fmt != "json":
        yield _record(f, det, 0, text)
        return
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FileRejected("quarantined", "invalid_json", _json_error(e, with_line=True)) from None
    if isinstance(doc, dict):
        doc = [doc]  # one object is a one-element array: line 1
    elif not isinstance(doc, list):
        raise FileRejected("quarantined", "invalid_json", f"top level is {type(doc).__name__}, not an array/object")
    escapes = "\\u" in text
    for i, el in enumerate(doc, 1):
        text = _text_of(f, cfg, i, el, None, escapes)
        yield text if type(text) is Quarantined else _record(f, det, i, text, _id(el, cfg))


def _parquet(f: InputFile, cfg: InputConfig, max_bytes: int) -> Iterator[Record | Quarantined]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{f.rel}: reading .parquet needs pyarrow: pip install 'gptforge[parquet]'") from None
    det = Detection("utf-8", "utf-8", 0, "parquet strings are UTF-8")
    try:
        if f.compression:
            with enc.open_stream(f.path, f.compression) as fh:
                data = fh.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise FileRejected("quarantined", "too_large", f"more than max_file_mb={cfg.max_file_mb} MB")
            pf = pq.ParquetFile(pa.BufferReader(data))
        else:
            pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, *enc.stream_errors(f.compression)) as e:
        raise FileRejected("quarantined", "read_error", f"not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise FileRejected("quarantined", "missing_text_field", f"no column {cfg.text_field!r} in {names[:20]}")
    id_is_text = cfg.id_field == cfg.text_field
    with_id = cfg.id_field is not None and cfg.id_field in names and not id_is_text
    columns = [cfg.text_field, cfg.id_field] if with_id else [cfg.text_field]
    row = 0
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if with_id else [None] * len(texts)
            for text, rid in zip(texts, ids):
                row += 1
                if isinstance(text, str):
                    yield _record(f, det, row, text, text if id_is_text else rid)
                elif text is None:
                    yield Quarantined(f.rel, row, "missing_text_field", f"column {cfg.text_field!r} is null", "")
                else:
                    detail = f"column {cfg.text_field!r} holds {type(text).__name__}, not a string"
                    yield Quarantined(f.rel, row, "text_not_string", detail, preview(repr(text)))
    except pa.ArrowException as e:
        raise OSError(f"parquet row {row + 1}: {e}") from None
