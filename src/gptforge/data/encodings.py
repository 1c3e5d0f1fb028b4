"""Decide how a file's bytes become text: byte-order marks, strict UTF-8, legacy Chinese codecs, binary sniffing;
plus the byte-level helpers the readers share (decompressing streams, decoding line by line, cutting at newlines).

Order: a BOM (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) decides alone; else strict UTF-8; else each legacy codec
(default GB18030 then Big5) is decoded and *scored*; else the encoding is unknown and the caller quarantines the file.

Trade-offs:
- "Decodes without error" is no evidence: GB18030 accepts most byte soups, so cp1252 "Größe" comes out as "Gr鲞e".
  A legacy codec is accepted only when the text it produces looks like Chinese: its ideographs are mostly in the
  codec's *common* set (GB2312 level 1 for GB codecs, Big5 level 1 for Big5; both derived by decoding those byte
  ranges, so no table is shipped), it holds no kana/Greek/Cyrillic/box-drawing/private-use/control/U+FFFD noise, and
  its ideographs are not lone characters glued to Latin letters (the signature of accented Latin bytes eating the
  next ASCII letter). The best candidate must also beat the runner-up by a clear margin; when unsure we quarantine
  ("encoding_unknown") rather than guess, so a wrong guess never reaches the corpus. The price: a GB/Big5 file that
  is mostly rare characters, or mostly single characters inside Latin words, is quarantined rather than decoded.
- cp1252/Latin-1 are never guessed (every byte string is valid in them); the user forces them with `encoding=`.
- The decision is made once per file on a head sample (HEAD_BYTES), so all byte-range pieces of a split file agree.
  A later part of the file in another encoding shows up as quarantined "undecodable_bytes" lines, not as garbage.
- UTF-8 wins when most non-ASCII lines of the head are valid UTF-8 (a few corrupt lines are quarantined one by one),
  or when no legacy codec is plausible and the failing lines are a small share of all lines.
- BOM-less UTF-16/32 is not detected: its NUL bytes make it look binary (the skip reason names the likely codec,
  for `encoding=`). A forced codec skips its own BOM (forced utf-16-le on a file starting FF FE).
- zstd streams are checked for truncation at their end (zstandard's reader ends silently on a cut frame).
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO

HEAD_BYTES = 1 << 20  # sample used for every decision (~1 MB, read once per file)
SCORE_CHARS = 1 << 18  # decoded characters scored per candidate; more adds time, not accuracy
MIN_SCORE = 0.8  # plausibility a legacy codec needs (real Chinese text scores ~0.95-1.0, mojibake < 0.6)
MIN_MARGIN = 0.2  # ...and its lead over the runner-up (real GB text read as Big5 ~0.4, Big5 read as GB ~0.2)
MIN_IDEOGRAPHS = 2  # one character is no evidence
UTF8_BAD_LINE_SHARE = 0.1  # no plausible legacy codec and at most this share of lines broken -> still UTF-8

# Byte-order marks, UTF-32 LE before UTF-16 LE (it starts with the same two bytes): (bom, codec after it, label).
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32-le", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "utf-32"),
    (b"\xff\xfe", "utf-16-le", "utf-16"),
    (b"\xfe\xff", "utf-16-be", "utf-16"),
)

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"%PDF-", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"PK\x05\x06", "ZIP archive"),
    (b"PK\x07\x08", "ZIP archive"),
    (b"\x7fELF", "ELF executable"),
    (b"\xfe\xed\xfa\xce", "Mach-O binary"),
    (b"\xfe\xed\xfa\xcf", "Mach-O binary"),
    (b"\xce\xfa\xed\xfe", "Mach-O binary"),
    (b"\xcf\xfa\xed\xfe", "Mach-O binary"),
    (b"\xca\xfe\xba\xbe", "Java class or Mach-O universal binary"),
    (b"\x1f\x8b", "gzip stream (name it .gz to read it)"),
    (b"\x28\xb5\x2f\xfd", "zstd stream (name it .zst to read it)"),
    (b"\xfd7zXZ\x00", "xz stream"),
    (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"SQLite format 3\x00", "SQLite database"),
    (b"\x00asm", "WebAssembly module"),
)
# C0 controls that text does not use: all but \t \n \v \f \r and ESC (ANSI colour codes in logs are text).
_CONTROL_BYTES = bytes(range(0, 9)) + bytes(range(14, 27)) + bytes(range(28, 32))
_BINARY_SAMPLE = 8192
_MAX_NUL_SHARE = 0.05  # a few stray NULs are text (the normalizer drops them); binaries are NUL-heavy
_MAX_CONTROL_SHARE = 0.08  # random bytes have ~10% C0 controls, text well under 1%

_IDEO = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_IDEO_RE = re.compile(f"[{_IDEO}]")
# A lone ideograph touching an ASCII letter: "Gr鲞e" (GB), or "Ä"+"r" -> one Big5 character in "Ärzte". One side is
# enough (stricter than "flanked on both sides"): a capital at a word start only has a letter after it.
_GLUED_RE = re.compile(f"(?<=[A-Za-z])[{_IDEO}](?![{_IDEO}])|(?<![{_IDEO}])[{_IDEO}](?=[A-Za-z])")
# What GB/Big5 Chinese text legitimately contains besides ideographs: ASCII, Latin-1 symbols and pinyin letters, tone
# marks, punctuation/letterlike/number/arrow/math/technical/enclosed/geometric/misc symbols, CJK radicals, strokes,
# punctuation, enclosed and compatibility forms, full-width forms, emoji. Anything else (kana, Greek, Cyrillic, box
# drawing, Hangul, bopomofo, private use, controls, U+FFFD, other scripts) is noise from a wrong codec.
_NEUTRAL = (
    "\t\n\r\f\v\x20-\x7e\u00a0-\u017f\u01cd-\u01dc\u0251\u0261\u02c7\u02c9-\u02cb\u02d9"
    "\u2000-\u206f\u2100-\u23ff\u2460-\u24ff\u25a0-\u26ff\u2e80-\u2fdf\u3000-\u303f\u31c0-\u31ef"
    "\u3200-\u33ff\ufe30-\ufe6f\uff00-\uffef\U0001f300-\U0001faff"
)
_NOISE_RE = re.compile(f"[^{_NEUTRAL}{_IDEO}]")
_GENERIC_NOISE_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ue000-\uf8ff\ufffd]")
_NON_ASCII_RE = re.compile("[^\x00-\x7f]")
_FAMILIES = {
    "gb2312": "gb",
    "gbk": "gb",
    "gb18030": "gb",
    "hz": "gb",
    "big5": "big5",
    "cp950": "big5",
    "big5hkscs": "big5",
}


@dataclass(frozen=True)
class Detection:
    """How to decode a file: skip `bom` bytes at its start, then decode with `codec` (None: unknown, see detail)."""

    codec: str | None
    label: str  # reported as Record.encoding: "utf-8", "utf-8-sig", "utf-16", "gb18030", ...
    bom: int
    detail: str


def canonical(codec: str) -> str:
    """Python's canonical name of a codec ("GBK" -> "gbk"); LookupError for an unknown name."""
    return codecs.lookup(codec).name


