"""Pruning: zero weights in place (unstructured, N:M) or cut whole heads and MLP channels (structured).

Methods, from cheapest to most useful at inference time:
* `magnitude_prune` zeroes the smallest |w| of each selected Linear (per layer). No data needed; at 50% a GPT loses
  noticeably more than with Wanda because it ignores that some input features are much larger than others.
* `wanda_prune` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") scores |W_ij| * ||X_j||_2 and
  zeroes the lowest fraction *per output row*; the norms come from a few calibration batches. We calibrate every layer
  in one pass over the *dense* model. The paper (and its code) calibrates layer by layer, feeding each block the
  output of the already-pruned blocks before it, so later layers see the activations they will really get. One pass
  costs one forward per batch and a vector per layer instead of L forwards and the hidden states of every batch in
  memory; at moderate sparsity (<= 50%) the input norms barely move, which is why we take the cheaper route.
* `semi_structured_prune` keeps N of every M consecutive inputs of a row (2:4), scored by magnitude or Wanda. The
  pattern is what sparse tensor cores run at up to ~2x (`torch.sparse.to_sparse_semi_structured`: CUDA only, fp16/bf16,
  shape constraints); on CPU, and in this module, the result is still a dense matrix with zeros: accuracy only.
* `structured_prune` returns a new, genuinely smaller dense GPT with fewer heads (whole GQA groups) and a narrower MLP,
  so it is faster everywhere with no special kernels, at a larger accuracy cost per removed parameter.

Unstructured and N:M pruning leave a dense model with exact zeros: it saves, loads and exports like any other
checkpoint; the saving comes from compression of the file or from sparse kernels. `mask_gradients` keeps the zeros
during recovery fine-tuning, and `sparsity_report` measures them. Every function returns plain dicts so a stage can
put them into its metrics.

A tied `lm_head` shares its weight with `wte`: pruning it also prunes the embedding, so the default excludes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from gptforge.compress.select import select_modules
from gptforge.model.gpt import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------------------------------
# Argument checks and shared helpers


def _check_fraction(value: float, name: str, *, low_open: bool, high_open: bool) -> float:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    lo_ok = ok_type and (value > 0 if low_open else value >= 0)
    hi_ok = ok_type and (value < 1 if high_open else value <= 1)
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_sparsity(sparsity: float) -> float:
    # 1.0 is refused: a layer of only zeros is a deleted layer, which no caller of these functions means.
    return _check_fraction(sparsity, "sparsity", low_open=False, high_open=True)


def _linears(model: nn.Module, include: Sequence[str], exclude: Sequence[str]) -> dict[str, nn.Linear]:
    if isinstance(include, str) or isinstance(exclude, str):
        raise ValueError(f"include/exclude must be sequences of globs, not a string: {include!r} / {exclude!r}")
    modules = select_modules(model, include, exclude, types=(nn.Linear,))
    if not modules:
        raise ValueError(f"include={list(include)!r} exclude={list(exclude)!r} select no nn.Linear module")
    return modules


def _zero_stats(modules: dict[str, nn.Linear]) -> dict[str, float]:
    """{name: fraction of exact zeros} plus "overall" weighted by size; a weight shared by two modules counts once."""
    stats: dict[str, float] = {}
    zeros = total = 0
    seen: set[int] = set()
    for name, m in modules.items():
        w = m.weight
        z = int((w == 0).sum())
        stats[name] = z / w.numel()
        if id(w) not in seen:
            seen.add(id(w))
            zeros, total = zeros + z, total + w.numel()
    stats["overall"] = zeros / total if total else 0.0
    return stats


def _batches(model: nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Validate calibration batches lazily (a generator is consumed once) and move them to the model's device."""
    if isinstance(batches, torch.Tensor):
        shape = tuple(batches.shape)
        raise ValueError(f"batches must be an iterable of (B, T) tensors, not one tensor of shape {shape}")
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    n = 0
    for i, x in enumerate(batches):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"batches[{i}] must be a (B, T) integer tensor of token ids, got {got}")
        if x.numel() and (int(x.min()) < 0 or (vocab and int(x.max()) >= vocab)):
            raise ValueError(f"batches[{i}] has token ids in [{int(x.min())}, {int(x.max())}], outside [0, {vocab})")
        n += 1
        yield x.to(device)
    if n == 0:
        raise ValueError("batches is empty: calibration needs at least one (B, T) batch of token ids")


