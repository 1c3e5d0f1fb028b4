"""`gptforge tokenizer`: train a byte-level BPE tokenizer on the user's text.

Writes `<run_dir>/tokenizer/tokenizer.json` (Hugging Face format), `stats.json` (characters and bytes per token,
separately for Chinese and English lines) and the resolved `config.yaml`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from gptforge import SAMPLE, resolve_input
from gptforge.artifacts import append_ledger, save_config, stage_dir, write_json
from gptforge.data.readers import read_documents, split_pieces
from gptforge.data.shards import split_of
from gptforge.runtime import Runtime
from gptforge.tokenizer.bpe import Tokenizer, script_of, tokenizer_stats, train_bpe


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field("runs/default", description="Run directory; outputs go to <run_dir>/tokenizer/.")
    input: str = Field(SAMPLE, description="Folder or file of .txt/.md/.jsonl text; @sample is the bundled corpus.")
    text_field: str = Field("text", description="Field holding the text in .jsonl records.")
    vocab_size: int = Field(8192, ge=300, le=1_000_000, description="Vocabulary size including special tokens.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a merge.")
    balance_scripts: float = Field(
        20.0,
        ge=1.0,
        description="Repeat the minority script's (Chinese or English) lines up to this many times "
        "during training so both get a fair share of merges; 1 disables.",
    )
    holdout_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of text pieces kept out of training; the statistics are measured on it.",
    )
    holdout_seed: int = Field(1337, description="Seed of the hold-out split.")
    piece_chars: int = Field(4000, gt=0, description="Documents are cut into pieces of about this many characters.")
    overwrite: bool = Field(False, description="Replace an existing, different tokenizer.json in this run_dir.")


# The hold-out defaults equal pretrain's data.val_fraction, data.seed and data.piece_chars, so with default settings
# the tokenizer never sees the text the model is validated on.


def _pieces(src: Path, cfg: Config, held_out: bool) -> Iterator[str]:
    for doc in read_documents(src, cfg.text_field):
        for piece in split_pieces(doc, cfg.piece_chars):
            if (split_of(piece.source, cfg.holdout_seed, cfg.holdout_fraction) == "val") == held_out:
                yield piece.text


def run(cfg: Config, runtime: Runtime | None = None) -> dict:
    src = resolve_input(cfg.input)
    t0 = time.perf_counter()
    weights = script_weights(src, cfg)
    tok = Tokenizer(train_bpe(_weighted_texts(src, cfg, weights), cfg.vocab_size, cfg.min_frequency))
    train_s = time.perf_counter() - t0
    path = Path(cfg.run_dir) / "tokenizer" / "tokenizer.json"
    if path.is_file() and not cfg.overwrite and Tokenizer.load(path).sha256() != tok.sha256():
        raise ValueError(
            f"{path} exists and differs from the tokenizer these settings train; checkpoints trained with it would "
            "no longer resume. Pass --overwrite to replace it, or use another run_dir"
        )
    # The folder is touched only after training succeeded: a bad input leaves a previous tokenizer as it was.
    out = stage_dir(cfg.run_dir, "tokenizer")
    save_config(cfg, out)
    tok.save(path)
    stats = tokenizer_stats(tok, _pieces(src, cfg, held_out=True))
    stats["measured_on"] = "held-out text"
    if not any(stats["lines"].values()):  # a corpus too small to hold anything out
        stats = {**tokenizer_stats(tok, _pieces(src, cfg, held_out=False)), "measured_on": "training text"}
    stats.update(requested_vocab_size=cfg.vocab_size, train_seconds=round(train_s, 2), train_repeat=weights)
    stats["input"] = str(src)
    write_json(out / "stats.json", stats)
    append_ledger(cfg.run_dir, "tokenizer", "ok", stats)
    print(format_stats(stats))
    if tok.vocab_size < cfg.vocab_size:
        print(
            f"  note: the text supports only {tok.vocab_size} tokens of the {cfg.vocab_size} asked for "
            f"(no pair left that occurs {cfg.min_frequency}+ times)"
        )
    print(f"tokenizer saved: {path}")
    return stats


def script_weights(src, cfg: Config) -> dict[str, int]:
    """How many times each script's lines are fed to the trainer. BPE spends merges where the bytes are: on a
    corpus that is 93% English by bytes, Chinese characters stay split into byte pieces (under 1 char/token).
    Repeating the minority script's lines until byte shares are even (capped) buys Chinese whole-character and
    word tokens at a small cost in English."""
    volume = {"zh": 0, "en": 0}
    for text in _pieces(src, cfg, held_out=False):
        for line in text.splitlines():
            if s := script_of(line):
                volume[s] += len(line.encode("utf-8"))
    weights = {"zh": 1, "en": 1}
    small, big = sorted(volume, key=volume.get)
    if volume[small] > 0 and cfg.balance_scripts > 1:
        weights[small] = max(1, min(int(cfg.balance_scripts), volume[big] // volume[small]))
    return weights


def _weighted_texts(src, cfg: Config, weights: dict[str, int]) -> Iterator[str]:
    for text in _pieces(src, cfg, held_out=False):
        yield text
        extra = [line for line in text.splitlines() if weights.get(script_of(line) or "", 1) > 1]
        if extra:
            block = "\n".join(extra)
            for _ in range(weights[script_of(extra[0])] - 1):
                yield block


def format_stats(stats: dict) -> str:
    rows = [
        f"tokenizer: vocab {stats['vocab_size']}, trained in {stats['train_seconds']} s; "
        f"characters per token on {stats['measured_on']}:",
        f"  {'script':<8}{'lines':>8}{'chars':>10}{'tokens':>10}{'chars/token':>13}{'bytes/token':>13}",
    ]
    for s in ("zh", "en"):
        d = stats[s]
        cpt = d["chars_per_token"] if d["chars_per_token"] is not None else "-"
        bpt = d["bytes_per_token"] if d["bytes_per_token"] is not None else "-"
        rows.append(f"  {s:<8}{stats['lines'][s]:>8}{d['chars']:>10}{d['tokens']:>10}{cpt:>13}{bpt:>13}")
    return "\n".join(rows)
