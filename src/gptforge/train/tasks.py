"""What differs between fine-tuning tasks, as data and functions handed to the one Trainer.

- `chat`: conversations rendered by the chat template, loss on assistant tokens only, packed into rows with segment
  ids (exact: no attention across conversations).
- `classify`: text -> label through the classification head; optional class weights and label smoothing.
- `lm`: continued pretraining on domain text (documents -> windows).

Data is read and tokenized once (`prepare`); a split (`make_split`) selects train/validation items by index, so
cross-validation folds and search trials reuse the tokenized data. Augmentation is applied inside `make_split` to the
training items only, after the split: a validation item and its augmented copies can never end up on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from gptforge.data.readers import DataError, read_documents
from gptforge.runtime import Runtime
from gptforge.tokenizer.bpe import Tokenizer


class TaskDataFields(BaseModel):
    """How task files are read: the keys shared by the finetune and evaluate configs (flat flags, one definition)."""

    model_config = ConfigDict(extra="forbid")

    text_field: str = Field("text", description="Field holding the text.")
    label_field: str = Field("label", description="Field holding the label (classify).")
    messages_field: str = Field("messages", description="Field holding the conversation (chat).")
    bad_records: Literal["error", "skip"] = Field("error", description="Malformed record: stop, or skip and count.")
    too_long: Literal["auto", "truncate", "skip", "error"] = Field(
        "auto", description="Sample longer than the context; auto = truncate (classify) or skip (chat)."
    )


@dataclass
class Prepared:
    """Everything read from the task files, tokenized once."""

    task: str
    items: list  # classify: Example; chat: Sample; lm: token lists of documents
    val_items: list | None  # from a separate validation file, else None (split from items)
    labels: Any = None  # LabelMap for classify
    report: dict = field(default_factory=dict)
    messages: dict[str, list] = field(default_factory=dict)  # chat: source -> messages, for reply samples
    doc_bytes: list[int] = field(default_factory=list)  # lm: UTF-8 bytes per document
    val_doc_bytes: list[int] = field(default_factory=list)


@dataclass
class Example:
    text: str
    label: int
    source: str
    ids: list[int]


@dataclass
class Split:
    task: str
    train: Any
    val: Any
    n_train: int
    report: dict = field(default_factory=dict)


# --- reading -----------------------------------------------------------------------------------------------------


def read_classify(path: str, cfg, tok: Tokenizer, block_size: int, labels, report: dict, name: str):
    from gptforge.data.sft import LabelMap, encode_texts, load_labeled

    texts, raw, sources, rep = load_labeled(path, cfg.text_field, cfg.label_field, cfg.bad_records)
    if cfg.bad_records == "skip":
        texts, raw, sources = _drop_odd_label_types(texts, raw, sources, rep, labels)
    if labels is None:
        labels = LabelMap.fit(raw, sources)
    ys, keep = [], []
    for i, (r, s) in enumerate(zip(raw, sources)):
        try:
            ys.append(labels.encode(r, s))
            keep.append(i)
        except DataError:
            if cfg.bad_records == "error":
                raise
            _count_skip(rep, "unseen_label", s)
    texts, sources = [texts[i] for i in keep], [sources[i] for i in keep]
    too_long = "truncate" if cfg.too_long == "auto" else cfg.too_long
    seqs, kept, trep = encode_texts(tok, texts, sources, block_size, too_long)
    rep["tokenize"] = trep
    report[name] = rep
    examples = [Example(texts[i], ys[i], sources[i], seq) for i, seq in zip(kept, seqs)]
    _require_items(examples, rep, path, "labelled examples")
    return examples, labels


def _count_skip(rep: dict, reason: str, source: str) -> None:
    rep.setdefault("skipped", {})
    rep["skipped"][reason] = rep["skipped"].get(reason, 0) + 1
    rep["used"] = rep.get("used", 1) - 1
    examples = rep.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < 5:
        examples.append(source)


def _drop_odd_label_types(texts, raw, sources, rep: dict, labels):
    """With bad_records=skip, labels of another type than the rest (a stray 1 among strings) are counted skips; the
    type kept is the label map's (evaluation) or the most common one (training)."""
    from gptforge.data.sft import _label_kind

    kinds = [_label_kind(r) for r in raw]
    if labels is not None:
        keep_kind = labels.kind
    else:
        valid = [k for k in kinds if k in ("int", "str")]
        keep_kind = max(set(valid), key=valid.count) if valid else None
    keep = [i for i, k in enumerate(kinds) if k == keep_kind]
    for i in sorted(set(range(len(raw))) - set(keep)):
        _count_skip(rep, "label_type_mismatch", sources[i])
    return [texts[i] for i in keep], [raw[i] for i in keep], [sources[i] for i in keep]


