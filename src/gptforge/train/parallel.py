"""Data parallelism (DDP or FSDP2) and activation checkpointing, applied to the model from outside the model file.

* DDP replicates the model and all-reduces gradients; `Trainer` skips that all-reduce on accumulation micro-steps
  (`no_sync`).
* FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer states over the processes:
  each Transformer block is one unit (gathered for its forward/backward, freed after), then the root. It needs the
  optimizer built *after* sharding (parameters become DTensors), and `set_requires_gradient_sync(False)` plays the
  part of `no_sync` on accumulation micro-steps. Checkpoints stay world-size independent: the full (unsharded)
  weights and optimizer state are gathered to rank 0 and written exactly like a single-process checkpoint, with the
  optimizer state keyed by parameter name.
* Activation checkpointing recomputes each block's activations in the backward pass instead of keeping them: memory
  per layer drops to the block's input, at about one extra forward of compute. It swaps each block's `forward` for a
  checkpointed call of the same function (parameter names and checkpoints are unchanged); the RNG state is replayed,
  so dropout masks in the recomputation equal the first pass.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptforge.model.gpt import GPT, Block
from gptforge.runtime import Runtime


def apply_activation_checkpointing(model: GPT) -> None:
    for block in model.h:
        block.forward = functools.partial(checkpoint, Block.forward, block, use_reentrant=False)


def shard_fsdp(model: GPT) -> GPT:
    """Shard in place: one FSDP unit per block, then the root (embeddings, final norm, tied head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    return model


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
