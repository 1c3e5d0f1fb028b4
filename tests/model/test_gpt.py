import math

import pytest
import torch

from gptforge.model.gpt import GPT, GPTConfig, KVCache, sample_next

LLAMA = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
GPT2 = dict(
    vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32, pos="learned", norm="layernorm", mlp="gelu", bias=True
)


def test_gpt2_small_has_gpt2_parameter_count():
    cfg = GPTConfig(
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        pos="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
    )
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808  # the published GPT-2 small count (tied head counted once)


def test_llama_shapes_and_flops():
    cfg = GPTConfig(**LLAMA)
    model = GPT(cfg)
    assert model.h[0].attn.c_k.weight.shape == (2 * 8, 32)  # GQA: 2 kv heads of dim 8
    assert cfg.hidden_dim == 128  # 8/3 * 32 rounded up to 64
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(48) == 6 * (n + 97 * 32) + 12 * 2 * 32 * 48


@pytest.mark.parametrize("arch", [LLAMA, GPT2, {**LLAMA, "n_kv_head": 1, "tie_embeddings": False, "qkv_bias": True}])
def test_kv_cache_greedy_equals_full_recompute(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**arch)).eval()
    prompt = torch.randint(0, 97, (3, 7))
    cached = model.generate(prompt, 20, temperature=0.0, use_cache=True)
    full = model.generate(prompt, 20, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)


def test_cached_logits_match_uncached():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA)).eval()
    x = torch.randint(0, 97, (2, 12))
    full, _ = model(x)
    cache = KVCache(model.config, 2, 12, "cpu", torch.float32)
    a, _ = model(x[:, :5], cache=cache)  # prefill
    b, _ = model(x[:, 5:9], cache=cache)  # a chunk after a prefix (uses the explicit mask)
    c, _ = model(x[:, 9:10], cache=cache)  # one token
    d, _ = model(x[:, 10:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c, d], dim=1), full, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_filters():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA)).eval()
    p = torch.randint(0, 97, (1, 4))
    runs = [
        model.generate(p, 15, temperature=1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    for _ in range(50):
        assert sample_next(logits, 1.0, top_k=2).item() in (0, 1)
        # top-p 0.5: token 0 alone holds ~71% of the mass, so only it survives
        assert sample_next(logits, 1.0, top_p=0.5).item() == 0


def test_context_overflow_is_an_error():
    model = GPT(GPTConfig(**LLAMA))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_bad_head_config_is_named():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_embd=32, n_head=4, n_kv_head=3)


def test_initial_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA))
    x, y = torch.randint(0, 97, (2, 4, 32))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(97)) < 0.3


def test_matches_transformers_llama():
    """Our default architecture is Llama: copy weights into LlamaForCausalLM and the logits agree."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = GPTConfig(**LLAMA, tie_embeddings=False)
    ours = GPT(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {
        "model.embed_tokens.weight": ours.wte.weight,
        "model.norm.weight": ours.ln_f.weight,
        "lm_head.weight": ours.lm_head.weight,
    }
    for i, b in enumerate(ours.h):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": b.ln_1.weight,
                p + "post_attention_layernorm.weight": b.ln_2.weight,
                p + "self_attn.q_proj.weight": b.attn.c_q.weight,
                p + "self_attn.k_proj.weight": b.attn.c_k.weight,
                p + "self_attn.v_proj.weight": b.attn.c_v.weight,
                p + "self_attn.o_proj.weight": b.attn.c_proj.weight,
                p + "mlp.gate_proj.weight": b.mlp.c_gate.weight,
                p + "mlp.up_proj.weight": b.mlp.c_fc.weight,
                p + "mlp.down_proj.weight": b.mlp.c_proj.weight,
            }
        )
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_sampling_edge_cases():
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1e-45, generator=g).item() == 0  # tiny temperature is greedy, not NaN
    assert sample_next(logits, 1.0, top_k=100, generator=g).shape == (1, 1)  # top_k beyond the vocabulary
    flat = torch.tensor([[1.0, 0.8, 0.6, 0.4]])
    draws = {sample_next(flat, 1.0, top_p=1.0, generator=g).item() for _ in range(300)}
    assert draws == {0, 1, 2, 3}  # top_p=1 filters nothing


def test_vocab_limit_and_stop_ids():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA)).eval()
    p = torch.randint(0, 90, (1, 4))
    out = model.generate(p, 30, temperature=2.0, vocab_limit=90, generator=torch.Generator().manual_seed(1))
    assert int(out.max()) < 90
    greedy = model.generate(p, 10, temperature=0.0)
    first = int(greedy[0, 4])
    stopped = model.generate(p, 10, temperature=0.0, stop_ids={first})
    assert stopped.shape == (1, 5) and int(stopped[0, -1]) == first  # stops right after emitting the stop id


@pytest.mark.parametrize("arch", [LLAMA, GPT2])
def test_packed_rows_equal_separate_sequences(arch):
    """Three sequences packed into one row with segment ids give the logits each gives alone (no attention across
    segments, positions restart), which is what makes packed fine-tuning exact."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**arch)).eval()
    seqs = [torch.randint(0, 97, (n,)) for n in (7, 12, 5)]
    row = torch.cat(seqs)[None]
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    with torch.no_grad():
        packed = model(row, segment_ids=seg)[0][0]
        alone = torch.cat([model(s[None])[0][0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unsegmented = model(row)[0][0]
    assert not torch.allclose(unsegmented[7:], alone[7:], atol=1e-3)  # without segments the rows do interact
