"""Automatic batch settings: the memory estimate against what the model measurably keeps, the plan's arithmetic
against a hand-made memory budget, and the stages using it."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gptforge.model.gpt import GPT, GPTConfig
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
    # bf16 autocast does not halve them: norms keep fp32 tensors and each projection keeps its own bf16 cast.
    assert four["activations"] // 2 < estimate_bytes(CFG, N, 4, 256, 2)["activations"] < four["activations"]


# Small models covering each branch of the estimate: SwiGLU and GELU, MHA and GQA, packed rows (a mask per
# attention call), and GPT-2 style (LayerNorm, learned positions, biases) with dropout, which on CPU sends attention
# to SDPA's math kernel. name -> (config, packed)
GQA = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_kv_head=1, n_embd=64)
MEASURED = {
    "swiglu": (GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64), False),
    "swiglu-gqa": (GQA, False),
    "swiglu-gqa-packed": (GQA, True),
    "gelu-gqa": (GQA.model_copy(update={"n_kv_head": 2, "mlp": "gelu"}), False),
    "gpt2-dropout": (
        GQA.model_copy(
            update={"n_kv_head": 2, "mlp": "gelu", "norm": "layernorm", "pos": "learned", "bias": True, "dropout": 0.1}
        ),
        False,
    ),
}


def _is_weight_copy(t: torch.Tensor) -> bool:
    """Whether a saved tensor is autocast's copy of a parameter (a cast of a leaf, maybe seen through a view)."""
    fn = t.grad_fn
    while fn is not None and len(fn.next_functions) == 1 and type(fn).__name__ != "ToCopyBackward0":
        fn = fn.next_functions[0][0]  # t() / view of the copy, as a matmul saves it
    return (
        fn is not None
        and type(fn).__name__ == "ToCopyBackward0"
        and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    )


def _loss(model: GPT, idx: torch.Tensor, bf16: bool, packed: bool = False) -> torch.Tensor:
    """Forward + loss as the trainer runs it: under autocast when bf16, the model's fp32 cross-entropy; packed rows
    hold two sequences each."""
    segments = (torch.arange(idx.size(1)) >= idx.size(1) // 2).long().expand_as(idx) if packed else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(idx, idx, segment_ids=segments)[1]


def _saved_bytes(cfg: GPTConfig, micro: int, bf16: bool, packed: bool) -> tuple[int, int]:
    """(bytes of the activations autograd saves for the backward pass, bytes of saved weight copies), counting each
    storage once and leaving out the model's own parameters and buffers."""
    torch.manual_seed(0)
    model = GPT(cfg)
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    acts: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            (copies if _is_weight_copy(t) else acts)[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (micro, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, idx, bf16, packed)
    return sum(acts.values()), sum(copies.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MEASURED))
def test_estimate_covers_the_measured_saved_tensors_and_is_not_loose(name, bf16):
    """The estimate is an upper bound of what the model keeps for the backward pass plus the logits' gradients, and
    at most 1.6 x that, at two micro-batch sizes (both grow linearly with it). One more layer adds at least what it
    measurably keeps (exactly that with RMSNorm), so no per-layer term can hide behind the others' margins."""
    (cfg, packed), act_bytes = MEASURED[name], 2 if bf16 else 4
    n = sum(p.numel() for p in GPT(cfg).parameters())
    measured = {}
    for micro in (1, 3):
        saved, copies = _saved_bytes(cfg, micro, bf16, packed)
        est = estimate_bytes(cfg, n, micro, cfg.block_size, act_bytes, packed=packed)
        # log_softmax's backward holds two fp32 (tokens, V) gradients beside what was saved: log-probs and logits.
        grads = 2 * 4 * micro * cfg.block_size * cfg.vocab_size
        needed, estimated = saved + grads, est["activations"] + est["logits"]
        assert needed <= estimated <= 1.6 * needed, (micro, needed, estimated)
        assert est["states"] - 16 * n == copies  # the bf16 weight copies, exactly (none in fp32)
        measured[micro] = saved
    assert measured[3] == pytest.approx(3 * measured[1], rel=0.01)
    deeper = cfg.model_copy(update={"n_layer": cfg.n_layer + 1})
    layer_measured = _saved_bytes(deeper, 1, bf16, packed)[0] - measured[1]
    layer_estimated = estimate_bytes(deeper, n, 1, cfg.block_size, act_bytes, packed=packed)["activations"]
    layer_estimated -= estimate_bytes(cfg, n, 1, cfg.block_size, act_bytes, packed=packed)["activations"]
    assert layer_measured <= layer_estimated <= 1.2 * layer_measured


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages that the ops run under it create and that are still referenced: a CPU stand-in for
    `torch.cuda.max_memory_allocated`, checked after every op so that an op's inputs and outputs count together."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.live, self.peak = skip, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: (ref, nbytes) for ptr, (ref, nbytes) in self.live.items() if not ref.expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (ptr := t.untyped_storage().data_ptr()) and ptr not in self.skip:
                self.live.setdefault(ptr, (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


@pytest.mark.parametrize("vocab", [64, 2048], ids=["peak-in-a-block", "peak-at-the-loss"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_estimate_covers_the_peak_of_a_forward_and_backward_pass(vocab, bf16):
    """Everything allocated during forward, loss and backward (activations, gradients in flight, parameter
    gradients, weight copies) stays within the estimate less the weights and AdamW moments, which exist before. A
    small vocabulary puts the peak inside a block's backward pass, a large one at the loss's. (Not a looseness check:
    the parameter gradients counted in full are mostly not allocated yet at the peak.)"""
    cfg = MEASURED["swiglu"][0].model_copy(update={"vocab_size": vocab, "n_layer": 3})
    torch.manual_seed(0)
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, vocab, (2, cfg.block_size))
    with _PeakBytes({t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}) as mode:
        _loss(model, idx, bf16).backward()
    est = estimate_bytes(cfg, n, 2, cfg.block_size, 2 if bf16 else 4)
    assert mode.peak <= est["total"] - 12 * n


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
