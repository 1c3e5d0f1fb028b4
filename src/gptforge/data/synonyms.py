"""Synonym sources for text augmentation: user tables, bundled tables, words mined from the user's corpus, WordNet.

Everything here works offline and nothing is downloaded:

- `load_synonym_table` reads a hand-made table (one group per line). It is the most trusted source: the user wrote it.
- `mine_synonyms` finds words used in the same contexts in the user's own text (the distributional hypothesis):
  positive PMI of co-occurrence within a small window (Church & Hanks 1990; context-distribution smoothing 0.75 from
  Levy, Goldberg & Dagan 2015), a truncated SVD done with numpy (randomized range finder, Halko et al. 2011), then
  cosine nearest neighbours. Trade-off: distributional neighbours are *related* words, and antonyms ("good"/"bad")
  live in the same contexts as synonyms do. Two guards keep that in check: a pair is kept only when each word is among
  the other's nearest neighbours (mutual), and the augmenter consults mined pairs last, after every curated table.
- `wordnet_synonyms` uses English WordNet through nltk when both nltk and its wordnet data are installed; otherwise it
  returns nothing (nltk never downloads on its own, and neither do we).

Words come from `tokenize`: rjieba for runs of CJK characters, a regex for everything else, so that the mined keys and
the words the augmenter looks up are cut the same way. Latin words are lower-cased as keys.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gptforge.data.text import CJK_CHARS, CJK_RE

CJK_RUN_RE = re.compile(f"[{CJK_CHARS}]+")
# Outside CJK runs: whitespace, a word (letters/digits joined by an apostrophe or hyphen), or one other character.
LATIN_TOKEN_RE = re.compile(r"\s+|[^\W_]+(?:['’\-][^\W_]+)*|\S")
_TABLE_SPLIT_RE = re.compile(r"[,，、]")
_COMMENT_RE = re.compile(r"(?:^|\s)#.*")

# Function words: frequent, content-free, never worth replacing; they stay useful as *contexts* when mining.
STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from as into onto upon about over under than
    so too very not no nor is am are was were be been being do does did doing have has had having will would shall
    should can could may might must i me my mine we us our ours you your yours he him his she her hers it its they
    them their theirs this that these those there here what which who whom whose when where why how all any each
    some such own same other only just also s t don doesn didn isn aren wasn weren won wouldn shouldn couldn
    don't doesn't didn't isn't aren't wasn't weren't won't wouldn't shouldn't couldn't can't cannot i'm you're he's
    she's it's we're they're i've you've we've they've i'll you'll he'll she'll we'll they'll i'd you'd he'd she'd
    we'd they'd let's that's there's what's""".split()
    + """的 了 着 过 地 得 之 和 与 及 或 而 且 但 是 在 有 也 都 就 又 还 很 更 最
    不 没 没有 被 把 让 给 对 向 从 自 于 以 为 由 因 所 其 这 那 这个 那个 这些
    那些 此 些 个 一个 一些 我 你 他 她 它 我们 你们 他们 她们 它们 自己 咱们 吗 呢
    吧 啊 呀 哦 嗯 哈 么 啦 嘛 上 下 里 中 内 外 前 后 来 去 说 要 会 能 可 可以
    将 已 并 等 即 则 若 如 乃 之后 之前 什么 怎么 怎样 为什么 哪 哪里 谁 多少 这样
    那样 这里 那里 因为 所以 如果 虽然 但是 然后""".split()
)


def tokenize(text: str) -> list[str]:
    """Pieces that concatenate back to `text` exactly: CJK words (rjieba), Latin words, numbers, whitespace runs
    and single punctuation characters."""
    if not CJK_RE.search(text):
        return LATIN_TOKEN_RE.findall(text)
    import rjieba  # a core dependency; imported here so that importing this module stays cheap

    out: list[str] = []
    pos = 0
    for m in CJK_RUN_RE.finditer(text):
        if m.start() > pos:
            out += LATIN_TOKEN_RE.findall(text, pos, m.start())
        out += rjieba.cut(m.group())
        pos = m.end()
    if pos < len(text):
        out += LATIN_TOKEN_RE.findall(text, pos)
    return out


def is_word(piece: str) -> bool:
    """A replaceable word: letters only (apostrophes and inner hyphens allowed), no digits."""
    return piece[:1].isalpha() and piece.replace("'", "").replace("’", "").replace("-", "").isalpha()


def script_of_word(word: str) -> str:
    return "zh" if CJK_RE.search(word) else "en"


def word_key(word: str) -> str:
    """Table key of a word: lower-cased, with a typographic apostrophe as a plain one (CJK words are unchanged)."""
    return word.lower().replace("’", "'")


# ---------------------------------------------------------------------------------------------------------- tables


