"""Which modules a compression method touches: a name filter over `named_modules()`.

Quantization and pruning plug in from outside the model file by swapping or editing modules chosen here (house rule 8,
torchtitan's float8 converter). Patterns are shell globs (`fnmatch`) over full module names such as `h.0.attn.c_q`
or `lm_head`; a module is selected when it matches an `include` pattern and no `exclude` pattern. A pattern that
matches nothing is an error naming it, so a typo never silently compresses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch.nn as nn


def select_modules(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> dict[str, nn.Module]:
    """{name: module} of every module of one of `types` whose name matches an include glob and no exclude glob,
    in model order. Raises ValueError naming any pattern that matches no module of those types."""
    candidates = {name: m for name, m in model.named_modules() if name and isinstance(m, types)}
    for field, patterns in (("include", include), ("exclude", exclude)):
        for pat in patterns:
            if not any(fnmatchcase(name, pat) for name in candidates):
                kinds = "/".join(t.__name__ for t in types)
                sample = ", ".join(list(candidates)[:4])
                raise ValueError(f"{field} pattern {pat!r} matches no {kinds} module (names look like: {sample}, ...)")
    return {
        name: m
        for name, m in candidates.items()
        if any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)
    }
