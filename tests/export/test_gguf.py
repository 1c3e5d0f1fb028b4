"""GGUF export: read back with gguf's own reader, every tensor is where llama.cpp's name table (gguf's
TensorNameMap, applied to our Hugging Face export) puts it, f32 data equals ours exactly (llama q/k after undoing the
RoPE permutation), f16/q8_0 within their rounding, every metadata key is the expected value; and, when llama-cpp-python
is installed, llama.cpp decodes the same greedy tokens as our model and tokenizes text to our ids."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from gptforge.export.gguf import export_gguf
from gptforge.export.hf import ExportError, hf_state_dict
from gptforge.tokenizer.bpe import Tokenizer
from gptforge.tokenizer.chat import CHAT_TEMPLATE_JINJA
from tests.export.conftest import VARIANTS, ZH_EN, make_model

gguf = pytest.importorskip("gguf")

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}
FTYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
T = gguf.GGMLQuantizationType


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved pairs back to half-split)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference(model, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> expected tensor, independent of the exporter's own table: our HF export (checked against
    transformers in test_hf) renamed by llama.cpp's TensorNameMap, GPT-2's Conv1D weights transposed back to
    (out, in) as convert_hf_to_gguf.py does."""
    names = gguf.get_tensor_name_map(ARCH[arch], model.config.n_layer)
    out = {}
    for hf_name, t in hf_state_dict(model, arch).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        conv1d = arch == "gpt2" and t.dim() == 2 and not name.startswith(("token_embd", "position_embd", "output."))
        out[name] = (t.t() if conv1d else t).float()
    return out


def read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def file_data(t, n_heads: dict[str, int], arch: str) -> np.ndarray:
    """A tensor's values as float32 in torch's (rows, cols) order, permutation undone."""
    shape = tuple(int(d) for d in reversed(t.shape))
    data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type == T.Q8_0 else t.data
    data = np.asarray(data, dtype=np.float32).reshape(shape)
    kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
    if arch == "llama" and kind in n_heads:
        data = unpermute(data, n_heads[kind])
    return data


@pytest.mark.parametrize(
    "variant", ["llama-tied", "llama-untied", "llama-head-size", "llama-bias", "qwen2", "qwen2-head-size", "gpt2"]
)
def test_tensors_metadata_and_vocab_read_back(tmp_path, tok, variant):
    model = make_model(tok, **VARIANTS[variant])
    # A head-pruned Qwen2-style model goes out as llama: llama.cpp's qwen2 loader assumes q/o of n_embd x n_embd.
    cfg, arch = model.config, "llama" if variant == "qwen2-head-size" else variant.split("-")[0]
    ref = reference(model, arch)
    n_heads = {"attn_q": cfg.n_head, "attn_k": cfg.kv_heads}
    for qtype in ("f32", "f16", "q8_0"):
        path = tmp_path / f"m-{qtype}.gguf"
        meta = {"checkpoint": "runs/x/pretrain/step-1", "step": 1, "name": "tiny"}
        summary = export_gguf(model, tok, path, qtype, meta=meta)
        assert summary["architecture"] == arch and summary["f16_fallback"] == []
        assert summary["bytes"] == path.stat().st_size and not path.with_name(path.name + ".tmp").exists()
        fields, tensors = read(path)
        assert set(tensors) == set(ref)
        assert ("output.weight" in tensors) == (not cfg.tie_embeddings)  # tied: llama.cpp reuses token_embd
        for name, t in tensors.items():
            want = ref[name].numpy()
            assert tuple(int(d) for d in reversed(t.shape)) == want.shape, name
            got = file_data(t, n_heads, arch)
            if qtype == "f32" or want.ndim == 1 or name == "position_embd.weight":
                assert t.tensor_type == T.F32, name  # 1-D tensors and positions always stay f32
                assert np.array_equal(got, want), name
            elif qtype == "f16":
                assert t.tensor_type == T.F16, name
                assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
            else:
                assert t.tensor_type == T.Q8_0, name
                # q8_0: blocks of 32 share one scale d = max|w|/127, stored as f16 (relative error 2^-11): the error
                # is at most half a step plus 127 steps' worth of the scale's rounding, 0.5d + 127 * 2^-11 d.
                step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
                err = np.abs(got - want).reshape(-1, 32)
                assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
                assert err.max() > 0  # really quantized
        check_metadata(fields, model, tok, arch, qtype)