def line_safe(codec: str) -> bool:
    """True when b"\\n" in the encoded bytes always means a newline (ASCII-compatible codecs incl. UTF-8, GB18030,
    Big5), so a file can be split into lines as bytes and cut at byte offsets; False for UTF-16/32."""
    return "\n".encode(codec) == b"\n" and "a\n".encode(codec) == b"a\n"


def sniff_bom(head: bytes) -> tuple[str, str, int] | None:
    """(codec after the BOM, label, BOM length) when `head` starts with a byte-order mark."""
    for bom, codec, label in _BOMS:
        if head.startswith(bom):
            return codec, label, len(bom)
    return None


def binary_reason(head: bytes, forced: str | None = None) -> str | None:
    """Why `head` (the first bytes of a file's content, after decompression) is not text, or None if it may be.
    With a `forced` codec that is not line-safe (BOM-less UTF-16/32), NULs are expected: only magic numbers count."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"{what} (magic bytes {magic[:4]!r})"
    # "MZ" alone also starts English words; a real PE header has NULs right after it.
    if head.startswith(b"MZ") and b"\x00" in head[2:64]:
        return "Windows PE executable (magic bytes b'MZ')"
    if sniff_bom(head) is not None or (forced is not None and not line_safe(forced)):  # UTF-16/32: NULs by design
        return None
    sample = head[:_BINARY_SAMPLE]
    if not sample:
        return None
    nul = sample.count(0) / len(sample)
    ctrl = (len(sample) - len(sample.translate(None, _CONTROL_BYTES))) / len(sample)
    if nul > _MAX_NUL_SHARE or ctrl > _MAX_CONTROL_SHARE:
        why = f"{nul:.0%} NUL and {ctrl:.0%} control bytes in the first {len(sample)} bytes"
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        if nul > 0.2 and min(even, odd) <= 0.02 * (even + odd):  # NULs in every other byte: ASCII-ish UTF-16
            order = "le" if odd > even else "be"
            why += f"; looks like UTF-16-{order.upper()} without a byte-order mark (set encoding='utf-16-{order}')"
        return why
    return None


@cache
def common_chars(family: str) -> frozenset[str]:
    """The common ideographs of a codec family, by decoding its level-1 byte range: GB2312 0xB0A1-0xD7FE (3755
    characters, "gb") or Big5 0xA440-0xC67E (5401 characters, "big5")."""
    if family == "gb":
        codec, leads, trails, last = "gb2312", range(0xB0, 0xD8), [*range(0xA1, 0xFF)], 0xD7FE
    elif family == "big5":
        codec, leads, trails, last = "big5", range(0xA4, 0xC7), [*range(0x40, 0x7F), *range(0xA1, 0xFF)], 0xC67E
    else:
        raise ValueError(f"no common character set for codec family {family!r}")
    chars = set()
    for lead in leads:
        for trail in trails:
            if (lead << 8 | trail) > last:
                break
            try:
                chars.add(bytes((lead, trail)).decode(codec))
            except UnicodeDecodeError:
                continue  # unassigned slots inside the range
    return frozenset(c for c in chars if _IDEO_RE.fullmatch(c))


def plausibility(text: str, codec: str) -> float:
    """How much `text` (decoded with `codec`) looks like real text in that codec, 0..1.

    GB/Big5 families: (common ideographs - lone ideographs glued to Latin letters) / (ideographs + noise characters),
    0 with fewer than MIN_IDEOGRAPHS ideographs. Other codecs (only when the user lists them): the share of non-ASCII
    characters that are letters and not controls/private use/U+FFFD -- a weak check, since such codecs decode anything.
    """
    text = text[:SCORE_CHARS]
    family = _FAMILIES.get(canonical(codec))
    if family is None:
        other = "".join(_NON_ASCII_RE.findall(text))
        if not other:
            return 0.0
        letters = sum(1 for c in other if c.isalpha())
        return max(0.0, (letters - len(_GENERIC_NOISE_RE.findall(other))) / len(other))
    ideographs = _IDEO_RE.findall(text)
    if len(ideographs) < MIN_IDEOGRAPHS:
        return 0.0
    common = common_chars(family)
    n_common = sum(1 for c in ideographs if c in common)
    glued = len(_GLUED_RE.findall(text))
    noise = len(_NOISE_RE.findall(text))
    return max(0.0, (n_common - glued) / (len(ideographs) + noise))


def _decode_head(head: bytes, codec: str, complete: bool, errors: str = "replace") -> str:
    # final=False keeps a multibyte character cut by the end of the sample out of the result instead of erroring.
    return codecs.getincrementaldecoder(codec)(errors=errors).decode(head, final=complete)


def _utf8_line_stats(head: bytes, complete: bool) -> tuple[int, int, int]:
    """(non-ASCII lines valid as UTF-8, non-ASCII lines not, non-empty lines) in the head sample."""
    ok = bad = total = 0
    lines = head.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        total += 1
        if line.isascii():
            continue
        try:
            _decode_head(line, "utf-8", complete or i < len(lines) - 1, errors="strict")
            ok += 1
        except UnicodeDecodeError:
            bad += 1
    return ok, bad, total


def detect_encoding(
    head: bytes, legacy: Sequence[str] = ("gb18030", "big5"), *, complete: bool = True, forced: str | None = None
) -> Detection:
    """Choose the codec for a file from its first bytes (`complete`: `head` is the whole content).

    `forced` (a codec name) skips detection; a UTF-8 BOM is still skipped when forcing UTF-8.
    """
    bom = sniff_bom(head)
    if forced is not None:
        name = canonical(forced)
        if name in ("utf-8", "utf-8-sig"):  # decoded as plain UTF-8 after the BOM, so lines stay splittable
            n = bom[2] if bom is not None and bom[0] == "utf-8" else 0
            return Detection("utf-8", "utf-8-sig" if n else "utf-8", n, f"forced {name}")
        if bom is not None and canonical(bom[0]) == name:  # forced utf-16-le on a file with its BOM: skip the mark
            return Detection(name, name, bom[2], f"forced {name}")
        return Detection(name, name, 0, f"forced {name}")
    if bom is not None:
        return Detection(bom[0], bom[1], bom[2], "byte-order mark")
    try:
        _decode_head(head, "utf-8", complete, errors="strict")
        return Detection("utf-8", "utf-8", 0, "valid UTF-8")
    except UnicodeDecodeError:
        pass
    ok, bad, total = _utf8_line_stats(head, complete)
    utf8 = f"UTF-8 fails on {bad} of {ok + bad} non-ASCII lines"
    if ok >= bad:
        return Detection("utf-8", "utf-8", 0, utf8)
    scores: dict[str, float] = {}
    by_text: dict[str, str] = {}
    same: list[str] = []
    for codec in legacy:
        name = canonical(codec)
        text = _decode_head(head, name, complete)
        if text in by_text:  # GBK and GB18030 read GBK bytes identically: one candidate, not a tie
            same += [] if name == by_text[text] else [f"{name}=same as {by_text[text]}"]
            continue
        by_text[text] = name
        scores[name] = plausibility(text, name)
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    shown = " ".join([f"{name}={score:.2f}" for name, score in ranked] + same) or "no legacy codecs configured"
    if ranked:
        best, score = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        if score >= MIN_SCORE and score - runner_up >= MIN_MARGIN:
            return Detection(best, best, 0, f"{utf8}; plausibility {shown}")
    if bad <= UTF8_BAD_LINE_SHARE * total:
        return Detection("utf-8", "utf-8", 0, f"{utf8} of {total} lines; no plausible legacy codec ({shown})")
    return Detection(
        None, "", 0, f"{utf8}; plausibility {shown} (need >= {MIN_SCORE} and a {MIN_MARGIN} lead over the next)"
    )


class Undecodable:
    """A line that cannot become text, kept so that only this line is quarantined: its bytes do not decode with the
    file's codec (`err`), or it is longer than the line cap (`err` None, `size` its length; `raw` its first bytes)."""

    __slots__ = ("raw", "err", "size")

    def __init__(self, raw: bytes, err: UnicodeDecodeError | None, size: int = 0):
        self.raw, self.err, self.size = raw, err, size

    @property
    def reason(self) -> str:
        return "undecodable_bytes" if self.err is not None else "too_large"

    def describe(self, label: str) -> str:
        e = self.err
        if e is None:
            return f"line of {self.size} bytes is longer than max_file_mb ({self.size / 2**20:.1f} MB); not read"
        return f"{label}: {e.reason} (byte 0x{self.raw[e.start]:02x}) at column {e.start + 1}"


