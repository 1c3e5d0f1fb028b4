"""Shared fixtures: a small real corpus (Song poems + the Sonnets from the bundled sample), a tokenizer trained on
it, and one tiny trained run reused by the tests that only need *a* checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

TINY_MODEL = [
    "--model.block_size=64",
    "--model.n_layer=2",
    "--model.n_head=4",
    "--model.n_kv_head=2",
    "--model.n_embd=64",
    "--model.dropout=0.0",
]
TINY_TRAIN = [
    "--train.micro_batch_size=4",
    "--train.warmup_steps=2",
    "--train.lr=3e-3",
    "--train.eval_batches=2",
    "--train.log_every=1",
    "--progress=false",
]


def pretrain(run: Path, corpus: Path, *extra: str) -> int:
    """`gptforge pretrain` of the tiny model in-process; returns the exit status."""
    from gptforge.cli import main

    return main(["pretrain", f"--run_dir={run}", f"--input={corpus}", *TINY_MODEL, *TINY_TRAIN, *extra])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from gptforge import sample_data_dir

    d = tmp_path_factory.mktemp("corpus")
    (d / "zh").mkdir()
    (d / "en").mkdir()
    shutil.copy(sample_data_dir() / "zh" / "song100.jsonl", d / "zh" / "song100.jsonl")
    shutil.copy(sample_data_dir() / "en" / "sonnets.txt", d / "en" / "sonnets.txt")
    return d


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory, corpus) -> Path:
    """A run dir whose tokenizer/ is trained on the small corpus (vocab 1024)."""
    from gptforge.stages import tokenizer

    run = tmp_path_factory.mktemp("tokrun")
    tokenizer.run(tokenizer.Config(run_dir=str(run), input=str(corpus), vocab_size=1024))
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus, tokenizer_run) -> Path:
    """A run dir with a tiny model pretrained for 12 steps (checkpoints at 6 and 12)."""
    run = tmp_path_factory.mktemp("trained")
    shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
    rc = pretrain(run, corpus, "--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6")
    assert rc == 0
    return run