def check_metadata(fields: dict, model, tok: Tokenizer, arch: str, qtype: str) -> None:
    cfg = model.config
    expected = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": "tiny",
        "general.file_type": FTYPE[qtype],
        "general.quantization_version": 2,
        f"{arch}.vocab_size": cfg.vocab_size,
        f"{arch}.context_length": cfg.block_size,
        f"{arch}.embedding_length": cfg.n_embd,
        f"{arch}.block_count": cfg.n_layer,
        f"{arch}.feed_forward_length": cfg.hidden_dim,
        f"{arch}.attention.head_count": cfg.n_head,
        f"{arch}.attention.head_count_kv": cfg.kv_heads,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": tok.special_ids["<|end|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE_JINJA,
    }
    if arch == "gpt2":
        expected[f"{arch}.attention.layer_norm_epsilon"] = pytest.approx(cfg.norm_eps, rel=1e-6)
    else:
        expected[f"{arch}.attention.layer_norm_rms_epsilon"] = pytest.approx(cfg.norm_eps, rel=1e-6)
        expected[f"{arch}.rope.freq_base"] = cfg.rope_theta
        expected[f"{arch}.rope.dimension_count"] = cfg.head_dim
    if cfg.head_size:
        expected[f"{arch}.attention.key_length"] = expected[f"{arch}.attention.value_length"] = cfg.head_size
    lists = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    assert set(fields) == set(expected) | lists | {"general.description"}
    for key, value in expected.items():
        assert fields[key] == value, key
    assert "runs/x/pretrain/step-1" in fields["general.description"]

    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    assert len(tokens) == len(types) == cfg.vocab_size  # llama.cpp's vocabulary is the embedding's rows
    assert tokens[: tok.vocab_size] == sorted(vocab, key=vocab.get)
    specials = set(tok.special_ids.values())
    for i, t in enumerate(types):
        want = gguf.TokenType.UNUSED if i >= tok.vocab_size else gguf.TokenType.CONTROL if i in specials else 1
        assert t == want, (i, tokens[i])
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path, tok):
    model = make_model(tok, n_head=4, n_embd=48, intermediate_size=64)  # rows of 48 inputs: not whole q8_0 blocks
    summary = export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    _, tensors = read(tmp_path / "m.gguf")
    assert sorted(summary["f16_fallback"]) == sorted(n for n, t in tensors.items() if t.tensor_type == T.F16)
    assert "blk.0.ffn_down.weight" not in summary["f16_fallback"]  # 64 inputs per row: quantized
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0
    assert "blk.0.attn_q.weight" in summary["f16_fallback"]


def test_refusals_name_the_problem(tmp_path, tok, monkeypatch):
    model = make_model(tok, **VARIANTS["llama-untied"])
    with torch.no_grad():
        model.lm_head.weight[7, 2] = float("inf")
    with pytest.raises(ExportError, match="output.weight"):
        export_gguf(model, tok, tmp_path / "inf.gguf", "f32")
    export_gguf(model, tok, tmp_path / "inf.gguf", "f32", allow_nonfinite=True)
    with pytest.raises(ExportError, match="exists.*overwrite"):
        export_gguf(model, tok, tmp_path / "inf.gguf", "f32", allow_nonfinite=True)

    big = make_model(tok, **VARIANTS["gpt2"])
    with torch.no_grad():
        big.h[1].mlp.c_fc.weight[0, 0] = 1e5  # beyond float16's 65504
    with pytest.raises(ExportError, match=r"blk\.1\.ffn_up\.weight.*f16"):
        export_gguf(big, tok, tmp_path / "big.gguf", "f16")
    export_gguf(big, tok, tmp_path / "big.gguf", "q8_0")  # q8_0's scale is max/127: fits
    with pytest.raises(ExportError, match="model.norm="):
        export_gguf(make_model(tok, norm="layernorm"), tok, tmp_path / "ln.gguf")
    with pytest.raises(ExportError, match="qtype"):
        export_gguf(big, tok, tmp_path / "q4.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf", "inf.gguf"]

    monkeypatch.setitem(sys.modules, "gguf", None)  # the optional dependency is missing
    with pytest.raises(ImportError, match=r"pip install gptforge\[export\]"):
        export_gguf(big, tok, tmp_path / "x.gguf")


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, tok):
    from tokenizers import pre_tokenizers

    hf = type(tok.hf).from_str(tok.hf.to_str())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # GPT-2 split, but with a leading space
    other = Tokenizer(hf)
    with pytest.raises(ExportError, match="pre_tokenizer=ByteLevel"):
        export_gguf(make_model(tok), other, tmp_path / "t.gguf")
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="pre_tokenizer=Whitespace"):
        export_gguf(make_model(tok), Tokenizer(hf), tmp_path / "t.gguf")


# --- llama.cpp itself -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", ["llama-untied", "llama-tied", "llama-head-size", "llama-bias", "qwen2", "qwen2-head-size", "gpt2"]
)
def test_llama_cpp_decodes_our_greedy_tokens(tmp_path, tok, variant):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = make_model(tok, **VARIANTS[variant])
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "f32")
    # f32 KV cache (GGML_TYPE_F32 = 0): llama.cpp's default f16 cache would add rounding our model does not have.
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=model.config.block_size, logits_all=False, verbose=False, type_k=0, type_v=0
    )
    assert llm.tokenize(ZH_EN.encode(), add_bos=False, special=False) == tok.encode(ZH_EN)
    prompt = [tok.bos_id, *tok.encode("The quick brown fox 春眠")]
    ours = model.generate(torch.tensor([prompt]), 16, temperature=0)[0, len(prompt) :].tolist()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == ours
    del llm

    # Next-token logits of the prompt in every type. f32: equal up to float rounding (and, for gpt2, ggml's GELU,
    # which reads a float16 lookup table); f16 and q8_0: within their rounding, q8_0 also quantizing activations.
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0][0, -1].numpy()
    tolerance = {"f32": 5e-3, "f16": 0.1, "q8_0": 0.15 * np.abs(want).max()}
    for qtype, tol in tolerance.items():
        export_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype, overwrite=True)
        llm = llama_cpp.Llama(
            model_path=str(tmp_path / f"m-{qtype}.gguf"), n_ctx=model.config.block_size, logits_all=True,
            verbose=False, type_k=0, type_v=0,
        )  # fmt: skip
        llm.eval(prompt)
        got = np.asarray(llm.scores[len(prompt) - 1])
        assert np.abs(got - want).max() <= tol, qtype
        del llm
