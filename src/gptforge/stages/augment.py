"""`gptforge augment`: grow a small labelled training set with label-preserving text augmentation (offline, seeded).

Reads a JSONL training file (one record per line with a text field and usually a label) and writes
`<run_dir>/augment/train.jsonl`: the original records, unchanged and in order, followed by their augmented copies.
A copy differs only in its text and carries `augmented_from` (the line index of its source among the records) and
`augment_op`; the label and every other field are copied untouched. Also writes `stats.json` (records in, copies
out, applied/unchanged counts per operation, synonym sources with their sizes, whether WordNet was available) and the
resolved `config.yaml`.

Operations (EDA, Wei & Zou 2019, plus character noise) for Chinese and English: synonym replacement, random
insertion, random swap, random deletion, sentence reordering, character noise. Special tokens such as `<|user|>`,
URLs, emails and numbers are never changed. Synonyms come from your table (augment.synonym_table), the bundled tables,
WordNet when nltk and its data are installed, and words mined from the input texts themselves. Nothing is downloaded.

Augment the TRAINING split only. Evaluation and validation data must never be augmented: near-copies of training
records in them inflate every score. Split first, then augment the training part (the finetune stage does exactly
that: it applies the same library after its train/validation split). An input whose records already carry
`augmented_from` is refused, since augmenting augmented data compounds the noise and breaks the source indices.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from gptforge.artifacts import append_ledger, atomic_write_text, save_config, stage_dir, write_json
from gptforge.data.augment import AugmentConfig, Augmenter

if TYPE_CHECKING:
    from gptforge.runtime import Runtime

NEEDS_TORCH = False  # cli: no runtime (device, dtype) to build, so torch is never imported


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/default", description="Run directory; outputs go to <run_dir>/augment/.")
    input: str = Field("", description="JSONL file of the training split (never the evaluation data).")
    text_field: str = Field("text", description="Field holding the text of a record.")
    label_field: str = Field("label", description="Field holding the label (copied untouched; counted in stats).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    output: str = Field("", description="Output JSONL; '' = <run_dir>/augment/train.jsonl.")


def read_records(path: Path, text_field: str) -> tuple[list[dict], int]:
    """The records of a JSONL file and the number of blank lines skipped. A line that is not a JSON object with a
    string `text_field`, or one that is already an augmented copy, is a ValueError naming file:line."""
    if not path.is_file():
        raise ValueError(f"input: {path} is not a file (expected the training split as JSONL)")
    records, blank = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason}); convert the file to UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                blank += 1
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get(text_field), str):
                got = "missing" if text_field not in rec else f"a {type(rec[text_field]).__name__}"
                raise ValueError(f"{path}:{lineno}: text field {text_field!r} is {got}; set --text_field")
            if "augmented_from" in rec:
                raise ValueError(
                    f"{path}:{lineno}: record already carries 'augmented_from': this is augmented data. Augment the "
                    "original training split instead (augmenting copies compounds the noise)"
                )
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records (the file holds only blank lines)")
    return records, blank


def _label_counts(records: list[dict], label_field: str) -> dict[str, int]:
    """Records per label (labels that are not strings as JSON), and '<none>' for records without one."""
    counts: Counter[str] = Counter()
    for rec in records:
        if label_field and label_field in rec:
            label = rec[label_field]
            counts[label if isinstance(label, str) else json.dumps(label, ensure_ascii=False)] += 1
        else:
            counts["<none>"] += 1
    return dict(sorted(counts.items()))


def run(cfg: Config, runtime: Runtime | None = None) -> dict:
    t0 = time.perf_counter()
    if not cfg.input:
        raise ValueError("input: set --input to the JSONL file of the training split")
    src = Path(cfg.input)
    out = Path(cfg.run_dir) / "augment"
    dest = Path(cfg.output) if cfg.output else out / "train.jsonl"
    if dest.resolve() == src.resolve():
        raise ValueError(f"output: {dest} is the input file; write the augmented set elsewhere")
    records, blank = read_records(src, cfg.text_field)
    augmenter = Augmenter(cfg.augment, corpus=(r[cfg.text_field] for r in records))
    copies, aug = augmenter.augment_records(records, cfg.text_field)
    # The folder is touched only once the input has been read and augmented: a bad input leaves no half run.
    out = stage_dir(cfg.run_dir, "augment")
    save_config(cfg, out)
    atomic_write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [*records, *copies]))
    stats = {
        "input": str(src),
        "output": str(dest),
        "records_in": len(records),
        "blank_lines": blank,
        "copies_out": len(copies),
        "records_out": len(records) + len(copies),
        "ops": aug["ops"],
        "synonym_sources": augmenter.sources,
        "wordnet_available": augmenter.sources["wordnet"] == "available",
        "labels_in": _label_counts(records, cfg.label_field),
        "labels_copies": _label_counts(copies, cfg.label_field),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / "stats.json", stats)
    append_ledger(
        cfg.run_dir, "augment", "ok", {k: stats[k] for k in ("records_in", "copies_out", "records_out", "seconds")}
    )
    unchanged = sum(v["unchanged"] for v in aug["ops"].values())
    print(
        f"augment: {len(records)} records -> {len(copies)} copies ({unchanged} draws left the text unchanged and "
        f"were dropped); wrote {dest}"
    )
    return stats
