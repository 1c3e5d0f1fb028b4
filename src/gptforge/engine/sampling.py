"""Per-request sampling parameters and the batched sampler the engine runs once per step.

Every row of a batch carries its own settings, so the sampler is vectorized over rows where the maths allows
(penalties, temperature, top-k and top-p all become per-row tensors) and loops only for the final draw, because each
seeded request owns a torch.Generator: a request's tokens then depend on its seed and its logits alone, never on
which other requests happen to share its batch.

Conventions follow the APIs users already know: repetition_penalty as in Hugging Face / CTRL (divide positive
logits, multiply negative ones, over prompt and output tokens); presence and frequency penalties as in OpenAI (subtract
per generated token). Greedy (temperature 0) is plain argmax, exactly what the reference `GPT.generate` does.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    # allow_inf_nan=False: NaN slips through ge/le checks otherwise, and inf makes no sense for any field here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(16, ge=1, description="New tokens at most.")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy; higher = more random.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: the smallest set of tokens with this mass.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="> 1 discourages tokens already in prompt or output.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from generated tokens.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted per occurrence in the output.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra ids that end generation.")
    seed: int | None = Field(None, description="Same seed, prompt and settings give the same tokens.")
    ignore_eos: bool = Field(False, description="Do not stop at the engine's end ids (fixed-length benchmarks).")

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """logits (B, V) float; counts (B, V) generated-token counts; seen (B, V) bool, token in prompt or output;
    repetition/presence/frequency (B, 1). Returns penalized logits (a new tensor)."""
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature, top-k and top-p per row. logits (B, V); temperature (B, 1) > 0; top_k (B, 1) long, 0 = off;
    top_p (B, 1). None skips a filter for every row. Returns probabilities (B, V).

    A full sort of the vocabulary per row is the expensive part of sampling a big batch, so it only happens when
    some row asks for top-p; top-k alone uses topk with the largest k asked for."""
    V = logits.size(-1)
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_p is None:
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)  # (B, 1)
            top = torch.topk(logits, int(k.max())).values  # (B, kmax), descending
            kth = top.gather(1, k.clamp(max=top.size(1)) - 1)  # (B, 1): the k-th largest logit of each row
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(dim=-1)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    if top_k is not None:
        rank = torch.arange(V, device=logits.device)[None]  # (1, V)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    drop = (probs.cumsum(dim=-1) - probs) > top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return out.softmax(dim=-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """Pick one token per row. logits (B, V) float32, already penalized and vocab-limited. Returns a list of ints.

    Unseeded rows are drawn in one multinomial call; a seeded row is drawn alone with its own generator, so its
    tokens do not depend on its neighbours."""
    B = logits.size(0)
    out = [0] * B
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    if greedy:
        ids = (logits if len(greedy) == B else logits[greedy]).argmax(dim=-1).tolist()
        for i, t in zip(greedy, ids):
            out[i] = t
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return out
    dev, ps = logits.device, [params[i] for i in sampled]
    temp = torch.tensor([[p.temperature] for p in ps], device=dev, dtype=logits.dtype)
    top_k = torch.tensor([[p.top_k] for p in ps], device=dev) if any(p.top_k for p in ps) else None
    top_p = None
    if any(p.top_p < 1.0 for p in ps):
        top_p = torch.tensor([[p.top_p] for p in ps], device=dev, dtype=logits.dtype)
    probs = filter_logits(logits if len(sampled) == B else logits[sampled], temp, top_k, top_p)
    # Inverse-CDF draw: one uniform number per row against the cumulative distribution. Same distribution as
    # torch.multinomial, ~30x faster for a batch over a real vocabulary on CPU. right=True never lands on a
    # zero-probability token (the CDF does not rise there), and scaling u by the total keeps it in range.
    cdf = probs.cumsum(dim=-1)  # (b, V)
    u = torch.empty(len(sampled), 1, device=dev, dtype=cdf.dtype)
    for j, i in enumerate(sampled):
        if generators[i] is not None:
            u[j] = torch.rand(1, generator=generators[i], device=dev, dtype=cdf.dtype)
    free = [j for j, i in enumerate(sampled) if generators[i] is None]
    if free:
        u[free] = torch.rand(len(free), 1, device=dev, dtype=cdf.dtype)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.size(-1) - 1).view(-1).tolist()
    for j, t in zip(range(len(sampled)), picks):
        out[sampled[j]] = t
    return out
