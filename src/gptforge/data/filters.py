"""Document quality filters for the `clean` stage: length, repetition, symbol/digit/punctuation shares, script mix,
language and blocklists. `Filters.check(text)` returns None to keep a document or the name of the first failing
check (see `REASONS`, which is also the check order: cheap checks and user policy first, n-grams last).

Repetition follows Gopher (Rae et al. 2021, appendix A, table A1), with the thresholds datatrove's
GopherRepetitionFilter uses by default, but n-grams are over *units* (`gptforge.data.text.units`): one CJK
character or one word. That makes the same thresholds work on Chinese, where a word n-gram does not exist.
Trade-offs, all chosen so that short poems and whole plays (the bundled sample) pass:

- A "duplicated n-gram" covers every occurrence of an n-gram seen twice or more, overlapping windows counted once
  (the paper's definition, also RedPajama-v2's), computed with numpy; datatrove's greedy loop counts only repeats
  and is a Python loop per window. Coverage of duplicated (n+1)-grams lies inside that of duplicated n-grams, so
  the fraction falls as n grows and the larger n are skipped once it is under every remaining threshold.
- Fractions are of len(text) (as in datatrove), so punctuation and spaces dilute repetition a little.
- The top n-gram (n = 2..4) must occur at least 3 times. Gopher only saw documents of 50+ words; in a 50-character
  poem one repeated 4-gram already passes 0.16 (巴山夜雨 twice in 李商隐's 夜雨寄北), and two occurrences of longer
  n-grams are still judged by the duplicated n-gram rule.
- Language detection uses scripts and an English stopword list, with no model: it tells zh / ja / ko / en apart
  and calls other Latin-script text "latin". It cannot tell French from German.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptforge.data.dedup import unit_classes
from gptforge.data.text import CJK_CHARS, UNIT_RE, units

REASONS: tuple[str, ...] = (
    "too_short",
    "too_long",
    "blocklist",
    "language",
    "script_mix",
    "symbols",
    "digits",
    "punctuation",
    "repetitive_lines",
    "repetitive_ngrams",
)
LANGUAGES = ("zh", "ja", "ko", "en", "latin", "other", "und")

# Gopher table A1 / datatrove GopherRepetitionFilter defaults: top 2/3/4-gram and duplicated 5..10-gram fractions.
TOP_NGRAM_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
TOP_NGRAM_MIN_COUNT = 3  # ours, not Gopher's: see the module docstring

# Function words that are common in English and rare as words in French, German, Spanish, Italian or Dutch ("a",
# "in", "is", "of", "so", "was", "die", "an", "on", "me", "he" are left out for that reason); thou/thee/thy/hath
# cover older English (Shakespeare scores 0.32 with this list).
EN_STOPWORDS = frozenset(
    "the and to that with you your this for are have has had not but they their them what which would shall from"
    " be been were by it its his him she her we our my thou thee thy hath doth at there when who all if can"
    " how than then these those will or"
    # Common English words rare in fr/de/es/it/nl/pt: without them one short English paragraph in 12 (a line or two
    # of a play: "Do I look like a cudgel or a hovel-post, a staff or a prop? Do you know me, father?") is "latin".
    " know good well like upon into out up here now some any should could must let more very such only also just"
    " about did does why where said say too yet nor ever never much many again make made take give because other"
    " after being one go see yes think".split()
)
EN_MIN_STOPWORD_FRAC = 0.15  # Shakespeare 0.32, one short English sentence 0.2; fr/de/es/it/nl prose under 0.05
KANA_MIN_FRAC = 0.1  # share of kana among Han+kana that makes CJK text Japanese (Chinese has at most a stray の)

_CJK_LETTER_RE = re.compile(
    "[\u3005-\u3007\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\u1100-\u11ff\u3131-\u318e\uac00-\ud7af\U00020000-\U0003134f]+"
)
_KANA_RE = re.compile("[\u3041-\u3096\u309d-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff]+")
_HANGUL_RE = re.compile("[\u1100-\u11ff\u3131-\u318e\uac00-\ud7af]+")
_LATIN_RE = re.compile(
    "[A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\u2c60-\u2c7f\ua720-\ua7ff\uff21-\uff3a"
    "\uff41-\uff5a]+"
)
_LETTER_RE = re.compile(r"[^\W\d_]+")
_DIGIT_RE = re.compile(r"\d+")
# Gopher counts "#" and "..." per word; we count runs, so a Chinese ellipsis "……" or a Markdown "###" is one symbol.
_SYMBOL_RE = re.compile(r"#+|\.{3,}|…+|⋯+")


def _may_have_symbol(text: str) -> bool:  # a cheap pre-check: most documents have none of these)
    return "#" in text or "..." in text or "…" in text or "⋯" in text


@lru_cache(maxsize=1)
def _punct_re() -> re.Pattern:
    """Unicode punctuation (categories P*, BMP only) plus the ASCII symbols $+<=>^`|~, built once per process."""
    ranges: list[list[int]] = []
    for c in range(0x10000):
        if unicodedata.category(chr(c))[0] == "P" or chr(c) in "$+<=>^`|~":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    body = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(f"[{body}]+")


