"""Quantized modules against a plain dequantize-and-matmul reference, and whole quantized models against float."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from gptforge.compress.quantize import (
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    apply_quantization_spec,
    dequantize_model,
    is_quantized,
    logical_params,
    quantize_int4,
    quantize_model,
)
from gptforge.engine import Engine, SamplingParams
from gptforge.model.gpt import GPT, GPTConfig


def tiny(tie: bool = True, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=192, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, tie_embeddings=tie)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, the int4 kernel pads rows
def test_kernels_match_the_dequantized_reference(bias, out_features):
    torch.manual_seed(1)
    lin = nn.Linear(128, out_features, bias=bias)
    x = torch.randn(2, 3, 128)  # 3-D input: the kernels are 2-D, the modules reshape
    for q in (Int8Linear.from_float(lin), Int4Linear.from_float(lin, 32), Int4Linear.from_float(lin, 128)):
        ref = x @ q.dequantize().t() + (lin.bias if bias else 0)
        assert q(x).shape == (2, 3, out_features) and q(x).dtype == torch.float32
        # The CPU kernels take bf16 activations (their fast path): bf16 rounding, ~0.4% relative, nothing more.
        assert rel_err(q(x), ref) < 5e-3
        xb = x.bfloat16().float()  # with activations already in bf16, only the fp32 accumulation order differs
        torch.testing.assert_close(q(xb), xb @ q.dequantize().t() + (lin.bias if bias else 0), atol=2e-2, rtol=1e-2)
    # The dynamic kernel also quantizes activations: close to the reference, not equal.
    dyn = Int8Linear.from_float(lin, dynamic=True)
    assert rel_err(dyn(x), x @ dyn.dequantize().t() + (lin.bias if bias else 0)) < 0.02


def test_quantization_error_is_bounded_by_half_a_step():
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    packed, sz = quantize_int4(w, 64)
    m = Int4Linear(256, 32, group_size=64)
    m.qweight.copy_(packed)
    m.scale_zero.copy_(sz)
    step = sz[..., 0].float().t().repeat_interleave(64, dim=1)  # (N, K) per-weight step size
    # Half a step from rounding, plus bf16 rounding of the zero point (relative 2^-8 of the group's range).
    assert ((m.dequantize() - w).abs() <= step / 2 + 0.02 * w.abs().amax()).all()
    q8 = Int8Linear.from_float(nn.Linear(256, 32))
    assert q8.qweight.abs().max() <= 127


@pytest.mark.parametrize("scheme,tol", [("int8", 0.02), ("int8_dynamic", 0.05), ("int4", 0.25)])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_model_stays_close_to_float(scheme, tol, tie):
    model = tiny(tie)
    x = torch.randint(0, 192, (2, 24))
    ref, _ = model(x)
    spec = quantize_model(model, scheme, group_size=64)
    assert is_quantized(model) and spec["embedding"] and "lm_head" in spec["modules"]
    assert isinstance(model.wte, QuantEmbedding)
    assert (model.wte.table is model.lm_head) is tie  # a tied pair reads one quantized table
    assert logical_params(model) == tiny(tie).num_params()
    got, _ = model(x)
    assert rel_err(got, ref) < tol


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_safetensors_round_trip_and_dequantize(tmp_path, scheme):
    model = tiny()
    spec = quantize_model(model, scheme, exclude=["h.1.mlp.*"], group_size=32)
    x = torch.randint(0, 192, (1, 16))
    want, _ = model(x)
    f = tmp_path / "model.safetensors"
    save_model(model, str(f))
    reloaded = tiny()
    with torch.no_grad():
        for p in reloaded.parameters():
            p.add_(1.0)  # make sure every value really comes from the file
    apply_quantization_spec(reloaded, spec)
    load_model(reloaded, str(f))
    assert isinstance(reloaded.h[1].mlp.c_fc, nn.Linear) and not isinstance(reloaded.h[1].mlp.c_fc, Int8Linear)
    torch.testing.assert_close(reloaded(x)[0], want)
    float_size = tmp_path / "float.safetensors"
    save_model(tiny(), str(float_size))
    assert f.stat().st_size < 0.6 * float_size.stat().st_size
    # Dequantized back to float: the same function, as plain modules (what export writes).
    dequantize_model(reloaded)
    assert not is_quantized(reloaded) and reloaded.lm_head.weight is reloaded.wte.weight
    assert rel_err(reloaded(x)[0], want) < 0.01  # float weights vs the kernels' bf16 activations


def test_filter_and_argument_errors():
    model = tiny()
    spec = quantize_model(model, "int8", include=["h.*.attn.*"])
    assert all(".attn." in n for n in spec["modules"]) and not spec["embedding"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.wte, nn.Embedding)
    with pytest.raises(ValueError, match="'h.*.atn.*' matches no"):
        quantize_model(tiny(), "int8", include=["h.*.atn.*"])
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_model(tiny(), "int4", group_size=48)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(tiny(), "int3")
    with pytest.raises(ValueError, match="not so for"):
        quantize_model(tiny(n_embd=96, n_head=4, n_kv_head=2), "int4", group_size=64)


@pytest.mark.parametrize("scheme", ["int8", "int8_dynamic", "int4"])
def test_engine_and_cache_run_the_quantized_model_unchanged(scheme):
    model = tiny()
    quantize_model(model, scheme, group_size=32)
    prompt = torch.randint(0, 192, (1, 5))
    cached = model.generate(prompt, 12, temperature=0)
    full = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    engine = Engine(model, max_batch_size=2, max_seq_len=48)
    out = engine.generate([prompt[0].tolist()], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0] == cached[0, 5:].tolist()


def test_bfloat16_model_runs():
    model = tiny()
    quantize_model(model, "int4", group_size=32)
    x = torch.randint(0, 192, (1, 8))
    ref, _ = model(x)
    model = model.to(torch.bfloat16)
    got, _ = model(x)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), ref) < 0.05
