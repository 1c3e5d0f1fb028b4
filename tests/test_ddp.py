"""DistributedDataParallel through torchrun: 2 CPU processes on gloo see the same global batches as 1 process with
gradient accumulation 2, so the loss trajectories agree; a run resumes at another world size when an optimizer step
still reads the same number of sequences, and is refused naming that number otherwise."""

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
    # ... and at world size 1 only with the same sequences per optimizer step; the refusal says how.
    rc = main(["pretrain", f"--run_dir={two}", f"--input={corpus}", *ARGS, "--train.max_steps=12", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "sequences per optimizer step: checkpoint 8, config 4" in err
    assert "--train.global_batch_size=8" in err


def test_resume_at_another_world_size(tmp_path, corpus, tokenizer_run, capsys):
    """1 process (accumulation 2) -> 2 processes and back: each step reads the same windows, so the resumed halves
    continue the uninterrupted trajectory (to float rounding: the reductions differ)."""
    ref, up = tmp_path / "ref", tmp_path / "up"
    shutil.copytree(tokenizer_run / "tokenizer", ref / "tokenizer")
    one = ["pretrain", f"--input={corpus}", *ARGS, "--train.grad_accum=2"]
    assert main([*one, f"--run_dir={ref}"]) == 0
    shutil.copytree(ref, up)
    shutil.rmtree(up / "pretrain" / "checkpoints" / "step-00000008")
    (up / "pretrain" / "checkpoints" / "best.json").unlink(missing_ok=True)
    proc = torchrun(up, corpus, "--resume")  # grad_accum 1 x 2 processes = 8 sequences, as saved
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved by 1 process(es), resumed by 2" in proc.stdout
    # 2 -> 1: the world-size-2 step-8 checkpoint just written, back to one process for 2 more steps.
    assert main([*one, f"--run_dir={up}", "--train.max_steps=10", "--resume"]) == 0
    assert main([*one, f"--run_dir={ref}", "--train.max_steps=10", "--resume"]) == 0
    a, b = _metric(ref, "loss"), _metric(up, "loss")
    assert len(a) == len(b) == 10 and a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert _metric(ref, "val_loss") == pytest.approx(_metric(up, "val_loss"), rel=1e-4, abs=1e-4)


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


@pytest.mark.slow
def test_compiled_ddp_matches_one_compiled_process(tmp_path, corpus, tokenizer_run):
    """`--compile` under DDP compiles around the DDP wrapper (graph split at gradient buckets): the same losses as
    one compiled process with accumulation 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")
    assert main(["pretrain", f"--run_dir={one}", f"--input={corpus}", *ARGS, "--compile", "--train.grad_accum=2"]) == 0
    proc = torchrun(two, corpus, "--compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metric(one, "loss") == pytest.approx(_metric(two, "loss"), rel=1e-3, abs=1e-3)
    assert _metric(one, "val_loss") == pytest.approx(_metric(two, "val_loss"), rel=1e-3, abs=1e-3)
