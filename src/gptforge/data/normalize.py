"""Text normalization for the `clean` stage: HTML to text, mojibake repair, control characters, width folding,
traditional to simplified Chinese, PII masking and whitespace, in that order.

Each step is a plain function over a string, so it can be tested alone; `Normalizer` chains the enabled ones and
reports which of them changed a document. Trade-offs:

- Width folding is NOT NFKC. NFKC would turn the Chinese comma ，into "," and … into "...", and superscripts and
  circled numbers into digits. We apply NFC and fold only what is plainly the wrong width: full-width ASCII letters,
  digits and ASCII symbols, the ideographic space, and the half-width katakana / CJK punctuation block (the other
  direction). CJK-style punctuation stays full-width (see `KEEP_FULL_WIDTH`).
- ftfy is slow (about 150 µs for 500 characters) and only ever changes text containing characters outside ASCII
  and the CJK blocks (mojibake is made of Latin-1 / cp1252 / Cyrillic / box-drawing characters), or ligatures.
  A precompiled prefilter skips it for the rest; a test checks the skip never changes the result. ftfy sees the
  text as the control and whitespace steps will leave it (an escape or a no-break space glued to mojibake blocks
  its repair), so when it repairs something those clean-ups arrive with it. HTML entities (&egrave; in the
  Gutenberg plays) are unescaped in this step too. normalize(normalize(x)) == normalize(x) holds on real text;
  on random strings dense in mojibake, controls and ZWJ about 0.1% still change on a second pass.
- The HTML extractor is the stdlib parser with a skip list; it is not a boilerplate remover like trafilatura, and
  an unclosed skipped element (say `<nav>`) hides the rest of the page.
- PII patterns are validated (ID check digit and birth date, Luhn, octets, `ipaddress`) to keep dates, years,
  prices and random numbers unmasked. A random 13–19 digit number still passes Luhn one time in ten when it starts
  like a card number (2–6); an IPv4-shaped version string such as 1.2.3.4 is masked.
"""

from __future__ import annotations

import datetime
import html
import ipaddress
import re
import unicodedata
from functools import lru_cache
from html.parser import HTMLParser
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gptforge.data.text import CJK_CHARS

PiiKind = Literal["email", "phone", "cn_id", "bank_card", "ip"]
PII_TOKENS = {"email": "<EMAIL>", "ip": "<IP>", "cn_id": "<ID>", "bank_card": "<CARD>", "phone": "<PHONE>"}
# Masking order: e-mails first (their local part may hold digits), then IPs, IDs and cards (validated numbers),
# phones last, so that an 18-digit ID is never half-eaten by a looser phone pattern.
PII_ORDER = ("email", "ip", "cn_id", "bank_card", "phone")

# Full-width forms U+FF01–U+FF5E that are ordinary CJK punctuation and stay full-width: ！（），：；？～.
# Everything else in U+FF01–U+FF5E (letters, digits, ＃＄％＆＊＋－．／＜＝＞＠［＼］＾＿｀｛｜｝＂＇) folds to ASCII.
# Punctuation outside that block (。、《》「」『』【】〔〕…—“”) is never touched.
KEEP_FULL_WIDTH = "！（），：；？～"

_HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")  # t2s has work only here
# Mojibake is built from characters of single-byte code pages; text made only of these never changes under ftfy
# (with our options: entities, line breaks and widths are handled elsewhere).
_FTFY_SAFE = "\t\n\r\x20-\x7e\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f"

DROP_TAGS = frozenset(
    {"script", "style", "noscript", "template", "head", "nav", "header", "footer", "aside", "svg", "iframe", "object"}
)
_PARA_TAGS = frozenset(
    "p h1 h2 h3 h4 h5 h6 ul ol table blockquote pre section article main figure dl address hr details fieldset".split()
)
_LINE_TAGS = frozenset("div li tr br dt dd figcaption caption summary title form".split())
_CELL_TAGS = frozenset({"td", "th"})
# What may stand inside <head>; any other start tag (or text outside <title>) ends an unclosed head, as in HTML5's
# parser ("<head><title>t</title><p>text" has its paragraph in the body).
_HEAD_CONTENT = frozenset("title meta link base style script noscript template".split())


