import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.model.heads import build_classifier
from gptforge.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)

LLAMA = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
GPT2 = dict(
    vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pos="learned", norm="layernorm", mlp="gelu", bias=True
)
ARCHS = pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama_gqa", "gpt2_bias"])


def tiny(arch: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**arch))


def train_steps(model: nn.Module, loss_fn, steps: int = 4, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def lm_loss(x: torch.Tensor):
    return lambda m: m(x[:, :-1], x[:, 1:])[1]


def expected_lora_params(cfg: GPTConfig, rank: int) -> int:
    """r * (in + out) per wrapped linear, from the config's dimensions (not from the modules)."""
    c, kv, hid = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    attn = (c + c) + (c + kv) + (c + kv) + (c + c)  # c_q, c_k, c_v, c_proj
    mlp = (c + hid) + (hid + c) + ((c + hid) if cfg.mlp == "swiglu" else 0)  # c_fc, c_proj, c_gate
    return cfg.n_layer * rank * (attn + mlp)


def test_config_validation():
    with pytest.raises(ValueError, match=re.escape("lora.targets[1] = 'c_(q'")):
        LoRAConfig(rank=4, targets=["c_v$", "c_(q"])
    for bad in ({"rank": -1}, {"alpha": 0.0}, {"dropout": 1.0}, {"dropout": -0.1}, {"ranks": 4}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0


def test_lora_linear_matches_reference_formula_for_any_leading_shape():
    torch.manual_seed(0)
    base = nn.Linear(12, 5)
    lora = LoRALinear(copy.deepcopy(base), rank=3, alpha=6.0)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(2, 3, 4, 12)
    ref = base(x) + (x @ lora.lora_A.T @ lora.lora_B.T) * 2.0
    torch.testing.assert_close(lora(x), ref)
    assert lora(x[0, 0, 0]).shape == (5,)
    # Kaiming-uniform(a=sqrt(5)) bound for A is 1/sqrt(in_features), as for nn.Linear.
    assert lora.lora_A.abs().max() <= 1 / 12**0.5 and lora.lora_A.std() > 0.1


@ARCHS
def test_wrapped_model_starts_equal_and_only_adapters_train(arch):
    base = tiny(arch)
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(rank=4))
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(x)[0], base(x)[0])  # B = 0: bit-identical, not just close
    per_block = 7 if model.config.mlp == "swiglu" else 6
    assert len(names) == per_block * model.config.n_layer and "lm_head" not in names
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    n_train, n_total = count_trainable(model)
    assert n_train == expected_lora_params(model.config, 4)
    assert n_total == base.num_params() + n_train


@ARCHS
def test_trained_adapters_merge_into_an_equivalent_plain_gpt(arch):
    torch.manual_seed(1)
    base = tiny(arch)
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    train_steps(model, lm_loss(torch.randint(0, 97, (4, 17))))
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.lora_B.abs().sum() > 0 for m in adapters)  # trained: the update is no longer zero
    for k, v in frozen.items():  # the base weights did not move
        wrapped_key = k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        key = k if k in model.state_dict() else wrapped_key
        assert torch.equal(model.state_dict()[key], v), key

    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        unmerged = model(x)[0]
        assert not torch.allclose(unmerged, base(x)[0], atol=1e-4)  # the adapters changed the model
        merged_model = merge_lora(model)
        merged = merged_model(x)[0]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert merged_model is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    fresh = tiny(arch, seed=123)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x)[0], merged)
    if arch.get("bias"):  # biases are kept as they were (frozen, not part of the update)
        assert torch.equal(model.h[0].mlp.c_fc.bias, base.h[0].mlp.c_fc.bias)
        assert model.h[0].mlp.c_fc.bias.abs().sum() == 0  # GPT-2 init zeros them; the base was not retrained