def read_chat(path: str, cfg, tok: Tokenizer, block_size: int, report: dict, name: str, messages: dict):
    from gptforge.data.sft import load_chat, read_jsonl

    too_long = "skip" if cfg.too_long == "auto" else cfg.too_long
    samples, rep = load_chat(path, tok, block_size, cfg.bad_records, too_long, cfg.messages_field)
    report[name] = rep
    _require_items(samples, rep, path, f"conversations within the {block_size}-token context")
    wanted = {s.source for s in samples}
    for line, rec in read_jsonl(path):
        src = f"{path}:{line}"
        if src in wanted and isinstance(rec, dict):
            messages[src] = rec[cfg.messages_field]
    return samples


def read_lm(path: str, cfg, tok: Tokenizer, report: dict, name: str) -> tuple[list[list[int]], list[int]]:
    from gptforge.data.readers import split_pieces

    # Pieces of ~4,000 characters (pretraining's unit), so a single big file still splits into train/validation.
    docs = [p.text for d in read_documents(path, cfg.text_field) for p in split_pieces(d, 4000)]
    if not docs:
        raise DataError(f"{path}: no text")
    ids = tok.encode_batch(docs)
    report[name] = {"read": len(docs), "used": len(docs), "tokens": sum(len(x) + 2 for x in ids)}
    return [[tok.bos_id, *x, tok.eos_id] for x in ids], [len(d.encode("utf-8")) for d in docs]


def prepare(cfg, tok: Tokenizer, block_size: int) -> Prepared:
    """Read cfg.train_file (and cfg.val_file) for cfg.task; cfg is the finetune stage's Config."""
    report: dict = {}
    if cfg.task == "classify":
        items, labels = read_classify(cfg.train_file, cfg, tok, block_size, None, report, "train")
        val = None
        if cfg.val_file:
            val, _ = read_classify(cfg.val_file, cfg, tok, block_size, labels, report, "val")
        return Prepared("classify", items, val, labels=labels, report=report)
    if cfg.task == "chat":
        messages: dict[str, list] = {}
        items = read_chat(cfg.train_file, cfg, tok, block_size, report, "train", messages)
        val = read_chat(cfg.val_file, cfg, tok, block_size, report, "val", messages) if cfg.val_file else None
        return Prepared("chat", items, val, report=report, messages=messages)
    docs, nbytes = read_lm(cfg.train_file, cfg, tok, report, "train")
    prep = Prepared("lm", docs, None, report=report, doc_bytes=nbytes)
    if cfg.val_file:
        prep.val_items, prep.val_doc_bytes = read_lm(cfg.val_file, cfg, tok, report, "val")
    return prep


def _require_items(items: list, report: dict, path: str, what: str) -> None:
    """Everything skipped is an error that says why, not an empty training run."""
    if items:
        return
    skipped = report.get("skipped") or {}
    trunc = (report.get("tokenize") or {}).get("skipped") or {}
    reasons = ", ".join(f"{k}: {v}" for k, v in {**skipped, **trunc}.items()) or "the file holds no records"
    raise DataError(f"{path}: no usable {what} ({report.get('read', 0)} read; skipped {reasons})")


def split_labels(prep: Prepared) -> list[int] | None:
    """Labels to stratify splits and folds by (classify only)."""
    return [e.label for e in prep.items] if prep.task == "classify" else None


# --- splits ------------------------------------------------------------------------------------------------------


