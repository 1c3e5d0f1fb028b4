"""LoRA (low-rank adaptation) applied from outside the model file by swapping `nn.Linear` modules chosen by name.

`apply_lora` replaces every `nn.Linear` whose qualified name matches one of `LoRAConfig.targets` (regular
expressions, `re.search`) with a `LoRALinear` that keeps the original layer frozen as `.base` and adds a trainable
low-rank update: y = base(x) + dropout(x) @ A^T @ B^T * alpha/rank (Hu et al. 2021, "LoRA"). B starts at zero, so a
freshly wrapped model computes exactly what the base model computes. Every other parameter is frozen; a caller that
also wants to train something else (a classification head) sets `requires_grad_(True)` on it after the call.
`merge_lora` folds the update into the weights (W + alpha/rank * B @ A) and puts plain `nn.Linear` modules back, so
the merged state dict has exactly the keys of the unwrapped model and every consumer (generate, evaluate, export,
serve) sees a plain model.

Trade-offs:
- Module swapping by name (torchtitan's float8 converter) keeps `gpt.py` free of LoRA code, at the price that the
  wrapped model's state-dict keys gain `.base.` (`h.0.attn.c_q.base.weight`) until merged.
- Adapters take the dtype of the weight they wrap (the trainer keeps fp32 weights and autocasts, so they are fp32
  while training). peft can upcast adapters of a half-precision base; not needed here.
- A tied weight (`lm_head` shared with `wte`) is refused as a target: merging would untie it, and the merged model
  would no longer load into a GPT built with `tie_embeddings=true`.
- Apply LoRA before wrapping the model in DDP or `torch.compile`: both capture the module tree.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Every projection of the attention and MLP of the Transformer blocks (`h.{i}.`), also inside a wrapper such as the
# classifier (`gpt.h.{i}.`); never `lm_head` nor a task head. A tuple: module constants stay immutable.
DEFAULT_TARGETS = (
    r"(^|\.)h\.\d+\.attn\.c_(q|k|v|proj)$",
    r"(^|\.)h\.\d+\.mlp\.c_(gate|fc|proj)$",
)


class LoRAConfig(BaseModel):
    """Which linear layers get adapters and how big they are. rank 0 turns LoRA off (full fine-tuning)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(0, ge=0, description="Rank r of the update B @ A; 0 = LoRA off, every weight is trained.")
    alpha: float = Field(16.0, gt=0, description="Scale of the update is alpha / rank (LoRA paper; peft default 16).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the input of the LoRA path only.")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Regular expressions searched (re.search) in the qualified names of nn.Linear modules; "
        "the default is every attention and MLP projection of the blocks, not lm_head or task heads.",
    )

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, targets: list[str]) -> list[str]:
        for i, pattern in enumerate(targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lora.targets[{i}] = {pattern!r} is not a valid regular expression: {e}") from e
        return targets

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update. Input (..., in) -> output (..., out).

    lora_A (r, in) gets peft's Kaiming-uniform init and lora_B (out, r) zeros, so the update starts at exactly 0 and
    the gradient still reaches B at the first step (A is random)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # a=sqrt(5) is nn.Linear's own init, which the LoRA reference code and peft reuse for A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Identity when off, so eval and dropout=0 cost nothing and stay bit-exact.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear rather than `@` so that autocast casts the adapters to the compute dtype like the base matmul.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A in the weight's dtype, computed in fp32 so a bf16 weight is rounded once."""
        w = self.base.weight
        delta = self.lora_B.float() @ self.lora_A.float()  # (out, r) @ (r, in) -> (out, in)
        return (w.float() + self.scaling * delta).to(w.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the matching `nn.Linear` modules of `model` in `LoRALinear`, in place, and freeze every other parameter.

    Returns the qualified names of the wrapped modules. rank 0 (LoRA off) returns [] and leaves the model, and its
    requires_grad flags, untouched. Every check runs before the first swap, so a refused call changes nothing."""
    if cfg.rank == 0:
        return []
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if wrapped:
        raise ValueError(
            f"model already has LoRA ({len(wrapped)} LoRALinear modules, e.g. {wrapped[0]}); "
            "apply_lora once, or merge_lora first"
        )
    linear = _linear_names(model)
    patterns = [re.compile(p) for p in cfg.targets]
    names = [n for n in linear if any(p.search(n) for p in patterns)]
    if not names:
        shown = ", ".join(linear[:10]) + (f", ... ({len(linear)} in all)" if len(linear) > 10 else "")
        raise ValueError(f"lora.targets {cfg.targets} matched no nn.Linear module; available: {shown or 'none'}")
    # A weight reachable under two names is tied (lm_head.weight is wte.weight): wrapping one of the two would
    # leave the other unadapted, and merging would silently untie them.
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        sharing = [o for o in owners[id(model.get_submodule(name).weight)] if o != f"{name}.weight"]
        if sharing:
            raise ValueError(
                f"LoRA target {name!r} has its weight tied to {', '.join(sharing)}; a LoRA update on a tied weight "
                "would untie it when merged. Drop it from lora.targets, or build the model with tie_embeddings=false"
            )
    model.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base weight and put the plain `nn.Linear` back, in place; returns `model`.

    The merged state dict has exactly the keys of the unwrapped model. requires_grad flags are left as they were
    (the base weights stay frozen); call `model.requires_grad_(True)` to train every weight again."""
    for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        lora = model.get_submodule(name)
        with torch.no_grad():
            lora.base.weight.copy_(lora.merged_weight())
        _set_module(model, name, lora.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only ({name}.lora_A / {name}.lora_B), for saving an adapter without the base model."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A"] = m.lora_A.detach()
            out[prefix + "lora_B"] = m.lora_B.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by `lora_state_dict` into a model already wrapped by `apply_lora` with the same
    targets; a missing or unexpected adapter is an error, never silently skipped."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, t in state.items():
        if t.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            raise ValueError(f"LoRA tensor {key}: shape {tuple(t.shape)}, the model expects {want}")
    with torch.no_grad():
        for key, t in state.items():
            expected[key].copy_(t)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # parameters() already skips duplicates
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
