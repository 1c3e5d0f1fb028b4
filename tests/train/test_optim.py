import math

import pytest

from gptforge.model.gpt import GPT, GPTConfig
from gptforge.train.optim import lr_at, param_groups


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(
        GPTConfig(
            vocab_size=64,
            block_size=16,
            n_layer=1,
            n_head=2,
            n_embd=16,
            pos="learned",
            norm="layernorm",
            mlp="gelu",
            bias=True,
        )
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and ("c_" in n) for n in decayed)
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "h.0.attn.c_q.bias"} <= plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))  # tied head counted once


def test_schedule_shape():
    kw = dict(max_lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, decay="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(60, decay="linear", **kw) == pytest.approx(0.55)
    assert lr_at(35, decay="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_at(500, decay="constant", **kw) == 1.0
    values = [lr_at(s, decay="cosine", **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])) and not any(math.isnan(v) for v in values)