class NormalizeConfig(BaseModel):
    """Which normalization steps run; they always run in the order html, ftfy, control, unicode, t2s, mask_pii,
    whitespace."""

    model_config = ConfigDict(extra="forbid")

    unicode: bool = Field(
        True,
        description="NFC, then fold full-width ASCII letters/digits/symbols and U+3000 to half-width and half-width "
        "katakana to full-width; CJK punctuation ！（），：；？～。、《》「」… is kept (this is not NFKC)",
    )
    ftfy: bool = Field(True, description="repair mojibake (UTF-8 read as cp1252/Latin-1 etc.) and ligatures with ftfy")
    control: bool = Field(
        True,
        description="remove ANSI escape sequences, C0/C1 control characters (except tab and newline), zero-width "
        "spaces, BOMs, soft hyphens and bidi overrides; ZWJ is kept inside emoji/Indic sequences",
    )
    html: Literal["auto", "always", "never"] = Field(
        "auto",
        description="HTML to text: 'auto' when the record's format is html or the text looks like an HTML document",
    )
    whitespace: bool = Field(
        True,
        description="CR/CRLF to LF, Unicode spaces and tabs to one space, lines stripped, at most one blank line, "
        "document ends stripped",
    )
    t2s: bool = Field(False, description="convert traditional to simplified Chinese with OpenCC('t2s')")
    mask_pii: list[PiiKind] = Field(
        default_factory=list,
        description="PII to replace: email <EMAIL>, phone <PHONE>, cn_id <ID> (check digit verified), bank_card "
        "<CARD> (Luhn verified), ip <IP>",
    )


# ---------------------------------------------------------------------------------------------------------- width


@lru_cache(maxsize=1)
def _width_table() -> dict[int, str]:
    table = {c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F) if chr(c) not in KEEP_FULL_WIDTH}
    table[0x3000] = " "
    return table


# Everything fold_width changes: U+3000, U+FF01–U+FF5E minus KEEP_FULL_WIDTH, U+FF61–U+FFEE. Kept punctuation is
# left out so that ordinary Chinese text (full of ，：？) skips the translate pass.
_WIDE_RE = re.compile("[\u3000\uff02-\uff07\uff0a\uff0b\uff0d-\uff19\uff1c-\uff1e\uff20-\uff5d\uff61-\uffee]")
# Half-width katakana with their voicing marks (ｶﾞ → ガ), half-width CJK punctuation ｡｢｣､ and half-width Hangul
# need NFKC's composition, so runs of them go through NFKC; so do the full-width signs ￠￡￢￣￤￥￦ (→ ¢£¬¯¦¥₩).
_NFKC_RUN_RE = re.compile("[\uff61-\uffee]+")


def fold_width(text: str) -> str:
    """Fold full-width ASCII to half-width and half-width katakana to full-width, keeping CJK punctuation; then NFC.

    NFC comes last because folding can create a composable pair: "Ａ" + U+0301 only becomes "Á" once "Ａ" is "A"."""
    if _WIDE_RE.search(text) is not None:
        text = text.translate(_width_table())
        text = _NFKC_RUN_RE.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


# ------------------------------------------------------------------------------------------------------- controls

_ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves ("\x1b[31m")
    r"|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks ("\x1b]0;title\x07")
    r"|\x1b[ -/]*[0-~]"  # two-character escapes ("\x1b(B", "\x1bc")
)
# Deleted: C0/C1 controls except tab/LF/CR (VT/FF/NEL were turned into LF), zero-width space, word joiner, BOM,
# soft hyphen, LRM/RLM, bidi embeddings/overrides/isolates ("Trojan source"), interlinear annotation marks.
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\ufff9-\ufffb]"
)
# VT, FF and NEL are line breaks, not noise to delete; CR is left for the whitespace step (which owns line breaks), so a
# CRLF file is reported as a whitespace change, not a control-character one.
_BREAK_RE = re.compile("[\x0b\x0c\x85]")
_FTFY_DROP_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\ufff9-\ufffb]"
)  # _CONTROL_RE without the C1 range
_FTFY_BREAK_RE = re.compile("\r\n?|[\x0b\x0c\u2028\u2029]")  # not NEL (\x85): in Latin-1 mojibake "Ã\x85" is "Å"
_FTFY_SPACE_RE = re.compile("[\t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_C1_RE = re.compile("[\x80-\x9f]")
# ZWJ joins emoji (👨‍👩‍👧) and Indic conjuncts; next to ASCII, spaces, CJK, general or CJK punctuation or the
# width forms it is only noise. (Width forms count as noise because folding may turn them into ASCII later.)
_NOT_JOINABLE = rf"[\x00-\x7f\s{CJK_CHARS}\u2000-\u206f\u3000-\u303f\uff00-\uffef]"
_ZWJ_RE = re.compile(rf"(?:(?<={_NOT_JOINABLE})|\A)\u200d|\u200d(?:(?={_NOT_JOINABLE})|\Z)")
_CONTROL_TRIGGER_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\ufff9-\ufffb]"
)


