"""Automatic batch settings: the micro-batch size and gradient accumulation that give a requested global batch and
fit in the memory at hand.

A user thinks in global batch (sequences per optimizer step, which sets the optimization), the machine decides the
micro-batch (sequences per forward pass, which sets the memory). `train.global_batch_size` asks for the first;
`train.micro_batch_size: 0` lets this module pick the second, and `grad_accum` follows as
global / (micro x processes). An explicit micro-batch size is an override and is used as given.

The memory is an estimate, not a trial run (a trial would cost a forward and backward per candidate and cannot be
done for CPU RAM without risking the OOM killer). It is meant as an upper bound of the peak of one training step of
`gptforge.model.gpt` run eagerly, counted tensor by tensor from what that model keeps for the backward pass rather
than from a published constant: Korthikanti et al. 2022's 34 values per hidden unit assume one 2-byte copy of each
input, while autocast over fp32 weights keeps more (the norms save fp32, every projection keeps its own bf16 cast of
the norm output, SwiGLU keeps four hidden-width tensors), so an estimate built on 34 picks micro-batches that run out
of memory. Per process, with C n_embd, H/K query/key-value heads, D head dim, F MLP width, V vocab, T
sequence length and a bytes per activation (2 under bf16 autocast, 4 in fp32):
- states: fp32 weights, gradients and two AdamW moments (16 bytes per parameter), plus under bf16 autocast the bf16
  copy of every matmul weight that autograd keeps from the forward to the backward pass;
- activations per token and layer: two norms (8C + 4 each, plus their output once in fp32 or once per reading
  projection in bf16: 3 for attention, 2 for SwiGLU, 1 for GELU), attention a(3HD + 2KD) + 4H with a fused kernel
  that never materializes the T x T scores, the MLP 4aF (SwiGLU) or 2aF (GELU), dropout masks, and a packed row's
  attention mask (aT); plus per token the final norm, the int64 token ids and targets, and one block's gradients in
  flight during the backward pass. At bf16 a SwiGLU layer keeps 57.4 x C bytes per token, a GELU one 50.1 x C;
- logits: (12 + a) V bytes per token: the loss's fp32 log-probabilities, the fp32 gradients of log-probabilities and
  logits that its backward holds at once, and the model's logits, which a caller may keep until the backward.
The tests measure on CPU what autograd saves (fp32 and bf16 autocast, SwiGLU and GELU, MHA and GQA, packed rows,
dropout), which the per-layer terms match exactly with RMSNorm, and the peak of a forward and backward pass; the
estimate covers both and is at most 1.6 x the first. `torch.compile` keeps less, so stays covered. Not covered: an
SDPA fallback to its math kernel on CUDA, which would keep the T x T scores (off CUDA, attention dropout does take the
math kernel and its scores are counted), and LoRA adapters' own activations (small beside the 16 bytes counted for
every frozen weight). The largest power-of-two micro-batch that divides the per-process batch and whose estimate fits
in `fraction` of the free memory is chosen; the rest absorbs allocator fragmentation and workspaces. Free memory:
`torch.cuda.mem_get_info` on CUDA, MPS's recommended working set, `MemAvailable` on CPU.
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


def _norm_bytes(c: int, act_bytes: int, readers: int) -> int:
    """Bytes per token kept by one RMSNorm and its output for the backward pass."""
    # Eager RMSNorm keeps its input (the residual stream, fp32 even under autocast: an fp32 embedding plus bf16
    # branch outputs promotes), x * rstd for the weight's gradient, and rstd. LayerNorm keeps less (input, mean, rstd).
    kept = 4 * c + 4 * c + 4
    # The output is kept by the projections reading it: one fp32 tensor, or under autocast one bf16 cast per reading
    # projection, since autocast caches casts of leaf weights only and casts an activation again for every matmul.
    return kept + (4 * c if act_bytes == 4 else act_bytes * c * readers)


def _matmul_weights(cfg: GPTConfig) -> int:
    """Elements of the weights that run through a matmul (the ones autocast copies to bf16)."""
    c, h, k, d, f = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
    per_layer = c * (h * d + 2 * k * d) + h * d * c + (3 if cfg.mlp == "swiglu" else 2) * c * f
    return cfg.n_layer * per_layer + cfg.vocab_size * c  # the LM head is a matmul even when tied to the embedding


def estimate_bytes(
    cfg: GPTConfig,
    n_params: int,
    micro: int,
    seq_len: int,
    act_bytes: int,
    device: str = "cpu",
    packed: bool = False,
) -> dict[str, int]:
    """Estimated peak memory of one training step per process: {'states', 'activations', 'logits', 'total'}.
    act_bytes: 2 under bf16 autocast over fp32 weights, 4 in fp32. device: where it runs ('cuda...' has fused
    attention kernels with dropout; elsewhere attention dropout falls back to the math kernel). packed: rows hold
    several sequences (`segment_ids`), so attention takes a (B, 1, T, T) mask."""
    if act_bytes not in (2, 4):
        raise ValueError(f"act_bytes must be 2 (bf16 autocast) or 4 (fp32), got {act_bytes}")
    a, swiglu = act_bytes, cfg.mlp == "swiglu"
    c, h, k, d, f = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
    states = 16 * n_params  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq
    if a == 2:
        # Each linear keeps the bf16 copy of its weight for the backward pass. Counted from the config, not from
        # n_params: FSDP gathers the full weights, so every process keeps copies of all of them.
        states += 2 * _matmul_weights(cfg)

    # Bytes per token kept by one block.
    layer = _norm_bytes(c, a, 3) + _norm_bytes(c, a, 2 if swiglu else 1)
    # Fused SDPA (flash, memory-efficient or cuDNN on CUDA, flash on CPU) keeps q and k after RoPE, v, the output and
    # one fp32 log-sum-exp per head, never the T x T scores; the transpose + reshape before c_proj copies the output
    # once more, and c_proj keeps that copy. RoPE itself keeps only its cos/sin buffers.
    layer += a * (2 * h * d + 2 * k * d + h * d) + 4 * h
    # SwiGLU keeps gate and up projections, silu(gate) and their product (the input of c_proj); GELU its input and
    # output.
    layer += a * f * (4 if swiglu else 2)
    fused_dropout = device.startswith("cuda")
    if cfg.dropout:
        if fused_dropout:
            layer += 2 * c  # bool masks after attention and MLP; the fused kernels keep only their RNG state
        else:
            # No fused SDPA kernel takes dropout off CUDA: the math kernel keeps 12 bytes per score (fp32
            # probabilities, mask, dropped probabilities) and fp32 q/k/v with k/v repeated to every query head
            # instead of the fused kernel's, and the masks after attention and MLP are float (measured on CPU).
            layer += 12 * h * seq_len + 4 * c + 8 * h * d - 2 * a * k * d
    if packed:
        # SDPA turns the bool mask into an additive one in the compute dtype inside every call, and the kernel keeps
        # it (the memory-efficient CUDA kernel pads its last dimension to a multiple of 16).
        layer += a * ((seq_len + 15) // 16 * 16)

    # Bytes per token kept outside the blocks, and in flight during the backward pass.
    rest = 3 * 8  # token ids, targets and learned-position ids as int64 (embeddings and the loss keep them)
    rest += _norm_bytes(c, a, 1)  # the final norm, read by the LM head
    # A block's backward pass holds the fp32 gradient of the residual stream and up to three hidden-width gradients
    # (the gradient of c_proj's input and of both factors of the SwiGLU product) before its saved tensors go.
    rest += 4 * c + 3 * a * f
    if cfg.dropout:
        rest += c if fused_dropout else 4 * c  # the embedding dropout's mask
    if packed:
        rest += 2 * seq_len  # the bool mask itself and the segment-equality tensor it is built from

    tokens = micro * seq_len
    activations = tokens * (cfg.n_layer * layer + rest)
    # The loss keeps fp32 log-probabilities (4 bytes); log_softmax's backward holds the fp32 gradients of the
    # log-probabilities and of the logits at once (4 + 4), while a caller may still hold the model's logits (a). The
    # fp32 copy of bf16 logits lives only during the forward pass, when neither gradient exists yet.
    logits = tokens * cfg.vocab_size * (12 + a)
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
    packed: bool = False,
) -> BatchPlan:
    """Resolve (micro_batch_size, grad_accum) for a global batch (0 = micro x accum x world as given) and a
    micro-batch size (0 = the largest that fits). Raises ValueError naming the setting that cannot be met."""
    budget = int(free_bytes * fraction)
    free_txt = f"{fraction:.0%} of the {free_bytes / GIB:.1f} GiB free on {device}" if free_bytes else "unknown memory"

    def est(m: int) -> dict[str, int]:
        return estimate_bytes(cfg, n_params, m, seq_len, act_bytes, device, packed)

    states_txt = "weights+grads+AdamW" + ("+bf16 weight copies" if act_bytes == 2 else "")

    def describe(m: int) -> str:
        e = est(m)
        return (
            f"estimated peak {e['total'] / GIB:.2f} GiB per process ({states_txt} {e['states'] / GIB:.2f}, "
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
    train_cfg,
    model: torch.nn.Module,
    seq_len: int,
    runtime,
    sharded: bool = False,
    resume_from: Path | None = None,
    packed: bool = False,
) -> tuple[object, BatchPlan | None]:
    """(train config with concrete micro_batch_size and grad_accum, the plan or None when nothing was automatic),
    printed with its reason on rank 0. Used by pretraining and fine-tuning before any data is drawn; the resolved
    values are what gets saved. `sharded`: FSDP keeps 1/world of the weights, gradients and optimizer states on each
    process. `resume_from`: the checkpoint a run resumes from; an automatic micro-batch with no global batch asked for
    then keeps its sequences per optimizer step (free memory differs between starts; the data order must not).
    `packed`: rows hold several sequences kept apart by an attention mask (fine-tuning's packed chat rows)."""
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
        packed=packed,
    )
    if runtime.is_main:
        print(f"batch: {plan.reason}")
    update = {"micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum, "global_batch_size": 0}
    return train_cfg.model_copy(update=update), plan