def decode_lines(
    stream: BinaryIO, codec: str, limit: int | None = None, max_line: int | None = None
) -> Iterator[str | Undecodable]:
    """Lines of a binary stream (each with its "\\n"), decoded one by one; the line that crosses `limit` bytes is the
    last. Line-safe codecs split on b"\\n" bytes, so a bad line is one Undecodable item, and a line longer than
    `max_line` bytes is skipped in chunks (never held in memory) and reported as one Undecodable with err None;
    UTF-16/32 are decoded as a stream and a bad spot raises OSError (the rest cannot be re-synchronised reliably)."""
    if not line_safe(codec):
        try:
            yield from io.TextIOWrapper(stream, encoding=codec, errors="strict", newline="\n")  # type: ignore[arg-type]
        except UnicodeDecodeError as e:
            raise OSError(f"undecodable {codec} data ({e.reason})") from None
        return
    pos, cap = 0, -1 if max_line is None else max_line + 1
    while raw := stream.readline(cap):
        n = len(raw)
        if n == cap and not raw.endswith(b"\n"):  # over the cap: skip to the end of the line, 1 MB at a time
            while (chunk := stream.readline(1 << 20)) and (n := n + len(chunk)) and not chunk.endswith(b"\n"):
                pass
            yield Undecodable(raw[:800], None, n)
        else:
            try:
                yield raw.decode(codec)
            except UnicodeDecodeError as e:
                yield Undecodable(raw, e)
        if limit is not None:
            pos += n
            if pos >= limit:
                return


