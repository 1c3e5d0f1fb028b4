"""Exact and near-duplicate detection: content keys, MinHash signatures, LSH clustering, repeated-line hashes.

Near duplicates are found the classic way (Broder 1997; Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*
ch. 3): each document becomes the set of its n-grams of units (`gptforge.data.text`: a CJK character or a word), a
MinHash signature of `num_perm` minima estimates the Jaccard similarity of two sets as the share of equal entries, and
LSH banding (b bands of r rows) makes two documents *candidates* when any band matches, which happens with

    P(candidate | Jaccard s) = 1 - (1 - s^r)^b          (an S-curve that steps up near s ≈ (1/b)^(1/r)).

Candidates are then verified against the threshold with the full signature, so LSH may over-generate freely: its
false positives cost a comparison, never a wrongly removed document. Clusters are connected components of verified
pairs; the representative kept is the smallest index, so results do not depend on hash-bucket order.

Everything is numpy and deterministic across processes and machines (no Python `hash()`, constants derived from the
seed with splitmix64; only the Unicode tables of the Python version, which also define `units`, enter). Trade-offs
taken for speed, since this runs on one CPU core over the whole corpus (~40k documents of 500 characters a second):
* units are hashed without a Python loop per character: code points come from one UTF-32 encode of a whole batch,
  a lookup table classifies them, and a word's hash is a polynomial over its code points read off prefix sums
  (mod 2^64 with wraparound), then mixed with the splitmix64 finalizer;
* a shingle hash is a fixed linear combination of its n unit hashes, mixed again (n vectorized passes);
* the permutations are multiply-add hashes (a·x + b mod 2^64, keep the high 32 bits) rather than true random
  permutations or datasketch's modulo-prime family: native uint64 arithmetic with no modulo, and with x already
  well mixed the estimate is as accurate as datasketch's (tested). Signatures are uint32 to halve memory; two
  different shingles tying for a minimum by chance is a ~1e-7 event per entry.
* bucket members are compared with the bucket's first member and with their neighbour in index order, not all
  pairs, which bounds the work at 2·n pairs per band even for huge buckets of templated text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gptforge.data.text import CJK_RE, UNIT_RE

U64 = np.uint64
EMPTY = np.uint32(0xFFFFFFFF)  # signature entry of a document with no units: such rows are never clustered
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2^64 and word hashes can be read off prefix sums
_BASE_INV = pow(_BASE, -1, 1 << 64)
_CHUNK_CHARS = 1 << 20  # characters hashed per batch: tables and temporaries stay around 30 MB
_CHUNK_ROWS = 4096  # shingles per (num_perm × rows) MinHash block: 4 MB at 128 permutations, fits in cache


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="Drop documents whose normalized text is identical to an earlier one.")
    near: bool = Field(
        True, description="Drop near-duplicates found with MinHash + LSH (keeps the first of a cluster)."
    )
    # Defaults measured on planted near-duplicates (random character/word edits at 1-10%, zh and en, 100-3000
    # characters): pair F1 >= 0.96 at every rate. 5-grams at 0.7-0.8 (datatrove/FineWeb-like) miss most copies with
    # 5% edits, whose 5-gram Jaccard is ~0.65. 3-grams at 0.45 still keep unrelated text far apart: the closest
    # unrelated pair among ~3,000 real Tang-poem and Shakespeare chunks has a 3-gram Jaccard of 0.13.
    threshold: float = Field(
        0.45,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity of n-gram sets at or above which two documents are near-duplicates.",
    )
    ngram: int = Field(3, ge=1, description="Shingle size in units: 3 CJK characters or 3 words.")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations; more is slower but estimates better.")
    bands: int = Field(
        0, ge=0, description="LSH bands; 0 picks bands and rows that best fit `threshold` (least FP+FN area)."
    )
    seed: int = Field(1, ge=0, description="Seed of the hash constants; signatures only compare under the same seed.")
    verify: bool = Field(True, description="Confirm each LSH candidate pair with the full signature before merging.")
    lines: bool = Field(True, description="Remove lines that repeat across many documents (boilerplate).")
    line_min_chars: int = Field(50, ge=1, description="Only lines at least this long (after strip) count as repeats.")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        if self.bands > self.num_perm:
            raise ValueError(
                f"dedup.bands: {self.bands} bands need at least as many permutations, num_perm={self.num_perm}"
            )
        return self


# -- hashing primitives -------------------------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (Steele et al. 2014), in place on a uint64 array: spreads every input bit to all bits."""
    z ^= z >> U64(30)
    z *= U64(0xBF58476D1CE4E5B9)
    z ^= z >> U64(27)
    z *= U64(0x94D049BB133111EB)
    z ^= z >> U64(31)
    return z


