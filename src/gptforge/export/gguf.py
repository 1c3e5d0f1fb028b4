"""Export a gptforge `GPT` as one GGUF file for llama.cpp (and what builds on it: Ollama, LM Studio, llama-cpp-python).

The file is what llama.cpp's own `convert_hf_to_gguf.py` writes for the Hugging Face export of the same model
(`gptforge.export.hf`), without the detour through a folder:
- architecture `llama` for RoPE models (also with `bias`: llama.cpp's llama graph has optional q/k/v/o and MLP biases),
  `qwen2` when only q/k/v carry biases, `gpt2` for GPT-2 style models; anything else is refused by
  `gptforge.export.hf.pick_architecture`, naming the field.
- llama.cpp's `llama` graph rotates *adjacent* pairs of a head (GPT-J style) while our RoPE, like Hugging Face Llama,
  rotates the two halves of a head; so q and k rows (and their biases) are permuted per head exactly as
  convert_hf_to_gguf.py's `LlamaModel.permute` does. `qwen2` and `gpt2` are used as stored (qwen2 runs NEOX-style,
  half-split RoPE; gpt2 has none).
- tokenizer `gpt2` (byte-level BPE: tokens, merges, types) with pre-tokenizer `gpt-2`, the split regex our
  `tokenizers` ByteLevel pre-tokenizer uses; any other tokenizer layout is refused rather than tokenized differently.
  Embedding rows past the tokenizer (vocabulary rounded up to 64) become UNUSED `[PAD<i>]` tokens, which llama.cpp
  needs because its vocabulary size is the embedding's row count.

Types: `f32`, `f16` or `q8_0` for the 2-D weights. 1-D tensors (norms, biases) stay f32 as llama.cpp requires, and so
does GPT-2's position table (convert_hf_to_gguf.py keeps `position_embd` f32). A q8_0 tensor whose rows are not a
multiple of 32 falls back to f16 (convert_hf_to_gguf.py does the same); the summary lists them.

The file is written as `<out>.tmp` and renamed into place. `gguf` is an optional dependency: pip install
gptforge[export].
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gptforge.artifacts import fsync_dir
from gptforge.export.hf import ExportError, check_finite, check_tokenizer, pick_architecture
from gptforge.model.gpt import GPT
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.tokenizer.chat import CHAT_TEMPLATE_JINJA, END

QTypes = Literal["f32", "f16", "q8_0"]
F16_MAX = float(np.finfo(np.float16).max)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package: pip install gptforge[export]") from None
    return gguf


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (H*D, ...) from our half-split RoPE layout to llama.cpp's interleaved pairs: within each head,
    row j of the first half and row j of the second half become rows 2j and 2j+1 (convert_hf_to_gguf.py's
    `LlamaModel.permute`). Works for weights (H*D, C) and biases (H*D,)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor in llama.cpp's layout (nn.Linear's (out, in), written as is). A tied head is not
    written: llama.cpp then uses token_embd for the output."""
    cfg, sd = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {"token_embd.weight": sd["wte.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
    kinds = ("weight", "bias")
    for i in range(cfg.n_layer):
        p, b = f"h.{i}.", f"blk.{i}."
        if arch == "gpt2":
            for k in kinds:
                out[f"{b}attn_norm.{k}"] = sd[f"{p}ln_1.{k}"]
                out[f"{b}attn_qkv.{k}"] = torch.cat([sd[f"{p}attn.c_{x}.{k}"] for x in "qkv"])
                out[f"{b}attn_output.{k}"] = sd[f"{p}attn.c_proj.{k}"]
                out[f"{b}ffn_norm.{k}"] = sd[f"{p}ln_2.{k}"]
                out[f"{b}ffn_up.{k}"] = sd[f"{p}mlp.c_fc.{k}"]
                out[f"{b}ffn_down.{k}"] = sd[f"{p}mlp.c_proj.{k}"]
            continue
        out[f"{b}attn_norm.weight"] = sd[f"{p}ln_1.weight"]
        heads = {"q": cfg.n_head, "k": cfg.kv_heads}
        for ours, theirs in (("c_q", "attn_q"), ("c_k", "attn_k"), ("c_v", "attn_v"), ("c_proj", "attn_output")):
            for k in kinds:
                if f"{p}attn.{ours}.{k}" in sd:
                    t = sd[f"{p}attn.{ours}.{k}"]
                    if arch == "llama" and ours[-1] in heads:
                        t = permute_rope(t, heads[ours[-1]])
                    out[f"{b}{theirs}.{k}"] = t
        out[f"{b}ffn_norm.weight"] = sd[f"{p}ln_2.weight"]
        for ours, theirs in (("c_gate", "ffn_gate"), ("c_fc", "ffn_up"), ("c_proj", "ffn_down")):
            for k in kinds:
                if f"{p}mlp.{ours}.{k}" in sd:
                    out[f"{b}{theirs}.{k}"] = sd[f"{p}mlp.{ours}.{k}"]
    for k in kinds:
        if f"ln_f.{k}" in sd:
            out[f"output_norm.{k}"] = sd[f"ln_f.{k}"]
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {n: t.detach().float().contiguous() for n, t in out.items()}


def gguf_vocab(tok: Tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `tokenizer.ggml.model = gpt2`, with `n_rows` tokens (the embedding's rows).
    ExportError when the tokenizer is not the byte-level BPE with the GPT-2 split that llama.cpp's `gpt-2`
    pre-tokenizer reproduces."""
    from gguf import TokenType

    spec = json.loads(tok.hf.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    gpt2_split = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if model.get("type") != "BPE" or not gpt2_split or norm is not None:
        got = f"model={model.get('type')}, pre_tokenizer={pre.get('type')}, normalizer={(norm or {}).get('type')}"
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers with the GPT-2 split (as gptforge trains them), got {got}"
        )
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:  # padding rows of a rounded-up embedding (or a hole in the id space)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _encode(gguf, name: str, t: torch.Tensor, qtype: str, fallback: list[str]):
    """(array to write, raw ggml type or None) for one tensor in the requested type."""
    arr = t.numpy()
    # 1-D tensors must be f32 for llama.cpp; the position table stays f32 like convert_hf_to_gguf.py keeps it.
    if qtype == "f32" or arr.ndim == 1 or name == "position_embd.weight":
        return arr.astype(np.float32), None
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if arr.shape[-1] % block == 0:
            return gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), (
                gguf.GGMLQuantizationType.Q8_0
            )
        fallback.append(name)
    return arr.astype(np.float16), None


def _too_big(name: str, t: torch.Tensor, qtype: str) -> bool:
    """Finite in fp32 but not representable in the file: f16 values, or q8_0's f16 block scales (max/127). A q8_0
    tensor whose rows are not whole 32-value blocks is written as f16 (see `_encode`), so the f16 limit applies."""
    if qtype == "f32" or t.dim() == 1 or name == "position_embd.weight":
        return False
    q8_blocks = qtype == "q8_0" and t.shape[-1] % 32 == 0
    limit = F16_MAX * 127 if q8_blocks else F16_MAX
    return bool(t.abs().max() > limit)


def export_gguf(
    model: GPT,
    tok: Tokenizer,
    out_file: str | Path,
    qtype: QTypes = "f16",
    meta: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `model` + `tok` as a GGUF file; returns a summary (out, architecture, qtype, num_params, tensors,
    bytes, f16_fallback). Raises ExportError naming the field, tensor or path that prevents an exact export."""
    gguf = _import_gguf()
    if qtype not in ("f32", "f16", "q8_0"):
        raise ExportError(f"qtype must be f32, f16 or q8_0, got {qtype!r}")
    if not isinstance(model, GPT):
        raise ExportError(f"export needs a plain gptforge GPT language model, got {type(model).__name__}")
    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise ExportError(f"{out_file} exists; pass overwrite=True (--overwrite) to replace it")
    if out_file.is_dir():
        raise ExportError(f"{out_file} is a directory; give the path of a .gguf file")
    cfg, meta = model.config, meta or {}
    arch = pick_architecture(cfg)
    if arch == "qwen2" and cfg.head_dim * cfg.n_head != cfg.n_embd:
        # llama.cpp's qwen2 loader assumes q/o projections of n_embd x n_embd; its llama loader takes any head width
        # and optional q/k/v biases, so a head-pruned Qwen2-style model is written as llama (q/k permuted).
        arch = "llama"
    check_tokenizer(model, tok)
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    tensors = gguf_tensors(model, arch)
    if not allow_nonfinite:
        check_finite(tensors)
        big = [n for n, t in tensors.items() if _too_big(n, t, qtype)]
        if big:
            raise ExportError(
                f"tensor {', '.join(big[:5])} holds values too large for {qtype} (max {F16_MAX:g}); export as f32"
            )

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type["q8_0"] = gguf.LlamaFileType.MOSTLY_Q8_0
    tmp = out_file.with_name(out_file.name + ".tmp")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(str(meta.get("name") or f"gptforge-{arch}"))
        source = ", ".join(f"{k} {meta[k]}" for k in ("checkpoint", "step", "task") if meta.get(k) is not None)
        w.add_description(f"exported by gptforge{' from ' + source if source else ''}")
        w.add_file_type(file_type[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        if arch == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_eot_token_id(tok.special_ids[END])  # chat front ends stop a turn here
        w.add_add_bos_token(False)  # prompts are rendered with <|bos|> by the chat template, never added twice
        w.add_chat_template(CHAT_TEMPLATE_JINJA)
        fallback: list[str] = []
        for name, t in tensors.items():
            arr, raw = _encode(gguf, name, t, qtype, fallback)
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_file)
        fsync_dir(out_file.parent)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "format": "gguf",
        "out": str(out_file),
        "architecture": arch,
        "qtype": qtype,
        "num_params": model.num_params(),
        "tensors": len(tensors),
        "bytes": out_file.stat().st_size,
        "f16_fallback": fallback,
    }
