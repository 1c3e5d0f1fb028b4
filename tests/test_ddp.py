"""DistributedDataParallel through torchrun: 2 CPU processes on gloo see the same global batches as 1 process with
gradient accumulation 2, so the loss trajectories agree; and resume at another world size is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.cli import main
from tests.conftest import TINY_MODEL, TINY_TRAIN

ARGS = [
    *TINY_MODEL,
    *TINY_TRAIN,
    "--dtype=float32",
    "--train.max_steps=8",
    "--train.save_every=4",
    "--train.eval_every=4",
]


def _metric(run: Path, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def torchrun(run: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m gptforge pretrain` of the tiny model (later flags override earlier ones)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gptforge",
        "pretrain",
        f"--run_dir={run}",
        f"--input={corpus}",
        *ARGS,
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_gloo_matches_one_process(tmp_path, corpus, tokenizer_run, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")
    assert main(["pretrain", f"--run_dir={one}", f"--input={corpus}", *ARGS, "--train.grad_accum=2"]) == 0
    proc = torchrun(two, corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metric(one, "loss"), _metric(two, "loss")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert _metric(one, "val_loss") == pytest.approx(_metric(two, "val_loss"), rel=1e-4, abs=1e-4)
    ckpt = two / "pretrain" / "checkpoints" / "step-00000008"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {f.name for f in ckpt.iterdir()}

    # The world-size-2 checkpoint resumes at world size 2 ...
    proc = torchrun(two, corpus, "--resume", "--train.max_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_metric(two, "loss")) == 10
    # ... and is refused at world size 1, naming the mismatch.
    rc = main(["pretrain", f"--run_dir={two}", f"--input={corpus}", *ARGS, "--train.max_steps=12", "--resume"])
    assert rc == 2 and "world_size: checkpoint 2, config 1" in capsys.readouterr().err


def test_rank_without_validation_windows_does_not_hang(tmp_path, corpus, tokenizer_run):
    """1 validation window for 2 ranks: rank 1 evaluates nothing and must still not deadlock; dropout on."""
    shutil.copytree(tokenizer_run / "tokenizer", tmp_path / "tokenizer")
    proc = torchrun(
        tmp_path,
        corpus,
        "--model.dropout=0.1",
        "--train.micro_batch_size=1",
        "--train.eval_batches=1",
        "--train.max_steps=4",
        "--train.eval_every=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_metric(tmp_path, "val_loss")) == 2
