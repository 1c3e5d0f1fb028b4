"""Regression tests for edge cases in sources.py / encodings.py found in review (issue 3)."""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc

import pytest
import zstandard

from gptforge.data import encodings as enc
from gptforge.data.sources import FileRejected, InputConfig, Quarantined, Record, discover, iter_file, split_points
from tests.data.test_sources import read, rejected


def jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(start, start + n))


# --- zstd: a cut file used to read as "0 bytes, empty" or lose its last frame silently ---------------------------


@pytest.mark.parametrize("cut", [1, 4, 100, "half"])
def test_truncated_zst_is_a_read_error_not_empty_or_silent(tmp_path, cut):
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(jsonl(3000))
    keep = len(packed) // 2 if cut == "half" else len(packed) - cut
    (tmp_path / "t.jsonl.zst").write_bytes(packed[:keep])
    e = rejected(tmp_path / "t.jsonl.zst")
    assert (e.kind, e.reason) == ("quarantined", "read_error")
    assert "truncated zstd" in e.detail


def test_truncated_zst_after_records_ends_with_read_error(tmp_path):
    # first frame complete (> HEAD_BYTES of records), second frame cut: records kept, then one read_error item
    first = zstandard.ZstdCompressor().compress(jsonl(80_000))
    second = zstandard.ZstdCompressor().compress(jsonl(1000, 80_000))
    (tmp_path / "t.jsonl.zst").write_bytes(first + second[:-10])
    items = read(tmp_path / "t.jsonl.zst")
    assert isinstance(items[-1], Quarantined) and items[-1].reason == "read_error"
    assert "truncated zstd" in items[-1].detail
    assert sum(isinstance(x, Record) for x in items) >= 80_000


def test_complete_multi_frame_zst_with_checksum_and_skippable_frame(tmp_path):
    raw = jsonl(2000)
    packed = (
        zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(raw[:20_000])
        + b"\x50\x2a\x4d\x18\x04\x00\x00\x00skip"  # skippable frame
        + zstandard.ZstdCompressor(level=5).compress(raw[20_000:])
    )
    (tmp_path / "m.jsonl.zst").write_bytes(packed)
    items = read(tmp_path / "m.jsonl.zst")
    assert [x.text for x in items] == [f"doc {i}" for i in range(2000)]
    assert enc.zstd_truncation(tmp_path / "m.jsonl.zst") is None


def test_streamed_zst_of_many_frames_like_the_zstd_cli(tmp_path):
    raw = jsonl(5000)
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    out = tmp_path / "s.jsonl.zst"
    with open(out, "wb") as fh, cctx.stream_writer(fh) as w:
        for i in range(0, len(raw), 7000):
            w.write(raw[i : i + 7000])
            w.flush(zstandard.FLUSH_BLOCK)
    assert enc.zstd_truncation(out) is None
    assert len(read(out)) == 5000


# --- BOMs ---------------------------------------------------------------------------------------------------------


def test_concatenated_jsonl_files_keep_the_record_after_each_bom(tmp_path):
    part = b'\xef\xbb\xbf{"text": "a"}\n'
    (tmp_path / "cat.jsonl").write_bytes(part + part + b'\xef\xbb\xbf{"text": "b"}')
    items = read(tmp_path / "cat.jsonl")
    assert [(type(x).__name__, x.line, x.text) for x in items] == [
        ("Record", n, t) for n, t in [(1, "a"), (2, "a"), (3, "b")]
    ]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_forced_codec_skips_its_own_bom(tmp_path, codec):
    (tmp_path / "f.jsonl").write_bytes('\ufeff{"text": "一"}\n{"text": "b"}\n'.encode(codec))
    (tmp_path / "f.csv").write_bytes("\ufefftext\n一\n".encode(codec))
    cfg = InputConfig(encoding=codec)
    assert [x.text for x in read(tmp_path / "f.jsonl", cfg)] == ["一", "b"]
    assert [x.text for x in read(tmp_path / "f.csv", cfg)] == ["一"]


