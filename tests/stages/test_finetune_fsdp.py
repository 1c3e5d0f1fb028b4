"""`gptforge finetune --parallel fsdp` through torchrun on 2 CPU processes (gloo), and activation checkpointing.

2 sharded processes see the same global batches as 1 process with gradient accumulation 2, so the loss and
validation trajectories agree (classifier with its head; chat with LoRA adapters, frozen base weights and activation
checkpointing); the checkpoints hold full weights that load in one process and give the 1-process run's logits; a
run resumed at world size 2 ends on the very weights of the uninterrupted one; at world size 1 it resumes on the same
trajectory when a step reads the same examples (accumulation 2), and is refused naming that number otherwise.
Checkpointing alone (1 process, dropout on) gives the same losses as without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.artifacts import sha256_file
from gptforge.train.models import load_for_inference
from tests.stages.ft_helpers import (
    chat_records,
    classify_records,
    finetune_args,
    read_json,
    read_jsonl,
    run_cli,
    write_jsonl,
)

# 8 steps, checkpoints at 4 and 8 (both kept), a validation pass at each; no early stop, so both runs do 8 steps.
BUDGET = [
    "--epochs=0",
    "--train.max_steps=8",
    "--evals_per_epoch=0",
    "--train.eval_every=4",
    "--train.save_every=4",
    "--train.keep_last=3",
    "--train.log_every=1",
    "--train.warmup_steps=2",
    "--train.early_stop_patience=0",
    "--train.lr=3e-3",
]
FSDP = ["--parallel=fsdp"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m gptforge ...` on CPU (gloo), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gptforge"]
    return subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def _metric(ft: Path, key: str) -> list[float]:
    return [r[key] for r in read_jsonl(ft / "metrics.jsonl") if key in r]


def _assert_same_run(one: Path, two: Path) -> None:
    """The same loss at every step and the same validation metrics at every pass and at the end."""
    a, b = _metric(one, "loss"), _metric(two, "loss")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert _metric(one, "val_loss") == pytest.approx(_metric(two, "val_loss"), rel=1e-4, abs=1e-4)
    end_a, end_b = read_json(one / "summary.json")["val"], read_json(two / "summary.json")["val"]
    floats = {k for k, v in end_a.items() if isinstance(v, float)}
    assert floats and {k: end_a[k] for k in floats} == pytest.approx({k: end_b[k] for k in floats}, rel=1e-4, abs=1e-4)


def _inputs(n_vocab: int) -> torch.Tensor:
    return torch.randint(0, n_vocab, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """32 training examples (4 global batches of 8: no epoch tail that 1 and 2 processes would cut differently)."""
    d = tmp_path_factory.mktemp("fsdp_cls")
    recs = classify_records(corpus, 20)
    return write_jsonl(d / "train.jsonl", recs[:32]), write_jsonl(d / "val.jsonl", recs[32:])


def test_fsdp_classify_matches_one_process_loads_and_resumes_exactly(tmp_path, cls_files, trained_run, capsys):
    train, val = cls_files
    init = trained_run / "pretrain"
    args = ["--task=classify", f"--val_file={val}", *BUDGET]
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path / "one", init, train, *args, "--train.grad_accum=2"))
    assert rc == 0, err
    proc = torchrun(*finetune_args(tmp_path / "two", init, train, *args, *FSDP))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "finetune" / "classify", tmp_path / "two" / "finetune" / "classify"
    _assert_same_run(one, two)
    assert read_json(two / "summary.json")["val"]["val_accuracy"] > 0.5  # the head did learn something
    # The checkpoint holds the full weights (head included): one process loads it and gets the 1-process logits.
    a, _, meta = load_for_inference(one / "checkpoints" / "step-00000008")
    b, _, meta_b = load_for_inference(two / "checkpoints" / "step-00000008")
    assert meta_b["world_size"] == 2 and meta["world_size"] == 1 and meta_b["data"] == meta["data"]
    x = _inputs(300)
    lengths = torch.tensor([16, 9])
    torch.testing.assert_close(a(x, lengths), b(x, lengths), atol=1e-4, rtol=1e-4)

    # Resume from the step-4 checkpoint to 8 at world size 2: the same weights as the uninterrupted 8 steps.
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "two", split)
    ft = split / "finetune" / "classify"
    shutil.rmtree(ft / "checkpoints" / "step-00000008")
    (ft / "checkpoints" / "best.json").unlink(missing_ok=True)
    proc = torchrun(*finetune_args(split, init, train, *args, *FSDP, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 4" in proc.stdout
    name = "checkpoints/step-00000008/model.safetensors"
    assert sha256_file(ft / name) == sha256_file(two / name)
    # ... and at world size 1 from the same step-4 checkpoint: refused while a step would read fewer examples ...
    solo = tmp_path / "solo"
    shutil.copytree(tmp_path / "two", solo)
    ckpts = solo / "finetune" / "classify" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000008")
    assert read_json(ckpts / "best.json")["step"] == 4  # as a crash after step 4 would leave it
    rc, _, err = run_cli(capsys, *finetune_args(solo, init, train, *args, "--resume"))
    assert rc == 2 and "sequences per optimizer step: checkpoint 8, config 4" in err
    assert "--train.global_batch_size=8" in err
    # ... and resumed with accumulation 2: the rest of the uninterrupted trajectory, unsharded.
    rc, out, err = run_cli(capsys, *finetune_args(solo, init, train, *args, "--resume", "--train.grad_accum=2"))
    assert rc == 0, err
    assert "(step 4)" in out and "saved by 2 process(es), resumed by 1" in out
    _assert_same_run(one, solo / "finetune" / "classify")
    c, _, _ = load_for_inference(solo / "finetune" / "classify" / "checkpoints" / "step-00000008")
    torch.testing.assert_close(a(x, lengths), c(x, lengths), atol=1e-4, rtol=1e-4)


def test_fsdp_chat_lora_with_checkpointing_matches_one_process(tmp_path, corpus, trained_run, capsys):
    """LoRA: frozen base weights and trainable adapters in the same FSDP units, a root unit with nothing to train."""
    d = tmp_path / "data"
    d.mkdir()
    train = write_jsonl(d / "train.jsonl", chat_records(corpus, 16))
    val = write_jsonl(d / "val.jsonl", chat_records(corpus, 4, offset=16))
    # pack=false: 16 rows, 2 global batches of 8, so an epoch ends at the same step for 1 and 2 processes.
    args = ["--task=chat", f"--val_file={val}", "--pack=false", "--lora.rank=4", "--samples=1", *BUDGET]
    init = trained_run / "pretrain"
    rc, _, err = run_cli(capsys, *finetune_args(tmp_path / "one", init, train, *args, "--train.grad_accum=2"))
    assert rc == 0, err
    proc = torchrun(*finetune_args(tmp_path / "two", init, train, *args, *FSDP, "--activation_checkpointing"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "finetune" / "chat", tmp_path / "two" / "finetune" / "chat"
    _assert_same_run(one, two)
    # The chat sample is generated by rank 0 alone after training: it must not wait on the other rank.
    assert read_jsonl(two / "samples.jsonl")[0]["reply"] == read_jsonl(one / "samples.jsonl")[0]["reply"]
    a, _, _ = load_for_inference(one)
    b, _, meta = load_for_inference(two)  # adapters gathered with the frozen weights, then merged
    assert meta["lora"]["rank"] == 4
    x = _inputs(300)
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_and_compiled_optimizer_give_the_same_losses(tmp_path, cls_files, trained_run, capsys):
    """1 process, dropout on: the recomputation replays the dropout masks, so the losses agree to rounding; the
    compiled AdamW step rounds differently from the fused kernel in the last bits only."""
    train, val = cls_files
    args = ["--task=classify", f"--val_file={val}", "--dropout=0.1", *BUDGET, "--train.max_steps=4"]
    runs = []
    variants = (("plain", []), ("ac", ["--activation_checkpointing"]), ("co", ["--compile_optimizer"]))
    for name, extra in variants:
        rc, _, err = run_cli(capsys, *finetune_args(tmp_path / name, trained_run / "pretrain", train, *args, *extra))
        assert rc == 0, err
        runs.append(tmp_path / name / "finetune" / "classify")
    plain, ac, co = (_metric(r, "loss") for r in runs)
    assert len(plain) == 4 and plain == pytest.approx(ac, rel=1e-6, abs=1e-6)
    assert _metric(runs[0], "val_loss") == pytest.approx(_metric(runs[1], "val_loss"), rel=1e-6, abs=1e-6)
    assert "activation_checkpointing: true" in (runs[1] / "config.yaml").read_text()
    assert plain == pytest.approx(co, rel=1e-5, abs=1e-5)
    assert "compile_optimizer: true" in (runs[2] / "config.yaml").read_text()
    assert _metric(runs[0], "val_loss") == pytest.approx(_metric(runs[2], "val_loss"), rel=1e-5, abs=1e-5)
