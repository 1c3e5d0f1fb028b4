"""The whole gptforge model in one file, read top to bottom.

A decoder-only Transformer. The default is Llama/Qwen2-style (RoPE, RMSNorm, SwiGLU, grouped-query attention);
a few config flags switch to GPT-2 style (learned positions, LayerNorm, GELU, biases) so that GPT-2, Llama and Qwen2
weights can be mapped in without a second model class. No optimizer, logging, distributed or file I/O lives here
(nanoGPT's `model.py`, nanochat's `gpt.py`).

Shape legend used in the comments:
    B batch, T time (sequence), C n_embd, H query heads, K key/value heads, D head dim, V vocab, S cache length.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class GPTConfig(BaseModel):
    """Architecture hyperparameters. Everything a checkpoint needs to rebuild the model."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(0, ge=0, description="Embedding rows; 0 = the tokenizer's size rounded up to 64.")
    block_size: int = Field(256, gt=0, description="Maximum context length in tokens.")
    n_layer: int = Field(4, gt=0, description="Number of Transformer blocks.")
    n_head: int = Field(4, gt=0, description="Query heads.")
    n_kv_head: int = Field(0, ge=0, description="Key/value heads for GQA; 0 means equal to n_head (plain MHA).")
    n_embd: int = Field(256, gt=0, description="Residual stream width.")
    head_size: int = Field(
        0, ge=0, description="Width of one attention head; 0 means n_embd / n_head. Structured pruning sets it."
    )
    intermediate_size: int = Field(0, ge=0, description="MLP hidden width; 0 picks 8/3*n_embd (SwiGLU) or 4*n_embd.")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalization layer.")
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="MLP type: Llama SwiGLU or GPT-2 GELU.")
    pos: Literal["rope", "learned"] = Field("rope", description="Rotary embeddings or GPT-2 learned positions.")
    bias: bool = Field(False, description="Biases in every linear layer and norm (GPT-2).")
    qkv_bias: bool = Field(False, description="Biases on the q/k/v projections only (Qwen2).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output head.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention, residual and embedding paths.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the normalization layers.")

    @model_validator(mode="after")
    def _check_heads(self) -> GPTConfig:
        if not self.head_size and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        # Independent of n_embd once heads are pruned away: the residual stream keeps its width (Llama's head_dim).
        return self.head_size or self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "gelu":
            return 4 * self.n_embd
        # SwiGLU has three matrices, so 2/3 of 4*C keeps the parameter count of a GELU MLP (Llama paper);
        # rounded up to a multiple of 64 for matmul-friendly shapes.
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


def build_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


