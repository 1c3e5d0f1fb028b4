"""Fine-tuning data: chat conversations and labeled texts, plus packing and a (stratified) train/validation split.
(Continued-pretraining text is read by `data.readers`; the resumable index sampler is in `data.sampler`.)

Every loader reads JSONL (`read_jsonl`, UTF-8 with optional BOM, blank lines ignored) and applies two explicit
policies instead of guessing:
- `bad_records`: "error" raises DataError naming `path:line` and the reason; "skip" counts the record by reason.
- `too_long` (longer than block_size tokens): "truncate", "skip" or "error", counted the same way.
Each loader returns a report `{"read", "used", "skipped": {reason: n}, "truncated", "examples": {reason: [path:line,
...]}}` (at most 5 examples per reason; truncations are listed under "truncated"), so nothing is dropped silently.

Packing (`pack`) puts several chat samples in one row of `block_size` tokens with a segment id per sample; the
model's `segment_ids` attention makes a packed row compute exactly what its samples would compute alone, so packing
changes speed, never the loss (a test checks the summed loss). First-fit-decreasing keeps rows full (typically > 90%
for short chats) at O(n log n) cost with a segment tree; its order is fully deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from gptforge.data.readers import DataError
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.tokenizer.chat import ChatFormatError, render_chat, validate_messages

if TYPE_CHECKING:
    import torch

BadRecords = Literal["error", "skip"]
TooLong = Literal["truncate", "skip", "error"]
IGNORE_INDEX = -100  # the ignore_index of GPT.forward and F.cross_entropy
MAX_EXAMPLES = 5


class BadRecord(DataError):
    """One unusable input record; `reason` is the short code it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Report:
    """Counts of what a loader read, used, skipped (by reason) and truncated; see the module docstring."""

    bad_records: str = "error"
    too_long: str = "skip"
    read: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, allowed in (("bad_records", ("error", "skip")), ("too_long", ("truncate", "skip", "error"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _example(self, reason: str, source: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(source)

    def bad(self, source: str, reason: str, detail: str) -> None:
        if self.bad_records == "error":
            raise DataError(f"{source}: {reason}: {detail} (bad_records='skip' counts such records and goes on)")
        self.skipped[reason] += 1
        self._example(reason, source)

    def long(self, source: str, n_tokens: int, block_size: int, can_truncate: bool = True) -> bool:
        """Apply the too_long policy; True = truncate the sample, False = it was skipped."""
        if self.too_long == "error":
            raise DataError(
                f"{source}: too_long: {n_tokens} tokens > block_size {block_size} "
                "(too_long='truncate' or 'skip' handles such records)"
            )
        if self.too_long == "truncate" and can_truncate:
            self.truncated += 1
            self._example("truncated", source)
            return True
        self.skipped["too_long"] += 1
        self._example("too_long", source)
        return False

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "used": self.used,
            "skipped": dict(sorted(self.skipped.items())),
            "truncated": self.truncated,
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any) -> str | None:
    """The first unpaired surrogate in any string (keys included) of a JSON value, or None."""
    if isinstance(obj, str):
        return next((ch for ch in obj if 0xD800 <= ord(ch) <= 0xDFFF), None)
    children = [*obj, *obj.values()] if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    for x in children:
        if found := _lone_surrogate(x):
            return found
    return None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | Exception]]:
    """(1-based line number, record) per non-blank line. A line that is not UTF-8, not JSON or not a JSON object
    yields a BadRecord (reasons undecodable_bytes, invalid_json, not_an_object, invalid_unicode: an unpaired
    surrogate escape, which no tokenizer can encode) instead of raising, so the caller applies its
    policy. Lines are split on b"\\n" only, so U+2028 inside a JSON string never cuts a record."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file not found: {p}")
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadRecord("undecodable_bytes", f"not UTF-8 at byte {e.start}: {raw[e.start : e.start + 8]!r}")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield n, BadRecord("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(rec, dict):
                yield n, BadRecord("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
                continue
            # Only a "\\uD800"-style escape can smuggle a lone surrogate past strict UTF-8 decoding; the regex
            # keeps the full walk off almost every line.
            if _SURROGATE_ESCAPE.search(line) and (bad := _lone_surrogate(rec)):
                yield n, BadRecord("invalid_unicode", f"unpaired surrogate U+{ord(bad):04X} in a string")
                continue
            yield n, rec


def _records(path: str | Path, report: Report) -> Iterator[tuple[str, dict]]:
    """Good records as (source, record); bad ones go through the report's policy."""
    for n, rec in read_jsonl(path):
        report.read += 1
        source = f"{path}:{n}"
        if isinstance(rec, BadRecord):
            report.bad(source, rec.reason, rec.detail)
        else:
            yield source, rec


# --- chat ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    mask: list[bool]  # True where the token is a training target (assistant content and its <|end|>)
    source: str  # "path:line"


def load_chat(
    path: str | Path,
    tok: Tokenizer,
    block_size: int,
    bad_records: BadRecords = "error",
    too_long: TooLong = "skip",
    field: str = "messages",
) -> tuple[list[Sample], dict]:
    """Conversations from JSONL records `{field: [{"role", "content"}, ...]}` -> samples and a report.
    Bad-record reasons: those of read_jsonl, missing_{field}, and ChatFormatError.reason (unknown_role,
    no_assistant_turn, ...). too_long="truncate" keeps the first block_size tokens only if a loss token remains
    among them; otherwise the record is skipped as too_long."""
    report = Report(bad_records, too_long)
    samples = []
    for source, rec in _records(path, report):
        if field not in rec:
            report.bad(source, f"missing_{field}", f"no {field!r} key (keys: {sorted(rec)})")
            continue
        try:
            validate_messages(rec[field], require_assistant=True)
        except ChatFormatError as e:
            report.bad(source, e.reason, str(e))
            continue
        ids, mask = render_chat(tok, rec[field])
        if len(ids) > block_size:
            if not report.long(source, len(ids), block_size, can_truncate=any(mask[:block_size])):
                continue
            ids, mask = ids[:block_size], mask[:block_size]
        samples.append(Sample(ids, mask, source))
        report.used += 1
    return samples, report.as_dict()


@dataclass
class PackedRows:
    inputs: np.ndarray  # (N, T) int64 token ids; padding = pad_id
    targets: np.ndarray  # (N, T) int64 next token where it is trained on, else -100
    segments: np.ndarray  # (N, T) int64 per-row sample index; padding has its own id
    n_samples: int
    real_tokens: int

    @property
    def efficiency(self) -> float:
        """Real (non-padding) tokens / (N * T)."""
        return self.real_tokens / self.inputs.size if self.inputs.size else 0.0

    def report(self) -> dict:
        n, t = self.inputs.shape
        return {
            "samples": self.n_samples,
            "rows": n,
            "block_size": t,
            "efficiency": round(self.efficiency, 4),
            "loss_tokens": int((self.targets != IGNORE_INDEX).sum()),
        }


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices. Samples go longest first, ties by original index; each goes into the lowest-numbered
    row with room, rows being opened in order. A max segment tree over remaining capacity (unopened rows start full,
    so the first-fitting leaf is either an open row or the next new one) finds that row in O(log n)."""
    size = 1 << max(1, (len(lengths) - 1).bit_length())
    tree = [capacity] * (2 * size)
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= lengths[i] else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        tree[node] -= lengths[i]
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def pack(samples: Sequence[Sample], block_size: int, pad_id: int, pack: bool = True) -> PackedRows:
    """Samples -> rows of block_size tokens. Within a row a sample occupies consecutive positions; the target at
    position t is the sample's next token if that token's mask is True, else -100; a sample's last position and all
    padding have target -100. pack=False puts one sample per row, in input order."""
    if not samples:
        raise DataError("no samples to pack (every record was skipped? see the loader's report)")
    lengths = [len(s.ids) for s in samples]
    for s, n in zip(samples, lengths):
        if n > block_size or n == 0:
            raise ValueError(f"{s.source}: sample of {n} tokens does not fit block_size {block_size}")
    rows = _first_fit_decreasing(lengths, block_size) if pack else [[i] for i in range(len(samples))]
    shape = (len(rows), block_size)
    inputs = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    segments = np.empty(shape, dtype=np.int64)
    for r, members in enumerate(rows):
        pos = 0
        for seg, i in enumerate(members):
            ids = np.asarray(samples[i].ids, dtype=np.int64)
            mask = np.asarray(samples[i].mask, dtype=bool)
            n = len(ids)
            inputs[r, pos : pos + n] = ids
            targets[r, pos : pos + n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            segments[r, pos : pos + n] = seg
            pos += n
        segments[r, pos:] = len(members)  # padding is a segment of its own: it attends only to padding
    return PackedRows(inputs, targets, segments, len(samples), sum(lengths))


# --- classification ---------------------------------------------------------------------------------------------


def load_labeled(
    path: str | Path, text_field: str = "text", label_field: str = "label", bad_records: BadRecords = "error"
) -> tuple[list[str], list, list[str], dict]:
    """(texts, raw labels, sources, report) from JSONL. A missing or null text/label is a bad record (missing_text,
    missing_label); a text that is not a string is text_not_string, an empty or blank one empty_text. Label types are
    checked by LabelMap.fit, where all labels are seen together."""
    report = Report(bad_records)
    texts, labels, sources = [], [], []
    for source, rec in _records(path, report):
        text, label = rec.get(text_field), rec.get(label_field)
        if text is None:
            report.bad(source, "missing_text", f"no {text_field!r} value (keys: {sorted(rec)})")
        elif not isinstance(text, str):
            report.bad(source, "text_not_string", f"{text_field!r} must be a string, got {type(text).__name__}")
        elif not text.strip():
            report.bad(source, "empty_text", f"{text_field!r} is empty")
        elif label is None:
            report.bad(source, "missing_label", f"no {label_field!r} value (keys: {sorted(rec)})")
        else:
            texts.append(text)
            labels.append(label)
            sources.append(source)
            report.used += 1
    return texts, labels, sources, report.as_dict()


def _label_kind(x: Any) -> str:
    # bool is an int subclass and 1.0 == 1 in a dict: both would silently merge classes, so they are refused.
    if isinstance(x, bool):
        return "bool"
    return {int: "int", str: "str"}.get(type(x), type(x).__name__)


class LabelMap:
    """Raw labels (all strings or all integers) <-> class indices 0..K-1, classes sorted (integers numerically).
    Build it with the classmethod `LabelMap.fit(raw_labels, sources)`; save it with `to_json()` (a JSON-ready dict)."""

    def __init__(self, classes: Sequence[int | str]) -> None:
        kinds = {_label_kind(c) for c in classes}
        if len(kinds) != 1 or not kinds <= {"int", "str"}:
            raise ValueError(f"classes must be all strings or all integers, got kinds {sorted(kinds)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate classes in {list(classes)}")
        self.kind = kinds.pop()
        self.classes = sorted(classes)
        self._index = {c: i for i, c in enumerate(self.classes)}

    @classmethod
    def fit(cls, raw_labels: Sequence[Any], sources: Sequence[str]) -> LabelMap:
        if len(raw_labels) != len(sources):
            raise ValueError(f"{len(raw_labels)} labels but {len(sources)} sources")
        first: dict[str, tuple[Any, str]] = {}
        for label, source in zip(raw_labels, sources):
            first.setdefault(_label_kind(label), (label, source))
        bad = {k: v for k, v in first.items() if k not in ("int", "str")}
        if bad:
            k, (label, source) = next(iter(bad.items()))
            raise DataError(f"{source}: label {label!r} is a {k}; labels must be all strings or all integers")
        if len(first) > 1:
            shown = "; ".join(f"{k} {v[0]!r} at {v[1]}" for k, v in sorted(first.items()))
            raise DataError(f"labels mix types ({shown}); make them all strings or all integers")
        counts = Counter(raw_labels)
        if len(counts) < 2:
            got = ", ".join(f"{c!r} ({n} examples)" for c, n in counts.items()) or "no labels"
            raise DataError(f"classification needs at least 2 classes, got {got}")
        return cls(list(counts))

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [str(c) for c in self.classes]

    def encode(self, raw: Any, source: str) -> int:
        i = self._index.get(raw) if _label_kind(raw) == self.kind else None
        if i is None:
            hint = ""
            if str(raw) in self.names:
                hint = f" (training labels are {self.kind}s, this one is a {_label_kind(raw)})"
            raise DataError(f"{source}: label {raw!r} was not seen in training{hint}; known labels: {self.classes}")
        return i

    def to_json(self) -> dict:
        return {"kind": self.kind, "classes": list(self.classes)}

    @classmethod
    def from_json(cls, data: dict | str) -> LabelMap:
        d = json.loads(data) if isinstance(data, str) else data
        lm = cls(d["classes"])
        if lm.kind != d.get("kind", lm.kind):
            raise ValueError(f"label map says kind {d['kind']!r} but its classes are {lm.kind}s")
        return lm


def encode_texts(
    tok: Tokenizer, texts: Sequence[str], sources: Sequence[str], block_size: int, too_long: TooLong = "truncate"
) -> tuple[list[list[int]], list[int], dict]:
    """[bos] + encode(text) per text -> (sequences, kept indices into `texts`, report). Truncation keeps the first
    block_size tokens; filter the labels with the kept indices so they stay aligned."""
    report = Report(too_long=too_long)
    seqs, kept = [], []
    for i, (ids, source) in enumerate(zip(tok.encode_batch(list(texts)), sources)):
        report.read += 1
        ids = [tok.bos_id, *ids]
        if len(ids) > block_size:
            if not report.long(source, len(ids), block_size):
                continue
            ids = ids[:block_size]
        seqs.append(ids)
        kept.append(i)
        report.used += 1
    return seqs, kept, report.as_dict()


def collate_classify(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: ids (B, Tmax) int64 and lengths (B,) int64 (the head reads position length-1)."""
    import torch

    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("collate_classify needs a non-empty list of non-empty sequences")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


# --- sampling and splitting -------------------------------------------------------------------------------------


def split_train_val(
    n: int, val_fraction: float, seed: int, labels: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx), sorted int64 arrays covering 0..n-1 once. With labels the split is
    stratified: a class of c >= 2 examples puts round(c * val_fraction) of them, at least 1 and at most c - 1, in
    validation; a single-example class stays in training."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 examples to split off a validation set, got {n}")
    rng = np.random.default_rng([seed, 0x5EED])
    if labels is None:
        k = min(n - 1, max(1, math.floor(n * val_fraction + 0.5)))
        val = rng.permutation(n)[:k]
    else:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for n={n} examples")
        groups: dict[tuple[str, Any], list[int]] = {}
        for i, y in enumerate(labels):
            groups.setdefault((_label_kind(y), y), []).append(i)  # kind in the key: True and 1 stay apart
        parts = []
        for members in groups.values():  # first-appearance order: deterministic for a given input
            c = len(members)
            k = 0 if c < 2 else min(c - 1, max(1, math.floor(c * val_fraction + 0.5)))
            parts.append(rng.permutation(np.asarray(members, dtype=np.int64))[:k])
        val = np.concatenate(parts)
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val).astype(np.int64), np.flatnonzero(is_val).astype(np.int64)
