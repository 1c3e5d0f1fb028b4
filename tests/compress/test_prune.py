import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gptforge.compress.prune import (
    collect_input_norms,
    magnitude_prune,
    mask_gradients,
    plan_structured_prune,
    semi_structured_prune,
    sparsity_report,
    structured_prune,
    wanda_prune,
)
from gptforge.model.gpt import GPT, GPTConfig

V = 128
LLAMA = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
GPT2 = dict(
    vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, norm="layernorm", mlp="gelu", pos="learned", bias=True
)
ARCHS = {
    "llama_gqa": LLAMA,
    "mha_qkv_bias_untied": {**LLAMA, "n_kv_head": 0, "qkv_bias": True, "tie_embeddings": False},
    "gqa_4_groups": {**LLAMA, "n_head": 8, "n_kv_head": 4},
    "mqa": {**LLAMA, "n_kv_head": 1},
    "gpt2": GPT2,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add synchronization, which on a loaded 2-core machine made
    this file ~15x slower (spinning OpenMP workers). Restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(arch=LLAMA, seed=0) -> GPT:
    """A tiny model with every parameter random (biases and norm gains too, so a mis-sliced one shows up)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**arch)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight") and ("ln_" in name)
            p.copy_((1.0 if gain else 0.0) + (0.2 if gain else 0.1) * torch.randn(p.shape, generator=g))
    return model


def calib(n=3, seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (2, 16), generator=g) for _ in range(n)]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------------------------------------
# magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_prune_hits_target_per_layer_and_zeroes_the_smallest(sparsity):
    model = make()
    before = weights(model)
    stats = magnitude_prune(model, sparsity)
    names = [n for n in linear_names(model) if n != "lm_head"]
    assert set(stats) == {*names, "overall"}
    total = zeros = 0
    for name in names:
        w, w0 = model.get_submodule(name).weight, before[name + ".weight"]
        k = round(sparsity * w.numel())
        assert int((w == 0).sum()) == k and stats[name] == k / w.numel()
        if 0 < k < w.numel():
            # every zeroed weight was no larger than every survivor; survivors are unchanged
            assert w0[w == 0].abs().max() <= w0[w != 0].abs().min()
            assert torch.equal(w[w != 0], w0[w != 0])
        total, zeros = total + w.numel(), zeros + k
    assert stats["overall"] == pytest.approx(zeros / total)
    # lm_head (tied to wte) is excluded by default and untouched
    assert torch.equal(model.wte.weight, before["wte.weight"])


def test_magnitude_prune_respects_include_and_exclude():
    model = make(GPT2)
    before = weights(model)
    stats = magnitude_prune(model, 0.5, include=("h.0.*",), exclude=("*.c_proj",))
    assert set(stats) == {"h.0.attn.c_q", "h.0.attn.c_k", "h.0.attn.c_v", "h.0.mlp.c_fc", "overall"}
    for key, w in model.state_dict().items():
        changed = not torch.equal(w, before[key])
        module = key.rsplit(".", 1)[0]
        assert changed == (module in stats and key.endswith("weight")), key


# --------------------------------------------------------------------------------------------------------------------
# input norms and Wanda


def capture_inputs(model, names, batches) -> dict[str, np.ndarray]:
    """Reference: stash every input of each module, then the norm in float64 numpy."""
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    flat = {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]).double().numpy() for n, ts in seen.items()}
    return {n: np.sqrt((x**2).sum(0)) for n, x in flat.items()}


def test_collect_input_norms_matches_direct_computation_and_removes_hooks():
    model = make()
    batches = calib()
    modules = {n: model.get_submodule(n) for n in ("h.0.attn.c_q", "h.1.mlp.c_proj", "lm_head")}
    norms = collect_input_norms(model, batches, modules)
    ref = capture_inputs(model, list(modules), batches)
    for n in modules:
        np.testing.assert_allclose(norms[n].numpy(), ref[n], rtol=1e-5)
    # the first one by hand: c_q reads ln_1 of the embeddings
    x = torch.cat([model.h[0].ln_1(model.wte(b)).reshape(-1, 64) for b in batches])
    torch.testing.assert_close(norms["h.0.attn.c_q"], x.detach().pow(2).sum(0).sqrt())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_collect_input_norms_removes_hooks_and_restores_mode_on_error():
    model = make().train()
    modules = {"h.0.attn.c_q": model.h[0].attn.c_q}
    too_long = torch.zeros(1, 40, dtype=torch.long)  # past block_size: the model itself raises mid-calibration
    with pytest.raises(ValueError, match="block_size"):
        collect_input_norms(model, [calib(1)[0], too_long], modules)
    assert not model.h[0].attn.c_q._forward_pre_hooks and model.training
    with pytest.raises(ValueError, match=r"batches\[0\].*outside"):
        collect_input_norms(model, [torch.full((1, 4), V)], modules)
    assert not model.h[0].attn.c_q._forward_pre_hooks and model.training


@pytest.mark.parametrize("arch", [LLAMA, GPT2])
def test_wanda_matches_reference_rule_per_row(arch):
    model = make(arch)
    batches = calib()
    names = [n for n in linear_names(model) if n != "lm_head"]
    ref_norms = capture_inputs(model, names, batches)
    before = weights(model)
    stats = wanda_prune(model, iter(batches), 0.5)  # a one-shot iterator is enough: one calibration pass
    for name in names:
        w0 = before[name + ".weight"].double().numpy()
        score = np.abs(w0) * ref_norms[name][None, :]
        k = round(0.5 * w0.shape[1])
        drop = np.argsort(score, axis=1)[:, :k]
        expected = w0.copy()
        np.put_along_axis(expected, drop, 0.0, axis=1)
        w = model.get_submodule(name).weight.detach().double().numpy()
        np.testing.assert_array_equal(w, expected, err_msg=name)
        assert ((w == 0).sum(1) == k).all()  # exactly k per row
        assert stats[name] == k / w.shape[1]


def test_wanda_prunes_low_norm_inputs_where_magnitude_does_not():
    model = make()
    with torch.no_grad():  # features 0..31 reach the q/k/v projections 10x larger, 32..63 10x smaller
        model.h[0].ln_1.weight.copy_(torch.cat([torch.full((32,), 10.0), torch.full((32,), 0.1)]))
    mag, wan = copy.deepcopy(model), copy.deepcopy(model)
    magnitude_prune(mag, 0.5, include=("h.0.attn.c_q",))
    wanda_prune(wan, calib(), 0.5, include=("h.0.attn.c_q",))
    zm, zw = mag.h[0].attn.c_q.weight == 0, wan.h[0].attn.c_q.weight == 0
    assert (zm != zw).float().mean() > 0.3
    assert 0.35 < zm[:, :32].float().mean() < 0.65  # magnitude ignores the inputs
    assert zw[:, :32].float().mean() < 0.05 and zw[:, 32:].float().mean() > 0.95


# --------------------------------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("with_batches", [False, True])
def test_semi_structured_pattern_holds_in_every_group(n, m, with_batches):
    model = make(GPT2)
    batches = calib() if with_batches else None
    norms = capture_inputs(model, ["h.1.mlp.c_proj"], batches) if with_batches else None
    before = weights(model)
    stats = semi_structured_prune(model, batches, n=n, m=m)
    for name in (x for x in linear_names(model) if x != "lm_head"):
        w = model.get_submodule(name).weight
        zeros = (w.view(w.shape[0], -1, m) == 0).sum(-1)
        assert (zeros == m - n).all(), name
        assert stats[name] == pytest.approx(1 - n / m)
    # the survivors of each group are the n highest scores (checked on one layer against numpy)
    w0 = before["h.1.mlp.c_proj.weight"].double().numpy()
    score = np.abs(w0) * (norms["h.1.mlp.c_proj"][None, :] if with_batches else 1.0)
    g = score.reshape(w0.shape[0], -1, m)
    keep = np.zeros_like(g, dtype=bool)
    np.put_along_axis(keep, np.argsort(g, axis=-1)[..., m - n :], True, axis=-1)
    got = model.h[1].mlp.c_proj.weight.detach().double().numpy().reshape(g.shape) != 0
    np.testing.assert_array_equal(got, keep)
    assert torch.equal(model.wte.weight, before["wte.weight"])  # lm_head (tied) excluded


def test_semi_structured_refuses_indivisible_in_features_before_touching_anything():
    model = make()
    before = weights(model)
    with pytest.raises(ValueError, match=r"m=3.*'h\.0\.attn\.c_q': 64") as err:
        semi_structured_prune(model, n=1, m=3)
    assert "mlp.c_proj" not in str(err.value)  # 192 inputs divide by 3: only offenders are named
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# structured


def zero_removed(model: GPT, plan) -> GPT:
    """The dense model with the removed heads' c_proj input columns and removed channels' c_proj columns zeroed:
    exactly what the smaller model computes."""
    ref = copy.deepcopy(model)
    D = model.config.head_dim
    with torch.no_grad():
        for i, block in enumerate(ref.h):
            gone = sorted(set(range(model.config.n_head)) - set(plan.heads[i].tolist()))
            for h in gone:
                block.attn.c_proj.weight[:, h * D : (h + 1) * D] = 0
            chans = torch.ones(model.config.hidden_dim, dtype=torch.bool)
            chans[plan.channels[i]] = False
            block.mlp.c_proj.weight[:, chans] = 0
    return ref


@pytest.mark.parametrize("with_batches", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_structured_prune_equals_zeroed_dense_model(arch, with_batches):
    model = make(ARCHS[arch])
    before = weights(model)
    batches = calib() if with_batches else None
    plan = plan_structured_prune(model, heads_keep=0.5, mlp_keep=0.5, batches=batches)
    small = structured_prune(model, plan=plan)
    cfg, new = model.config, small.config
    for idx in (*plan.heads, *plan.kv_heads, *plan.channels):
        assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)

    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(small(x)[0], zero_removed(model, plan)(x)[0], atol=1e-5, rtol=0)
    assert small.num_params() < model.num_params()
    assert GPTConfig.model_validate(new.model_dump()) == new
    assert new.head_size == cfg.head_dim and new.n_embd == cfg.n_embd
    assert new.intermediate_size == round(0.5 * cfg.hidden_dim)
    if cfg.kv_heads > 1:  # whole kv groups go: the GQA ratio stays
        assert new.n_head // new.kv_heads == cfg.n_head // cfg.kv_heads and new.kv_heads == cfg.kv_heads // 2
    else:  # MQA: query heads go, the one kv head stays
        assert new.n_head == 2 and new.kv_heads == 1
    assert (small.lm_head.weight is small.wte.weight) == cfg.tie_embeddings
    assert torch.equal(small.wte.weight, model.wte.weight) and torch.equal(small.ln_f.weight, model.ln_f.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched
    # the one-call form computes the same plan
    again = structured_prune(model, 0.5, 0.5, batches)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in again.state_dict().items())
    # a KV-cached greedy generation on the smaller model equals full recompute
    prompt = x[:, :5]
    cached = small.generate(prompt, 10, temperature=0.0, use_cache=True)
    assert torch.equal(cached, small.generate(prompt, 10, temperature=0.0, use_cache=False))


def test_structured_keeps_at_least_one_unit_and_preserves_dtype_and_mode():
    model = make().to(torch.bfloat16).train()
    small = structured_prune(model, heads_keep=0.01, mlp_keep=0.001)
    assert (small.config.n_head, small.config.kv_heads, small.config.intermediate_size) == (2, 1, 1)
    assert small.training and small.h[0].attn.c_q.weight.dtype == torch.bfloat16
    assert small.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0.0).shape == (1, 7)


def test_structured_importance_uses_activations_when_given():
    """kv group 1 and MLP channels 0..9 read only features that the norms zero: big weights, no output.
    Weight norms keep them; activation importance drops them."""
    model = make()
    D, block = model.config.head_dim, model.h[0]
    with torch.no_grad():
        block.ln_1.weight[32:] = 0
        block.ln_2.weight[32:] = 0
        for lin in (block.attn.c_v, block.attn.c_k):
            lin.weight[D : 2 * D, :32] = 0
            lin.weight[D : 2 * D, 32:] *= 100
        for lin in (block.mlp.c_fc, block.mlp.c_gate):
            lin.weight[:10, :32] = 0
            lin.weight[:10, 32:] *= 100
    by_weight = plan_structured_prune(model, 0.5, 0.5)
    by_act = plan_structured_prune(model, 0.5, 0.5, batches=calib())
    assert by_weight.kv_heads[0].tolist() == [1] and by_act.kv_heads[0].tolist() == [0]
    assert set(range(10)) <= set(by_weight.channels[0].tolist())
    assert not set(range(10)) & set(by_act.channels[0].tolist())


def test_structured_refuses_bad_arguments():
    model = make()
    for bad in (0, 0.0, -0.5, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="heads_keep"):
            structured_prune(model, heads_keep=bad)
        with pytest.raises(ValueError, match="mlp_keep"):
            structured_prune(model, mlp_keep=bad)
    with pytest.raises(ValueError, match="GPT"):
        structured_prune(nn.Sequential(nn.Linear(4, 4)), 0.5)
    swapped = make()
    swapped.h[1].mlp.c_fc = nn.Sequential(swapped.h[1].mlp.c_fc)  # e.g. a quantized or LoRA module
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc"):
        structured_prune(swapped, 0.5)


# --------------------------------------------------------------------------------------------------------------------
# fine-tuning with masks, report, argument checks


def test_mask_gradients_keeps_zeros_through_adamw_with_weight_decay():
    model = make().train()
    magnitude_prune(model, 0.5)
    pruned = {n: model.get_submodule(n).weight for n in linear_names(model) if n != "lm_head"}
    zero = {n: w == 0 for n, w in pruned.items()}
    start = {n: w.detach().clone() for n, w in pruned.items()}
    handles = mask_gradients(model)
    assert len(handles) == len(pruned)  # the dense tied embedding/head gets no hook
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(3))

    def step():
        opt.zero_grad()
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()

    for _ in range(3):
        step()
    for n, w in pruned.items():
        assert (w[zero[n]] == 0).all(), n
        assert (w[~zero[n]] != start[n][~zero[n]]).float().mean() > 0.9, n
    # control: without the hooks the same optimizer moves the zeros at once
    for h in handles:
        h.remove()
    step()
    assert (pruned["h.0.attn.c_q"][zero["h.0.attn.c_q"]] != 0).any()


def test_sparsity_report_counts_exact_zeros_and_a_shared_weight_once():
    model = make()
    stats = magnitude_prune(model, 0.25, include=("h.*",))
    with torch.no_grad():
        model.wte.weight[:64] = 0  # tied head: half of it zero
    report = sparsity_report(model)
    assert report["lm_head"] == 0.5
    for name in linear_names(model)[:-1]:
        assert report[name] == stats[name]
    ws = [model.get_submodule(n).weight for n in linear_names(model)]  # lm_head counted once
    assert report["overall"] == pytest.approx(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    assert set(sparsity_report(model, include=("*.mlp.*",), exclude=("*c_gate",))) == {
        "h.0.mlp.c_fc",
        "h.0.mlp.c_proj",
        "h.1.mlp.c_fc",
        "h.1.mlp.c_proj",
        "overall",
    }


def test_bad_arguments_name_themselves():
    model = make()
    for bad in (-0.1, 1.0, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_prune(model, bad)
        with pytest.raises(ValueError, match="sparsity"):
            wanda_prune(model, calib(1), bad)
    for n, m in ((0, 4), (4, 4), (3, 2), (2.0, 4), (2, True)):
        with pytest.raises(ValueError, match=r"\bn\b|\bm\b"):
            semi_structured_prune(model, n=n, m=m)
    with pytest.raises(ValueError, match="h.9"):
        magnitude_prune(model, 0.5, include=("h.9.*",))
    with pytest.raises(ValueError, match="batches is empty"):
        wanda_prune(model, [], 0.5)
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        wanda_prune(model, [calib(1)[0], torch.rand(2, 4)], 0.5)
    with pytest.raises(ValueError, match="iterable"):
        wanda_prune(model, calib(1)[0], 0.5)
    with pytest.raises(ValueError, match="include"):
        magnitude_prune(model, 0.5, include="h.0.*")
    assert sparsity_report(model)["overall"] == 0.0  # nothing above changed a weight