def _constants(seed: int, salt: int, count: int) -> np.ndarray:
    """`count` well-mixed uint64 constants for (seed, salt): the splitmix64 stream, so identical on every machine."""
    start = (seed * 0x632BE59BD9B4E019 + salt * 0x8CB92BA72F3D8DD7) % (1 << 64)
    steps = np.arange(1, count + 1, dtype=U64) * U64(0x9E3779B97F4A7C15)
    return _mix64(steps + U64(start))


def unit_classes() -> np.ndarray:
    """Public view of the code-point class table (0 separator, 1 word character, 2 CJK unit)."""
    return _unit_classes()


@lru_cache(maxsize=1)
def _unit_classes() -> np.ndarray:
    """Class of every code point under `UNIT_RE`: 0 separator, 1 word character, 2 CJK unit (a unit on its own).

    Built once by running the very regexes of `gptforge.data.text` over all code points, so `unit_hashes` splits text
    exactly like `units` does (the regex classes are per character; only a word's extent depends on neighbours).
    """
    everything = "".join(map(chr, range(0x110000)))
    table = np.zeros(0x110001, np.int8)
    spans = np.array([m.span() for m in UNIT_RE.finditer(everything)], dtype=np.int64)
    np.add.at(table, spans[:, 0], 1)
    np.add.at(table, spans[:, 1], -1)
    classes = np.cumsum(table[:-1], dtype=np.int8).astype(np.uint8)
    classes[[m.start() for m in CJK_RE.finditer(everything)]] = 2
    classes.setflags(write=False)
    return classes


@lru_cache(maxsize=4)
def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE^i and BASE^-i mod 2^64 for i < size (cumprod wraps exactly like the modular arithmetic we want)."""
    out = []
    for base in (_BASE, _BASE_INV):
        p = np.full(size, base, U64)
        p[0] = 1
        np.cumprod(p, out=p)
        p.setflags(write=False)
        out.append(p)
    return out[0], out[1]


def _chunks(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of `texts` of about _CHUNK_CHARS characters (a longer text alone), in order."""
    start = 0
    while start < len(texts):
        stop, chars = start + 1, len(texts[start])
        while stop < len(texts) and chars + len(texts[stop]) < _CHUNK_CHARS:
            chars += len(texts[stop]) + 1
            stop += 1
        yield start, stop
        start = stop


