"""Shared fixtures of the export tests: a tiny zh+en byte-level BPE tokenizer and tiny GPTs with spread-out random
weights (a default 0.02 init gives near-uniform logits, where greedy decoding in two engines could differ on a tie
that says nothing about the export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.tokenizer.bpe import Tokenizer, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day?",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。床前明月光，疑是地上霜。",
    "Hello world! 你好，世界。Numbers 12345 and symbols #@!",
]
ZH_EN = "Hello, 世界! The fox 跳过了 the lazy dog。春眠不觉晓 12345"


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Tokenizer:
    hf = train_bpe(TEXTS * 20, vocab_size=330)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(hf.to_str(), encoding="utf-8")
    return Tokenizer.load(path)


def padded_vocab(tok: Tokenizer) -> int:
    return 64 * -(-tok.vocab_size // 64)  # rounded up like gptforge does, so the embedding has padding rows


# The architecture families the exporters support, as GPTConfig overrides.
LLAMA = dict(n_head=4, n_embd=64)
VARIANTS = {
    "llama-tied": dict(LLAMA),
    "llama-untied": dict(LLAMA, tie_embeddings=False),
    "llama-gqa": dict(LLAMA, n_kv_head=2),
    "llama-head-size": dict(LLAMA, n_kv_head=2, head_size=8),
    "llama-bias": dict(LLAMA, bias=True, tie_embeddings=False),
    "qwen2": dict(LLAMA, n_kv_head=2, qkv_bias=True),
    "qwen2-head-size": dict(LLAMA, n_kv_head=2, qkv_bias=True, head_size=8),  # heads pruned by `compress`
    "gpt2": dict(n_head=4, n_embd=64, pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "gpt2-untied": dict(
        n_head=4, n_embd=64, pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False
    ),
}


def make_model(tok: Tokenizer, seed: int = 0, **overrides) -> GPT:
    cfg = dict(
        vocab_size=padded_vocab(tok), block_size=64, n_layer=2, intermediate_size=96, rope_theta=500.0, norm_eps=1e-5
    )
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(cfg | overrides)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = name.endswith("weight") and ("ln_" in name)
            # Norm weights near 1 (not exactly: a norm mapped to the wrong place must show), the rest wide enough
            # that logits are well separated.
            p.copy_(1 + 0.1 * noise if is_norm else 0.3 * noise)
    return model.eval()


def no_code_files(folder: Path) -> bool:
    return not any(p.suffix in (".py", ".pyc", ".so") for p in folder.rglob("*"))
