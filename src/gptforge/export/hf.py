"""Export a gptforge `GPT` as a Hugging Face folder that `transformers` loads with no custom code.

The folder holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template),
special_tokens_map.json, generation_config.json and a short README.md model card. It is the exact inverse of
`gptforge.model.hf_import`: the tensor-name table is that module's `_specs`, used in the other direction, so a folder
written here loads back with `load_hf_model` to identical logits, and `transformers` computes the same logits as our
model (the tests check both to 1e-4 in fp32).

Architecture follows the config flags, exact or refused (`ExportError` names the field and value):
- RoPE + RMSNorm + SwiGLU -> `LlamaForCausalLM` (with `bias`: attention_bias + mlp_bias), or `Qwen2ForCausalLM`
  when only q/k/v carry biases (`qkv_bias`). Our RoPE is already Hugging Face's half-split layout: no permutation.
- learned positions + LayerNorm + GELU(tanh) + biases -> `GPT2LMHeadModel` (fused c_attn, Conv1D-transposed).
  GPT-2 has neither grouped-query attention nor a free head width, so those are refused.
Any other mix (say RoPE with LayerNorm) is computed by no stock architecture and is refused rather than exported as
something that would load and silently compute different logits.

Trade-offs: config.json carries both the transformers 4.x and 5.x spellings of the dtype and RoPE base (`torch_dtype`
and `dtype`, `rope_theta` and `rope_parameters`), so either major version reads it. `head_dim` is written only when
it differs from hidden/heads; older transformers releases ignore it for Qwen2, so a pruned-head Qwen2 export needs a
recent transformers. Hugging Face's tokenizer renders the chat template as text, so a literal "<|end|>" typed into
message content becomes the control token there (gptforge's own renderer never lets content produce one).

Safety: only JSON, Markdown and safetensors are written, never code. The folder is built in `<out>.tmp` and renamed
into place, so a crash leaves the old export or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gptforge.artifacts import fsync_dir
from gptforge.model.gpt import GPT, GPTConfig
from gptforge.model.hf_import import _PREFIX, _specs  # one name table for import and export keeps them inverse
from gptforge.tokenizer.bpe import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer
from gptforge.tokenizer.chat import CHAT_TEMPLATE_JINJA, END

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHOW = 5  # how many tensor names an error lists


class ExportError(ValueError):
    """A model (or output path) that cannot be exported exactly; the message names the field, tensor or path."""


def _refuse(field: str, value: Any, why: str) -> ExportError:
    return ExportError(f"cannot export: model.{field}={value!r} {why}")


def pick_architecture(cfg: GPTConfig) -> str:
    """'llama', 'qwen2' or 'gpt2': the stock architecture that computes exactly what `cfg` computes, else
    ExportError naming the first field no architecture can express."""
    if cfg.pos == "learned":
        gpt2 = "with pos='learned' (GPT-2 style, exported as GPT-2)"
        if cfg.norm != "layernorm":
            raise _refuse("norm", cfg.norm, f"{gpt2}: GPT-2 uses layernorm")
        if cfg.mlp != "gelu":
            raise _refuse("mlp", cfg.mlp, f"{gpt2}: GPT-2 uses the gelu MLP")
        if not cfg.bias:
            raise _refuse("bias", cfg.bias, f"{gpt2}: GPT-2 has biases in every linear layer and norm")
        if cfg.kv_heads != cfg.n_head:
            raise _refuse("n_kv_head", cfg.n_kv_head, f"{gpt2}: GPT-2 has no grouped-query attention")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise _refuse(
                "head_size", cfg.head_size, f"{gpt2}: GPT-2 heads are n_embd/n_head = {cfg.n_embd // cfg.n_head}"
            )
        return "gpt2"
    rope = "with pos='rope' (exported as Llama/Qwen2)"
    if cfg.norm != "rmsnorm":
        raise _refuse("norm", cfg.norm, f"{rope}: Llama and Qwen2 use rmsnorm; no stock architecture matches")
    if cfg.mlp != "swiglu":
        raise _refuse("mlp", cfg.mlp, f"{rope}: Llama and Qwen2 use the swiglu MLP; no stock architecture matches")
    # `bias` biases q/k/v/o and the MLP: Llama's attention_bias + mlp_bias. q/k/v alone is Qwen2's layout.
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def _names(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def check_finite(named: dict[str, torch.Tensor], what: str = "") -> None:
    """ExportError naming every tensor (first few) holding NaN or inf."""
    bad = [n for n, t in named.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ExportError(
            f"tensor {_names(bad)} contains NaN or inf values{what}; a model like this produces garbage "
            "(pass allow_nonfinite=True / --allow_nonfinite to export it anyway, e.g. to debug it elsewhere)"
        )


def check_tokenizer(model: GPT, tok: Tokenizer) -> None:
    if tok.vocab_size > model.config.vocab_size:
        raise ExportError(
            f"tokenizer has {tok.vocab_size} tokens but the model's embedding has only {model.config.vocab_size} rows"
        )


def hf_state_dict(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (the inverse of hf_import's mapping). A tied head is not stored:
    `tie_word_embeddings` tells transformers to reuse the embedding."""
    ours = model.state_dict()
    prefix = _PREFIX[arch]
    out: dict[str, torch.Tensor] = {}
    for s in _specs(model, arch, model.config.block_size):
        t = torch.cat([ours[n] for n in s.targets], dim=0) if len(s.targets) > 1 else ours[s.targets[0]]
        t = t.detach().t() if s.transpose else t.detach()
        out[s.hf_name if s.hf_name == "lm_head.weight" else prefix + s.hf_name] = t
    return out


