"""Input discovery and record reading: every file yields records or is rejected with the right reason, decoded text
equals the text that was written, one bad record quarantines only itself, and split pieces read like the whole."""

import csv
import gzip
import json
import time
from pathlib import Path

import pytest
import zstandard

from gptforge.data.sources import FileRejected, InputConfig, Quarantined, Record, discover, iter_file, split_points

ZH = "数据清洗是训练语言模型的第一步。我们需要把各种编码的文件统一转换为文本，并去掉重复的内容。\n"
ZH_RARE = "生僻字：𠀀、𠮷、㐀。这是一段包含四字节字符的国标文本，用来检查解码是否完全正确。\n"
ZH_TRAD = "繁體中文的軟體與網路，是臺灣與香港常用的書寫系統。我們在這裡測試大五碼的解碼是否正確。\n"
DE = "Über Größe und Maße: schön fährt Müller.\nDie Ärzte sind später gekommen.\n"
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + bytes(200)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00" + bytes(64)


def read(path: Path, cfg: InputConfig | None = None, **kw) -> list[Record | Quarantined]:
    (f,) = discover([str(path)])
    return list(iter_file(f, cfg or InputConfig(), **kw))


def rejected(path: Path, cfg: InputConfig | None = None) -> FileRejected:
    with pytest.raises(FileRejected) as e:
        read(path, cfg)
    return e.value


