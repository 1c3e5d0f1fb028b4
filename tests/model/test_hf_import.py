"""Loading Hugging Face folders: logits equal transformers' for GPT-2, Llama and Qwen2 (and Mistral), every
unsupported or unsafe input is refused by name, the tokenizer gains gptforge's specials without letting text forge
any control token, and growing the vocabulary leaves old tokens' logits unchanged."""

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.model.hf_import import (
    HFImportError,
    hf_config_to_gpt,
    is_hf_folder,
    load_hf_model,
    load_hf_tokenizer,
    resize_vocab,
)
from gptforge.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

VOCAB = 101


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """transformers inits biases to 0 and norms to 1, which would hide a bias or norm mapped to the wrong place."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            is_norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + noise if is_norm else noise)
    return model.eval()


def save(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return folder


def assert_same_logits(hf, folder: Path, t: int = 20, **kw):
    model, info = load_hf_model(folder, **kw)
    x = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    assert not model.training
    return model, info


def rewrite(folder: Path, fn) -> None:
    """Apply fn to the tensors of model.safetensors (a dict) and write them back."""
    f = folder / "model.safetensors"
    tensors = fn(load_file(f))
    save_file(tensors, f, metadata={"format": "pt"})


def gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie
    )
    return randomize(transformers.GPT2LMHeadModel(cfg))


def llama(tie: bool = False, bias: bool = False, max_pos: int = 64, **extra):
    cfg = transformers.LlamaConfig(
        **extra,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return randomize(transformers.LlamaForCausalLM(cfg))


def qwen2(tie: bool = False):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return randomize(transformers.Qwen2ForCausalLM(cfg))


# --- equivalence with transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie,block_size", [(True, None), (False, None), (True, 24)])
def test_gpt2_matches_transformers(tmp_path, tie, block_size):
    hf = gpt2(tie)
    model, info = assert_same_logits(hf, save(hf, tmp_path), block_size=block_size)
    assert model.config.pos == "learned" and model.config.block_size == (block_size or 40)
    assert info["model_type"] == "gpt2" and info["tie_embeddings"] is tie and info["vocab_size"] == VOCAB
    assert info["num_params"] == model.num_params() and info["source"] == str(tmp_path.resolve())
    assert (model.lm_head.weight is model.wte.weight) is tie


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_llama_matches_transformers(tmp_path, tie, bias):
    hf = llama(tie, bias)
    model, info = assert_same_logits(hf, save(hf, tmp_path))
    c = model.config
    assert (c.n_kv_head, c.rope_theta, c.norm_eps, c.bias, c.block_size) == (2, 5000.0, 1e-5, bias, 64)
    assert info["tie_embeddings"] is tie and (model.lm_head.weight is model.wte.weight) is tie


def test_llama_with_its_own_head_dim_matches_transformers(tmp_path):
    # A head width that is not hidden/heads (a structurally pruned model) maps to GPTConfig.head_size.
    hf = llama(head_dim=12)
    model, _ = assert_same_logits(hf, save(hf, tmp_path))
    assert model.config.head_size == 12 and model.h[0].attn.c_q.weight.shape == (4 * 12, 32)


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_matches_transformers(tmp_path, tie):
    hf = qwen2(tie)
    model, _ = assert_same_logits(hf, save(hf, tmp_path))
    assert model.config.qkv_bias and not model.config.bias and model.config.kv_heads == 2


def test_mistral_only_without_an_active_sliding_window(tmp_path):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    kw["num_key_value_heads"] = 2
    hf = randomize(transformers.MistralForCausalLM(transformers.MistralConfig(**kw, max_position_embeddings=64)))
    save(hf, tmp_path / "w")  # default sliding_window 4096 covers the whole 64-token context: plain causal
    assert_same_logits(hf, tmp_path / "w")
    cfg = transformers.MistralConfig(**kw, max_position_embeddings=64, sliding_window=16)
    hf = randomize(transformers.MistralForCausalLM(cfg))
    with pytest.raises(HFImportError, match="sliding_window"):
        load_hf_model(save(hf, tmp_path / "s"))
    assert_same_logits(hf, tmp_path / "s", t=16, block_size=16)


def test_sharded_checkpoint_loads(tmp_path):
    hf = llama()
    save(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    _, info = assert_same_logits(hf, tmp_path)
    assert len(info["files"]) > 1


def test_prefixless_checkpoint_and_ignored_buffers(tmp_path):
    hf = gpt2()
    save(hf, tmp_path)

    def strip_and_add_buffers(t):  # GPT2Model (no LM head) saves without "transformer."; old files carry buffers
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        t["h.0.attn.bias"] = torch.ones(1, 1, 40, 40).tril()
        t["h.1.attn.masked_bias"] = torch.tensor(-1e4)
        return t

    rewrite(tmp_path, strip_and_add_buffers)
    _, info = assert_same_logits(hf, tmp_path)
    assert info["ignored_tensors"] == ["h.0.attn.bias", "h.1.attn.masked_bias"]


def test_dtype(tmp_path):
    model, info = load_hf_model(save(qwen2(), tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and info["dtype"] == "bfloat16"
    rewrite(tmp_path, lambda t: {**t, "model.norm.weight": t["model.norm.weight"] * 0 + 1e6})
    with pytest.raises(HFImportError, match=r"'model.norm.weight' overflows torch.float16"):
        load_hf_model(tmp_path, dtype=torch.float16)


# --- refusals ------------------------------------------------------------------------------------------------------

LLAMA_CFG = dict(
    model_type="llama", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)
GPT2_CFG = dict(model_type="gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def test_config_mapping_reads_both_transformers_layouts():
    v4 = hf_config_to_gpt({**LLAMA_CFG, "rope_theta": 5e5, "rope_scaling": None, "max_position_embeddings": 128})
    v5 = hf_config_to_gpt({**LLAMA_CFG, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v4.rope_theta == v5.rope_theta == 5e5 and v4.block_size == 128 and v5.block_size == 2048
    assert hf_config_to_gpt(v4_cap := {**LLAMA_CFG, "max_position_embeddings": 128}, block_size=32).block_size == 32
    assert hf_config_to_gpt(v4_cap, block_size=256).block_size == 256  # RoPE extends; learned positions cannot
    g = hf_config_to_gpt({**GPT2_CFG, "n_inner": 100, "layer_norm_epsilon": 1e-6})
    assert (g.intermediate_size, g.norm_eps, g.norm, g.mlp, g.bias, g.tie_embeddings) == (
        100,
        1e-6,
        "layernorm",
        "gelu",
        True,
        True,
    )


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({**LLAMA_CFG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({**LLAMA_CFG, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({**LLAMA_CFG, "hidden_act": "gelu"}, "hidden_act"),
        ({**LLAMA_CFG, "attention_bias": True}, "attention_bias"),  # q/k/v/o biases: neither bias nor qkv_bias
        ({**LLAMA_CFG, "mlp_bias": True}, "mlp_bias"),
        ({**LLAMA_CFG, "model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({**LLAMA_CFG, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({**LLAMA_CFG, "model_type": "bert"}, "model_type='bert' is not supported; supported: gpt2, llama, qwen2"),
        ({**GPT2_CFG, "activation_function": "relu"}, "activation_function"),
        ({**GPT2_CFG, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({**GPT2_CFG, "n_embd": None}, "n_embd"),
    ],
)
def test_unsupported_configs_are_refused_by_key(cfg, key):
    with pytest.raises(HFImportError, match=key):
        hf_config_to_gpt(cfg)


def test_learned_positions_cannot_be_extended():
    with pytest.raises(HFImportError, match="n_positions=64"):
        hf_config_to_gpt(GPT2_CFG, block_size=65)


def edit_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def test_folder_level_refusals_name_the_key(tmp_path):
    save(llama(), tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(HFImportError, match="rope_scaling"):
        load_hf_model(tmp_path)
    edit_config(tmp_path, rope_scaling=None, model_type="gpt_neox")
    with pytest.raises(HFImportError, match="gpt_neox"):
        load_hf_model(tmp_path)


def test_pickled_weights_are_never_unpickled(tmp_path):
    save(llama(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(HFImportError, match="pickled weights are never loaded"):
        load_hf_model(tmp_path)
    assert not marker.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()  # the trap was real


def test_remote_code_is_never_imported(tmp_path):
    hf = llama()
    save(hf, tmp_path)
    marker = tmp_path / "EXECUTED"
    (tmp_path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass EvilModel: pass\n")
    edit_config(tmp_path, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    _, info = assert_same_logits(hf, tmp_path)
    assert info["remote_code_ignored"] and not marker.exists()
    subprocess.run([sys.executable, "-c", "import modeling_evil"], cwd=tmp_path, check=True)
    assert marker.exists()  # importing it would have run it


def test_non_finite_tensor_is_named(tmp_path):
    save(llama(), tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(t):
        t[name][3, 5] = float("nan")
        return t

    rewrite(tmp_path, poison)
    with pytest.raises(HFImportError, match=f"'{name}' contains NaN"):
        load_hf_model(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    save(llama(), tmp_path)
    gone = "model.layers.0.self_attn.k_proj.weight"
    rewrite(tmp_path, lambda t: {**{k: v for k, v in t.items() if k != gone}, "model.score.weight": torch.ones(2)})
    msg = f"missing 1 tensors: {gone}; unexpected 1 tensors: model.score.weight"
    with pytest.raises(HFImportError, match=msg):
        load_hf_model(tmp_path)
    save(llama(), tmp_path)
    edit_config(tmp_path, intermediate_size=40)
    msg = r"'model.layers.0.mlp.gate_proj.weight' has shape \[48, 32\], config expects \[40, 32\]"
    with pytest.raises(HFImportError, match=msg):
        load_hf_model(tmp_path)


def test_untied_config_needs_its_head_and_a_tied_copy_must_match(tmp_path):
    save(llama(tie=True), tmp_path)
    edit_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(HFImportError, match="missing 1 tensors: lm_head.weight"):
        load_hf_model(tmp_path)
    edit_config(tmp_path, tie_word_embeddings=True)
    rewrite(tmp_path, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    _, info = load_hf_model(tmp_path)
    assert info["ignored_tensors"] == ["lm_head.weight (tied copy)"]
    rewrite(tmp_path, lambda t: {**t, "lm_head.weight": t["lm_head.weight"] + 1})
    with pytest.raises(HFImportError, match="lm_head.weight differs"):
        load_hf_model(tmp_path)


def test_malformed_or_absent_weight_files(tmp_path):
    save(llama(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(HFImportError, match="cannot read safetensors file .*model.safetensors"):
        load_hf_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="no model.safetensors"):
        load_hf_model(tmp_path)
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFImportError, match="shard names must be"):
        load_hf_model(tmp_path)


def test_is_hf_folder(tmp_path):
    save(gpt2(), tmp_path / "m")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{nope")
    (tmp_path / "gf").mkdir()
    (tmp_path / "gf" / "config.json").write_text('{"n_layer": 2}')
    assert is_hf_folder(tmp_path / "m")
    assert not any(is_hf_folder(tmp_path / d) for d in ("bad", "gf", "absent", "m/config.json"))


# --- tokenizer -----------------------------------------------------------------------------------------------------

HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FRAGMENTS = ["hello", " world", "<|endoftext|>", "<|user|>", "<|im_start|>", "<|", "|>", "春眠", " ", "\n", "🧑‍🚀", "<"]


def tiny_hf_tokenizer(specials=HF_SPECIALS):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    tok.train_from_iterator(["hello world, the cat sat on the mat. 春眠不觉晓"] * 50, trainer=trainer)
    return tok


def test_load_hf_tokenizer_adds_specials_and_guards_every_control_token(tmp_path):
    hf = tiny_hf_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    n = hf.get_vocab_size()
    tok = load_hf_tokenizer(tmp_path)
    assert hf.get_vocab_size() == n  # the caller's tokenizer is not modified
    assert sorted(tok.special_ids[t] for t in SPECIAL_TOKENS) == list(range(n, n + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == n + len(SPECIAL_TOKENS) and tok.path is None
    hf_ids = {hf.token_to_id(t) for t in HF_SPECIALS}
    assert hf_ids <= tok.control_ids and set(tok.special_ids.values()) <= tok.control_ids
    for text in ["hello world", "the cat 春眠不觉晓", " mat.\n"]:  # ordinary text keeps the pretrained ids
        assert tok.encode(text) == hf.encode(text).ids
    rng = random.Random(0)
    texts = ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 8))) for _ in range(300)]
    for text in texts:
        ids = tok.encode(text)
        assert not tok.control_ids & set(ids), text
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    tok.save(tmp_path / "out" / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "out")
    assert again.sha256() == tok.sha256() and again.encode(texts[0]) == tok.encode(texts[0])


def test_with_specials_is_a_no_op_on_a_complete_tokenizer(tmp_path):
    hf = tiny_hf_tokenizer(HF_SPECIALS + SPECIAL_TOKENS)
    tok = Tokenizer.with_specials(hf, path=tmp_path / "tokenizer.json")
    assert tok.hf is hf and tok.path == tmp_path / "tokenizer.json" and tok.sha256() == Tokenizer(hf).sha256()


def test_overlapping_and_one_character_specials():
    tok = Tokenizer.with_specials(tiny_hf_tokenizer(["<|ab|>", "|ab|"]))
    for text in ["<|ab|>", "x<|ab|>|ab|y", "|ab|"]:  # breaking '<|ab|>' after '<' leaves '|ab|>', itself special
        ids = tok.encode(text)
        assert not tok.control_ids & set(ids) and tok.decode(ids) == text
    with pytest.raises(ValueError, match="one character"):
        Tokenizer.with_specials(tiny_hf_tokenizer(["§"]))


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
    with pytest.raises(HFImportError, match="pass a gptforge tokenizer or add"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(HFImportError, match="save_pretrained"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(HFImportError, match="cannot read tokenizer"):
        load_hf_tokenizer(tmp_path)


# --- vocabulary growth ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_keeps_old_logits(tie):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, tie_embeddings=tie)).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(x)[0]
        assert resize_vocab(model, VOCAB + 7) is model
        after = model(x)[0]
    assert after.shape == (2, 12, VOCAB + 7) and model.config.vocab_size == VOCAB + 7
    torch.testing.assert_close(after[..., :VOCAB], before, atol=1e-6, rtol=1e-6)
    # New rows are the mean of the old ones, so a new token's logit is the mean of the old logits.
    torch.testing.assert_close(after[..., VOCAB], before.mean(-1), atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.wte.weight) is tie and model.h[0].attn.config is model.config
    _, loss = model(torch.full((1, 4), VOCAB + 6), targets=torch.full((1, 4), VOCAB + 6))
    loss.backward()  # the new ids are usable for training
    assert model.wte.weight.grad[VOCAB + 6].abs().sum() > 0
    with pytest.raises(ValueError, match="only grows"):
        resize_vocab(model, VOCAB)


def test_hf_model_and_tokenizer_together(tmp_path):
    """The path a chat fine-tune takes: load both, grow the model to the tokenizer, encode a chat turn."""
    hf = gpt2()
    save(hf, tmp_path)
    tiny_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model, _ = load_hf_model(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    resize_vocab(model, max(tok.vocab_size, model.config.vocab_size))
    ids = [tok.special_ids["<|user|>"], *tok.encode("hello<|endoftext|>"), tok.special_ids["<|end|>"]]
    logits, _ = model(torch.tensor([ids]))
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
