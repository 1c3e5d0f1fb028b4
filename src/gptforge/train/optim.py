"""AdamW with parameter groups, an optionally compiled step, and the learning-rate schedule as a pure function.

Because the schedule is a function of the step alone, a checkpoint needs no scheduler state (nanochat, litgpt), and
a resumed run cannot drift from an uninterrupted one.

Two ways to run the AdamW step:
* plain (default): the fused kernel on CPU and CUDA, one pass over each tensor.
* compiled (`build_optimizer(compile_step=True)` + `compiled_step`): the non-fused step traced by `torch.compile`
  into generated kernels (PyTorch tutorial "Compiling the optimizer with torch.compile"). The LR lives in a 0-dim
  tensor that is updated in place: a float LR is a constant of the first graph, and changing it recompiles (torch
  2.13 recompiles once and then takes the float as an input; the tutorial describes a recompile per change, which
  is what older releases did). The price is a compile
  of ~20 s at the first step on a 2-core CPU. Measured on CPU (bench/optim_step.py) it is no faster than the fused
  kernel (0.98x at 10M parameters, 0.62x at 40M); the option is there for CUDA, where the PyTorch tutorial reports
  gains, and is not benchmarked on a GPU here.

A checkpoint's optimizer state loads into either kind: `load_state_dict` normally takes everything, implementation
flags included, from the saved groups, so a plain checkpoint would silently turn a compiled optimizer into a fused
one with a float LR (a recompile), and a compiled checkpoint a plain optimizer into the slow per-tensor loop. A load
hook keeps the loading optimizer's own implementation (fused/foreach/capturable, LR as float or tensor) and takes
only the values from the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# Group keys that say *how* the step runs, not *what* it computes; they belong to the optimizer, never to a file.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


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
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
    *,
    compile_step: bool = False,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`. `compile_step=True` builds the variant that `compiled_step` expects: non-fused,
    with each group's LR in its own 0-dim float32 tensor (set it with `fill_`, never replace it)."""
    groups = param_groups(model, weight_decay)
    if compile_step:
        for g in groups:
            g["lr"] = torch.tensor(lr, dtype=torch.float32)  # on the CPU, as in the PyTorch tutorial: no device sync
        # CUDA: capturable keeps `step` on the device and takes the multi-tensor path with a tensor LR; it is what
        # dynamo sets by itself for a fresh state, and saying it here keeps a resumed run on the same path. foreach
        # must be said too: with fused=False given, torch only picks foreach by default when both are None.
        # CPU: the per-tensor loop. Compiled, the multi-tensor variant steps as fast and compiles ~10-40% sooner
        # (bench/optim_step.py), but it needs capturable=True, which the CPU supports only inside compiled code: any
        # eager step (dynamo's fallback past its recompile limit; torch.distributed.checkpoint's state init under
        # FSDP) would raise.
        cuda = device.type == "cuda"
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=cuda, capturable=cuda, fused=False)
    else:
        # The fused kernel exists for CPU and CUDA in torch >= 2.4: one pass over each tensor instead of several.
        fused = device.type in ("cpu", "cuda")
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    opt.register_load_state_dict_pre_hook(_keep_implementation)
    return opt


def _keep_implementation(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """load_state_dict pre-hook: the saved groups with this optimizer's implementation flags and LR type."""
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return None  # load_state_dict itself refuses it, with its own message
    groups = []
    for cur, old in zip(optimizer.param_groups, saved, strict=True):
        g = {**old, **{k: cur[k] for k in _IMPLEMENTATION_KEYS if k in cur}}
        value = float(old["lr"])
        # A fresh tensor per group, not the file's: groups loaded from one file may share a single LR tensor.
        g["lr"] = torch.tensor(value, dtype=cur["lr"].dtype) if torch.is_tensor(cur["lr"]) else value
        groups.append(g)
    # `step` tensors are placed by load_state_dict from these (now the loading optimizer's) fused/capturable flags.
    return {**state_dict, "param_groups": groups}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR; a tensor LR is updated in place so a compiled step sees it without recompiling."""
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def compiled_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """`optimizer.step` compiled by `torch.compile`; the first call compiles (seconds), later calls reuse the graph
    as long as only tensor values (LR, gradients, moments) change.

    Dynamo caches per code object, and every optimizer is one more entry: a process that compiles the step of more
    than `torch._dynamo.config.recompile_limit` (8) optimizers runs the later ones eagerly (correct, only slower).
    """
    if not all(torch.is_tensor(g["lr"]) for g in optimizer.param_groups):
        raise ValueError(
            "compiled_step needs the LR of every parameter group in a tensor (a float LR is baked into the graph); "
            "build the optimizer with build_optimizer(..., compile_step=True)"
        )
    if any(g.get("fused") for g in optimizer.param_groups):
        raise ValueError("compiled_step compiles the non-fused AdamW step; build it with compile_step=True")

    @torch.compile(fullgraph=False)
    def step() -> None:
        optimizer.step()

    return step


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