# Character classes for one vectorized counting pass (see _class_table).
_SPACE, _DIGIT, _PUNCT, _LATIN, _HAN, _KANA, _HANGUL, _OTHER_LETTER, _OTHER = range(9)


@lru_cache(maxsize=1)
def _class_table() -> np.ndarray:
    """Class of every code point, built once per process by running the module's own regexes over all of Unicode, so
    the counts equal what the regexes would count; then one numpy lookup counts a document in a single pass."""
    everything = "".join(map(chr, range(0x110000)))
    table = np.full(0x110000, _OTHER, np.uint8)

    def mark(pattern: re.Pattern, cls: int) -> None:
        for m in pattern.finditer(everything):
            table[m.start() : m.end()] = cls

    mark(_punct_re(), _PUNCT)
    mark(_DIGIT_RE, _DIGIT)
    mark(_LETTER_RE, _OTHER_LETTER)
    mark(_LATIN_RE, _LATIN)
    mark(_CJK_LETTER_RE, _HAN)
    mark(_KANA_RE, _KANA)
    mark(_HANGUL_RE, _HANGUL)
    mark(re.compile(r"\s+"), _SPACE)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=8)  # the clean stage calls detect_language and then Filters.check on the same string
def _class_counts(text: str) -> np.ndarray:
    """Characters per class (see _class_table)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return np.bincount(_class_table()[codes], minlength=9)


def _unit_count(text: str) -> int:
    """len(units(text)) without building the list: CJK units plus starts of word runs."""
    # lower() first, as `units` does: "İ" lowers to "i" + U+0307 (a combining mark, not a word character)
    codes = np.frombuffer(text.lower().encode("utf-32-le", "surrogatepass"), dtype="<u4")
    if not len(codes):
        return 0
    uc = unit_classes()[codes]
    word = uc == 1
    return int(np.count_nonzero(uc == 2)) + int(word[0]) + int(np.count_nonzero(word[1:] & ~word[:-1]))


def _letter_counts(text: str) -> tuple[int, int, int]:
    """(all letters, CJK letters, Latin letters); only letters that are not digits count (as in _LETTER_RE)."""
    c = _class_counts(text)
    cjk = int(c[_HAN] + c[_KANA] + c[_HANGUL])
    latin = int(c[_LATIN])
    return cjk + latin + int(c[_OTHER_LETTER]), cjk, latin


def script_mix(text: str) -> dict[str, float]:
    """Shares of letters that are CJK (Han, kana, Hangul), Latin, or another script; all 0.0 without letters."""
    letters, cjk, latin = _letter_counts(text)
    if not letters:
        return {"cjk": 0.0, "latin": 0.0, "other": 0.0}
    return {"cjk": cjk / letters, "latin": latin / letters, "other": max(0, letters - cjk - latin) / letters}


def _language(text: str, letters: int, cjk: int, latin: int) -> str:
    if not letters:
        return "und"
    # A CJK character carries about as much as a word; a Latin word averages about four letters (Shakespeare 3.9).
    other = max(0, letters - cjk - latin)
    if cjk >= latin / 4 and cjk >= other / 4:
        counts = _class_counts(text)
        hangul = int(counts[_HANGUL])
        if hangul * 2 >= cjk:
            return "ko"
        kana = int(counts[_KANA])
        return "ja" if kana >= KANA_MIN_FRAC * (cjk - hangul) else "zh"
    if latin >= other:
        # whole words, so "Höhe" is not read as "h" + "he"; the first 5,000 characters tell the language well enough
        words = _LETTER_RE.findall(text[:5000].lower())
        hits = sum(map(EN_STOPWORDS.__contains__, words))
        return "en" if words and hits >= EN_MIN_STOPWORD_FRAC * len(words) else "latin"
    return "other"


def detect_language(text: str) -> str:
    """One of "zh", "ja" (kana), "ko" (Hangul), "en", "latin" (other Latin-script text), "other" (other scripts)
    or "und" (no letters), from letter counts per script and, for Latin text, the share of English stopwords."""
    return _language(text, *_letter_counts(text))


class FilterConfig(BaseModel):
    """Thresholds of the quality filters. To turn a check off: a max fraction of 1.0 (max_symbol_frac: a large
    number), min_script_frac 0.0, an empty n-gram dict."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int = Field(20, ge=0, description="drop documents shorter than this many characters (too_short)")
    max_chars: int = Field(2_000_000, ge=1, description="drop documents longer than this many characters (too_long)")
    max_dup_line_frac: float = Field(
        0.3, ge=0, le=1, description="Gopher: max share of non-empty lines that repeat an earlier line"
    )
    max_dup_line_char_frac: float = Field(
        0.2, ge=0, le=1, description="Gopher: max share of characters in lines that repeat an earlier line"
    )
    dup_line_min_units: int = Field(
        3,
        ge=0,
        description="a repeated line shorter than this many units (speaker names like 'BENEDICK.', 'Exeunt.') is "
        "not counted as a duplicate: plays repeat them by nature (Much Ado reaches 0.29 otherwise)",
    )
    max_top_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: dict(TOP_NGRAM_FRAC),
        description="Gopher: n -> max share of characters in the most frequent n-gram of units (if seen 3+ times)",
    )
    max_dup_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: dict(DUP_NGRAM_FRAC),
        description="Gopher: n -> max share of characters covered by n-grams of units that occur 2+ times",
    )
    max_symbol_frac: float = Field(
        0.1, ge=0, description="Gopher: max runs of '#', '...' or '…' per unit (CJK character or word)"
    )
    max_digit_frac: float = Field(0.3, ge=0, le=1, description="max share of digits among non-space characters")
    max_punct_frac: float = Field(
        0.3,
        ge=0,
        le=1,
        description="max share of punctuation (Unicode P* and ASCII $+<=>^`|~) among non-space characters; Tang "
        "poems run 0.15-0.20",
    )
    min_script_frac: float = Field(
        0.5, ge=0, le=1, description="min share of letters that are CJK or Latin (Cyrillic, Greek, ... count against)"
    )
    languages: list[str] = Field(
        default_factory=list,
        description=f"keep only these detect_language() results (any of {', '.join(LANGUAGES)}); empty keeps all",
    )
    blocklist_words: list[str] = Field(
        default_factory=list,
        description="drop documents containing a word: case-insensitive whole word for Latin, substring for CJK",
    )
    blocklist_regex: list[str] = Field(
        default_factory=list, description="drop documents where one of these Python regular expressions matches"
    )
    blocklist_file: str | None = Field(
        None, description="UTF-8 file of blocklist words, one per line (blank lines and lines starting '#' skipped)"
    )

    @field_validator("max_top_ngram_frac", "max_dup_ngram_frac")
    @classmethod
    def _ngram_thresholds(cls, v: dict[int, float], info) -> dict[int, float]:
        for n, frac in v.items():
            if n < 1 or frac < 0:
                raise ValueError(f"{info.field_name}: need n >= 1 and a fraction >= 0, got {n}: {frac}")
        return dict(sorted(v.items()))

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, v: list[str]) -> list[str]:
        if bad := [x for x in v if x not in LANGUAGES]:
            raise ValueError(f"languages: unknown {bad}; detect_language() returns one of {list(LANGUAGES)}")
        return v


