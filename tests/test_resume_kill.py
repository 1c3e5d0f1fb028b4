"""Exact resume under SIGKILL: a run killed at random moments (including inside a checkpoint write) and resumed
each time ends with weights bitwise equal to an uninterrupted run with the same seed (reliability plan A1, A2)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gptforge.train import checkpoint as ck
from tests.conftest import TINY_MODEL, TINY_TRAIN

ARGS = [
    *TINY_MODEL,
    *TINY_TRAIN,
    "--model.dropout=0.1",
    "--train.max_steps=150",
    "--train.save_every=10",
    "--train.eval_every=50",
    "--train.keep_last=2",
]


def start(run: Path, corpus: Path, resume: bool, env_extra: dict | None = None) -> subprocess.Popen:
    # Steps slowed to >= 10 ms so that on any hardware the kills land while training runs, never after it ended.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTFORGE_FAULT": "step_sleep=0.01", **(env_extra or {})}
    cmd = [sys.executable, "-m", "gptforge", "pretrain", f"--run_dir={run}", f"--input={corpus}", *ARGS]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def trained_steps(run: Path) -> int:
    m = run / "pretrain" / "metrics.jsonl"
    try:
        lines = m.read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((int(ln.split('"step": ')[1].split(",")[0]) for ln in lines if '"step": ' in ln), default=-1)


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("training made no progress")


def final_weights_hash(run: Path) -> str:
    last = ck.latest(run / "pretrain" / "checkpoints")
    assert last.name == "step-00000150"
    return ck.verify(last)["model.safetensors"]


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path, corpus, tokenizer_run):
    rng = random.Random(20261124)
    ref, run = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, run):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")

    p = start(ref, corpus, resume=False)
    assert p.wait() == 0, p.stderr.read().decode()

    kills = 0
    # Three kills at random moments during training, after a random amount of progress.
    for _ in range(3):
        p = start(run, corpus, resume=kills > 0)
        target = trained_steps(run) + rng.randint(3, 25)
        assert wait_for(lambda t=target: trained_steps(run) >= t, p), "the run ended before its kill"
        time.sleep(rng.uniform(0.0, 0.2))
        assert p.poll() is None, "the run ended before its kill"
        p.send_signal(signal.SIGKILL)
        kills += 1
        p.wait()
    # One kill inside a checkpoint write: the save pauses after its data files, before the manifest commits it.
    ckpts = run / "pretrain" / "checkpoints"
    for stale in ckpts.glob(".tmp-step-*"):  # left by an earlier kill: wait for a temp folder of this process
        shutil.rmtree(stale)
    p = start(run, corpus, resume=True, env_extra={"GPTFORGE_FAULT": "step_sleep=0.01,save_sleep=2"})
    assert wait_for(lambda: any(ckpts.glob(".tmp-step-*")), p)
    time.sleep(rng.uniform(0.1, 1.0))
    assert p.poll() is None
    p.send_signal(signal.SIGKILL)
    kills += 1
    p.wait()
    assert any(ckpts.glob(".tmp-step-*"))  # the half-written checkpoint is there, uncommitted
    assert kills == 4

    p = start(run, corpus, resume=True)
    assert p.wait() == 0, p.stderr.read().decode()
    assert not any(ckpts.glob(".tmp-step-*"))
    assert final_weights_hash(run) == final_weights_hash(ref)