def load_synonym_table(path: str | Path) -> dict[str, list[str]]:
    """Read a synonym table: one group per line, words separated by tabs, else commas (`,`, `，`, `、`), else spaces
    (tabs and commas allow multi-word entries); `#` at the start of a line or after a space starts a comment.

    Returns word -> the other words of every group it is in (first-seen order). A group of fewer than two words or an
    entry with a digit (augmentation never inserts digits) is a ValueError naming file:line, as is an unreadable
    file, text that is not UTF-8, or a file without any group."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"{p}: cannot read synonym table ({e.strerror or e})") from None
    table: dict[str, list[str]] = {}
    groups = 0
    for lineno, line_bytes in enumerate(raw.splitlines(), 1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{p}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}); save the table as UTF-8"
            ) from None
        line = _COMMENT_RE.sub("", line.removeprefix("\ufeff")).strip()
        if not line:
            continue
        if "\t" in line:
            parts = line.split("\t")
        elif _TABLE_SPLIT_RE.search(line):
            parts = _TABLE_SPLIT_RE.split(line)
        else:
            parts = line.split()
        words = list(dict.fromkeys(w for w in (" ".join(x.split()) for x in parts) if w))
        if len(words) < 2:
            raise ValueError(
                f"{p}:{lineno}: a synonym group needs at least two different words, got {words!r} "
                "(separate words by tabs, commas or spaces)"
            )
        if bad := [w for w in words if any(c.isdigit() for c in w)]:
            raise ValueError(f"{p}:{lineno}: entry {bad[0]!r} contains a digit; augmentation never changes numbers")
        groups += 1
        keys = [word_key(w) for w in words]
        for key in keys:
            known = table.setdefault(key, [])
            known += [w for w, k in zip(words, keys) if k != key and w not in known]
    if not groups:
        raise ValueError(f"{p}: no synonym groups in the file (one group per line, words separated by tabs/commas)")
    return table


# ------------------------------------------------------------------------------------------------------- mining


def _mining_ids(texts: Iterable[str], window: int) -> tuple[np.ndarray, list[str]]:
    """The corpus as one int32 id stream: words get ids in first-seen order; -1 marks a break (punctuation, digits)
    that no window crosses; `window` breaks separate documents."""
    vocab: dict[str, int] = {}
    ids = array("i")
    sep = [-1] * window
    for text in texts:
        for piece in tokenize(text):
            if piece.isspace():
                continue
            if is_word(piece):
                key = word_key(piece)
                ids.append(vocab.setdefault(key, len(vocab)))
            else:
                ids.append(-1)
        ids.extend(sep)
    return np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32), list(vocab)


def _randomized_svd(m: np.ndarray, k: int, seed: int = 0, n_iter: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors and values of dense `m` (Halko, Martinsson & Tropp 2011, algorithm 4.4)."""
    rng = np.random.default_rng(seed)
    y = m @ rng.standard_normal((m.shape[1], k + 10)).astype(m.dtype)
    for _ in range(n_iter):  # power iterations sharpen a slowly decaying spectrum
        q, _ = np.linalg.qr(y)
        z, _ = np.linalg.qr(m.T @ q)
        y = m @ z
    q, _ = np.linalg.qr(y)
    ub, s, _ = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k]