def test_bomless_utf16_is_skipped_with_a_hint(tmp_path):
    (tmp_path / "u.jsonl").write_bytes('{"text": "hello"}\n{"text": "world"}\n'.encode("utf-16-le"))
    e = rejected(tmp_path / "u.jsonl")
    assert e.reason == "binary" and "encoding='utf-16-le'" in e.detail
    cfg = InputConfig(encoding="utf-16-le")
    assert [x.text for x in read(tmp_path / "u.jsonl", cfg)] == ["hello", "world"]


def test_split_pieces_of_a_bom_file_cover_every_line_once(tmp_path):
    rng = random.Random(7)
    lines = [json.dumps({"text": "字" * rng.randint(0, 40)}, ensure_ascii=False) for _ in range(3000)]
    body = "\r\n".join(lines)  # CRLF, no newline after the last line
    p = tmp_path / "b.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    (f,) = discover([str(p)])
    cfg = InputConfig()
    whole = [(x.line, x.text) for x in iter_file(f, cfg)]
    for target in (97, 1000, 4096):
        pieces = split_points(f, cfg, target)
        assert len(pieces) > 1
        got = [(x.line, x.text) for s, e, n in pieces for x in iter_file(f, cfg, s, e, n)]
        assert got == whole
    assert len(whole) == 3000 and all(isinstance(t, str) for _, t in whole)


# --- long lines and big compressed line files ----------------------------------------------------------------------


def test_line_longer_than_the_cap_is_quarantined_without_being_held(tmp_path):
    p = tmp_path / "long.jsonl"
    big = 40 << 20
    with open(p, "wb") as fh:
        fh.write(b'{"text": "a"}\n{"text": "')
        for _ in range(big >> 20):
            fh.write(b"x" * (1 << 20))
        fh.write(b'"}\n{"text": "b"}')
    tracemalloc.start()
    items = read(p, InputConfig(max_file_mb=4))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(type(x).__name__, x.line) for x in items] == [("Record", 1), ("Quarantined", 2), ("Record", 3)]
    assert items[1].reason == "too_large" and "max_file_mb" in items[1].detail
    assert peak < 16 << 20


@pytest.mark.parametrize("name,unit", [("long.txt", "line"), ("long.md", "paragraph"), ("long.csv", "file")])
def test_long_line_in_other_line_formats(tmp_path, name, unit):
    head = b"text\n" if name.endswith(".csv") else b""
    (tmp_path / name).write_bytes(head + b"a\n\n" + b"y" * 300_000 + b"\n\nb\n")
    items = read(tmp_path / name, InputConfig(max_file_mb=0.1, txt_unit=unit))
    assert [type(x).__name__ for x in items] == ["Record", "Quarantined", "Record"]
    assert items[1].reason == "too_large"
    assert [x.text for x in items if isinstance(x, Record)] == ["a", "b"]


def test_compressed_jsonl_bigger_than_max_file_mb_is_streamed(tmp_path):
    rng = random.Random(1)
    raw = b"".join(
        json.dumps({"text": "".join(rng.choice("abcdefgh") for _ in range(40))}).encode() + b"\n" for _ in range(8000)
    )
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(raw))
    cfg = InputConfig(max_file_mb=0.1)
    assert (tmp_path / "big.jsonl.gz").stat().st_size > 0.1 * 2**20
    assert len(read(tmp_path / "big.jsonl.gz", cfg)) == 8000
    (tmp_path / "big.txt.gz").write_bytes(gzip.compress(raw))
    assert rejected(tmp_path / "big.txt.gz", cfg).reason == "too_large"  # read whole: still capped


# --- odd files never crash -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.csv", "x.txt", "x.jsonl.gz", "x.parquet"])
def test_vanished_or_directory_file_is_a_read_error(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"x" * 10)
    (f,) = discover([str(p)])
    p.unlink()
    assert rejected_f(f).reason == "read_error"
    p.mkdir()
    assert rejected_f(f).reason == "read_error"


def rejected_f(f) -> FileRejected:
    with pytest.raises(FileRejected) as e:
        list(iter_file(f, InputConfig()))
    return e.value


def test_empty_and_whitespace_compressed_files(tmp_path):
    (tmp_path / "z.jsonl.gz").write_bytes(b"")
    (tmp_path / "w.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b" \n\r\n"))
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    for name in ("z.jsonl.gz", "w.jsonl.zst", "e.jsonl.zst"):
        assert rejected(tmp_path / name).reason == "empty"