def preview(raw: bytes | str, codec: str = "utf-8", n: int = 200) -> str:
    """Up to `n` characters of a raw record for a human: undecodable bytes as \\xNN, lone surrogates as \\udXXX."""
    if isinstance(raw, bytes):
        raw = raw[: n * 4].decode(codec, "backslashreplace")
    return raw[:n].rstrip("\r\n").encode("utf-8", "backslashreplace").decode("utf-8")


def open_stream(path: Path, compression: str | None) -> BinaryIO:
    """The file's content as a binary stream, decompressed on the fly for "gz" and "zst"."""
    if compression == "gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst files needs zstandard: pip install zstandard") from None
        # read_across_frames: files written by `zstd` in several frames (or concatenated) must be read to the end.
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.BufferedReader(_ZstdChecked(reader, path))
    return open(path, "rb")


class _ZstdChecked(io.RawIOBase):
    """zstandard's reader ends quietly (no error, no data of the cut frame) on a truncated file; at its end we walk
    the frame and block headers (cheap: seeks, no decoding) and raise EOFError when the last frame is incomplete."""

    def __init__(self, reader, path: Path):
        self._reader, self._path, self._checked = reader, path, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._reader.readinto(b)
        if not n and not self._checked:
            if why := zstd_truncation(self._path):
                raise EOFError(f"truncated zstd file: {why}")
            self._checked = True  # the header walk is cheap, but once per stream is enough
        return n

    def close(self) -> None:
        self._reader.close()
        super().close()


