"""The peers gptforge's trainer is measured against: a nanoGPT-style GPT and Hugging Face's LlamaForCausalLM, plus
the small pieces of a hand-written training loop (logits access, nanoGPT's weight-decay rule).

`hp` is the benchmark's hyperparameter record (vocab_size, block_size, n_layer, n_head, n_kv_head, n_embd, dropout).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------------
# nanoGPT-style baseline (after karpathy/nanoGPT model.py, bias=False as in its train.py defaults)


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = NanoAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = NanoMLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, hp: Any) -> None:
        super().__init__()
        self.wte = nn.Embedding(hp.vocab_size, hp.n_embd)
        self.wpe = nn.Embedding(hp.block_size, hp.n_embd)
        self.h = nn.ModuleList(NanoBlock(hp.n_embd, hp.n_head) for _ in range(hp.n_layer))
        self.ln_f = nn.LayerNorm(hp.n_embd, bias=False)
        self.lm_head = nn.Linear(hp.n_embd, hp.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * hp.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face peer and loop helpers


def build_hf(hp: Any, intermediate_size: int) -> nn.Module:
    """transformers' LlamaForCausalLM with the same shape as gptforge's default (Llama) architecture."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: the model is built from a config
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=hp.vocab_size,
        hidden_size=hp.n_embd,
        intermediate_size=intermediate_size,
        num_hidden_layers=hp.n_layer,
        num_attention_heads=hp.n_head,
        num_key_value_heads=hp.n_kv_head,
        max_position_embeddings=hp.block_size,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_dropout=hp.dropout,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def logits_fn(name: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """How to get (B, T, V) logits from each model, for the shared loss and evaluation code."""
    if name == "gptforge":
        return lambda m, x: m(x)[0]
    if name == "hf_llama":
        return lambda m, x: m(input_ids=x, use_cache=False).logits
    return lambda m, x: m(x)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's `configure_optimizers` rule: decay every parameter with dim >= 2 (matrices and embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
