"""Task heads on top of the GPT body: sequence classification.

`ClassifierGPT` pools the body's final normalized hidden states (`GPT.hidden_states`) over each row and maps them to
class logits with one linear layer. It lives outside `gpt.py` so the model file stays one architecture; LoRA
(`gptforge.model.lora`) can wrap the body's linears while the head trains in full.

Rows are right-padded and `lengths` gives each row's real token count. Attention is causal, so a real token never
sees the padding after it: pooling only real positions makes the result independent of the padding (the tests
check it), with no attention mask needed.

Pooling:
- "last": the hidden state of the last real token, the only one that has seen the whole text (GPT-1, HF
  `*ForSequenceClassification`). The default.
- "mean": the average over real tokens; early tokens have seen only a prefix, but the average is a smoother signal
  for short-text tasks and small models.

Shape legend: B batch, T time, C n_embd, N n_classes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from gptforge.model.gpt import GPT, GPTConfig

POOLINGS = ("last", "mean")


class ClassifierGPT(nn.Module):
    def __init__(
        self, gpt: GPT, n_classes: int, pooling: Literal["last", "mean"] = "last", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
        self.gpt = gpt
        self.n_classes, self.pooling = n_classes, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        # Small init (the body's std 0.02) and zero bias: the first logits are near uniform, so the first gradients
        # shape the head instead of fighting a random preference that would also push noise into the body.
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C), lengths (B,) -> pooled (B, C) over the first lengths[b] positions of each row."""
        B, T, _ = hidden.shape
        if self.pooling == "last":
            return hidden[torch.arange(B, device=hidden.device), lengths - 1]  # (B, C)
        real = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
        # Sum in fp32: under bf16 autocast a long row's sum would lose the small contributions.
        total = (hidden.float() * real[:, :, None]).sum(dim=1)  # (B, C)
        return total / lengths[:, None].to(total.dtype)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded token ids, lengths (B,) real token counts (1..T) -> logits (B, N) in float32."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if lengths.shape != (B,):
            shape = tuple(lengths.shape)
            raise ValueError(f"lengths must have shape ({B},) to match idx {tuple(idx.shape)}, got {shape}")
        bad = (lengths < 1) | (lengths > T)
        if bad.any():  # one host sync per batch; indexing out of range would otherwise fail obscurely or wrap around
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"lengths[{row}] = {int(lengths[row])} is outside 1..{T} (the padded length)")
        lengths = lengths.to(device=idx.device, dtype=torch.long)
        hidden = self.gpt.hidden_states(idx)  # (B, T, C)
        pooled = self.pool(hidden, lengths)  # (B, C)
        return self.head(self.dropout(pooled)).float()  # (B, N)


def build_classifier(
    gpt_config: GPTConfig, n_classes: int, pooling: Literal["last", "mean"] = "last", dropout: float = 0.0
) -> ClassifierGPT:
    """A freshly initialized GPT body with a classification head (load pretrained weights into `.gpt` after)."""
    return ClassifierGPT(GPT(gpt_config), n_classes, pooling=pooling, dropout=dropout)