def test_classifier_with_lora_body_and_trainable_head_merges():
    torch.manual_seed(2)
    clf = build_classifier(GPTConfig(**LLAMA), n_classes=3, pooling="last")
    names = apply_lora(clf, LoRAConfig(rank=2))
    assert all(n.startswith("gpt.h.") for n in names) and "head" not in names
    clf.head.requires_grad_(True)  # apply_lora froze everything else; the caller unfreezes the head it wants to train
    n_train, _ = count_trainable(clf)
    assert n_train == expected_lora_params(clf.gpt.config, 2) + 32 * 3 + 3
    head_before = clf.head.weight.detach().clone()
    idx, lengths, y = torch.randint(0, 97, (6, 12)), torch.tensor([12, 5, 1, 9, 12, 3]), torch.tensor([0, 1, 2] * 2)
    train_steps(clf, lambda m: F.cross_entropy(m(idx, lengths), y))
    assert not torch.equal(clf.head.weight, head_before)
    with torch.no_grad():
        unmerged = clf(idx, lengths)
        merge_lora(clf)
        merged = clf(idx, lengths)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    fresh = build_classifier(GPTConfig(**LLAMA), n_classes=3)
    fresh.load_state_dict(clf.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx, lengths), merged)


def test_name_filter_selects_exactly_the_intended_modules():
    model = tiny(LLAMA)
    names = apply_lora(model, LoRAConfig(rank=2, targets=[r"attn\.c_[qv]$"]))
    assert names == ["h.0.attn.c_q", "h.0.attn.c_v", "h.1.attn.c_q", "h.1.attn.c_v"]
    assert isinstance(model.h[1].attn.c_v, LoRALinear) and type(model.h[1].attn.c_k) is nn.Linear
    gpt2 = tiny(GPT2)
    names = apply_lora(gpt2, LoRAConfig(rank=2, targets=[r"^h\.1\.mlp\."]))
    assert names == ["h.1.mlp.c_fc", "h.1.mlp.c_proj"]  # GPT-2 MLP has no c_gate; block 0 untouched


def test_errors_leave_the_model_unchanged():
    model = tiny(LLAMA)
    with pytest.raises(ValueError, match=r"nomatch.*matched no nn\.Linear.*h\.0\.attn\.c_q"):
        apply_lora(model, LoRAConfig(rank=2, targets=["nomatch"]))
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to wte\.weight"):
        apply_lora(model, LoRAConfig(rank=2, targets=[r"c_q$", "lm_head"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before the first swap
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    # An untied head is a legal target, and merging it keeps the state dict loadable.
    untied = tiny({**LLAMA, "tie_embeddings": False})
    assert apply_lora(untied, LoRAConfig(rank=2, targets=["lm_head"])) == ["lm_head"]
    assert set(merge_lora(untied).state_dict()) == set(tiny({**LLAMA, "tie_embeddings": False}).state_dict())


def test_rank_zero_is_full_finetuning():
    model = tiny(LLAMA)
    assert apply_lora(model, LoRAConfig(rank=0)) == []
    assert count_trainable(model) == (model.num_params(), model.num_params())


def test_dropout_only_on_lora_path_and_only_in_train_mode():
    model = tiny(LLAMA)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5))
    x = torch.randint(0, 97, (2, 16))
    model.train()
    with torch.no_grad():
        base_out = tiny(LLAMA)(x)[0]
        assert torch.equal(model(x)[0], base_out)  # B = 0: dropout on the LoRA input cannot touch the base path
        for m in model.modules():
            if isinstance(m, LoRALinear):
                nn.init.normal_(m.lora_B, std=0.1)
        assert not torch.equal(model(x)[0], model(x)[0])  # train: a fresh dropout mask each call
        model.eval()
        a, b = model(x)[0], model(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, base_out, atol=1e-3)


def test_autocast_bf16_forward_backward():
    model = tiny(LLAMA)
    apply_lora(model, LoRAConfig(rank=4))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x[:, :-1], x[:, 1:])
        low = model(x)[0]
    loss.backward()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)
    lora = model.h[0].attn.c_q
    assert lora.lora_A.grad is not None and lora.lora_A.grad.dtype == torch.float32 and lora.lora_B.grad.abs().sum() > 0
    assert lora.base.weight.grad is None


def test_adapter_state_dict_roundtrip():
    torch.manual_seed(3)
    a, b = tiny(LLAMA), tiny(LLAMA)
    names = apply_lora(a, LoRAConfig(rank=2))
    apply_lora(b, LoRAConfig(rank=2))
    for m in a.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    sd = lora_state_dict(a)
    assert sorted(sd) == sorted(f"{n}.lora_{x}" for n in names for x in "AB")
    load_lora_state_dict(b, sd)
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
    with pytest.raises(ValueError, match=r"missing \['h\.0\.attn\.c_k\.lora_A'"):
        load_lora_state_dict(b, {k: v for k, v in sd.items() if k != "h.0.attn.c_k.lora_A"})