def mine_synonyms(
    texts: Iterable[str],
    min_count: int = 5,
    top_k: int = 5,
    min_similarity: float = 0.5,
    window: int = 2,
    max_vocab: int = 20000,
    dims: int = 100,
    max_contexts: int = 2000,
) -> dict[str, list[str]]:
    """Words used in the same contexts in `texts`: word -> neighbours, most similar first.

    Words seen at least `min_count` times (the `max_vocab` most frequent) get a PPMI vector over the `max_contexts`
    most frequent words within ±`window` positions, reduced to `dims` dimensions by SVD. A pair is kept when both
    words are content words of the same script (CJK or not; stopwords, punctuation and digits never pair), each is
    among the other's `top_k` nearest neighbours, and their cosine similarity is at least `min_similarity`.

    Two filters against small-corpus artefacts: a word needs at least max(min_count, 2*window+1) *distinct* context
    words (a line repeated five times is one context, not five), and two words that occur within each other's
    window in over 10% of the rarer one's occurrences are a collocation ("世事茫茫"), not substitutes."""
    if min_count < 1 or top_k < 1 or window < 1 or max_vocab < 2 or dims < 1 or max_contexts < 1:
        raise ValueError("mine_synonyms: min_count, top_k, window, dims, max_contexts must be >= 1 and max_vocab >= 2")
    ids, words = _mining_ids(texts, window)
    if not words:
        return {}
    freq = np.bincount(ids[ids >= 0], minlength=len(words))
    order = np.argsort(-freq, kind="stable")  # ties keep first-seen order: deterministic for a given corpus
    keep = order[freq[order] >= min_count][:max_vocab]
    n_vocab = len(keep)
    if n_vocab < 3:
        return {}
    remap = np.full(len(words), -1, np.int64)
    remap[keep] = np.arange(n_vocab)
    seq = np.where(ids >= 0, remap[np.maximum(ids, 0)], -1)
    pairs, counts = _cooccurrence(seq, window, n_vocab)  # sorted keys word * n_vocab + neighbour, both directions
    rows, cols = pairs // n_vocab, pairs % n_vocab
    # Frequency order makes the most frequent words the low ids, so "is a context word" is just "id < n_ctx".
    n_ctx = min(n_vocab, max_contexts)
    m = np.zeros((n_vocab, n_ctx), np.float32)  # V x C, at most 20000 x 2000 float32 = 160 MB
    is_ctx = cols < n_ctx
    m[rows[is_ctx], cols[is_ctx]] = counts[is_ctx]
    # PPMI in place: log(max(1, c(w,c) * sum_c' c(c')^0.75 / (c(w) * c(c)^0.75)))
    ctx = m.sum(axis=0) ** 0.75
    m *= ctx.sum() / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    m /= np.maximum(ctx, 1e-12)[None, :]
    np.maximum(m, 1.0, out=m)
    np.log(m, out=m)
    u, s = _randomized_svd(m, max(1, min(dims, n_ctx - 1, n_vocab - 1)))
    del m
    emb = u * np.sqrt(s)[None, :]  # eigenvalue weighting p = 0.5 (Levy et al. 2015)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    vocab = [words[i] for i in keep]
    distinct = np.bincount(rows, minlength=n_vocab)
    eligible = (distinct >= max(min_count, 2 * window + 1)) & np.array(
        [w not in STOPWORDS and len(w) > 1 for w in vocab]
    )
    near = _nearest(emb, vocab, eligible, top_k, min_similarity)
    word_freq = freq[keep]
    out: dict[str, list[str]] = {}
    for i, cands in near.items():
        kept = []
        for sim, j in cands:
            if not any(back == i for _, back in near.get(j, ())):
                continue  # not mutual: j is a hub or i is noise
            at = np.searchsorted(pairs, i * n_vocab + j)
            together = counts[at] if at < len(pairs) and pairs[at] == i * n_vocab + j else 0
            if together <= 0.1 * min(word_freq[i], word_freq[j]):
                kept.append((-sim, vocab[j]))
        if kept:
            out[vocab[i]] = [w for _, w in sorted(kept)]
    return out


def _cooccurrence(seq: np.ndarray, window: int, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (word, neighbour) keys `word * n_vocab + neighbour` within ±window, sorted, with their counts."""
    keys = []
    for d in range(1, window + 1):
        a, b = seq[:-d], seq[d:]
        both = (a >= 0) & (b >= 0)
        a, b = a[both], b[both]
        keys += [a * n_vocab + b, b * n_vocab + a]
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.concatenate(keys), return_counts=True)


def _nearest(
    emb: np.ndarray, vocab: list[str], eligible: np.ndarray, top_k: int, min_similarity: float
) -> dict[int, list[tuple[float, int]]]:
    """For each eligible word: its top_k most cosine-similar eligible words of the same script above the threshold."""
    near: dict[int, list[tuple[float, int]]] = {}
    scripts = np.array([script_of_word(w) for w in vocab])
    for script in ("zh", "en"):
        idx = np.flatnonzero(eligible & (scripts == script))
        if len(idx) < 2:
            continue
        e = emb[idx]
        k = min(top_k, len(idx) - 1)
        for start in range(0, len(idx), 2048):  # chunks bound the similarity block to 2048 x V floats
            sims = e[start : start + 2048] @ e.T
            rows = np.arange(sims.shape[0])
            sims[rows, rows + start] = -np.inf
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for r, cols in enumerate(top):
                near[int(idx[start + r])] = [
                    (float(sims[r, c]), int(idx[c])) for c in cols if sims[r, c] >= min_similarity
                ]
    return near


# ------------------------------------------------------------------------------------------------------- wordnet


def wordnet_available() -> bool:
    """True when nltk and its WordNet data are installed (nothing is downloaded)."""
    try:
        from nltk.corpus import wordnet as wn

        wn.synsets("good")
    except Exception:  # ImportError, LookupError (data missing), nltk's path checks: all mean "not usable here"
        return False
    return True


def wordnet_synonyms(word: str) -> list[str]:
    """Lemma names of the WordNet synsets of `word` (first-seen order, without the word itself and without entries
    containing digits); [] when nltk or its data is not installed."""
    try:
        from nltk.corpus import wordnet as wn

        synsets = wn.synsets(word)
    except Exception:  # an optional source must never break augmentation; see wordnet_available
        return []
    out: list[str] = []
    for syn in synsets:
        for name in syn.lemma_names():
            name = name.replace("_", " ")
            if name.lower() != word.lower() and name not in out and not any(c.isdigit() for c in name):
                out.append(name)
    return out