def test_mixed_folder_every_file_is_read_exactly_or_rejected_for_its_reason(tmp_path):
    long_line = "中文abc" * 600_000  # 5.4 MB on one line; the 1 MiB detection sample ends inside a character
    texts = {  # name -> (bytes on disk, expected text of the one record, expected encoding label)
        "utf8.txt": (ZH.encode(), ZH, "utf-8"),
        "utf8_bom.md": (b"\xef\xbb\xbf" + ZH.encode(), ZH, "utf-8-sig"),
        "utf16le.txt": (b"\xff\xfe" + ZH.encode("utf-16-le"), ZH, "utf-16"),
        "utf16be.txt": (b"\xfe\xff" + ZH.encode("utf-16-be"), ZH, "utf-16"),
        "utf32.txt": (b"\xff\xfe\x00\x00" + ZH.encode("utf-32-le"), ZH, "utf-32"),
        "gbk.txt": (ZH.encode("gbk"), ZH, "gb18030"),
        "gb18030.txt": ((ZH + ZH_RARE).encode("gb18030"), ZH + ZH_RARE, "gb18030"),
        "big5.txt": (ZH_TRAD.encode("big5"), ZH_TRAD, "big5"),
        "notes.txt.zst": (zstandard.ZstdCompressor().compress(ZH.encode()), ZH, "utf-8"),
        "long.txt": (long_line.encode(), long_line, "utf-8"),
        "crlf.txt": (b"first line\r\nsecond line\r\n", "first line\r\nsecond line\r\n", "utf-8"),
        "nul.txt": (b"text with a stray\x00 NUL byte in an otherwise ordinary line of prose.\n", None, "utf-8"),
        "page.html": (b"<html><body><p>Hello</p></body></html>", "<html><body><p>Hello</p></body></html>", "utf-8"),
    }
    jsonl = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["一", "two"])
    rejects = {  # name -> (bytes, kind, reason)
        "german.txt": (DE.encode("cp1252"), "quarantined", "encoding_unknown"),
        "image.png": (PNG, "skipped", "binary"),
        "program": (ELF, "skipped", "binary"),
        "disguised.jsonl": (gzip.compress(jsonl.encode()), "skipped", "binary"),
        "empty.txt": (b"", "skipped", "empty"),
        "blank.md": (b" \n\r\n\t\n", "skipped", "empty"),
        "notes.xyz": (b"plain text in an unknown format\n", "skipped", "unsupported_format"),
    }
    for name, (raw, *_) in {**texts, **rejects}.items():
        (tmp_path / name).write_bytes(raw)
    (tmp_path / "data.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))

    files = {f.rel: f for f in discover([str(tmp_path)])}
    assert set(files) == {*texts, *rejects, "data.jsonl.gz"}
    cfg = InputConfig()
    for name, (raw, text, label) in texts.items():
        (rec,) = iter_file(files[name], cfg)
        expected = raw.decode() if text is None else text
        assert (rec.text, rec.encoding, rec.line, rec.id, rec.source) == (expected, label, 0, name, name), name
    gz = files["data.jsonl.gz"]
    assert [(r.text, r.line) for r in iter_file(gz, cfg)] == [("一", 1), ("two", 2)]
    assert list(iter_file(gz, cfg, 0, gz.size, 1)) == list(iter_file(gz, cfg))  # size on disk is not a byte limit
    for name, (_, kind, reason) in rejects.items():
        with pytest.raises(FileRejected) as e:
            list(iter_file(files[name], cfg))
        assert (e.value.kind, e.value.reason) == (kind, reason), name
    assert "gb18030=" in rejected(tmp_path / "german.txt").detail  # the scores say why
    forced = read(tmp_path / "german.txt", InputConfig(encoding="cp1252"))
    assert [(r.text, r.encoding) for r in forced] == [(DE, "cp1252")]
    (tmp_path / "bomless16.txt").write_bytes(ZH.encode("utf-16-le"))  # NUL-heavy: binary unless the user says so
    assert rejected(tmp_path / "bomless16.txt").reason == "binary"
    assert [r.text for r in read(tmp_path / "bomless16.txt", InputConfig(encoding="utf-16-le"))] == [ZH]


def test_jsonl_bad_records_quarantine_only_themselves(tmp_path):
    lines = [json.dumps({"text": f"record {i} 内容"}, ensure_ascii=False).encode() for i in range(1, 1001)]
    lines[4] = b'{"text": "bad byte \xff here"}'
    lines[699] = b'{"text": "truncated obj'
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = read(tmp_path / "a.jsonl")
    bad = [i for i in items if isinstance(i, Quarantined)]
    good = [i for i in items if isinstance(i, Record)]
    assert len(good) == 998 and [(q.line, q.reason) for q in bad] == [(5, "undecodable_bytes"), (700, "invalid_json")]
    assert "0xff" in bad[0].detail and bad[0].preview == '{"text": "bad byte \\xff here"}'
    assert [r.line for r in good] == [n for n in range(1, 1001) if n not in (5, 700)]
    assert good[0] == Record("a.jsonl", 1, "a.jsonl:1", "record 1 内容", "jsonl", "utf-8")


def test_jsonl_record_rules(tmp_path):
    rows = [
        '{"text": "first", "id": 7}',
        "",
        "   ",
        '["not", "an", "object"]',
        '{"body": "no text field"}',
        '{"text": 42}',
        '{"text": null}',
        '{"text": "lone \\ud83d surrogate"}',
        '{"text": "pair \\ud83d\\ude00 ok"}',
        '{"text": ""}',
        '{"text": "last line, no newline", "id": "x-1"}',
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(rows))
    items = read(tmp_path / "r.jsonl", InputConfig(id_field="id"))
    got = [(i.line, i.reason if isinstance(i, Quarantined) else i.id) for i in items]
    assert got == [
        (1, "7"),
        (4, "not_an_object"),
        (5, "missing_text_field"),
        (6, "text_not_string"),
        (7, "missing_text_field"),
        (8, "invalid_unicode"),
        (9, "r.jsonl:9"),  # id_field absent: falls back to source:line
        (10, "r.jsonl:10"),  # empty text is still a record; the filters count it
        (11, "x-1"),
    ]
    assert items[6].text == "pair 😀 ok" and items[7].text == ""


def test_utf16_jsonl_streams_with_line_numbers(tmp_path):
    body = '{"text": "一"}\n\n{"text": "b\u2028c"}\n'  # U+2028 inside a string must not split the line
    (tmp_path / "u.jsonl").write_bytes(b"\xff\xfe" + body.encode("utf-16-le"))
    assert [(r.line, r.text, r.encoding) for r in read(tmp_path / "u.jsonl")] == [
        (1, "一", "utf-16"),
        (3, "b\u2028c", "utf-16"),
    ]


def test_txt_units(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"para one\r\nstill one\r\n\r\n\r\n  \npara two\n\nlast line")
    by_line = read(tmp_path / "t.txt", InputConfig(txt_unit="line"))
    assert [(r.line, r.text) for r in by_line] == [(1, "para one"), (2, "still one"), (6, "para two"), (8, "last line")]
    paras = read(tmp_path / "t.txt", InputConfig(txt_unit="paragraph"))
    assert [(r.line, r.text, r.id) for r in paras] == [
        (1, "para one\r\nstill one", "t.txt:1"),
        (6, "para two", "t.txt:6"),
        (8, "last line", "t.txt:8"),
    ]
    (tmp_path / "b.txt").write_bytes("好的\n\n第二段\n".encode() + b"bad \xff line\n\n" + "第三段\n".encode())
    items = read(tmp_path / "b.txt", InputConfig(txt_unit="paragraph"))
    assert [(i.line, type(i).__name__) for i in items] == [(1, "Record"), (3, "Quarantined"), (6, "Record")]
    assert items[1].reason == "undecodable_bytes" and items[1].detail.startswith("line 4:")


def test_csv_and_tsv(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerows([["id", "text"], ["a", "one line"], ["b", "multi\nline, with comma"], ["c", "third"], ["d"]])
    items = read(tmp_path / "d.csv", InputConfig(id_field="id"))
    assert [(r.line, r.id, r.text) for r in items[:3]] == [
        (2, "a", "one line"),
        (3, "b", "multi\nline, with comma"),
        (5, "c", "third"),
    ]
    assert (items[3].line, items[3].reason) == (6, "missing_text_field")
    (tmp_path / "d.tsv").write_bytes("title\ttext\nx\t中文\n\ny\tsecond\n".encode("gbk"))
    assert [(r.line, r.text, r.encoding) for r in read(tmp_path / "d.tsv")] == [
        (2, "中文", "gb18030"),
        (4, "second", "gb18030"),
    ]
    assert rejected(tmp_path / "d.csv", InputConfig(text_field="body")).reason == "missing_text_field"


def test_json_files(tmp_path):
    rows = [{"text": "a", "id": 5}, "bare string", 3, {"x": 1}, "lone \ud800", {"text": "中文 \ud83d\ude00"}]
    (tmp_path / "arr.json").write_text(json.dumps(rows))  # ensure_ascii: the surrogates are \\u escapes
    items = read(tmp_path / "arr.json", InputConfig(id_field="id"))
    assert [(i.line, i.id if isinstance(i, Record) else i.reason) for i in items] == [
        (1, "5"),
        (2, "arr.json:2"),
        (3, "not_an_object"),
        (4, "missing_text_field"),
        (5, "invalid_unicode"),
        (6, "arr.json:6"),
    ]
    assert items[5].text == "中文 😀" and "U+D800" in items[4].detail
    (tmp_path / "one.json").write_text('{"text": "only"}')
    assert [(r.line, r.text) for r in read(tmp_path / "one.json")] == [(1, "only")]
    (tmp_path / "bad.json").write_text('[{"text": "a"},')
    assert rejected(tmp_path / "bad.json").reason == "invalid_json"
    (tmp_path / "num.json").write_text("42")
    assert rejected(tmp_path / "num.json").reason == "invalid_json"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": ["first", None, "third 中文"] * 2000, "n": list(range(6000))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=1000)
    items = read(tmp_path / "t.parquet", InputConfig(id_field="n"))
    assert len(items) == 6000 and [i.line for i in items] == list(range(1, 6001))
    assert (items[2].text, items[2].id, items[2].fmt) == ("third 中文", "2", "parquet")
    assert (items[1].reason, items[1].line) == ("missing_text_field", 2)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    assert {i.reason for i in read(tmp_path / "ints.parquet")} == {"text_not_string"}
    assert rejected(tmp_path / "t.parquet", InputConfig(text_field="body")).reason == "missing_text_field"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    assert rejected(tmp_path / "broken.parquet").reason == "read_error"


def test_corrupt_compressed_streams(tmp_path):
    body = "".join(json.dumps({"text": f"{i} {i * 7919 % 10007}"}) + "\n" for i in range(200_000)).encode()
    packed = gzip.compress(body)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 3 // 4])  # breaks after ~3/4 of the records
    items = read(tmp_path / "cut.jsonl.gz")
    assert len(items) > 100_000 and isinstance(items[-1], Quarantined) and items[-1].reason == "read_error"
    assert items[-1].line == items[-2].line + 1 and all(isinstance(i, Record) for i in items[:-1])
    (tmp_path / "head.jsonl.gz").write_bytes(packed[:20])
    assert rejected(tmp_path / "head.jsonl.gz").reason == "read_error"
    (tmp_path / "bad.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    assert rejected(tmp_path / "bad.txt.zst").reason == "read_error"


def test_too_large_whole_files_but_streamed_lines(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 300_000)
    (tmp_path / "big.jsonl").write_text('{"text": "y"}\n' * 30_000)
    small = InputConfig(max_file_mb=0.1)
    assert rejected(tmp_path / "big.txt", small).reason == "too_large"
    assert len(read(tmp_path / "big.jsonl", small)) == 30_000


@pytest.mark.parametrize("fmt,unit", [("jsonl", "file"), ("txt", "line")])
def test_split_pieces_read_like_the_whole_file(tmp_path, fmt, unit):
    lines = []
    for i in range(20_000):
        text = f"行 {i} " + "内容" * (i % 13) + ("" if i % 97 else "\xff")  # some invalid bytes, some blank lines
        raw = json.dumps({"text": text}, ensure_ascii=False) if fmt == "jsonl" else text
        lines.append(b"" if i % 50 == 0 else raw.encode().replace("\xff".encode(), b"\xff"))
    path = tmp_path / f"big.{fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))  # a BOM, and no newline at the end
    cfg = InputConfig(txt_unit=unit)
    (f,) = discover([str(path)])
    pieces = split_points(f, cfg, 64 * 1024)
    assert len(pieces) > 5 and pieces[0][0] == 0 and pieces[-1][1] == f.size
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    whole = list(iter_file(f, cfg))
    assert [i for s, e, n in pieces for i in iter_file(f, cfg, s, e, n)] == whole
    bad_lines = [i + 1 for i in range(20_000) if i % 97 == 0 and i % 50]  # blank lines are not records
    assert [i.line for i in whole if isinstance(i, Quarantined)] == bad_lines and len(bad_lines) == 202
    assert len(whole) == 20_000 - 400 and whole[-1].line == 20_000 and whole[0].encoding == "utf-8-sig"
    assert split_points(f, cfg, f.size) == [(0, f.size, 1)]
    if fmt == "txt":  # paragraphs may straddle a cut: not splittable
        assert split_points(f, InputConfig(txt_unit="paragraph"), 64 * 1024) == [(0, f.size, 1)]
        with pytest.raises(ValueError, match="byte ranges"):
            list(iter_file(f, InputConfig(txt_unit="paragraph"), pieces[1][0], pieces[1][1], pieces[1][2]))


def test_discover(tmp_path, monkeypatch):
    for rel in ["b/z.txt", "b/a.jsonl.gz", "a.md", ".hidden/x.txt", "b/.secret.txt", "c/d.zst", "c/e.parquet"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    files = discover([str(tmp_path), str(tmp_path / "a.md"), str(tmp_path / "b" / "*.txt")])
    assert [f.rel for f in files] == ["a.md", "b/a.jsonl.gz", "b/z.txt", "c/d.zst", "c/e.parquet"]
    assert [(f.fmt, f.compression) for f in files] == [
        ("md", None),
        ("jsonl", "gz"),
        ("txt", None),
        (None, "zst"),
        ("parquet", None),
    ]
    assert files[0].size == 1
    monkeypatch.chdir(tmp_path)
    assert [f.rel for f in discover(["b/**/*.txt"])] == ["z.txt"]
    assert [f.rel for f in discover([str(tmp_path / "b" / "z.txt")])] == ["z.txt"]
    sample = discover(["@sample"])
    assert {"zh/tang300.jsonl", "en/hamlet.txt"} <= {f.rel for f in sample}
    for bad in [str(tmp_path / "missing"), str(tmp_path / "*.none")]:
        with pytest.raises(ValueError, match="missing|none"):
            discover([bad])
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="void"):
        discover([str(tmp_path / "void")])


def test_config_validation():
    with pytest.raises(ValueError, match="encoding"):
        InputConfig(encoding="utf-99")
    with pytest.raises(ValueError, match="legacy_encodings"):
        InputConfig(legacy_encodings=["gb18030", "nope"])
    with pytest.raises(ValueError, match="extra"):
        InputConfig(text_fields="x")
    assert InputConfig(encoding="GBK").encoding == "GBK"


def test_jsonl_throughput(tmp_path):
    path = tmp_path / "fast.jsonl"
    row = {"text": "一段用于测量读取速度的中文文本，with some English words mixed in. " * 3}
    path.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 50_000, encoding="utf-8")
    (f,) = discover([str(path)])
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_file(f, InputConfig()))
    rate = n / (time.perf_counter() - t0)
    print(f"iter_file jsonl: {rate:,.0f} records/s ({path.stat().st_size / 2**20:.1f} MB)")
    assert n == 50_000 and rate > 20_000  # loose: the target is well over 50k/s, CI machines vary