def windows(docs: list[list[int]], block_size: int) -> np.ndarray:
    stream = np.fromiter((t for d in docs for t in d), dtype=np.int64)
    n = (len(stream) - 1) // block_size
    if n < 1:
        raise DataError(f"{len(stream)} tokens of text is less than one window of {block_size + 1} tokens")
    # Windows overlap by one token so every token but the very first is a target exactly once.
    idx = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)[None, :]
    return stream[idx]


def _augment_classify(train: list[Example], cfg, tok: Tokenizer, block_size: int, seed: int) -> tuple[list, dict]:
    from gptforge.data.augment import Augmenter
    from gptforge.data.sft import encode_texts

    acfg = cfg.augment.model_copy(update={"seed": seed})
    aug = Augmenter(acfg, corpus=[e.text for e in train])
    records = [{"text": e.text, "label": e.label, "source": e.source} for e in train]
    copies, stats = aug.augment_records(records, text_field="text")
    too_long = "truncate" if cfg.too_long == "auto" else cfg.too_long
    sources = [f"{c['source']}#aug{c['augment_op']}" for c in copies]
    seqs, kept, trep = encode_texts(tok, [c["text"] for c in copies], sources, block_size, too_long)
    extra = [Example(copies[i]["text"], copies[i]["label"], sources[i], s) for i, s in zip(kept, seqs)]
    return extra, {"augment": stats, "augment_tokenize": trep, "augmented_copies": len(extra)}


def make_split(prep: Prepared, train_idx, val_idx, cfg, tok: Tokenizer, block_size: int, seed: int) -> Split:
    """Train/validation data for one run. val_idx indexes prep.items; with a validation file it is ignored."""
    from gptforge.data.sft import pack

    train = [prep.items[i] for i in train_idx]
    val = prep.val_items if prep.val_items is not None else [prep.items[i] for i in val_idx]
    report: dict = {"train_items": len(train), "val_items": len(val)}
    if not val:
        raise DataError("the validation split is empty; raise val_fraction or pass val_file")
    if prep.task == "classify":
        if cfg.augment.n_per_record > 0:
            extra, rep = _augment_classify(train, cfg, tok, block_size, seed)
            train = train + extra
            report.update(rep)
        return Split("classify", train, val, len(train), report)
    if prep.task == "chat":
        tr, va = pack(train, block_size, tok.pad_id, cfg.pack), pack(val, block_size, tok.pad_id, cfg.pack)
        report["packing"] = {"train_rows": len(tr.inputs), "val_rows": len(va.inputs)}
        return Split("chat", tr, {"rows": va, "samples": val}, len(tr.inputs), report)
    val_bytes = prep.val_doc_bytes if prep.val_items is not None else [prep.doc_bytes[i] for i in val_idx]
    tr, va = windows(train, block_size), windows(val, block_size)
    report["windows"] = {"train": len(tr), "val": len(va)}
    val_tokens = sum(len(d) - 2 for d in val)  # bos/eos carry no text bytes
    return Split("lm", tr, {"windows": va, "bytes_per_token": sum(val_bytes) / max(1, val_tokens)}, len(tr), report)


# --- batches, loss, evaluation ------------------------------------------------------------------------------------


def class_weights(cfg, split: Split, names: list[str]) -> torch.Tensor | None:
    """none | balanced (n / (k * count), scikit-learn's convention) | 'label=weight,...' for every label."""
    spec = cfg.class_weights.strip()
    if spec in ("", "none"):
        return None
    k = len(names)
    if spec == "balanced":
        counts = np.bincount([e.label for e in split.train], minlength=k).astype(np.float64)
        if (counts == 0).any():
            missing = [names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"class_weights=balanced: no training example of {missing}")
        return torch.tensor(counts.sum() / (k * counts), dtype=torch.float32)
    weights = {}
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"class_weights: bad entry {part!r} (expected label=weight)") from None
        if not eq or weights[name.strip()] < 0:
            raise ValueError(f"class_weights: bad entry {part!r} (expected label=weight, weight >= 0)")
    unknown = sorted(set(weights) - set(names))
    missing = [n for n in names if n not in weights]
    if unknown or missing:
        raise ValueError(
            f"class_weights: unknown labels {unknown}, labels without a weight {missing} (labels: {names})"
        )
    return torch.tensor([weights[n] for n in names], dtype=torch.float32)