def rope_cache(config: GPTConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (block_size, D/2), computed in fp32 whatever the training dtype."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    t = torch.arange(config.block_size, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, D) by position; cos/sin are (T, D/2), or (B, T, D/2) when every row has its own positions
    (packed sequences). Uses the half-split (Llama/HF) layout, so Hugging Face Llama and Qwen2 weights map in without
    permuting q/k rows."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos[None, None], sin[None, None])
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class KVCache:
    """Preallocated key/value tensors for incremental decoding: (B, K, S, D) per layer; `pos` is the filled length.

    The model talks to a cache through four calls, so the serving engine can bring its own (per-row positions for
    continuous batching) without the model knowing: prepare(T) -> (positions, mask, end) before the blocks,
    update(layer, k, v) -> all keys/values in each attention layer, advance(T) after the blocks."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        if max_len > config.block_size and config.pos == "learned":
            raise ValueError(f"max_len {max_len} exceeds block_size {config.block_size} (learned positions)")
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0
        self.max_len = max_len

    def prepare(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Positions (T,) of the next T tokens, the attention mask (None = plain causal), and the end position."""
        start = self.pos
        mask = None
        if start > 0 and T > 1:
            # Query i sits at absolute position start+i and may see keys 0..start+i.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        return torch.arange(start, start + T, device=device), mask, start + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at the current position; return all cached keys/values up to it."""
        t = k.size(2)
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {t} > {self.max_len}")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]

    def advance(self, T: int) -> None:
        self.pos += T


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, k, d = config.n_head, config.kv_heads, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        # Separate q/k/v projections: GQA gives them different widths, and Llama/Qwen2 store them separately.
        self.c_q = nn.Linear(config.n_embd, h * d, bias=qkv_bias)
        self.c_k = nn.Linear(config.n_embd, k * d, bias=qkv_bias)
        self.c_v = nn.Linear(config.n_embd, k * d, bias=qkv_bias)
        self.c_proj = nn.Linear(h * d, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ):
        """mask (B or 1, 1, T, S) bool, True = may attend: packed sequences, or a cache's own positions."""
        B, T, C = x.shape
        h, k, d = self.config.n_head, self.config.kv_heads, self.config.head_dim
        q = self.c_q(x).view(B, T, h, d).transpose(1, 2)  # (B, H, T, D)
        kk = self.c_k(x).view(B, T, k, d).transpose(1, 2)  # (B, K, T, D)
        v = self.c_v(x).view(B, T, k, d).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, kk = apply_rope(q, *rope), apply_rope(kk, *rope)
        if cache is not None:
            kk, v = cache.update(self.layer_idx, kk, v)  # (B, K, S, D): the cached prefix plus these T tokens
        gqa = k != h
        dropout = self.config.dropout if self.training else 0.0
        if mask is not None:
            y = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        else:
            # No mask: either a fresh causal sequence (S == T) or one new token that may see the whole cache.
            y = F.scaled_dot_product_attention(q, kk, v, is_causal=T > 1, dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, h * d)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hid = config.hidden_dim
        if self.swiglu:
            self.c_gate = nn.Linear(config.n_embd, hid, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hid, bias=config.bias)
        self.c_proj = nn.Linear(hid, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 uses the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = build_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos == "rope":
            cos, sin = rope_cache(config)
            # Not persistent: derived from the config, so never stored in (or required from) a checkpoint.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 scaled init of the residual projections: keeps the residual stream variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(
        self, idx: torch.Tensor, cache: KVCache | None = None, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx (B, T) token ids -> final normalized hidden states (B, T, C), the input of the LM head and of task
        heads. segment_ids (B, T) marks packed sequences: a token attends only within its segment, and positions
        restart at each segment, so a packed row computes exactly what its sequences would compute alone."""
        B, T = idx.shape
        mask = pos = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            pos, mask, end = cache.prepare(T, idx.device)  # pos (T,) or (B, T); mask None or (.., T, S)
            if end > self.config.block_size:
                raise ValueError(f"sequence of {end} tokens exceeds block_size {self.config.block_size}")
        elif T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        elif segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]  # (B, 1, T, T)
            t = torch.arange(T, device=idx.device).expand(B, T)
            is_start = torch.ones_like(segment_ids, dtype=torch.bool)
            is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            pos = t - torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T)
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]  # (1, 1, T, S)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos if pos is not None else torch.arange(T, device=idx.device))
        elif pos is not None:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, D/2) or (B, T, D/2) each
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ignore_index: int = -100,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy over targets
        that are not `ignore_index` (fine-tuning masks prompts and padding that way)."""
        logits = self.lm_head(self.hidden_states(idx, cache, segment_ids))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
            )
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). non_embedding drops token/position embeddings,
        the convention of scaling-law papers and of `flops_per_token`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6*N for the weight matmuls plus 12*L*C*T for
        attention scores and values (PaLM appendix B; nanoGPT's estimate_mfu). The tied head is a matmul too."""
        cfg = self.config
        t = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * t

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        stop_ids: set[int] | None = None,
        vocab_limit: int | None = None,
    ) -> torch.Tensor:
        """Reference sampler: idx (B, T) -> (B, T + new). temperature 0 is greedy. With use_cache=False every step
        recomputes the whole prefix, which is what the KV-cache equivalence test compares against. Ids at or above
        `vocab_limit` (the padding rows of a vocabulary rounded up to 64) are never produced."""
        total = idx.size(1) + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds block_size {self.config.block_size}")
        cache = None
        if use_cache:
            p = next(self.parameters())
            cache = KVCache(self.config, idx.size(0), total, p.device, p.dtype)
        out = idx
        step_in = idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_in if use_cache else out, cache=cache)
            last = logits[:, -1, :].float()
            if vocab_limit is not None:
                last[:, vocab_limit:] = float("-inf")
            next_id = sample_next(last, temperature, top_k, top_p, generator)
            out = torch.cat([out, next_id], dim=1)
            step_in = next_id
            if stop_ids and idx.size(0) == 1 and next_id.item() in stop_ids:
                break
        return out


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). Greedy at temperature 0; else top-k, then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
