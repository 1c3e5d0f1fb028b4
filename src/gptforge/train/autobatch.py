"""Automatic batch settings: the micro-batch size and gradient accumulation that give a requested global batch and
fit in the memory at hand.

A user thinks in global batch (sequences per optimizer step, which sets the optimization), the machine decides the
micro-batch (sequences per forward pass, which sets the memory). `train.global_batch_size` asks for the first;
`train.micro_batch_size: 0` lets this module pick the second, and `grad_accum` follows as
global / (micro x processes). An explicit micro-batch size is an override and is used as given.

The memory is an estimate, not a trial run (a trial would cost a forward and backward per candidate and cannot be
done for CPU RAM without risking the OOM killer): per process, fp32 weights, gradients and two AdamW moments
(16 bytes per parameter), plus activations per token of about 34 x n_embd x n_layer values kept for the backward
pass (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", with attention
scores never materialized, as SDPA's fused kernels do), plus the logits and their gradient in fp32. The largest
power-of-two micro-batch that divides the per-process batch and whose estimate fits in `fraction` of the free memory
is chosen. Free memory: `torch.cuda.mem_get_info` on CUDA, MPS's recommended working set, `MemAvailable` on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.model.gpt import GPTConfig

GIB = 2**30


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    estimate_bytes: int  # estimated peak per process for the chosen micro-batch
    budget_bytes: int  # the part of free memory the plan may use (0 = not measured)
    reason: str


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for this process's tensors on `device`, in bytes (0 when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def estimate_bytes(cfg: GPTConfig, n_params: int, micro: int, seq_len: int, act_bytes: int) -> dict[str, int]:
    """Estimated peak memory of one training step per process: {'states', 'activations', 'logits', 'total'}."""
    states = 16 * n_params  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq
    tokens = micro * seq_len
    width = max(cfg.n_embd, cfg.n_head * cfg.head_dim)
    # 34 values per hidden unit per layer at 2 bytes each in the paper; scaled to the activation dtype here.
    activations = tokens * cfg.n_layer * width * 34 * act_bytes // 2
    logits = tokens * cfg.vocab_size * (act_bytes + 4 + 4)  # logits, their fp32 copy for the loss, the gradient
    return {"states": states, "activations": activations, "logits": logits, "total": states + activations + logits}


def plan_batch(
    cfg: GPTConfig,
    n_params: int,
    seq_len: int,
    world_size: int,
    global_batch_size: int,
    micro_batch_size: int,
    grad_accum: int,
    free_bytes: int,
    act_bytes: int = 4,
    fraction: float = 0.8,
    device: str = "cpu",
) -> BatchPlan:
    """Resolve (micro_batch_size, grad_accum) for a global batch (0 = micro x accum x world as given) and a
    micro-batch size (0 = the largest that fits). Raises ValueError naming the setting that cannot be met."""
    budget = int(free_bytes * fraction)
    free_txt = f"{fraction:.0%} of the {free_bytes / GIB:.1f} GiB free on {device}" if free_bytes else "unknown memory"

    def est(m: int) -> dict[str, int]:
        return estimate_bytes(cfg, n_params, m, seq_len, act_bytes)

    def describe(m: int) -> str:
        e = est(m)
        return (
            f"estimated peak {e['total'] / GIB:.2f} GiB per process (weights+grads+AdamW {e['states'] / GIB:.2f}, "
            f"activations {e['activations'] / GIB:.2f}, logits {e['logits'] / GIB:.2f})"
        )

    if global_batch_size:
        if global_batch_size % world_size:
            raise ValueError(
                f"train.global_batch_size {global_batch_size} is not divisible by the {world_size} processes"
            )
        per_rank = global_batch_size // world_size
    else:
        per_rank = 0  # no global target: the micro-batch is free, grad_accum stays as given
    if micro_batch_size:  # an explicit micro-batch size is an override
        micro, how = micro_batch_size, "micro-batch size as given (override)"
        if per_rank and per_rank % micro:
            raise ValueError(
                f"train.global_batch_size {global_batch_size} is not a multiple of train.micro_batch_size {micro} x "
                f"{world_size} processes; set train.micro_batch_size: 0 to choose one automatically"
            )
    else:
        limit = per_rank or 1024
        candidates = [m for m in (2**k for k in range(11)) if m <= limit and (not per_rank or per_rank % m == 0)]
        fitting = [m for m in candidates if not budget or est(m)["total"] <= budget]
        if not fitting:
            raise ValueError(
                f"even a micro-batch of 1 sequence of {seq_len} tokens does not fit: {describe(1)} > {free_txt}; "
                "lower model.block_size or the model size, or free memory"
            )
        micro = fitting[-1]
        bound = "the largest power of two" + (f" dividing {per_rank}" if per_rank else "")
        how = f"{bound} that fits {free_txt}" if budget else f"{bound} (free memory unknown: not checked)"
    accum = per_rank // micro if per_rank else grad_accum
    total = micro * accum * world_size
    reason = (
        f"global batch {total} sequences = micro-batch {micro} x grad_accum {accum} x {world_size} process"
        f"{'es' if world_size > 1 else ''}; micro-batch: {how}; {describe(micro)}"
    )
    return BatchPlan(micro, accum, total, est(micro)["total"], budget, reason)


def agreed_free_memory(runtime) -> int:
    """The least free memory over all processes (a process that cannot read it does not count; 0 when none can).
    Collective when distributed: every rank must reach the same plan, or their samplers would read different
    windows and FSDP's collectives would fall out of step (nodes of one job can differ in free memory)."""
    free = free_memory_bytes(runtime.device)
    if not runtime.distributed:
        return free
    unknown = 2**62
    t = torch.tensor([free or unknown], dtype=torch.int64, device=runtime.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return 0 if int(t.item()) == unknown else int(t.item())


def resolve_batch(
    train_cfg, model: torch.nn.Module, seq_len: int, runtime, sharded: bool = False, resume_from: Path | None = None
) -> tuple[object, BatchPlan | None]:
    """(train config with concrete micro_batch_size and grad_accum, the plan or None when nothing was automatic),
    printed with its reason on rank 0. Used by pretraining and fine-tuning before any data is drawn; the resolved
    values are what gets saved. `sharded`: FSDP keeps 1/world of the weights, gradients and optimizer states on each
    process. `resume_from`: the checkpoint a run resumes from; an automatic micro-batch with no global batch asked for
    then keeps its sequences per optimizer step (free memory differs between starts; the data order must not)."""
    if train_cfg.micro_batch_size == 0 and not train_cfg.global_batch_size and resume_from is not None:
        from gptforge.train.checkpoint import STEP_BATCH, read_meta

        # The step's batch must stay what it was; the split into micro-batches may follow today's free memory.
        if saved := read_meta(resume_from).get("data", {}).get(STEP_BATCH):
            train_cfg = train_cfg.model_copy(update={"global_batch_size": int(saved)})
    if not train_cfg.global_batch_size and train_cfg.micro_batch_size:
        return train_cfg, None
    gpt = getattr(model, "gpt", model)
    plan = plan_batch(
        gpt.config,
        sum(p.numel() for p in model.parameters()) // (runtime.world_size if sharded else 1),
        seq_len,
        runtime.world_size,
        train_cfg.global_batch_size,
        train_cfg.micro_batch_size,
        train_cfg.grad_accum,
        agreed_free_memory(runtime),
        act_bytes=2 if runtime.dtype != torch.float32 else 4,
        device=str(runtime.device),
    )
    if runtime.is_main:
        print(f"batch: {plan.reason}")
    update = {"micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum, "global_batch_size": 0}
    return train_cfg.model_copy(update=update), plan
