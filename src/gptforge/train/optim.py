"""AdamW with parameter groups, and the learning-rate schedule as a pure function of the step.

Because the schedule is a function of the step alone, a checkpoint needs no scheduler state (nanochat, litgpt), and
a resumed run cannot drift from an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of linear layers. Norm gains, biases and embeddings get no weight decay: shrinking them
    towards zero has no regularizing meaning (GPT-2/nanoGPT, Llama practice)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # a tied weight belongs to the first module that owns it (the embedding)
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, device: torch.device
) -> torch.optim.AdamW:
    # The fused kernel exists for CPU and CUDA in torch >= 2.4 and does one pass over each tensor instead of several.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, max_lr: float, warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine or linear decay to `min_ratio * max_lr` at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return max_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        scale = 1.0 - progress
    else:
        raise ValueError(f"unknown decay '{decay}' (cosine, linear or constant)")
    return max_lr * (min_ratio + (1.0 - min_ratio) * scale)
