"""Data parallelism (DDP or FSDP2) and activation checkpointing, applied to the model from outside the model file.

* DDP replicates the model and all-reduces gradients; `Trainer` skips that all-reduce on accumulation micro-steps
  (`no_sync`).
* FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer states over the processes:
  each Transformer block is one unit (gathered for its forward/backward, freed after), then the root. It needs the
  optimizer built *after* sharding (parameters become DTensors), and `set_requires_gradient_sync(False)` plays the
  part of `no_sync` on accumulation micro-steps. Checkpoints stay world-size independent: the full (unsharded)
  weights and optimizer state are gathered to rank 0 and written exactly like a single-process checkpoint, with the
  optimizer state keyed by parameter name. A task model (classifier head, LoRA adapters) shards the same way: the
  backbone's blocks are the units, the root is the whole task model. FSDP2 shards each parameter on its own (a
  DTensor per parameter, not one flat buffer per unit), so frozen base weights and trainable adapters may share a
  unit; frozen ones simply get no gradient and no optimizer state.
* Activation checkpointing recomputes each block's activations in the backward pass instead of keeping them: memory
  per layer drops to the block's input, at about one extra forward of compute. It swaps each block's `forward` for a
  checkpointed call of the same function (parameter names and checkpoints are unchanged); the RNG state is replayed,
  so dropout masks in the recomputation equal the first pass.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptforge.model.gpt import GPT, Block
from gptforge.runtime import Runtime


def apply_activation_checkpointing(model: GPT) -> None:
    for block in model.h:
        block.forward = functools.partial(checkpoint, Block.forward, block, use_reentrant=False)


def shard_fsdp(model: nn.Module, runtime: Runtime, gpt: GPT | None = None) -> nn.Module:
    """Shard in place: one FSDP unit per block of `gpt` (default: `model` itself), then the root `model`, which
    holds everything else (embeddings, final norm, tied head; a task model's head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # An explicit mesh on the run's device type: left out, FSDP2 takes the machine's accelerator, so a `--device cpu`
    # run on a GPU host would build a CUDA mesh over its gloo process group.
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=_gather_dtype(runtime), reduce_dtype=torch.float32)
    for block in (gpt if gpt is not None else model).h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _gather_dtype(runtime: Runtime) -> torch.dtype | None:
    # Under bf16 autocast the weights are gathered in bf16 (half the all-gather traffic, and no per-forward fp32->bf16
    # copies of every gathered weight) while gradients are reduced and the sharded master weights kept in fp32.
    return runtime.dtype if runtime.dtype != torch.float32 else None


def describe_fsdp(runtime: Runtime) -> str:
    gather = str(_gather_dtype(runtime) or torch.float32).removeprefix("torch.")
    return f"FSDP2 over {runtime.world_size} processes: weights gathered in {gather}, gradients reduced in float32"


def parallelize(
    model: nn.Module, gpt: GPT, runtime: Runtime, mode: Literal["ddp", "fsdp"], activation_checkpointing: bool
) -> nn.Module:
    """Activation checkpointing on `gpt`'s blocks, then, with several processes, FSDP2 sharding (in place) or a DDP
    wrapper. Returns the module the trainer runs: `model` itself unless DDP-wrapped. Apply LoRA before this call
    (checkpointing and sharding capture the module tree), and build the optimizer after it (FSDP2 replaces the
    parameters with sharded DTensors)."""
    if activation_checkpointing:
        apply_activation_checkpointing(gpt)
    if not runtime.distributed:
        return model
    if mode == "fsdp":
        return shard_fsdp(model, runtime, gpt)
    return wrap_ddp(model, runtime)


def wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded weights on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: the unsharded optimizer state keyed by parameter name, on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Every rank passes the full state it read from the checkpoint; each keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, into: nn.Module | None) -> dict[str, Any]:
    """Collective: gather an FSDP-sharded model's full weights into `into` (rank 0 passes an unsharded module of the
    same structure, the others None) and return the full optimizer state keyed by parameter name (empty on ranks
    other than 0). `into` can then be saved exactly as a single process saves its model."""
    # Weights first: gathering the optimizer state before them fails in torch.distributed.checkpoint under FSDP2
    # (KeyError mapping a parameter id to its name; torch 2.13, found by test).
    weights = full_model_state(model)
    optim = full_optimizer_state(model, optimizer)
    if into is not None:
        missing, unexpected = into.load_state_dict(weights, strict=False)
        # The state dict names a tied weight once (lm_head.weight shares wte.weight): missing is fine for a name
        # whose tensor was loaded under another name, and nothing else.
        aliases: dict[int, list[str]] = {}
        for name, p in into.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        loaded = {name for names in aliases.values() if any(n in weights for n in names) for name in names}
        untied = [n for n in missing if n not in loaded]
        if untied or unexpected:
            raise RuntimeError(f"gathered weights do not fit the model: missing {untied}, unexpected {unexpected}")
    return optim
