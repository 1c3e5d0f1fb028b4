"""Decontamination: find training documents that overlap the evaluation data, so scores stay honest.

The test is the one GPT-3 (Brown et al. 2020, appendix C) and most later reports use: a training document is
contaminated when it shares any n-gram of `ngram` units (13 by default: 13 words, or 13 CJK characters) with an
evaluation document, or equals one exactly. Units come from `gptforge.data.text`, so "n-gram" means words in English
and characters in Chinese, with punctuation, spacing and case ignored; both sides go through the same normalizer.

Trade-offs:
* The index is a sorted numpy array of 64-bit n-gram hashes plus the owning evaluation document (12 bytes per
  n-gram, ~60 MB for 5M evaluation n-grams), looked up with `searchsorted`; no Python dict or set per n-gram. A
  64-bit hash collision could flag a clean document, at odds of ~n_train_ngrams·n_eval_ngrams / 2^64.
* 13-grams miss paraphrases and translated test items; they catch copies, quotes and leaked answers, which are
  what inflates scores. A lower `ngram` catches more and flags more common phrases too.
* An evaluation document shorter than `ngram` units contributes only its exact text (a short answer like "Paris"
  must not flag every document that mentions Paris).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gptforge.data.dedup import exact_key, unit_hashes_batch, window_hashes
from gptforge.data.sources import FileRejected, InputConfig, Quarantined, Record, discover, iter_file
from gptforge.data.text import UNIT_RE

_BATCH_CHARS = 1 << 20  # characters hashed per batch: bounds temporary memory while indexing big evaluation sets


class DecontamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        default_factory=list,
        description="Evaluation/test files or folders (read like the inputs); empty turns decontamination off.",
    )
    ngram: int = Field(
        13, ge=1, description="n-gram length in units (words or CJK characters) that counts as an overlap."
    )
    action: Literal["drop", "flag"] = Field(
        "drop", description="drop: reject as 'contaminated'; flag: keep, marked with the evaluation document's id."
    )


class Decontaminator:
    """n-gram overlap index of the evaluation documents; `check` tells whether a training text overlaps them.

    `normalize(text, fmt) -> text` should be the normalizer applied to the training data, so both sides compare
    equal after the same cleaning. Evaluation files that cannot be read at all are an error (silently skipping them
    would leave their contamination undetected); single bad records in them are skipped and listed in `skipped`.
    """

    def __init__(self, cfg: DecontamConfig, input_cfg: InputConfig, normalize: Callable[[str, str], str] | None = None):
        self.skipped: list[str] = []
        self._build(cfg, self._read(cfg, input_cfg, normalize))
        if cfg.paths and not self.n_eval_docs:
            raise ValueError(f"decontam.paths: no evaluation documents found in {cfg.paths}")

    @classmethod
    def from_texts(cls, cfg: DecontamConfig, pairs: Iterable[tuple[str, str]]) -> Decontaminator:
        """Index (eval_id, text) pairs given directly (already normalized); `cfg.paths` is not read."""
        self = cls.__new__(cls)
        self.skipped = []
        self._build(cfg, pairs)
        return self

    def _read(
        self, cfg: DecontamConfig, input_cfg: InputConfig, normalize: Callable[[str, str], str] | None
    ) -> Iterable[tuple[str, str]]:
        if not cfg.paths:
            return
        for f in discover(cfg.paths):
            try:
                for item in iter_file(f, input_cfg):
                    if isinstance(item, Quarantined):
                        self.skipped.append(f"{item.source}:{item.line}: {item.reason} ({item.detail})")
                        continue
                    yield item.id, _normalized(item, normalize)
            except FileRejected as e:
                if e.kind == "quarantined":
                    raise ValueError(
                        f"decontam.paths: evaluation file {f.rel!r} cannot be used ({e.reason}: {e.detail})"
                    ) from None
                self.skipped.append(f"{f.rel}: {e.reason} ({e.detail})")  # binary, empty or an unsupported format

    def _build(self, cfg: DecontamConfig, pairs: Iterable[tuple[str, str]]) -> None:
        self.ngram = cfg.ngram
        self.eval_ids: list[str] = []
        self._exact: dict[bytes, int] = {}
        grams, owners = [], []
        batch: list[str] = []
        chars = 0
        for eval_id, text in pairs:
            if UNIT_RE.search(text):  # an empty (or all-punctuation) evaluation text must not match empty documents
                self._exact.setdefault(exact_key(text), len(self.eval_ids))
            self.eval_ids.append(str(eval_id))
            batch.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS:
                self._index_batch(batch, len(self.eval_ids) - len(batch), grams, owners)
                batch, chars = [], 0
        self._index_batch(batch, len(self.eval_ids) - len(batch), grams, owners)
        all_grams = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        all_owners = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        # stable sort + first of each run: an n-gram in several evaluation documents belongs to the earliest one
        order = np.argsort(all_grams, kind="stable")
        all_grams, all_owners = all_grams[order], all_owners[order]
        first = np.r_[True, all_grams[1:] != all_grams[:-1]] if all_grams.size else np.zeros(0, bool)
        self._grams, self._owners = all_grams[first], all_owners[first]
        # A bitmap over the top hash bits (16+ bits per n-gram: under 1/16 false hits, 2 bytes per n-gram) answers
        # most lookups from cache; only its hits pay for a binary search in the big sorted array.
        bits = min(max(16, (16 * self._grams.size).bit_length()), 32)
        self._shift = np.uint64(64 - bits)
        self._bitmap = np.zeros(1 << (bits - 3), np.uint8)
        top = self._grams >> self._shift  # sorted, since the n-grams are
        byte, bit = top >> np.uint64(3), np.left_shift(1, top & np.uint64(7)).astype(np.uint8)
        runs = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]]) if top.size else np.zeros(0, np.int64)
        if runs.size:
            self._bitmap[byte[runs]] = np.bitwise_or.reduceat(bit, runs)

    def _index_batch(self, texts: list[str], first_doc: int, grams: list, owners: list) -> None:
        if not texts:
            return
        hashes, offsets = unit_hashes_batch(texts)
        windows, win_offsets = window_hashes(hashes, offsets, self.ngram, short=False)
        grams.append(windows)
        owners.append((np.repeat(np.arange(len(texts)), np.diff(win_offsets)) + first_doc).astype(np.int32))

    @property
    def n_eval_docs(self) -> int:
        return len(self.eval_ids)

    @property
    def n_ngrams(self) -> int:
        """Distinct evaluation n-grams in the index."""
        return int(self._grams.size)

    def check(self, text: str) -> dict | None:
        """None when `text` is clean, else {"eval_id": the evaluation document it overlaps most, "ngrams": distinct
        shared n-grams, "exact": whether the whole text equals an evaluation document}."""
        return self.check_batch([text])[0]

    def check_batch(self, texts: Sequence[str]) -> list[dict | None]:
        """`check` for many texts in one vectorized pass (the same answers, several times faster per document)."""
        results: list[dict | None] = [None] * len(texts)
        if not texts:
            return results
        hashes, offsets = unit_hashes_batch(texts)
        windows, win_offsets = window_hashes(hashes, offsets, self.ngram, short=False)
        hit_docs = np.zeros(0, np.int64)
        hit_pos = np.zeros(0, np.int64)
        if self._grams.size and windows.size:
            top = windows >> self._shift
            maybe = np.flatnonzero((self._bitmap[top >> np.uint64(3)] >> (top & np.uint64(7)).astype(np.uint8)) & 1)
            pos = np.minimum(np.searchsorted(self._grams, windows[maybe]), self._grams.size - 1)
            found = self._grams[pos] == windows[maybe]
            hit, pos = maybe[found], pos[found]
            doc_of = np.searchsorted(win_offsets, hit, "right") - 1
            # distinct shared n-grams per document: a repeated n-gram counts once
            codes = np.unique(doc_of.astype(np.int64) * self._grams.size + pos)
            hit_docs, hit_pos = codes // self._grams.size, codes % self._grams.size
        starts = np.searchsorted(hit_docs, np.arange(len(texts) + 1))
        for i, text in enumerate(texts):
            exact = self._exact.get(exact_key(text))
            lo, hi = starts[i], starts[i + 1]
            if exact is None and lo == hi:
                continue
            if exact is not None:
                owner = exact
            else:  # the evaluation document sharing the most n-grams; ties go to the earliest
                owner = int(np.bincount(self._owners[hit_pos[lo:hi]]).argmax())
            results[i] = {"eval_id": self.eval_ids[owner], "ngrams": int(hi - lo), "exact": exact is not None}
        return results


def _normalized(item: Record, normalize: Callable[[str, str], str] | None) -> str:
    if normalize is None:
        return item.text
    out = normalize(item.text, item.fmt)
    return out[0] if isinstance(out, tuple) else out  # a `Normalizer` itself returns (text, changed steps)