def hf_config(model: GPT, tok: Tokenizer, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    cfg = model.config
    common = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": DTYPES[dtype],  # transformers 4.x
        "dtype": DTYPES[dtype],  # transformers 5.x
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if arch == "gpt2":
        return {
            **common,
            "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.hidden_dim,
            "activation_function": "gelu_new",  # the tanh approximation our GELU MLP computes
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    out = {
        **common,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "attention_dropout": 0.0,
    }
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        out["head_dim"] = cfg.head_dim
    if arch == "llama":
        out |= {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    return out


def tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json verbatim plus the transformers side files, as name -> text."""
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "chat_template": CHAT_TEMPLATE_JINJA,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes exactly; no space cleanup
        "add_bos_token": False,
        "add_eos_token": False,
    }
    return {
        "tokenizer.json": tok.hf.to_str(pretty=True),
        "tokenizer_config.json": _dumps(tok_cfg),
        "special_tokens_map.json": _dumps(specials),
    }


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    # Both stops gptforge itself uses: <|eos|> ends a document, <|end|> ends a chat turn.
    eos = [tok.eos_id, tok.special_ids[END]]
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id, "do_sample": False}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def model_card(model: GPT, arch: str, dtype: torch.dtype, meta: dict[str, Any], num_params: int) -> str:
    cfg = model.config
    from gptforge import __version__

    keys = ("checkpoint", "stage", "task", "step", "tokenizer_sha256")
    provenance = "\n".join(f"- {k}: `{meta[k]}`" for k in keys if meta.get(k) is not None)
    provenance += f"\n- exported by: gptforge {__version__}"
    return f"""---
library_name: transformers
tags: [gptforge]
---
# gptforge model ({HF_CLASSES[arch]})

A {num_params / 1e6:.2f}M-parameter decoder-only language model trained with gptforge and exported as a standard
`{HF_CLASSES[arch]}` ({arch}): {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads ({cfg.kv_heads} key/value),
context {cfg.block_size} tokens, vocabulary {cfg.vocab_size}, weights in {DTYPES[dtype]}. No custom code is needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=64)
```

The chat template is gptforge's: `<|bos|>`, then per message `<|role|>` + content + `<|end|>`; generation stops at
`<|end|>` or `<|eos|>` (generation_config.json). gptforge can load this folder back with
`gptforge finetune --init <folder>` (`gptforge.model.hf_import.load_hf_model`).

## Provenance
{provenance}
"""


def prepare_out_dir(out_dir: Path, overwrite: bool, marker: str) -> Path:
    """The temp folder to build into, after refusing to clobber what is there. A non-empty `out_dir` is replaced only
    with overwrite=True and only when it holds `marker` (a previous export): never a folder of someone's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out_dir / marker).is_file():
            raise ExportError(f"refusing to replace {out_dir}: it has no {marker}, so it is not an earlier export")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-export
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """fsync every file, then swap `tmp` into place; an old export is moved aside only once the new one is whole."""
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(
    model: GPT,
    tok: Tokenizer,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Write `model` + `tok` as a Hugging Face folder at `out_dir`; returns a summary (out_dir, files, model_type,
    architecture, num_params, dtype). Raises ExportError naming the field, tensor or path that prevents an exact
    export."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES.values())}, got {dtype}")
    if not isinstance(model, GPT):
        raise ExportError(f"export needs a plain gptforge GPT language model, got {type(model).__name__}")
    out_dir = Path(out_dir)
    arch = pick_architecture(model.config)
    check_tokenizer(model, tok)
    tensors = hf_state_dict(model, arch)
    if not allow_nonfinite:
        check_finite(tensors)
    cast = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
    if not allow_nonfinite and dtype != torch.float32:
        check_finite(cast, f" after casting to {DTYPES[dtype]} (too large for it; export in float32)")
    num_params = model.num_params()

    tmp = prepare_out_dir(out_dir, overwrite, marker="config.json")
    try:
        save_file(cast, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {
            "config.json": _dumps(hf_config(model, tok, arch, dtype)),
            **tokenizer_files(tok, model.config.block_size),
            "generation_config.json": _dumps(generation_config(tok)),
            "README.md": model_card(model, arch, dtype, meta or {}, num_params),
        }
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "format": "hf",
        "out": str(out_dir),
        "files": sorted(["model.safetensors", *files]),
        "model_type": arch,
        "architecture": HF_CLASSES[arch],
        "num_params": num_params,
        "dtype": DTYPES[dtype],
    }
