"""Hugging Face export: transformers computes our logits, hf_import reads the folder back to identical logits, the
tokenizer and chat template give our ids, and every inexact or unsafe export is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptforge.export.hf import ExportError, export_hf, pick_architecture
from gptforge.model.gpt import GPTConfig
from gptforge.model.hf_import import load_hf_model
from gptforge.tokenizer.chat import chat_prompt_ids
from tests.export.conftest import VARIANTS, ZH_EN, make_model, no_code_files, padded_vocab

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "README.md",
}
EXPECTED_ARCH = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def ids(tok, n: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, tok.vocab_size, (batch, n), generator=torch.Generator().manual_seed(1))


def canonical(cfg: GPTConfig) -> dict:
    """The config with derived fields resolved (0 = "derived" on one side, the explicit value on the other)."""
    unused = {"rope_theta"} if cfg.pos == "learned" else set()  # GPT-2 has no RoPE base to carry
    d = cfg.model_dump(exclude={"n_kv_head", "head_size", "intermediate_size", *unused})
    return d | {"kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_and_hf_import_compute_our_logits(tmp_path, tok, variant):
    model = make_model(tok, **VARIANTS[variant])
    out = tmp_path / "hf"
    summary = export_hf(model, tok, out, meta={"checkpoint": "runs/x/pretrain/step-1", "step": 1})
    assert set(summary["files"]) == FILES == {p.name for p in out.iterdir()}
    assert no_code_files(out) and not out.with_name("hf.tmp").exists()
    arch = variant.split("-")[0]
    assert summary["model_type"] == arch and summary["architecture"] == EXPECTED_ARCH.get(arch, "LlamaForCausalLM")
    assert summary["num_params"] == model.num_params()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [summary["architecture"]] and cfg["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] == model.config.tie_embeddings
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert cfg.get("max_position_embeddings", cfg.get("n_positions")) == model.config.block_size
    assert ("head_dim" in cfg) == bool(model.config.head_size)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not model.config.tie_embeddings)  # a tied head is not duplicated

    x = ids(tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == summary["architecture"]
    back, info = load_hf_model(out)
    with torch.no_grad():
        ours = model(x)[0]
        torch.testing.assert_close(hf(input_ids=x).logits, ours, atol=1e-4, rtol=0)
        assert torch.equal(back(x)[0], ours)  # the import is the exact inverse
    assert canonical(back.config) == canonical(model.config)
    assert info["model_type"] == arch and not info["ignored_tensors"]


def test_tokenizer_and_chat_template_give_our_ids(tmp_path, tok):
    out = tmp_path / "hf"
    export_hf(make_model(tok, **VARIANTS["llama-tied"]), tok, out)
    at = transformers.AutoTokenizer.from_pretrained(out)
    assert at(ZH_EN, add_special_tokens=False)["input_ids"] == tok.encode(ZH_EN)
    assert at(ZH_EN)["input_ids"] == tok.encode(ZH_EN)  # no BOS/EOS added behind the user's back
    assert at.decode(tok.encode(ZH_EN)) == ZH_EN
    assert (at.bos_token_id, at.eos_token_id, at.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert at.model_max_length == 64
    conversation = [
        {"role": "system", "content": "你是一个有用的助手。"},
        {"role": "user", "content": ZH_EN},
        {"role": "assistant", "content": "The fox 跳过了。"},
        {"role": "user", "content": "再来一次 please"},
    ]
    rendered = at.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(rendered) == chat_prompt_ids(tok, conversation)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False and tok.eos_id in gen["eos_token_id"]
    assert tok.special_ids["<|end|>"] in gen["eos_token_id"]
    readme = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in readme and "from_pretrained" in readme


def test_bfloat16_export_round_trips(tmp_path, tok):
    model = make_model(tok, **VARIANTS["qwen2"])
    out = tmp_path / "bf16"
    export_hf(model, tok, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back, _ = load_hf_model(out)
    for name, p in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], p.to(torch.bfloat16).float()), name


GPT2 = VARIANTS["gpt2"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(norm="layernorm"), "norm"),  # RoPE + LayerNorm: no stock architecture
        (dict(mlp="gelu"), "mlp"),
        (dict(GPT2, norm="rmsnorm"), "norm"),
        (dict(GPT2, mlp="swiglu"), "mlp"),
        (dict(GPT2, bias=False), "bias"),
        (dict(GPT2, bias=False, qkv_bias=True), "bias"),
        (dict(GPT2, n_kv_head=2), "n_kv_head"),
        (dict(GPT2, head_size=8), "head_size"),
    ],
)
def test_inexact_architectures_are_refused_naming_the_field(tmp_path, tok, overrides, field):
    cfg = GPTConfig(**{"vocab_size": 64, "n_head": 4, "n_embd": 64, **overrides})
    with pytest.raises(ExportError, match=rf"model\.{field}="):
        pick_architecture(cfg)
    with pytest.raises(ExportError, match=rf"model\.{field}="):
        export_hf(make_model(tok, **{"n_head": 4, "n_embd": 64, **overrides}), tok, tmp_path / "out")
    assert not any(tmp_path.iterdir())  # nothing written


def test_flags_pick_the_architecture():
    base = dict(vocab_size=64, n_head=4, n_embd=64)
    assert pick_architecture(GPTConfig(**base)) == "llama"
    assert pick_architecture(GPTConfig(**base, bias=True)) == "llama"
    assert pick_architecture(GPTConfig(**base, bias=True, qkv_bias=True)) == "llama"  # bias covers q/k/v and more
    assert pick_architecture(GPTConfig(**base, qkv_bias=True)) == "qwen2"
    assert pick_architecture(GPTConfig(**{**base, **GPT2})) == "gpt2"


def test_non_finite_tensors_are_refused_by_name(tmp_path, tok):
    model = make_model(tok, **VARIANTS["llama-untied"])
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        export_hf(model, tok, tmp_path / "nan")
    assert not any(tmp_path.iterdir())
    export_hf(model, tok, tmp_path / "nan", allow_nonfinite=True)  # on request (debugging elsewhere)
    assert (tmp_path / "nan" / "model.safetensors").is_file()

    big = make_model(tok, **VARIANTS["llama-tied"])
    with torch.no_grad():
        big.h[0].attn.c_v.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ExportError, match=r"v_proj\.weight.*float16"):
        export_hf(big, tok, tmp_path / "fp16", dtype=torch.float16)
    export_hf(big, tok, tmp_path / "bf16", dtype=torch.bfloat16)  # bfloat16 has fp32's range


def test_output_folder_is_replaced_only_on_request(tmp_path, tok):
    model = make_model(tok, **VARIANTS["llama-tied"])
    out = tmp_path / "hf"
    export_hf(model, tok, out)
    with pytest.raises(ExportError, match="not empty.*overwrite"):
        export_hf(model, tok, out)
    out.with_name("hf.tmp").mkdir()  # a crashed export's leftovers are cleared
    (out.with_name("hf.tmp") / "junk").write_text("x")
    other = make_model(tok, seed=5, **VARIANTS["llama-tied"])
    export_hf(other, tok, out, overwrite=True)
    assert {p.name for p in tmp_path.iterdir()} == {"hf"}
    back, _ = load_hf_model(out)
    assert torch.equal(back.wte.weight, other.wte.weight)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="no config.json"):
        export_hf(model, tok, mine, overwrite=True)  # never clobber a folder that is not an export
    assert (mine / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    export_hf(model, tok, tmp_path / "empty")  # an empty folder is fine


def test_refuses_what_is_not_a_language_model_or_does_not_fit(tmp_path, tok):
    from gptforge.model.heads import ClassifierGPT

    model = make_model(tok, **VARIANTS["llama-tied"])
    with pytest.raises(ExportError, match="ClassifierGPT"):
        export_hf(ClassifierGPT(model, 3), tok, tmp_path / "c")
    small = make_model(tok, vocab_size=tok.vocab_size - 1, **VARIANTS["llama-tied"])
    with pytest.raises(ExportError, match="tokenizer has"):
        export_hf(small, tok, tmp_path / "s")
    assert padded_vocab(tok) > tok.vocab_size  # the other tests do export padding rows
    with pytest.raises(ExportError, match="dtype"):
        export_hf(model, tok, tmp_path / "d", dtype=torch.float64)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ExportError, match="not a directory"):
        export_hf(model, tok, tmp_path / "f")
    assert not Path(tmp_path / "c").exists()