class Filters:
    """Precompiled filters; `check(text)` returns None (keep) or the first failing reason from REASONS."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        words = [w.strip() for w in cfg.blocklist_words if w.strip()]
        if cfg.blocklist_file is not None:
            path = Path(cfg.blocklist_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"filters.blocklist_file: cannot read {str(path)!r}: {e}") from None
            words += [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
        # Plain Latin words are looked up among the document's units (a set lookup per unit scales to big lists);
        # CJK words and anything with spaces or symbols go into one regex. A word boundary is "not next to a
        # Latin/digit character": CJK text has no spaces, so 'foo' in '买foo吧' is still a whole word.
        self._block_units = frozenset(w.lower() for w in words if re.fullmatch(rf"[^\W_{CJK_CHARS}]+", w))
        edge = rf"[^\W{CJK_CHARS}]"
        patterns = []
        for w in sorted({w for w in words if w.lower() not in self._block_units}, key=len, reverse=True):
            if re.search(f"[{CJK_CHARS}]", w):
                patterns.append(re.escape(w))
            else:
                patterns.append(rf"(?<!{edge}){re.escape(w)}(?!{edge})")
        self._block_words = re.compile("|".join(patterns), re.I) if patterns else None
        self._block_regex = []
        for pat in cfg.blocklist_regex:
            try:
                self._block_regex.append(re.compile(pat))
            except re.error as e:
                raise ValueError(f"filters.blocklist_regex: invalid regular expression {pat!r}: {e}") from None
        self._languages = frozenset(cfg.languages)
        self._punct = _punct_re()
        self._top = cfg.max_top_ngram_frac
        self._dup = cfg.max_dup_ngram_frac

    def __reduce__(self):
        return (Filters, (self.cfg,))

    def check(self, text: str) -> str | None:
        cfg = self.cfg
        n = len(text)
        if n < cfg.min_chars or not text or text.isspace():
            return "too_short"
        if n > cfg.max_chars:
            return "too_long"
        # The unit list costs a regex pass: build it only for the checks that need the units themselves.
        us = units(text) if self._block_units or self._top or self._dup else None
        if self._blocked(text, us):
            return "blocklist"
        letters, cjk, latin = _letter_counts(text)
        if self._languages and _language(text, letters, cjk, latin) not in self._languages:
            return "language"
        if letters and cjk + latin < cfg.min_script_frac * letters:
            return "script_mix"
        if _may_have_symbol(text) and len(_SYMBOL_RE.findall(text)) > cfg.max_symbol_frac * max(_unit_count(text), 1):
            return "symbols"
        visible = n - text.count(" ") - text.count("\n") - text.count("\t")
        counts = _class_counts(text)
        if counts[_DIGIT] > cfg.max_digit_frac * visible:
            return "digits"
        if counts[_PUNCT] > cfg.max_punct_frac * visible:
            return "punctuation"
        if self._repetitive_lines(text):
            return "repetitive_lines"
        if us is not None and self._repetitive_ngrams(us, n):
            return "repetitive_ngrams"
        return None

    def _blocked(self, text: str, us: list[str] | None) -> bool:
        if self._block_units and not self._block_units.isdisjoint(us):
            return True
        if self._block_words is not None and self._block_words.search(text):
            return True
        return any(p.search(text) for p in self._block_regex)

    def _repetitive_lines(self, text: str) -> bool:
        lines = [line for line in text.split("\n") if line and not line.isspace()]
        if len(set(lines)) == len(lines):
            return False
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                if len(UNIT_RE.findall(line)) < self.cfg.dup_line_min_units:
                    continue
                dup_lines += 1
                dup_chars += len(line)
            else:
                seen.add(line)
        return dup_lines > self.cfg.max_dup_line_frac * len(lines) or dup_chars > self.cfg.max_dup_line_char_frac * len(
            text
        )

    def _repetitive_ngrams(self, us: list[str], n_chars: int) -> bool:
        n_units = len(us)
        if n_units < 2 or not (self._top or self._dup):
            return False
        h = np.fromiter(map(hash, us), dtype=np.int64, count=n_units).view(np.uint64)
        # Characters per unit; skipped for text made of one-character units (Chinese), where an n-gram has n.
        lens = None if sum(map(len, us)) == n_units else np.fromiter(map(len, us), np.int64, n_units)
        # Rolling polynomial hash of windows: g_n[i] = g_{n-1}[i] * K + h[i+n-1] (uint64 wraps around on purpose).
        K = np.uint64(0x9E3779B97F4A7C15)
        g, g_n = h, 1
        top, dup = self._top, dict(self._dup)
        for n in sorted(set(top) | set(dup)):
            if n > n_units:
                break
            if n not in top and n not in dup:
                continue
            while g_n < n:
                g = g[:-1] * K + h[g_n:]
                g_n += 1
            # One argsort per n answers everything: equal n-grams are neighbours in sorted order.
            order = np.argsort(g)
            same = g[order[1:]] == g[order[:-1]]  # same[i]: sorted windows i and i+1 hold the same n-gram
            if not same.any():  # nothing repeats at n, so nothing repeats at any larger n either
                return False
            if n in top:
                bounds = np.flatnonzero(np.concatenate(([True], ~same, [True])))
                runs = np.diff(bounds)  # occurrences of each distinct n-gram
                most = int(runs.max())
                if most >= TOP_NGRAM_MIN_COUNT:
                    chars = n
                    if lens is not None:  # ties: the longest in characters, so the result is deterministic
                        at = order[bounds[:-1][runs == most]]
                        offsets = np.concatenate(([0], np.cumsum(lens)))
                        chars = int((offsets[at + n] - offsets[at]).max())
                    if most * chars > top[n] * n_chars:
                        return True
            if n in dup:
                in_run = np.zeros(len(order), dtype=bool)
                in_run[1:] |= same
                in_run[:-1] |= same
                at = order[in_run]  # window starts of every occurrence of a duplicated n-gram
                edges = np.bincount(at, minlength=n_units + 1) - np.bincount(at + n, minlength=n_units + 1)
                inside = np.cumsum(edges)[:n_units] > 0
                covered = int(inside.sum()) if lens is None else int(lens[inside].sum())
                if covered > dup[n] * n_chars:
                    return True
                # Coverage only shrinks as n grows: larger n whose threshold it already meets need no work.
                dup = {m: f for m, f in dup.items() if m <= n or covered > f * n_chars}
        return False