def _run_calibration(model: nn.Module, batches: Iterable[torch.Tensor], hooks: list, needs_head: bool) -> None:
    """Forward every batch with `hooks` (already registered handles) in eval mode; always restore mode, drop hooks."""
    was_training = model.training
    try:
        model.eval()  # dropout off: the statistics describe the model as it will be used
        with torch.no_grad():
            for x in _batches(model, batches):
                if isinstance(model, GPT) and not needs_head:
                    model.hidden_states(x)  # skip the (V, C) head matmul when nothing hooks it
                else:
                    model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# Unstructured and N:M pruning (in place)


@torch.no_grad()
def magnitude_prune(
    model: nn.Module, sparsity: float, include: Sequence[str] = ("*",), exclude: Sequence[str] = ("lm_head",)
) -> dict[str, float]:
    """Zero the round(sparsity * numel) smallest-|w| weights of each selected Linear, in place (per-layer budget:
    a global threshold would empty small, sensitive layers first). Returns {module: achieved sparsity, "overall"}."""
    sparsity = _check_sparsity(sparsity)
    modules = _linears(model, include, exclude)
    for m in modules.values():
        w = m.weight
        k = round(sparsity * w.numel())
        if k:
            # topk on the flat view picks exactly k entries even among ties, so achieved == target up to rounding.
            idx = torch.topk(w.detach().abs().float().flatten(), k, largest=False, sorted=False).indices
            w.view(-1)[idx] = 0
    return _zero_stats(modules)