def unit_hashes_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`unit_hashes` of many texts at once: (hashes uint64 [M], offsets int64 [len(texts)+1]); document i owns
    hashes[offsets[i]:offsets[i+1]]. One encode and a handful of array passes per ~1M characters."""
    if not texts:
        return np.zeros(0, U64), np.zeros(1, np.int64)
    parts = [_unit_hashes_chunk(texts[a:b]) for a, b in _chunks(texts)]
    if len(parts) == 1:
        return parts[0]
    shift = np.cumsum([0] + [h.size for h, _ in parts[:-1]])
    offsets = np.concatenate([parts[0][1][:1]] + [o[1:] + k for (_, o), k in zip(parts, shift)])
    return np.concatenate([h for h, _ in parts]), offsets


def _unit_hashes_chunk(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    lowered = [t.lower() for t in texts]  # lower first, like `units`: lowering can change a string's length
    joined = "\n".join(lowered)  # a separator keeps a word from running across two documents
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), "<u4")
    n_chars = codes.size
    classes = _unit_classes()[codes]
    word = classes == 1
    cjk = classes == 2
    first = np.ones(n_chars, bool)
    last = np.ones(n_chars, bool)
    first[1:] = ~word[:-1]
    last[:-1] = ~word[1:]
    starts = np.flatnonzero(cjk | (word & first))
    ends = np.flatnonzero(cjk | (word & last)) + 1  # units do not overlap, so the k-th end closes the k-th start
    # power-of-two table sizes so a few cached tables serve every batch; a huge single text gets its own
    size = max(1 << 16, 1 << n_chars.bit_length())
    powers, inverse = _powers(size) if size <= 1 << 22 else _powers.__wrapped__(size)
    prefix = np.zeros(n_chars + 1, U64)
    np.cumsum(codes * powers[:n_chars], out=prefix[1:])
    # sum_j c_j BASE^(start+j), shifted back by BASE^-start: the same value wherever the word stands
    hashes = _mix64((prefix[ends] - prefix[starts]) * inverse[starts])
    lengths = np.fromiter(map(len, lowered), np.int64, len(lowered))
    doc_starts = np.zeros(len(lowered) + 1, np.int64)
    np.cumsum(lengths + 1, out=doc_starts[1:])
    return hashes, np.searchsorted(starts, doc_starts)


def unit_hashes(text: str) -> np.ndarray:
    """uint64 hash of each unit of `text`, in order; equal units hash equally in every process (see `units`)."""
    return unit_hashes_batch([text])[0]


def window_hashes(hashes: np.ndarray, offsets: np.ndarray, n: int, short: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-unit window inside each document: (uint64 [K], offsets [docs+1]).

    A window's hash mixes sum_t u[i+t]·K_t, order-sensitive and computed in n vectorized passes. With `short`, a
    document with 1..n-1 units yields one window of all its units (dedup); without, it yields none (decontamination).
    """
    counts = np.diff(offsets)
    total = hashes.size
    mult = _constants(0, 1, n) | U64(1)
    per_doc = np.maximum(counts - n + 1, 0)
    if total >= n:
        acc = hashes[: total - n + 1] * mult[0]
        for t in range(1, n):
            acc += hashes[t : total - n + 1 + t] * mult[t]
        doc_of = np.repeat(np.arange(counts.size), counts)
        full = _mix64(acc[doc_of[: total - n + 1] == doc_of[n - 1 :]])  # windows that stay inside one document
    else:
        full = np.zeros(0, U64)
    small = np.flatnonzero((counts > 0) & (counts < n)) if short else np.zeros(0, np.int64)
    if small.size == 0:
        out_offsets = np.zeros(counts.size + 1, np.int64)
        np.cumsum(per_doc, out=out_offsets[1:])
        return full, out_offsets
    per_doc[small] = 1
    out_offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(per_doc, out=out_offsets[1:])
    partial = np.zeros(small.size, U64)
    for t in range(n - 1):
        live = counts[small] > t
        partial[live] += hashes[offsets[small[live]] + t] * mult[t]
    out = np.empty(out_offsets[-1], U64)
    is_full = np.ones(out.size, bool)
    is_full[out_offsets[small]] = False
    out[is_full] = full
    out[out_offsets[small]] = _mix64(partial)
    return out, out_offsets


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Distinct uint64 hashes of the n-unit windows of `text` (fewer than n units: one shingle of them all)."""
    if n < 1:
        raise ValueError(f"ngram must be >= 1, got {n}")
    hashes, offsets = unit_hashes_batch([text])
    return np.unique(window_hashes(hashes, offsets, n, short=True)[0])


def exact_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of the (already normalized) text: the identity used by exact dedup."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def line_hash(line: str) -> int:
    """Stable 64-bit hash of a stripped line (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def line_hashes(text: str, min_chars: int) -> np.ndarray:
    """Sorted distinct uint64 hashes of the stripped lines of `text` that are at least `min_chars` characters long.

    Counted over a corpus, a line hash that appears in many documents marks boilerplate (menus, footers, notices).
    """
    lines = {s for s in (line.strip() for line in text.splitlines()) if len(s) >= min_chars}
    return np.sort(np.fromiter((line_hash(s) for s in lines), U64, len(lines)))


# -- MinHash ------------------------------------------------------------------------------------------------------


class MinHasher:
    """Batched MinHash signatures: [n_docs, num_perm] uint32, a row of EMPTY for a document with no units."""

    def __init__(self, num_perm: int, ngram: int, seed: int):
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"num_perm and ngram must be >= 1, got num_perm={num_perm}, ngram={ngram}")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._mul = _constants(seed, 2, num_perm) | U64(1)  # odd multipliers: each a·x + b is a bijection of uint64
        self._add = _constants(seed, 3, num_perm)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.num_perm), np.uint32)
        for start, stop in _chunks(texts):
            hashes, offsets = _unit_hashes_chunk(texts[start:stop])
            shingles, shingle_offsets = window_hashes(hashes, offsets, self.ngram, short=True)
            out[start:stop] = self._minhash(shingles, shingle_offsets)
        return out

    def _minhash(self, shingles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Minima of (a·x + b) over each document's shingles, computed on (num_perm × rows) blocks.

        Permutations are the rows of a block so that `minimum.reduceat` runs along contiguous memory (about 5x faster
        than reducing over the first axis); a document longer than one block is merged across blocks.
        """
        n_docs = offsets.size - 1
        mins = np.full((self.num_perm, n_docs), np.iinfo(U64).max, U64)
        nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
        firsts = offsets[nonempty]
        block = np.empty((self.num_perm, _CHUNK_ROWS), U64)
        mul, add = self._mul[:, None], self._add[:, None]
        for r0 in range(0, shingles.size, _CHUNK_ROWS):
            r1 = min(r0 + _CHUNK_ROWS, shingles.size)
            view = block[:, : r1 - r0]
            np.multiply(mul, shingles[None, r0:r1], out=view)
            view += add
            lo = max(int(np.searchsorted(firsts, r0, "right")) - 1, 0)
            docs = nonempty[lo : np.searchsorted(firsts, r1, "left")]  # documents with shingles in rows [r0, r1)
            seg = np.maximum(offsets[docs], r0) - r0
            mins[:, docs] = np.minimum(mins[:, docs], np.minimum.reduceat(view, seg, axis=1))
        # the high half of a minimum is the minimum of the high halves: shift once per entry, not once per shingle
        return (mins.T >> U64(32)).astype(np.uint32)


# -- LSH clustering -----------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands·rows <= num_perm minimizing the weighted areas under the S-curve 1-(1-s^r)^b:
    false positives ∫_0^t P(s) ds and false negatives ∫_t^1 (1-P(s)) ds (datasketch's `_optimal_param`)."""
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            err = fp_weight * np.trapezoid(p[below], s[below]) + fn_weight * np.trapezoid(1.0 - p[above], s[above])
            if err < best_err:
                best, best_err = (b, r), err
    return best


def _band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[bands, n] uint64 keys: a band's `rows` signature entries combined and mixed (collisions only add candidates)."""
    mult = _constants(0, 4, rows) | U64(1)
    keys = np.empty((bands, sigs.shape[0]), U64)
    for j in range(bands):
        acc = np.full(sigs.shape[0], U64(j), U64)  # the band number is part of the key
        for t in range(rows):
            acc += sigs[:, j * rows + t].astype(U64) * mult[t]
        keys[j] = _mix64(acc)
    return keys


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components as rep[i] = smallest index of i's component (hook roots to the smaller, then jump)."""
    rep = np.arange(n, dtype=np.int64)
    while left.size:
        rl, rr = rep[left], rep[right]
        differ = rl != rr
        if not differ.any():
            break
        rl, rr = rl[differ], rr[differ]
        low = np.minimum(rl, rr)
        np.minimum.at(rep, rl, low)
        np.minimum.at(rep, rr, low)
        while True:  # pointer jumping: every node points at its root; rep[i] <= i always holds
            nxt = rep[rep]
            if np.array_equal(nxt, rep):
                break
            rep = nxt
    return rep


def lsh_bands(threshold: float, num_perm: int, bands: int = 0, verify: bool = True) -> tuple[int, int]:
    """(bands, rows) used by near_duplicate_clusters; bands=0 picks them for the threshold."""
    # verified candidates cost one comparison each, so with `verify` misses weigh 9x more than extra candidates
    weights = (0.1, 0.9) if verify else (0.5, 0.5)
    return optimal_bands(round(threshold, 6), num_perm, *weights) if bands == 0 else (bands, num_perm // bands)


def near_duplicate_clusters(sigs: np.ndarray, threshold: float, bands: int = 0, verify: bool = True) -> np.ndarray:
    """rep int64 [n]: the smallest index of each document's near-duplicate cluster (rep[i] == i: keep it).

    `sigs` must be in the global deterministic document order. LSH over `bands` bands (0: `optimal_bands`); pairs
    sharing a band key become candidates, kept when their equal-entry share is >= threshold (if `verify`).
    """
    n, num_perm = sigs.shape
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if bands < 0 or bands > num_perm:
        raise ValueError(f"bands must be in [0, num_perm={num_perm}], got {bands}")
    b, r = lsh_bands(threshold, num_perm, bands, verify)
    live = np.flatnonzero(~(sigs == EMPTY).all(axis=1))  # documents without units are never anyone's duplicate
    if live.size < 2:
        return np.arange(n, dtype=np.int64)
    keys = _band_keys(sigs[live], b, r)
    pairs = []
    for j in range(b):
        order = np.argsort(keys[j], kind="stable")  # stable: inside a bucket, indices ascend
        k = keys[j][order]
        same = np.flatnonzero(k[1:] == k[:-1]) + 1  # positions whose predecessor is in the same bucket
        if same.size == 0:
            continue
        head = np.maximum.accumulate(np.where(np.r_[True, k[1:] != k[:-1]], np.arange(k.size), 0))
        pairs.append(np.stack([order[head[same]], order[same]]))  # (first member, member)
        pairs.append(np.stack([order[same - 1], order[same]]))  # (previous member, member)
    if not pairs:
        return np.arange(n, dtype=np.int64)
    cand = np.concatenate(pairs, axis=1)
    cand = cand[:, cand[0] != cand[1]]
    codes = np.unique(cand[0].astype(np.int64) * live.size + cand[1])
    left, right = live[codes // live.size], live[codes % live.size]
    if verify:
        need = threshold * num_perm - 1e-9
        keep = np.zeros(left.size, bool)
        step = max(1, (1 << 22) // num_perm)
        for s0 in range(0, left.size, step):
            sl = slice(s0, s0 + step)
            keep[sl] = (sigs[left[sl]] == sigs[right[sl]]).sum(axis=1) >= need
        left, right = left[keep], right[keep]
    return _components(n, left, right)


def exact_duplicate_reps(keys: np.ndarray) -> np.ndarray:
    """rep int64 [n]: the smallest index holding the same key ([n] of 'S16' from `exact_key`, or [n, 2] uint64)."""
    keys = np.asarray(keys)
    if keys.ndim == 2:
        order = np.lexsort(keys.T[::-1])  # lexsort is stable, so equal keys keep ascending indices
        sk = keys[order]
        new = np.r_[True, (sk[1:] != sk[:-1]).any(axis=1)]
    elif keys.ndim == 1:
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        new = np.r_[True, sk[1:] != sk[:-1]]
    else:
        raise ValueError(f"keys must be 1-D or 2-D, got shape {keys.shape}")
    head = np.maximum.accumulate(np.where(new, np.arange(order.size), 0))
    rep = np.empty(order.size, np.int64)
    rep[order] = order[head]
    return rep
