"""Offline, seeded, label-preserving text augmentation for Chinese and English (EDA plus character noise).

The operations of EDA (Wei & Zou 2019, "Easy Data Augmentation"), each applied to a copy of a text:

- `synonym`: replace up to p*n words by a synonym;  `insert`: insert a synonym of a random word at a random place;
- `swap`: swap two words (p*n times);  `delete`: drop each word with probability p (at least one, never all);
- `reorder`: shuffle the sentences of a document (split after 。！？!?. and at line breaks; terminators stay with
  their sentence, the whitespace between sentences stays where it was);
- `char_noise`: Chinese characters swapped for similar-shape or same-sound ones from a bundled confusion table,
  English keyboard-neighbour typos and dropped, doubled or transposed letters.

Words are cut by `synonyms.tokenize` (rjieba for Chinese, a regex for the rest), so the pieces of a text always
concatenate back to it and only word pieces are ever edited. Never touched: special-token literals (`<|user|>`,
`</s>`, `[SEP]`: they are also fences, so no word or sentence moves across them), anything containing `://` or `@`
(URLs, emails), digits and Chinese numerals, punctuation. A text whose only edit would leave it empty is returned
unchanged. Synonyms come from, in order of trust: the user's table, the bundled tables, WordNet (when nltk and its data
are installed), words mined from the training corpus; a word takes its candidates from the first source that knows it.

Determinism: copy j of record i is drawn from a `random.Random` seeded by (seed, i, j, text) alone, so it does not
depend on the order of calls or on other records (given the same synonym sources; mined synonyms depend on the corpus).
Trade-off: these edits are cheap and offline but blind to meaning; a swapped or deleted word can break grammar, which is
why p defaults to 0.1 and augmentation is meant for the training split only.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptforge.data.synonyms import (
    STOPWORDS,
    is_word,
    load_synonym_table,
    mine_synonyms,
    tokenize,
    word_key,
    wordnet_available,
    wordnet_synonyms,
)
from gptforge.data.text import CJK_CHARS, CJK_RE

VALID_OPS = ("synonym", "insert", "swap", "delete", "reorder", "char_noise")

WORD, SPACE, FIXED, FENCE = "word", "space", "fixed", "fence"
# Chat and model control tokens; a fence between turns. `[A-Z]` tags cover [CLS]/[SEP]/[INST] and friends.
_SPECIAL = r"<\|[^|<>\s]{1,64}\|>|</?s>|\[/?[A-Z][A-Z_]{1,15}\]"
# A URL or email: the run of non-space, non-CJK, non-Chinese-punctuation characters around `://` or `@`.
_NOT_LINK = rf"\s{CJK_CHARS}，。！？、；：“”‘’（）《》【】「」『』"
PROTECT_RE = re.compile(rf"(?P<special>{_SPECIAL})|(?P<link>[^{_NOT_LINK}]*(?:://|@)[^{_NOT_LINK}]*)")
ZH_NUMERALS = frozenset("〇零一二三四五六七八九十百千万亿两壹贰叁肆伍陆柒捌玖拾佰仟")
TERMINATORS = frozenset("。！？!?")
CLOSERS = frozenset("\"'”’」』)）】》")
_KEY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ops: list[str] = Field(
        default_factory=lambda: list(VALID_OPS),
        description=f"Operations to draw from, uniformly: {', '.join(VALID_OPS)}.",
    )
    n_per_record: int = Field(4, ge=0, description="Augmented copies drawn per training record (duplicates dropped).")
    p: float = Field(0.1, gt=0.0, le=1.0, description="Share of words touched by one operation.")
    seed: int = Field(1337, description="Seed; copy j of record i depends only on (seed, i, j, text).")
    synonym_table: str = Field(
        "", description="Your synonym table (one group per line, tab/comma/space separated, # comments); '' = none."
    )
    mine_synonyms: bool = Field(True, description="Mine synonyms from the training texts by distributional similarity.")
    mine_min_count: int = Field(5, ge=1, description="Fewest occurrences of a word for it to be mined.")
    wordnet: Literal["auto", "off"] = Field(
        "auto", description="English WordNet synonyms when nltk and its wordnet data are installed (never downloaded)."
    )
    builtin_tables: bool = Field(True, description="Use the bundled Chinese and English synonym tables.")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError(f"ops: empty; choose from {', '.join(VALID_OPS)}")
        for op in ops:
            if op not in VALID_OPS:
                raise ValueError(f"ops: unknown operation {op!r}; valid ones: {', '.join(VALID_OPS)}")
        if len(set(ops)) < len(ops):
            raise ValueError(f"ops: {ops} lists an operation twice")
        return ops


class Tok(NamedTuple):
    text: str
    kind: str  # WORD (editable), SPACE, FIXED (punctuation, numbers, URLs), FENCE (special token)
    seg: int  # fence-delimited segment: words and sentences move only within their segment


def tables_dir() -> Path:
    """The bundled tables (package data)."""
    return Path(__file__).resolve().parent / "tables"


def keyboard_neighbors() -> dict[str, str]:
    """QWERTY letter -> letters on the keys around it (same row left/right, the two touching keys above and below)."""
    out = {}
    for r, row in enumerate(_KEY_ROWS):
        for c, key in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            if r > 0:
                near += [_KEY_ROWS[r - 1][i] for i in (c, c + 1) if i < len(_KEY_ROWS[r - 1])]
            if r + 1 < len(_KEY_ROWS):
                near += [_KEY_ROWS[r + 1][i] for i in (c - 1, c) if 0 <= i < len(_KEY_ROWS[r + 1])]
            out[key] = "".join(near)
    return out


def _kind(piece: str) -> str:
    if piece.isspace():
        return SPACE
    if is_word(piece) and not all(c in ZH_NUMERALS for c in piece):
        return WORD
    return FIXED


def segment(text: str) -> list[Tok]:
    """`text` as tokens that concatenate back to it exactly; protected spans are single FIXED/FENCE tokens."""
    out: list[Tok] = []
    seg = pos = 0
    matches = PROTECT_RE.finditer(text) if any(m in text for m in ("<", "[", "@", "://")) else ()
    for m in matches:
        out += [Tok(p, _kind(p), seg) for p in tokenize(text[pos : m.start()])]
        if m.lastgroup == "special":
            out.append(Tok(m.group(), FENCE, seg + 1))
            seg += 2
        else:
            out.append(Tok(m.group(), FIXED, seg))
        pos = m.end()
    out += [Tok(p, _kind(p), seg) for p in tokenize(text[pos:])]
    return out


def match_case(new: str, old: str) -> str:
    """`new` capitalized like `old` (ALL CAPS, Capitalized or as is)."""
    if len(old) > 1 and old.isupper():
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _latin_edge(tok: Tok | None, first: bool) -> bool:
    """Whether `tok` meets an inserted Latin word with a letter or digit (so a space must separate them)."""
    if tok is None or tok.kind == SPACE or not tok.text:
        return False
    ch = tok.text[0] if first else tok.text[-1]
    return ch.isalnum() and not CJK_RE.match(ch)


def _inline_space(tok: Tok) -> bool:
    return tok.kind == SPACE and "\n" not in tok.text


def _tidy_spaces(toks: list[Tok], original: str) -> list[Tok]:
    """After deletions: one whitespace token per gap (the one holding a line break, if any), none at the ends
    unless the original had it there."""
    out: list[Tok] = []
    for t in toks:
        if t.kind == SPACE and out and out[-1].kind == SPACE:
            if t.text.count("\n") > out[-1].text.count("\n"):
                out[-1] = t
            continue
        out.append(t)
    if out and out[0].kind == SPACE and not original[:1].isspace():
        out.pop(0)
    if out and out[-1].kind == SPACE and not original[-1:].isspace():
        out.pop()
    return out


def _sentences(toks: list[Tok]) -> tuple[list[list[Tok]], list[list[Tok]]]:
    """Split one segment into sentence bodies and the whitespace gaps around them:
    toks == gaps[0] + bodies[0] + gaps[1] + ... + bodies[-1] + gaps[-1]."""
    chunks: list[list[Tok]] = [[]]
    i, n = 0, len(toks)
    while i < n:
        t = toks[i]
        if t.kind == SPACE and "\n" in t.text:
            chunks.append([t])  # a line break starts the next sentence (and becomes the gap before it)
            i += 1
            continue
        chunks[-1].append(t)
        i += 1
        if t.kind == FIXED and (
            t.text in TERMINATORS or (t.text == "." and (i == n or toks[i].kind == SPACE or toks[i].text in CLOSERS))
        ):
            while i < n and toks[i].kind == FIXED and (toks[i].text in TERMINATORS or toks[i].text in CLOSERS):
                chunks[-1].append(toks[i])  # "?!" and closing quotes stay with their sentence
                i += 1
            chunks.append([])
    bodies: list[list[Tok]] = []
    gaps: list[list[Tok]] = [[]]
    for ch in chunks:
        a, b = 0, len(ch)
        while a < b and ch[a].kind == SPACE:
            a += 1
        while b > a and ch[b - 1].kind == SPACE:
            b -= 1
        gaps[-1] += ch[:a]
        if a < b:
            bodies.append(ch[a:b])
            gaps.append(ch[b:])
    return bodies, gaps


class Augmenter:
    """Applies the configured operations; holds the synonym sources (built once, read-only afterwards)."""

    def __init__(self, cfg: AugmentConfig, corpus: Iterable[str] | None = None) -> None:
        self.cfg = cfg
        self._tables: list[tuple[str, dict[str, list[str]]]] = []  # (source, table), most trusted first
        self._source_info: dict = {"user_table": None, "builtin": "off", "wordnet": "off", "mined": "off"}
        if cfg.synonym_table:
            table = load_synonym_table(cfg.synonym_table)
            self._tables.append(("user_table", table))
            self._source_info["user_table"] = {"path": cfg.synonym_table, "words": len(table)}
        if cfg.builtin_tables:
            builtin = {
                **load_synonym_table(tables_dir() / "zh_synonyms.txt"),
                **load_synonym_table(tables_dir() / "en_synonyms.txt"),
            }
            self._tables.append(("builtin", builtin))
            self._source_info["builtin"] = {"words": len(builtin)}
        self._wordnet = cfg.wordnet == "auto" and wordnet_available()
        if cfg.wordnet == "auto":
            self._source_info["wordnet"] = "available" if self._wordnet else "unavailable (nltk or its data missing)"
        self._wordnet_cache: dict[str, list[str]] = {}
        self._mined: dict[str, list[str]] = {}
        if cfg.mine_synonyms:
            if corpus is None:
                self._source_info["mined"] = "no corpus given"
            else:
                self._mined = mine_synonyms(corpus, min_count=cfg.mine_min_count)
                self._source_info["mined"] = {"words": len(self._mined)}
        self._confusables: dict[str, list[str]] = {}
        if "char_noise" in cfg.ops:
            table = load_synonym_table(tables_dir() / "zh_confusables.txt")
            self._confusables = {c: [x for x in v if len(x) == 1] for c, v in table.items() if len(c) == 1}
        self._keys = keyboard_neighbors()

    @property
    def sources(self) -> dict:
        """Synonym sources in use with their sizes (for stats.json)."""
        return {**self._source_info, "confusables": len(self._confusables)}

    @property
    def confusables(self) -> dict[str, list[str]]:
        return self._confusables

    def synonyms(self, word: str) -> list[str]:
        """Candidates for `word` from the most trusted source that knows it (never the word itself)."""
        key = word_key(word)
        for _, table in self._tables:
            if key in table:
                return [w for w in table[key] if word_key(w) != key]
        if key in STOPWORDS:  # WordNet would offer "be, exist, constitute" for "was"; curated tables only
            return []
        if self._wordnet and not CJK_RE.search(word):
            if key not in self._wordnet_cache:
                self._wordnet_cache[key] = wordnet_synonyms(key)
            if self._wordnet_cache[key]:
                return list(self._wordnet_cache[key])
        return list(self._mined.get(key, []))

    def copy_rng(self, i: int, j: int, text: str) -> random.Random:
        """The generator of copy j of record i: a function of (seed, i, j, text) only."""
        return random.Random(f"{self.cfg.seed}\x1f{i}\x1f{j}\x1f{text}")  # str seeds hash with SHA-512: stable

    def augment(self, text: str, rng: random.Random, op: str | None = None) -> tuple[str, str]:
        """One augmented version of `text` and the operation used (`op`, or one of cfg.ops drawn from `rng`).
        Returns `text` itself when the operation finds nothing to change."""
        return self._apply(text, segment(text), rng, op)

    def augment_records(self, records: list[dict], text_field: str = "text") -> tuple[list[dict], dict]:
        """cfg.n_per_record augmented copies of every record (originals not included): each a shallow copy with the
        new text, `augmented_from` (the source's index) and `augment_op`; every other field (the label) untouched.
        Copies equal to the original or to an earlier copy are not emitted and count as unchanged."""
        ops = {op: {"applied": 0, "unchanged": 0} for op in self.cfg.ops}
        copies: list[dict] = []
        for i, rec in enumerate(records):
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"record {i}: field {text_field!r} is missing or not a string")
            base = segment(text)
            seen = {text}
            for j in range(self.cfg.n_per_record):
                new, op = self._apply(text, list(base), self.copy_rng(i, j, text), None)
                if new in seen:
                    ops[op]["unchanged"] += 1
                    continue
                seen.add(new)
                ops[op]["applied"] += 1
                copies.append({**rec, text_field: new, "augmented_from": i, "augment_op": op})
        return copies, {"records": len(records), "copies": len(copies), "ops": ops}

    # ------------------------------------------------------------------------------------------------ operations

    def _apply(self, text: str, toks: list[Tok], rng: random.Random, op: str | None) -> tuple[str, str]:
        op = op or rng.choice(self.cfg.ops)
        if op not in VALID_OPS:
            raise ValueError(f"unknown augmentation op {op!r}; valid ones: {', '.join(VALID_OPS)}")
        new = getattr(self, f"_{op}")(toks, rng)
        if new is None:
            return text, op
        out = "".join(t.text for t in new)
        return (out if out.strip() else text), op

    def _budget(self, n_words: int) -> int:
        return max(1, round(self.cfg.p * n_words))

    @staticmethod
    def _word_idx(toks: list[Tok]) -> list[int]:
        return [k for k, t in enumerate(toks) if t.kind == WORD]

    def _synonym(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        idx = self._word_idx(toks)
        budget, done = self._budget(len(idx)), 0
        rng.shuffle(idx)
        for k in idx:
            if cands := self.synonyms(toks[k].text):
                toks[k] = toks[k]._replace(text=match_case(rng.choice(cands), toks[k].text))
                done += 1
                if done == budget:
                    break
        return toks if done else None

    def _insert(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        done = 0
        for _ in range(self._budget(len(self._word_idx(toks)))):
            idx = self._word_idx(toks)
            # EDA draws up to ten random words hoping one has a synonym; drawing among those that do never comes
            # back empty-handed when the text has any.
            have = [k for k in idx if self.synonyms(toks[k].text)]
            if not have:
                break
            k = rng.choice(have)
            new, seg = rng.choice(self.synonyms(toks[k].text)), toks[k].seg
            slots = [q for q in idx if toks[q].seg == seg]
            slots.append(slots[-1] + 1)  # before any word of the segment, or right after its last one
            q = rng.choice(slots)
            piece = [Tok(new, WORD, seg)]
            if not CJK_RE.search(new):
                if _latin_edge(toks[q] if q < len(toks) else None, first=True):
                    piece.append(Tok(" ", SPACE, seg))
                if _latin_edge(toks[q - 1] if q > 0 else None, first=False):
                    piece.insert(0, Tok(" ", SPACE, seg))
            toks[q:q] = piece
            done += 1
        return toks if done else None

    def _swap(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        idx = self._word_idx(toks)
        if len(idx) < 2:
            return None
        done = 0
        for _ in range(self._budget(len(idx))):
            for _ in range(10):
                a = rng.choice(idx)
                if partners := [b for b in idx if toks[b].seg == toks[a].seg and toks[b].text != toks[a].text]:
                    b = rng.choice(partners)
                    toks[a], toks[b] = toks[a]._replace(text=toks[b].text), toks[b]._replace(text=toks[a].text)
                    done += 1
                    break
        return toks if done else None

    def _delete(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        idx = self._word_idx(toks)
        if len(idx) < 2:
            return None  # deleting the only word would leave nothing of the text
        drop = [k for k in idx if rng.random() < self.cfg.p]
        if not drop:
            drop = [rng.choice(idx)]  # the operation always does something (else it is just a duplicate)
        if len(drop) == len(idx):
            drop.remove(rng.choice(drop))
        # Adjacent deleted words (only inline spaces between them) go as one run, which takes one neighbouring space
        # along: "a b c d." minus b and c is "a d.", not "a  d." or "a d ."
        runs: list[list[int]] = []
        for k in sorted(drop):
            if runs and all(_inline_space(toks[m]) for m in range(runs[-1][1] + 1, k)):
                runs[-1][1] = k
            else:
                runs.append([k, k])
        gone: set[int] = set()
        for a, b in runs:
            gone.update(range(a, b + 1))
            for s in (b + 1, a - 1):
                if 0 <= s < len(toks) and _inline_space(toks[s]):
                    gone.add(s)
                    break
        original = "".join(t.text for t in toks)
        return _tidy_spaces([t for k, t in enumerate(toks) if k not in gone], original)

    def _reorder(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        out: list[Tok] = []
        moved = False
        for _, group in itertools.groupby(toks, key=lambda t: t.seg):
            bodies, gaps = _sentences(list(group))
            order = list(range(len(bodies)))
            if len(bodies) >= 2:
                rng.shuffle(order)
                if order == sorted(order):  # the identity: swap two, so that the operation always moves something
                    a, b = rng.sample(range(len(order)), 2)
                    order[a], order[b] = order[b], order[a]
                moved = True
            out += gaps[0]
            for pos, which in enumerate(order):
                out += bodies[which] + gaps[pos + 1]
        return out if moved else None

    def _char_noise(self, toks: list[Tok], rng: random.Random) -> list[Tok] | None:
        idx = self._word_idx(toks)
        spots = []
        for k in idx:
            if CJK_RE.search(toks[k].text):
                spots += [(k, c) for c, ch in enumerate(toks[k].text) if ch in self._confusables]
            elif any(ch.isascii() and ch.isalpha() for ch in toks[k].text):
                spots.append((k, -1))
        if not spots:
            return None
        for k, c in rng.sample(spots, min(self._budget(len(idx)), len(spots))):
            word = toks[k].text
            if c >= 0:
                new = word[:c] + rng.choice(self._confusables[word[c]]) + word[c + 1 :]
            else:
                new = self._typo(word, rng)
            toks[k] = toks[k]._replace(text=new)
        return toks

    def _typo(self, word: str, rng: random.Random) -> str:
        """One keyboard-neighbour substitution, dropped, doubled or transposed ASCII letter."""
        letters = [i for i, ch in enumerate(word) if ch.isascii() and ch.isalpha()]
        pairs = [i for i in letters if i + 1 in letters and word[i].lower() != word[i + 1].lower()]
        kinds = ["neighbor", "double"] + (["drop"] if len(word) >= 3 else []) + (["transpose"] if pairs else [])
        kind = rng.choice(kinds)
        if kind == "transpose":
            i = rng.choice(pairs)
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        i = rng.choice(letters)
        if kind == "double":
            return word[: i + 1] + word[i] + word[i + 1 :]
        if kind == "drop":
            return word[:i] + word[i + 1 :]
        ch = rng.choice(self._keys[word[i].lower()])
        return word[:i] + (ch.upper() if word[i].isupper() else ch) + word[i + 1 :]