def strip_controls(text: str) -> str:
    """Remove ANSI escapes, control and invisible formatting characters; VT, FF and NEL become line breaks, CR stays."""
    if _CONTROL_TRIGGER_RE.search(text) is None:
        return text
    text = _ANSI_RE.sub("", text)
    text = _BREAK_RE.sub("\n", text)
    text = _CONTROL_RE.sub("", text)
    return _ZWJ_RE.sub("", text) if "\u200d" in text else text


# ----------------------------------------------------------------------------------------------------------- html

_ENTITY_RE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")  # ";" required, as ftfy


def unescape_entities(text: str) -> str:
    """Unescape HTML entities such as &amp; &egrave; &#20013; (found in Gutenberg texts), repeating until none is
    left so that "&amp;lt;" ends as "<". Without the ";" nothing changes: "?a=1&para=2" keeps its "&para"."""
    for _ in range(4):
        if "&" not in text:
            break
        out = _ENTITY_RE.sub(lambda m: html.unescape(m.group()), text)
        if out == text:
            break
        text = out
    return text


# A page, not a text that mentions a tag: a doctype/<html>/<body> at the start, or several closing block tags.
_HTML_DOC_RE = re.compile(
    r"\A\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b", re.I | re.S
)
_HTML_CLOSE_RE = re.compile(
    r"</(?:p|div|span|a|li|ul|ol|td|tr|table|h[1-6]|body|html|section|article|b|i|em|strong)>", re.I
)


def looks_like_html(text: str) -> bool:
    """True for an HTML document: starts like one, or shows at least 5 closing tags in its first 10,000 chars."""
    if "<" not in text:
        return False
    head = text[:10_000]
    return _HTML_DOC_RE.match(head) is not None or len(_HTML_CLOSE_RE.findall(head)) >= 5


class _TextExtractor(HTMLParser):
    """Collects visible text; block elements become line breaks, skipped elements are dropped with their content."""

    def __init__(self, drop: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive already unescaped in handle_data
        self.drop = drop
        self.skipping: list[str] = []  # open dropped elements; text is kept only while this is empty
        self.pre = 0
        self.title = 0
        self.parts: list[str] = []

    def _leave_head(self) -> None:
        self.skipping = [t for t in self.skipping if t != "head"]

    def _break(self, n: int) -> None:
        # Trim the spaces before the break, and never emit more than n newlines in a row.
        while self.parts and self.parts[-1].endswith(" "):
            self.parts[-1] = self.parts[-1].rstrip(" ")
            if not self.parts[-1]:
                self.parts.pop()
        tail = "".join(self.parts[-n:])
        have = len(tail) - len(tail.rstrip("\n"))
        if self.parts and have < n:
            self.parts.append("\n" * (n - have))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.skipping and self.skipping[-1] == "head":
            if tag == "title":
                self.title += 1
            elif tag not in _HEAD_CONTENT:  # an unclosed <head> ends where <body> or body content starts
                self._leave_head()
        if tag in self.drop:
            self.skipping.append(tag)
        elif self.skipping:
            return
        elif tag in _PARA_TAGS:
            self._break(2)
            if tag == "pre":
                self.pre += 1
        elif tag in _LINE_TAGS:
            self._break(1)
            if tag == "li":
                self.parts.append("- ")
        elif tag in _CELL_TAGS and self.parts and not self.parts[-1].endswith(("\n", " ")):
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if not self.skipping and (tag in _LINE_TAGS or tag in _PARA_TAGS):
            self._break(2 if tag in _PARA_TAGS else 1)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.title:
            self.title -= 1
        if tag in self.skipping:
            del self.skipping[len(self.skipping) - 1 - self.skipping[::-1].index(tag) :]
        elif not self.skipping and (tag in _PARA_TAGS or tag in _LINE_TAGS):
            self._break(2 if tag in _PARA_TAGS else 1)
            if tag == "pre" and self.pre:
                self.pre -= 1

    def handle_data(self, data: str) -> None:
        if self.skipping == ["head"] and not self.title and not data.isspace():
            self._leave_head()  # text in <head> outside <title> starts the body
        if self.skipping or not data:
            return
        if not self.pre:  # outside <pre>, HTML shows any run of whitespace as one space
            core = " ".join(data.split())
            data = (" " if data[0].isspace() else "") + core + (" " if core and data[-1].isspace() else "")
            if not self.parts or self.parts[-1].endswith((" ", "\n")):
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)


def html_to_text(html: str, drop: frozenset[str] = DROP_TAGS) -> str:
    """Visible text of an HTML document: `drop` elements removed with their content, blocks on their own lines,
    list items as "- ", entities unescaped."""
    parser = _TextExtractor(drop)
    parser.feed(html)
    parser.close()
    return "".join(parser.parts).strip()


