"""FSDP2 (`--parallel fsdp`) through torchrun on 2 CPU processes (gloo), and activation checkpointing.

2 sharded processes see the same global batches as 1 process with gradient accumulation 2, so the loss trajectories
agree; a checkpoint written at world size 2 holds full weights (it loads in one process) and resumes at world size 2
to the very weights of an uninterrupted run, and at world size 1 (same sequences per step) on the 1-process run's
trajectory."""

from __future__ import annotations

import shutil

import pytest
import torch

from gptforge.artifacts import sha256_file
from gptforge.cli import main
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.train.models import load_for_inference
from gptforge.train.parallel import apply_activation_checkpointing
from tests.test_ddp import ARGS, _metric, torchrun

FSDP = ["--parallel=fsdp"]


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, corpus, tokenizer_run, capsys):
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    for d in (one, two):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")
    assert main(["pretrain", f"--run_dir={one}", f"--input={corpus}", *ARGS, "--train.grad_accum=2"]) == 0
    proc = torchrun(two, corpus, *FSDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metric(one, "loss") == pytest.approx(_metric(two, "loss"), rel=1e-4, abs=1e-4)
    assert _metric(one, "val_loss") == pytest.approx(_metric(two, "val_loss"), rel=1e-4, abs=1e-4)
    # The checkpoint holds the full weights: one process loads it and computes what the 1-process run computes.
    a, _, _ = load_for_inference(one / "pretrain" / "checkpoints" / "step-00000008")
    b, _, _ = load_for_inference(two / "pretrain" / "checkpoints" / "step-00000008")
    x = torch.randint(0, 300, (1, 16))
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-4, rtol=1e-4)

    # Resume from the step-4 checkpoint to 8 at world size 2: the same weights as the uninterrupted 8 steps.
    shutil.copytree(two, split)
    shutil.rmtree(split / "pretrain" / "checkpoints" / "step-00000008")
    (split / "pretrain" / "checkpoints" / "best.json").unlink(missing_ok=True)
    proc = torchrun(split, corpus, *FSDP, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "pretrain/checkpoints/step-00000008/model.safetensors"
    assert sha256_file(split / name) == sha256_file(two / name)
    # At world size 1 the sharded checkpoint resumes with the same 8 sequences per step (full weights and optimizer
    # state keyed by name): steps 9-10 continue the 1-process run's trajectory. With 4 per step it is refused.
    two_more = ["pretrain", f"--input={corpus}", *ARGS, "--train.max_steps=10", "--resume"]
    rc = main([*two_more, f"--run_dir={two}", *FSDP])
    assert rc == 2 and "sequences per optimizer step: checkpoint 8, config 4" in capsys.readouterr().err
    for run in (one, two):
        assert main([*two_more, f"--run_dir={run}", "--train.grad_accum=2"]) == 0
    assert _metric(one, "loss") == pytest.approx(_metric(two, "loss"), rel=1e-4, abs=1e-4)
    assert len(_metric(two, "loss")) == 10


def test_fsdp_bf16_gathers_bf16_weights_and_tracks_one_process(tmp_path, corpus, tokenizer_run):
    """bf16 autocast under FSDP2: weights are gathered in bf16 and gradients reduced in fp32 (said in the log), the
    sharded master weights stay fp32 (the checkpoint), and the losses track a 1-process bf16 run to bf16 rounding."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(tokenizer_run / "tokenizer", d / "tokenizer")
    bf16 = [*ARGS, "--dtype=bfloat16"]
    assert main(["pretrain", f"--run_dir={one}", f"--input={corpus}", *bf16, "--train.grad_accum=2"]) == 0
    proc = torchrun(two, corpus, *FSDP, "--dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights gathered in bfloat16, gradients reduced in float32" in proc.stdout
    a, b = _metric(one, "loss"), _metric(two, "loss")
    assert len(a) == len(b) == 8 and a == pytest.approx(b, rel=2e-2, abs=2e-2)
    m, _, _ = load_for_inference(two / "pretrain" / "checkpoints" / "step-00000008")
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = GPTConfig(vocab_size=128, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(cfg).train()
    ckpt = GPT(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    x = torch.randint(0, 128, (2, 24))
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks; the recomputation must replay them
        loss = m(x, x)[1]
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert set(plain.state_dict()) == set(ckpt.state_dict())  # checkpoints are unchanged


def test_activation_checkpointing_flag_trains(tmp_path, corpus, tokenizer_run):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
    args = [f"--run_dir={run}", f"--input={corpus}", *ARGS, "--train.max_steps=2", "--activation_checkpointing"]
    assert main(["pretrain", *args]) == 0