def zstd_truncation(path: Path) -> str | None:
    """Why the zstd frames of `path` do not end exactly at its end (a cut download), or None when they do."""
    with open(path, "rb") as fh:
        size, pos = os.fstat(fh.fileno()).st_size, 0
        while pos < size:
            fh.seek(pos)
            head = fh.read(8)
            magic = int.from_bytes(head[:4], "little")
            if len(head) == 8 and magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: magic, 4-byte size, data
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if len(head) < 5 or magic != 0xFD2FB528:
                return f"no zstd frame at byte {pos}" if len(head) >= 5 else f"frame header cut at byte {pos}"
            fhd = head[4]  # frame header descriptor: sizes of window, dictionary id, content size; checksum flag
            single = fhd >> 5 & 1
            pos += 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
            while True:  # blocks: 3-byte header (last flag, type, size); an RLE block holds one byte
                fh.seek(pos)
                bh = fh.read(3)
                if len(bh) < 3:
                    return f"block header cut at byte {pos} of {size}"
                v = int.from_bytes(bh, "little")
                pos += 3 + (1 if (v >> 1 & 3) == 1 else v >> 3)
                if v & 1:
                    break
            pos += 4 * (fhd >> 2 & 1)
        return f"last frame needs {pos} bytes, file has {size}" if pos > size else None


def stream_errors(compression: str | None) -> tuple[type[BaseException], ...]:
    """What reading a (compressed) stream raises when the file is corrupt or truncated."""
    if compression != "zst":
        return (OSError, EOFError, zlib.error)
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


def newline_cuts(stream: BinaryIO, target_bytes: int) -> tuple[list[tuple[int, int]], int]:
    """([(offset just after a b"\\n", newlines before it)] about every `target_bytes`, total size) of a stream read
    from its start; bytes.find/count keep this at disk speed. No cut at the very end."""
    cuts, pos, newlines, target = [], 0, 0, target_bytes
    while chunk := stream.read(8 << 20):
        while target < pos + len(chunk):
            i = chunk.find(b"\n", max(0, target - 1 - pos))
            if i < 0:
                break  # no newline left in this chunk: the cut falls in a later one
            cuts.append((pos + i + 1, newlines + chunk.count(b"\n", 0, i + 1)))
            target = pos + i + 1 + target_bytes
        newlines += chunk.count(b"\n")
        pos += len(chunk)
    return [(c, n) for c, n in cuts if c < pos], pos