# ------------------------------------------------------------------------------------------------------------ pii

# Boundaries are ASCII-only on purpose: "\b" treats Chinese characters as word characters, so "电话13812345678"
# would have no boundary before the 1.
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9_-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_RE = re.compile(rf"(?<![A-Za-z0-9.]){_OCTET}(?:\.{_OCTET}){{3}}(?![A-Za-z0-9]|\.\d)")
_IPV6_RE = re.compile(r"(?<![A-Za-z0-9:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![A-Za-z0-9:])")
# 18-digit resident ID: 6-digit region, birth date 18xx–20xx, 3-digit sequence, check digit (0-9 or X).
_CN_ID_RE = re.compile(r"(?<![A-Za-z0-9])[1-9]\d{5}(?:18|19|20)\d{9}[\dXx](?![A-Za-z0-9])")
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)  # ISO 7064 MOD 11-2, GB 11643-1999
# Card numbers start 2–6 (Mastercard 2-series, Amex/JCB/Diners 3, Visa 4, Mastercard 5, UnionPay/Discover 6); a
# timestamp like 20230115123045 therefore starts "20" and is excluded by the prefix check in _card.
_CARD_RE = re.compile(r"(?<![A-Za-z0-9+.-])[2-6](?:[ -]?\d){12,18}(?![0-9])")
_CARD_PREFIX_RE = re.compile(r"4|5[1-5]|6|3[4-8]|2[2-7]")
_PHONE_RE = re.compile(
    r"(?<![A-Za-z0-9+])(?:\((?:\+|00)86\) ?|(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)"  # CN mobile, +86
    r"|(?<![A-Za-z0-9+])\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)"  # +CC ...
    r"|(?<![A-Za-z0-9(-])(?:1-)?(?:\(\d{3}\) ?|\d{3}-)\d{3}-\d{4}(?![\d-])"  # North American (555) 123-4567
    r"|(?<![A-Za-z0-9-])0\d{2,3}-\d{7,8}(?![\d-])"  # CN landline 010-12345678
)


def _valid_cn_id(m: re.Match) -> str:
    s = m.group()
    try:
        datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return s
    check = "10X98765432"[sum(int(d) * w for d, w in zip(s, _CN_ID_WEIGHTS)) % 11]
    return PII_TOKENS["cn_id"] if s[17].upper() == check else s


def _luhn_card(m: re.Match) -> str:
    digits = [int(c) for c in m.group() if c.isdigit()]
    if not _CARD_PREFIX_RE.match(m.group()):
        return m.group()
    total = sum(digits[-1::-2]) + sum(d * 2 - 9 if d > 4 else d * 2 for d in digits[-2::-2])
    return PII_TOKENS["bank_card"] if total % 10 == 0 else m.group()


def _phone(m: re.Match) -> str:
    n = sum(c.isdigit() for c in m.group())
    return PII_TOKENS["phone"] if 7 <= n <= 15 else m.group()  # E.164 allows at most 15 digits


def _ipv6(m: re.Match) -> str:
    s = m.group()
    groups = [g for g in s.split(":") if g]
    # "a::b" is a valid address but far more often C++ or Rust; a real one has 3+ groups, one of 3+ hex digits.
    if len(groups) < 3 or max(map(len, groups)) < 3:
        return s
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return s
    return PII_TOKENS["ip"]


def mask_pii(text: str, kinds) -> str:
    """Replace the PII `kinds` (a subset of PII_ORDER) with <EMAIL>, <IP>, <ID>, <CARD>, <PHONE>."""
    kinds = set(kinds)
    if unknown := kinds - set(PII_ORDER):
        raise ValueError(f"mask_pii: unknown kind(s) {sorted(unknown)}; choose from {list(PII_ORDER)}")
    if "email" in kinds and "@" in text:
        text = _EMAIL_RE.sub(PII_TOKENS["email"], text)
    if "ip" in kinds:
        text = _IPV4_RE.sub(PII_TOKENS["ip"], text)
        if ":" in text:
            text = _IPV6_RE.sub(_ipv6, text)
    if "cn_id" in kinds:
        text = _CN_ID_RE.sub(_valid_cn_id, text)
    if "bank_card" in kinds:
        text = _CARD_RE.sub(_luhn_card, text)
    if "phone" in kinds:
        text = _PHONE_RE.sub(_phone, text)
    return text


# ----------------------------------------------------------------------------------------------------- whitespace

