"""Automatic batch settings: the plan's arithmetic against a hand-made memory budget, and the stages using it."""

from __future__ import annotations

import pytest
import yaml

from gptforge.model.gpt import GPTConfig
from gptforge.train.autobatch import GIB, estimate_bytes, plan_batch
from tests.conftest import pretrain

CFG = GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256)
N = 5_000_000


def plan(free_gib: float, global_batch: int = 64, micro: int = 0, world: int = 1, accum: int = 1):
    return plan_batch(CFG, N, 256, world, global_batch, micro, accum, int(free_gib * GIB))


def test_estimate_is_states_plus_linear_in_the_micro_batch():
    one, four = estimate_bytes(CFG, N, 1, 256, 4), estimate_bytes(CFG, N, 4, 256, 4)
    assert one["states"] == four["states"] == 16 * N
    assert four["activations"] == 4 * one["activations"] and four["logits"] == 4 * one["logits"]
    assert estimate_bytes(CFG, N, 4, 256, 2)["activations"] == four["activations"] // 2  # bf16 activations


def test_more_memory_gives_a_bigger_micro_batch_and_the_same_global_batch():
    small, big = plan(0.3), plan(4.0)
    assert small.micro_batch_size < big.micro_batch_size
    for p in (small, big):
        assert p.micro_batch_size * p.grad_accum == p.global_batch_size == 64
        assert p.estimate_bytes <= p.budget_bytes  # it fits what it was given
        # ... and the next power of two would not, unless the whole batch already fits in one pass.
        if p.micro_batch_size < 64:
            bigger = estimate_bytes(CFG, N, 2 * p.micro_batch_size, 256, 4)["total"]
            assert bigger > p.budget_bytes
    assert "global batch 64 sequences = micro-batch" in small.reason and "GiB" in small.reason


def test_processes_share_the_global_batch_and_overrides_are_kept():
    p = plan(4.0, global_batch=64, world=4)
    assert p.micro_batch_size * p.grad_accum * 4 == 64 and "4 processes" in p.reason
    p = plan(4.0, global_batch=64, micro=8)
    assert (p.micro_batch_size, p.grad_accum) == (8, 8) and "override" in p.reason
    p = plan(4.0, global_batch=0, micro=0, accum=3)  # no global target: only the micro-batch is chosen
    assert p.grad_accum == 3 and p.micro_batch_size >= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(free_gib=4.0, global_batch=64, micro=24), "not a multiple of train.micro_batch_size 24"),
        (dict(free_gib=4.0, global_batch=30, world=4), "not divisible by the 4 processes"),
        (dict(free_gib=0.01), "even a micro-batch of 1 sequence"),
    ],
)
def test_impossible_requests_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


def test_pretrain_resolves_prints_and_saves_the_batch(tmp_path, corpus, tokenizer_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tokenizer_run / "tokenizer", run / "tokenizer")
    rc = pretrain(run, corpus, "--train.max_steps=2", "--train.micro_batch_size=0", "--train.global_batch_size=8")
    out = capsys.readouterr().out
    assert rc == 0 and "batch: global batch 8 sequences = micro-batch" in out
    saved = yaml.safe_load((run / "pretrain" / "config.yaml").read_text())["train"]
    assert saved["micro_batch_size"] * saved["grad_accum"] == 8 and saved["global_batch_size"] == 0
    # Resuming with the automatic setting keeps the checkpoint's micro-batch (and so its data order).
    rc = pretrain(run, corpus, "--train.max_steps=3", "--train.micro_batch_size=0", "--train.global_batch_size=8",
                  "--resume")  # fmt: skip
    assert rc == 0, capsys.readouterr().err


def test_an_automatic_resume_keeps_the_step_batch_and_fits_todays_memory(tmp_path, monkeypatch):
    """A run that chose its micro-batch automatically resumes with the same sequences per optimizer step, even when
    less memory is free now: the micro-batch shrinks and accumulation makes up the difference."""
    import json

    import torch

    from gptforge.model.gpt import GPT
    from gptforge.runtime import Runtime
    from gptforge.train import autobatch
    from gptforge.train.checkpoint import STEP_BATCH
    from gptforge.train.trainer import TrainConfig

    small = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32)
    model, rt = GPT(small), Runtime(device=torch.device("cpu"), dtype=torch.float32)
    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"data": {STEP_BATCH: 16}}))
    n = sum(p.numel() for p in model.parameters())
    # Today only a 4-sequence micro-batch fits in the budget (80% of what is free).
    free = int((estimate_bytes(small, n, 4, 32, 4)["total"] + 1) / 0.8)
    assert estimate_bytes(small, n, 8, 32, 4)["total"] > 0.8 * free
    monkeypatch.setattr(autobatch, "free_memory_bytes", lambda device: free)
    auto = TrainConfig(micro_batch_size=0, global_batch_size=0, grad_accum=1)
    resolved, plan = autobatch.resolve_batch(auto, model, 32, rt, resume_from=ckpt)
    assert (resolved.micro_batch_size, resolved.grad_accum) == (4, 4) and plan.global_batch_size == 16
    fresh, _ = autobatch.resolve_batch(auto, model, 32, rt)  # a fresh start just takes what fits
    assert (fresh.micro_batch_size, fresh.grad_accum) == (4, 1)


def _plan_on_rank(rank: int, init_file: str, frees: list[int], out_dir: str) -> None:
    """One process of a 2-process gloo group whose free memory is frees[rank]: writes the micro-batch it chose."""
    import json
    from pathlib import Path

    import torch

    from gptforge.model.gpt import GPT
    from gptforge.runtime import Runtime
    from gptforge.train import autobatch
    from gptforge.train.trainer import TrainConfig

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        autobatch.free_memory_bytes = lambda device: frees[rank]
        rt = Runtime(torch.device("cpu"), torch.float32, rank=rank, world_size=2)
        model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32))
        cfg, _ = autobatch.resolve_batch(TrainConfig(micro_batch_size=0, global_batch_size=16), model, 32, rt)
        Path(out_dir, f"{rank}.json").write_text(json.dumps([cfg.micro_batch_size, cfg.grad_accum]))
    finally:
        torch.distributed.destroy_process_group()


def test_processes_with_different_free_memory_agree_on_one_plan(tmp_path):
    """Two nodes, one with room for 8 sequences per micro-batch and one for 2: both take the plan that fits the
    smaller (a different split per rank would read the wrong windows and, under FSDP, hang the collectives)."""
    import json

    import torch.multiprocessing as mp

    from gptforge.model.gpt import GPT

    small = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32)
    n = sum(p.numel() for p in GPT(small).parameters())

    def room_for(m: int) -> int:
        return int((estimate_bytes(small, n, m, 32, 4)["total"] + 1) / 0.8)

    frees = [room_for(8), room_for(2)]
    mp.spawn(_plan_on_rank, args=(str(tmp_path / "store"), frees, str(tmp_path)), nprocs=2, join=True)
    plans = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert plans == [[2, 4], [2, 4]]