def make_batcher(split: Split, sampler, pad_id: int, device: torch.device):
    def next_batch():
        idx = sampler.next_indices()
        if split.task == "classify":
            from gptforge.data.sft import collate_classify

            ids, lengths = collate_classify([split.train[i].ids for i in idx], pad_id)
            y = torch.tensor([split.train[i].label for i in idx])
            return ids.to(device), lengths.to(device), y.to(device)
        if split.task == "chat":
            rows = split.train
            x, y, s = (torch.from_numpy(a[idx]).long().to(device) for a in (rows.inputs, rows.targets, rows.segments))
            return x, y, s
        w = torch.from_numpy(split.train[idx]).long().to(device)
        return w[:, :-1], w[:, 1:], None

    return next_batch


def make_loss(task: str, label_smoothing: float, weights: torch.Tensor | None):
    def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
        if task == "classify":
            ids, lengths, y = batch
            logits = model(ids, lengths)
            w = weights.to(logits.device) if weights is not None else None
            return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=label_smoothing)
        x, y, seg = batch
        logits, _ = model(x, segment_ids=seg)
        return F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )

    return loss_fn


def batch_tokens(task: str):
    if task == "classify":
        return lambda b: int(b[1].sum())
    return lambda b: int((b[1] != -100).sum())


def make_evaluator(model: torch.nn.Module, split: Split, labels, pad_id: int, batch_size: int, runtime: Runtime):
    """evaluate(state) -> validation metrics, all prefixed `val_`."""
    from gptforge.eval.lm import lm_metrics, token_nll, windows_to_rows

    def evaluate(_state=None) -> dict[str, float]:
        if split.task == "classify":
            return classify_metrics(model, split.val, labels.names, pad_id, batch_size, runtime)[0]
        if split.task == "chat":
            rows = split.val["rows"]
            nll, n = token_nll(model, rows.inputs, rows.targets, rows.segments, batch_size, runtime)
            return lm_metrics(nll, n)
        x, y = windows_to_rows(split.val["windows"])
        nll, n = token_nll(model, x, y, None, batch_size, runtime)
        return lm_metrics(nll, n, int(round(split.val["bytes_per_token"] * n)))

    return evaluate


def classify_metrics(model, examples: list[Example], names: list[str], pad_id: int, batch_size: int, runtime: Runtime):
    """(flat val_ metrics incl. val_loss, full metrics dict, probabilities) for labelled examples."""
    from gptforge.eval.classification import classification_metrics, flat_metrics
    from gptforge.eval.predict import predict_proba

    probs = predict_proba(model, [e.ids for e in examples], pad_id, batch_size, runtime)
    y = np.array([e.label for e in examples])
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()
    full = classification_metrics(y.tolist(), probs.argmax(1).tolist(), names)
    flat = {"val_loss": float(nll), **{f"val_{k}": v for k, v in flat_metrics(full).items()}}
    return flat, full, probs


def write_predictions(path: Path, examples: list[Example], probs: np.ndarray, names: list[str]) -> None:
    """One JSON line per example: source, text, true label, predicted label, probability of each label."""
    import json

    from gptforge.artifacts import atomic_write_text

    lines = []
    for e, p in zip(examples, probs):
        lines.append(
            json.dumps(
                {
                    "source": e.source,
                    "text": e.text,
                    "label": names[e.label],
                    "predicted": names[int(p.argmax())],
                    "correct": int(p.argmax()) == e.label,
                    "probs": {n: round(float(v), 6) for n, v in zip(names, p)},
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def chat_samples(model, tok: Tokenizer, prep: Prepared, samples: list, n: int, runtime: Runtime, seed: int):
    """Replies of the model to the first n validation conversations (context up to their last assistant turn)."""
    from gptforge.eval.predict import chat_reply

    out = []
    for s in samples[:n]:
        msgs = prep.messages.get(s.source)
        if not msgs:
            continue
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        context, reference = msgs[:last], msgs[last]["content"]
        reply = chat_reply(model, tok, context, max_new_tokens=160, temperature=0.0, seed=seed, runtime=runtime)
        out.append({"source": s.source, "prompt": context[-1]["content"], "reference": reference, "reply": reply})
    return out