_LINE_BREAK_RE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_HSPACE_RE = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # runs of 2+ spaces, or any single space that is not " "
_LINE_EDGE_RE = re.compile(r" \n ?|\n ")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """LF line breaks; every Unicode space or tab run → one " "; lines stripped; ≤ 1 blank line; ends stripped."""
    text = _LINE_BREAK_RE.sub("\n", text)
    text = _HSPACE_RE.sub(" ", text)
    text = _LINE_EDGE_RE.sub("\n", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


# ----------------------------------------------------------------------------------------------------- normalizer


_EXTRACTED = "\0html-extracted"  # the format the steps after `html` see once html_to_text has run


class Normalizer:
    """Callable that applies the enabled steps; returns the text and the names of the steps that changed it.

    Everything (ftfy options, OpenCC converter, PII set) is built once here; pickling rebuilds from the config, so a
    Normalizer can be sent to worker processes."""

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        steps = []
        if cfg.html != "never":
            steps.append(("html", self._html))
        if cfg.ftfy:
            import ftfy

            # Width, quotes and line breaks are our own steps; escapes and controls belong to `control`, so the
            # report names the step that really did the work. ftfy's own entity unescaping ("auto") switches off
            # for the rest of a document after the first line holding "<", which makes the result depend on line
            # breaks; we unescape entities ourselves (unescape_entities).
            self._ftfy_opts = ftfy.TextFixerConfig(
                unescape_html=False,
                normalization=None,
                uncurl_quotes=False,
                fix_character_width=False,
                fix_line_breaks=False,
                remove_terminal_escapes=False,
                remove_control_chars=False,
            )
            self._ftfy_fix = ftfy.fix_text
            self._ftfy_trigger = re.compile(f"[^{_FTFY_SAFE}]")
            steps.append(("ftfy", self._ftfy))
        if cfg.control:
            steps.append(("control", lambda t, fmt: strip_controls(t)))
        if cfg.unicode:
            steps.append(("unicode", lambda t, fmt: fold_width(t)))
        if cfg.t2s:
            try:
                import opencc
            except ImportError as e:
                raise ImportError("normalize.t2s needs OpenCC: pip install opencc") from e
            convert = opencc.OpenCC("t2s").convert
            steps.append(("t2s", lambda t, fmt: convert(t) if _HAN_RE.search(t) else t))
        if cfg.mask_pii:
            kinds = frozenset(cfg.mask_pii)
            steps.append(("mask_pii", lambda t, fmt: mask_pii(t, kinds)))
        if cfg.whitespace:
            steps.append(("whitespace", lambda t, fmt: normalize_whitespace(t)))
        self._steps = steps

    def _is_html(self, text: str, fmt: str) -> bool:
        return self.cfg.html == "always" or fmt == "html" or looks_like_html(text)

    def _html(self, text: str, fmt: str) -> str:
        return html_to_text(text) if self._is_html(text, fmt) else text

    def _ftfy(self, text: str, fmt: str) -> str:
        if fmt != _EXTRACTED:  # text out of html_to_text has its entities resolved already
            text = unescape_entities(text)
        if self._ftfy_trigger.search(text) is None:
            return text
        # ftfy judges a line as a whole: an ANSI escape, a control character or a no-break space next to mojibake
        # can stop the repair, and a second pass (after control/whitespace removed them) would then repair it. So
        # ftfy sees the text as those steps will leave it (C1 controls stay: they are often part of the mojibake),
        # and when it repairs nothing the text comes back untouched, for those steps to do and report their work.
        clean = _ANSI_RE.sub("", text)
        clean = _FTFY_SPACE_RE.sub(" ", _FTFY_BREAK_RE.sub("\n", _FTFY_DROP_RE.sub("", clean)))
        fixed = self._ftfy_fix(clean, self._ftfy_opts)
        if _C1_RE.search(fixed):  # left over (undefined in cp1252), they are junk that can still hide mojibake
            clean = _C1_RE.sub("", clean)
            fixed = self._ftfy_fix(_C1_RE.sub("", fixed), self._ftfy_opts)
        return text if fixed == clean else fixed

    def __call__(self, text: str, fmt: str = "txt") -> tuple[str, list[str]]:
        changed = []
        step_fmt = fmt
        for name, step in self._steps:
            if name == "html" and self._is_html(text, fmt):
                # html_to_text already resolved the entities: "&amp;lt;" is the visible text "&lt;", which the
                # ftfy step must not unescape a second time (it would turn an HTML tutorial's "&lt;" into "<").
                out, step_fmt = html_to_text(text), _EXTRACTED
            else:
                out = step(text, step_fmt)
            if out != text:
                changed.append(name)
                text = out
        return text, changed

    def __reduce__(self):
        return (Normalizer, (self.cfg,))
