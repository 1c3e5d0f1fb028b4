"""Which model a stage starts from and how a saved model is rebuilt.

A fine-tuning run starts from a gptforge checkpoint (a pretrain or finetune folder) or from a local Hugging Face
folder of a GPT-2, Llama or Qwen2 model (safetensors only, mapped into gptforge's one model class). A saved
checkpoint is rebuilt from its `meta.json` alone: the architecture, the task head (classifier), and LoRA adapters,
which `load_for_inference` merges into the weights so that every consumer (generate, evaluate, export, serve) sees a
plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.train import checkpoint as ckpt_lib
from gptforge.train.checkpoint import CheckpointError


@dataclass
class Base:
    model: GPT
    tokenizer: Tokenizer
    info: dict[str, Any]  # where it came from: kind (gptforge | hf), path, step, model_type


def set_dropout(model: nn.Module, p: float) -> None:
    """Change dropout after construction: the nn.Dropout modules and the attention dropout (read from the config
    the blocks share)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, GPT):
            m.config.dropout = p


def load_base(init: str | Path, tokenizer: str | Path = "", block_size: int = 0) -> Base:
    """The language model a fine-tuning run starts from, with its tokenizer (or the `tokenizer` override)."""
    from gptforge.model import hf_import

    p = Path(init)
    if not p.exists():
        raise FileNotFoundError(
            f"init model not found: {p} (a gptforge run/checkpoint folder or a Hugging Face folder)"
        )
    if hf_import.is_hf_folder(p):
        model, info = hf_import.load_hf_model(p, block_size=block_size or None)
        tok = Tokenizer.load(tokenizer) if tokenizer else hf_import.load_hf_tokenizer(p)
        if tok.vocab_size > model.config.vocab_size:
            # gptforge's chat tokens were added to the HF tokenizer: grow the embedding to hold them.
            hf_import.resize_vocab(model, 64 * -(-tok.vocab_size // 64))
        return Base(model, tok, {"kind": "hf", "path": str(p), **info})
    ckpt = ckpt_lib.resolve(p)
    ckpt_lib.verify(ckpt)
    meta = ckpt_lib.read_meta(ckpt)
    if meta.get("task", "lm") == "classify":
        raise CheckpointError(
            f"{ckpt} is a classifier; fine-tuning starts from a language model (a pretrain, lm or chat checkpoint)"
        )
    if (meta.get("compression") or {}).get("quantization"):
        raise CheckpointError(
            f"{ckpt} is quantized ({meta['compression']['quantization']['scheme']}); fine-tune the float checkpoint it "
            f"came from ({meta['compression'].get('source', '?')}) and quantize again"
        )
    model = GPT(GPTConfig(**meta["model"]))
    _load_plain_or_lora(ckpt, model, meta)
    ckpt_lib.check_finite(model, f"checkpoint {ckpt}")
    tok_file = Path(tokenizer) if tokenizer else ckpt / "tokenizer.json"
    tok = Tokenizer.load(tok_file)
    if not tokenizer and tok.sha256() != meta.get("tokenizer_sha256"):
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json does not match the tokenizer it was trained with")
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer {tok_file} has {tok.vocab_size} tokens but the model's embedding has {model.config.vocab_size}"
        )
    if block_size:
        if block_size > model.config.block_size and model.config.pos == "learned":
            raise ValueError(
                f"block_size {block_size} exceeds the model's learned positions ({model.config.block_size})"
            )
        _set_block_size(model, block_size)
    return Base(model, tok, {"kind": "gptforge", "path": str(ckpt), "step": meta.get("step")})


def _set_block_size(model: GPT, block_size: int) -> None:
    """Fine-tune at another context length. RoPE tables are derived from the config, so they are rebuilt; learned
    positions can only shrink (rows are kept, the model just never uses the rest)."""
    from gptforge.model.gpt import rope_cache

    cfg = model.config
    if block_size == cfg.block_size:
        return
    if cfg.pos == "rope":
        cfg.block_size = block_size
        cos, sin = rope_cache(cfg, model.rope_cos.device)
        model.rope_cos, model.rope_sin = cos, sin
    else:
        # Keep the full position table (its shape is part of the weights); only the usable length changes.
        cfg.block_size = min(block_size, cfg.block_size)


def build_task_model(gpt: GPT, task: str, n_classes: int = 0, pooling: str = "last", head_dropout: float = 0.0):
    if task != "classify":
        return gpt
    from gptforge.model.heads import ClassifierGPT

    return ClassifierGPT(gpt, n_classes, pooling=pooling, dropout=head_dropout)


def _rebuild(meta: dict[str, Any]) -> nn.Module:
    """The trained module from its meta: GPT, wrapped in the classifier head if any, with LoRA adapters if any."""
    gpt = GPT(GPTConfig(**meta["model"]))
    head = meta.get("head") or {}
    model = build_task_model(gpt, meta.get("task", "lm"), head.get("n_classes", 0), head.get("pooling", "last"))
    lora = meta.get("lora") or {}
    if lora.get("rank", 0) > 0:
        from gptforge.model.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(**lora))
    return model


def _load_plain_or_lora(ckpt: Path, model: GPT, meta: dict[str, Any]) -> None:
    """Load a checkpoint's weights into a plain GPT; a LoRA checkpoint is rebuilt, loaded and merged first."""
    if (meta.get("lora") or {}).get("rank", 0) > 0:
        from gptforge.model.lora import merge_lora

        trained = _rebuild(meta)
        ckpt_lib.load_weights(ckpt, trained)
        merge_lora(trained)
        model.load_state_dict(trained.state_dict())
    else:
        ckpt_lib.load_weights(ckpt, model)


def load_for_inference(path: str | Path, device: torch.device | str = "cpu", allow_nonfinite: bool = False):
    """(model in eval mode, tokenizer, meta) from a checkpoint folder or a folder holding checkpoints. LoRA adapters
    are merged; a classifier comes back as the ClassifierGPT (meta['task'] == 'classify', meta['labels']); a
    quantized checkpoint (written by `gptforge compress`) comes back with its quantized modules. A tensor holding NaN
    or inf is refused, naming it, unless `allow_nonfinite`."""
    ckpt = ckpt_lib.resolve(path)
    ckpt_lib.verify(ckpt)
    meta = ckpt_lib.read_meta(ckpt)
    model = _rebuild(meta)
    if quant := (meta.get("compression") or {}).get("quantization"):
        from gptforge.compress.quantize import apply_quantization_spec

        apply_quantization_spec(model, quant)
    ckpt_lib.load_weights(ckpt, model)
    if not allow_nonfinite:
        ckpt_lib.check_finite(model, f"checkpoint {ckpt}")
    if (meta.get("lora") or {}).get("rank", 0) > 0:
        from gptforge.model.lora import merge_lora

        merge_lora(model)
    tok_file = ckpt / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no tokenizer.json")
    tok = Tokenizer.load(tok_file)
    if tok.sha256() != meta.get("tokenizer_sha256"):
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json does not match the tokenizer it was trained with")
    meta = {**meta, "checkpoint": str(ckpt)}
    return model.to(device).eval(), tok, meta