def collect_input_norms(
    model: nn.Module, batches: Iterable[torch.Tensor], modules: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """{name: ||X_j||_2 (in_features,) fp32}: the L2 norm of each input feature of each module over all B*T tokens of
    all batches (sum of squares, square root at the end). One forward per batch; hooks are removed even on error."""
    if not modules:
        raise ValueError("modules is empty: nothing to collect input norms for")
    sumsq: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # (in,) summed over B*T
            sumsq[name] = sumsq[name] + sq if name in sumsq else sq

        return hook

    hooks = [m.register_forward_pre_hook(make_hook(name)) for name, m in modules.items()]
    head = getattr(model, "lm_head", None)
    _run_calibration(model, batches, hooks, needs_head=any(m is head for m in modules.values()))
    missing = [name for name in modules if name not in sumsq]
    if missing:
        raise ValueError(f"modules {missing} never ran during calibration: are they part of this model's forward?")
    return {name: s.sqrt() for name, s in sumsq.items()}


def _wanda_scores(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float() * norm.to(w.device)[None, :]  # (out, in): |W_ij| * ||X_j||


@torch.no_grad()
def wanda_prune(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    sparsity: float,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = ("lm_head",),
) -> dict[str, float]:
    """Wanda: score |W_ij| * ||X_j||_2 and zero the round(sparsity * in_features) lowest scores of every output row,
    in place. All selected layers are calibrated in one pass over the dense model (see the module docstring for the
    trade-off against sequential calibration). Returns {module: achieved sparsity, "overall"}."""
    sparsity = _check_sparsity(sparsity)
    modules = _linears(model, include, exclude)
    norms = collect_input_norms(model, batches, modules)
    for name, m in modules.items():
        k = round(sparsity * m.in_features)
        if k:
            # Per row, as in the paper: comparing scores across rows mixes outputs of very different scales.
            idx = torch.topk(_wanda_scores(m.weight, norms[name]), k, dim=1, largest=False, sorted=False).indices
            m.weight.scatter_(1, idx, 0.0)
    return _zero_stats(modules)


@torch.no_grad()
def semi_structured_prune(
    model: nn.Module,
    batches: Iterable[torch.Tensor] | None = None,
    n: int = 2,
    m: int = 4,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = ("lm_head",),
) -> dict[str, float]:
    """N:M sparsity in place: in every group of m consecutive inputs of a row keep the n highest scores (|w|, or the
    Wanda score |w| * ||x|| when calibration `batches` are given). 2:4 is what sparse tensor cores accelerate, and only
    on CUDA through `torch.sparse.to_sparse_semi_structured` (fp16/bf16); on CPU the zeros cost the same as any other
    weight, so this is an accuracy experiment there. Every selected in_features must be divisible by m; that is
    checked for all modules before any weight changes. Returns {module: achieved sparsity, "overall"}."""
    for arg, value in (("n", n), ("m", m)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{arg} must be an int, got {value!r}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m for N:M sparsity, got n={n}, m={m}")
    modules = _linears(model, include, exclude)
    bad = {name: mod.in_features for name, mod in modules.items() if mod.in_features % m}
    if bad:
        raise ValueError(f"in_features not divisible by m={m} in {bad}; exclude those modules or pick another m")
    norms = collect_input_norms(model, batches, modules) if batches is not None else None
    for name, mod in modules.items():
        w = mod.weight
        score = _wanda_scores(w, norms[name]) if norms is not None else w.detach().abs().float()
        groups = score.view(w.shape[0], -1, m)  # (out, in/m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False, sorted=False).indices
        w.view(w.shape[0], -1, m).scatter_(-1, drop, 0.0)
    return _zero_stats(modules)


# ---------------------------------------------------------------------------------------------------------------------
# Structured pruning: a new, smaller GPT


@dataclass(frozen=True)
class StructuredPlan:
    """What `structured_prune` keeps, per layer, as sorted index tensors into the original model, and the new config.
    Query heads are listed group by group in the order of their kv heads, so new query head j still maps to new kv
    head j // (H/K); sorting keeps the original order, which makes plans easy to read and compare."""

    heads: list[torch.Tensor]  # kept query heads, (H',) each
    kv_heads: list[torch.Tensor]  # kept key/value heads, (K',) each
    channels: list[torch.Tensor]  # kept MLP hidden channels, (hid',) each
    config: GPTConfig


def _check_structurable(model: nn.Module) -> GPT:
    if not isinstance(model, GPT):
        raise ValueError(f"structured pruning needs a gptforge GPT, got {type(model).__name__}")
    names = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    names += ["mlp.c_gate"] if model.config.mlp == "swiglu" else []
    for i, block in enumerate(model.h):
        for name in names:
            mod = block.get_submodule(name)
            if type(mod) is not nn.Linear:
                raise ValueError(
                    f"h.{i}.{name} is a {type(mod).__name__}, not a plain nn.Linear: structured pruning must come "
                    "before quantization or LoRA (merge LoRA first)"
                )
    return model


@torch.no_grad()
def _unit_scores(model: GPT, batches: Iterable[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every query head (L, H) and MLP channel (L, hid), larger = keep.

    With batches: the energy each head writes into the residual stream, sum_tokens ||W_proj,h y_h||^2, computed from
    the (H, D, D) second moment of the head outputs y (input of attn.c_proj) so no (tokens, H, C) tensor is built;
    and for a channel, ||a_j||_2 * ||W_proj[:, j]|| (its rank-1 contribution is exactly that norm).
    Without: the same quantities bounded by weights only: (||W_v,g(h)|| * ||W_proj,h||)^2 (attention mixes values
    convexly, so a head's output is bounded through its value path) and ||W_fc,j|| (* ||W_gate,j||) * ||W_proj[:,j]||.
    """
    cfg = model.config
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    G = H // K
    heads, chans = [], []
    if batches is not None:
        moments: dict[int, torch.Tensor] = {}
        sumsq: dict[int, torch.Tensor] = {}

        def attn_hook(i: int):
            def hook(module: nn.Module, args: tuple) -> None:
                y = args[0].detach().float().reshape(-1, H, D)  # (N, H, D) per-head outputs before c_proj
                s = torch.einsum("nhd,nhe->hde", y, y)
                moments[i] = moments[i] + s if i in moments else s

            return hook

        def mlp_hook(i: int):
            def hook(module: nn.Module, args: tuple) -> None:
                a = args[0].detach().float()
                s = a.pow(2).reshape(-1, a.shape[-1]).sum(0)  # (hid,)
                sumsq[i] = sumsq[i] + s if i in sumsq else s

            return hook

        hooks = []
        for i, block in enumerate(model.h):
            hooks.append(block.attn.c_proj.register_forward_pre_hook(attn_hook(i)))
            hooks.append(block.mlp.c_proj.register_forward_pre_hook(mlp_hook(i)))
        _run_calibration(model, batches, hooks, needs_head=False)
    for i, block in enumerate(model.h):
        wp = block.attn.c_proj.weight.float().view(-1, H, D)  # (C, H, D)
        mp = block.mlp.c_proj.weight.float()  # (C, hid)
        if batches is not None:
            gram = torch.einsum("chd,che->hde", wp, wp)  # (H, D, D)
            heads.append((gram * moments[i]).sum((1, 2)))
            chans.append(sumsq[i].sqrt() * mp.norm(dim=0))
        else:
            wv_sq = block.attn.c_v.weight.float().view(K, -1).pow(2).sum(1)  # (K,) ||W_v,g||^2
            heads.append(wv_sq.repeat_interleave(G) * wp.pow(2).sum((0, 2)))  # (H,) times ||W_proj,h||^2
            c = block.mlp.c_fc.weight.float().norm(dim=1) * mp.norm(dim=0)
            if block.mlp.swiglu:
                c = c * block.mlp.c_gate.weight.float().norm(dim=1)
            chans.append(c)
    return torch.stack(heads).cpu(), torch.stack(chans).cpu()


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def plan_structured_prune(
    model: GPT, heads_keep: float = 1.0, mlp_keep: float = 1.0, batches: Iterable[torch.Tensor] | None = None
) -> StructuredPlan:
    """Choose the heads and channels `structured_prune` keeps: max(1, round(keep * count)) units in every layer, so the
    smaller model still has one uniform config. Attention units are whole kv groups (a kv head with its H/K query
    heads), which keeps the GQA ratio; plain MHA is the case of groups of one. With a single kv head (MQA) the units
    are the query heads, all sharing that kv head."""
    heads_keep = _check_fraction(heads_keep, "heads_keep", low_open=True, high_open=False)
    mlp_keep = _check_fraction(mlp_keep, "mlp_keep", low_open=True, high_open=False)
    model = _check_structurable(model)
    cfg = model.config
    H, K, hid = cfg.n_head, cfg.kv_heads, cfg.hidden_dim
    G = H // K
    head_scores, chan_scores = _unit_scores(model, batches)
    heads, kv_heads, channels = [], [], []
    n_mlp = max(1, round(mlp_keep * hid))
    if K > 1:
        n_units = max(1, round(heads_keep * K))
        n_head, n_kv = n_units * G, n_units
    else:
        n_units = n_head = max(1, round(heads_keep * H))
        n_kv = 1
    for i in range(cfg.n_layer):
        if K > 1:
            groups = _top_sorted(head_scores[i].view(K, G).sum(1), n_units)  # (K',)
            kv_heads.append(groups)
            heads.append((groups[:, None] * G + torch.arange(G)).flatten())  # (K' * G,) in order
        else:
            kv_heads.append(torch.zeros(1, dtype=torch.long))
            heads.append(_top_sorted(head_scores[i], n_units))
        channels.append(_top_sorted(chan_scores[i], n_mlp))
    update = {
        "n_head": n_head,
        # Keep "0 = MHA" as it was written, so the smaller config reads like the original one.
        "n_kv_head": 0 if cfg.n_kv_head == 0 else n_kv,
        "head_size": cfg.head_dim,  # explicit: n_embd / n_head no longer holds once heads are gone
        "intermediate_size": n_mlp,
    }
    new_cfg = GPTConfig.model_validate({**cfg.model_dump(), **update})
    return StructuredPlan(heads=heads, kv_heads=kv_heads, channels=channels, config=new_cfg)


@torch.no_grad()
def structured_prune(
    model: GPT,
    heads_keep: float = 1.0,
    mlp_keep: float = 1.0,
    batches: Iterable[torch.Tensor] | None = None,
    plan: StructuredPlan | None = None,
) -> GPT:
    """A new, smaller dense GPT: `heads_keep` of the attention units and `mlp_keep` of the MLP channels of every layer
    (see `plan_structured_prune`), ranked by activations when calibration `batches` are given, else by weight norms.
    The removed heads' q/k/v rows and c_proj columns and the removed channels' c_gate/c_fc rows and c_proj columns are
    cut; every other tensor (embeddings, norms, tied head, biases) is copied exactly, with the original dtype, device
    and train/eval mode. The input model is not modified. Pass `plan` to apply a plan computed earlier."""
    if plan is None:
        plan = plan_structured_prune(model, heads_keep, mlp_keep, batches)
    else:
        _check_structurable(model)
        if len(plan.heads) != model.config.n_layer or plan.config.n_embd != model.config.n_embd:
            raise ValueError(
                f"plan is for {len(plan.heads)} layers / n_embd {plan.config.n_embd}, not this model's "
                f"{model.config.n_layer} / {model.config.n_embd}"
            )
    cfg, D = model.config, model.config.head_dim

    def rows(units: torch.Tensor) -> torch.Tensor:  # head indices -> weight rows (units * D,)
        return (units[:, None] * D + torch.arange(D)).flatten()

    state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        parts = key.split(".")
        if parts[0] != "h":
            new_state[key] = t
            continue
        i, mod = int(parts[1]), ".".join(parts[2:4])
        is_weight = parts[-1] == "weight"
        q, kv, ch = rows(plan.heads[i]), rows(plan.kv_heads[i]), plan.channels[i]
        if mod == "attn.c_q":
            t = t[q.to(t.device)]
        elif mod in ("attn.c_k", "attn.c_v"):
            t = t[kv.to(t.device)]
        elif mod == "attn.c_proj" and is_weight:
            t = t[:, q.to(t.device)]
        elif mod in ("mlp.c_gate", "mlp.c_fc"):
            t = t[ch.to(t.device)]
        elif mod == "mlp.c_proj" and is_weight:
            t = t[:, ch.to(t.device)]
        new_state[key] = t  # c_proj biases live in C, which is unchanged

    new = GPT(plan.config)
    old_tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        ref = old_tensors.get(name)
        if ref is not None:
            t.data = t.data.to(device=ref.device, dtype=ref.dtype)  # a tied head follows: it is the same Parameter
    new.load_state_dict(new_state, strict=True)
    if cfg.tie_embeddings:
        assert new.lm_head.weight is new.wte.weight
    return new.train(model.training)


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning and reporting


def mask_gradients(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Keep pruned weights at zero during recovery fine-tuning: every nn.Linear weight that holds exact zeros gets a
    gradient hook multiplying its gradient by the (weight != 0) mask, taken now. Remove the returned handles when done.

    Why AdamW then keeps the zeros exactly: a masked weight always has gradient 0, so its first and second moments
    stay 0 (m = b1*0 + (1-b1)*0), the update m_hat / (sqrt(v_hat) + eps) is 0/eps = 0, and the decoupled weight decay
    w -= lr*wd*w of w = 0 is 0. This holds for optimizer state created after pruning (a fresh optimizer); moments left
    over from dense training would still move the weights. SGD with momentum and gradient clipping keep them too.
    A weight shared by two modules (tied head and embedding) gets one hook."""
    handles = []
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, nn.Linear) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        w = m.weight
        if not w.requires_grad:
            continue  # frozen (e.g. under LoRA): nothing will update it
        keep = w.detach() != 0
        if keep.all():
            continue
        mask = keep.to(w.dtype)  # built once: the hook runs every backward
        handles.append(w.register_hook(lambda g, mask=mask: g * mask))
    return handles


@torch.no_grad()
def sparsity_report(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, float]:
    """{module: fraction of exact zeros in its weight} for every selected nn.Linear, plus "overall" (size-weighted,
    a shared weight counted once)."""
    return _zero_stats(_linears(model, include, exclude))
