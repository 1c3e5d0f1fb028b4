"""The engine against the reference: continuous batching must not change what any request generates."""

import pytest
import torch

from gptforge.engine import Engine, SamplingParams
from gptforge.engine.sampling import apply_penalties, filter_logits
from gptforge.model.gpt import GPT, GPTConfig

V = 61


def tiny_model(pos: str = "rope", seed: int = 0, block_size: int = 48) -> GPT:
    """float64 so padded/masked batched attention and the naive loop agree to the last bit on argmax; untied
    embeddings and a larger init so greedy text varies (a tiny tied model just repeats its input)."""
    torch.manual_seed(seed)
    gpt2 = pos == "learned"
    cfg = GPTConfig(
        vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=block_size, pos=pos,
        tie_embeddings=False, norm="layernorm" if gpt2 else "rmsnorm", mlp="gelu" if gpt2 else "swiglu",
    )  # fmt: skip
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m.double().eval()


def naive(model: GPT, prompt: list[int], max_tokens: int, stops=(), max_seq_len=None) -> list[int]:
    """Full recompute greedy, one token at a time, no cache: the ground truth."""
    out = list(prompt)
    limit = max_seq_len or model.config.block_size
    new = []
    while len(new) < max_tokens and len(out) < limit:
        with torch.no_grad():
            logits, _ = model(torch.tensor([out]))
        t = int(logits[0, -1].argmax())
        if t in stops:
            break
        out.append(t)
        new.append(t)
    return new


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_staggered_mixed_batch_equals_naive_recompute(pos):
    model = tiny_model(pos)
    eng = Engine(model, max_batch_size=3, eos_ids=[0])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 1, 17, 9, 3, 30, 12)]
    max_toks = [10, 4, 20, 1, 25, 18, 7]
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4], 7: [5, 6]}  # step -> request indices arriving before that step
    ids, got, finish = {}, {}, {}
    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for i in arrivals.get(step, []):
            ids[eng.add_request(prompts[i], SamplingParams(max_tokens=max_toks[i], temperature=0))] = i
        for out in eng.step():
            i = ids[out.request_id]
            got.setdefault(i, []).extend(out.token_ids)
            if out.finished:
                finish[i] = out.finish_reason
        assert eng.num_running <= 3
        step += 1
    refs = [naive(model, p, m, stops={0}) for p, m in zip(prompts, max_toks)]
    assert len({tuple(r) for r in refs}) > 3, "degenerate model: the test would prove nothing"
    for i, ref in enumerate(refs):
        assert got[i] == ref, f"request {i}: {got[i]} != {ref}"
        assert finish[i] == ("length" if len(ref) == max_toks[i] else "stop")
    assert eng.counters["batch_size_sum"] > eng.counters["steps"]  # requests really shared steps


def test_stop_ids_context_limit_and_abort():
    model = tiny_model()
    eng = Engine(model, max_batch_size=4, max_seq_len=20)
    prompt = [3, 9, 27, 5]
    free = naive(model, prompt, 10)
    stop = free[4]
    first_stop = free.index(stop)
    # A stop id ends the request and is not returned.
    assert eng.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop])) == [
        free[:first_stop]
    ]
    # The context (20) ends generation with "length" even though max_tokens allows more.
    rid = eng.add_request(prompt, SamplingParams(max_tokens=100, temperature=0))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert sum(len(o.token_ids) for o in outs) == 16 and outs[-1].finish_reason == "length"
    assert outs[-1].completion_tokens == 16 and outs[-1].prompt_tokens == 4 and rid == outs[-1].request_id
    # Abort mid-way: the aborted one ends "abort", its slot is freed, the others are untouched.
    a = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0))
    b = eng.add_request([7, 7, 1], SamplingParams(max_tokens=12, temperature=0))
    res = {a: [], b: []}
    for _ in range(3):
        for o in eng.step():
            res[o.request_id] += o.token_ids
    eng.abort(a)
    reasons = {}
    while eng.has_unfinished():
        for o in eng.step():
            res[o.request_id] += o.token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        if a in reasons:
            assert eng.num_running <= 1
    assert reasons == {a: "abort", b: "length"}
    assert res[b] == naive(model, [7, 7, 1], 12)
    assert res[a] == naive(model, prompt, 12)[: len(res[a])]


def test_request_validation_names_the_problem():
    eng = Engine(tiny_model(), max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, V], SamplingParams())
    with pytest.raises(ValueError, match="16 tokens; the context is 16"):
        eng.add_request([1] * 16, SamplingParams())
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    model = tiny_model()
    p = SamplingParams(max_tokens=15, temperature=1.3, top_k=20, top_p=0.9, seed=7)
    alone = Engine(model, max_batch_size=4).generate([[4, 8, 15]], p)[0]
    crowd = Engine(model, max_batch_size=4).generate(
        [[1, 2], [4, 8, 15], [16, 23, 42, 5]],
        [p.model_copy(update={"seed": 1}), p, SamplingParams(max_tokens=9, temperature=0.7)],
    )
    assert crowd[1] == alone
    other = Engine(model, max_batch_size=4).generate([[4, 8, 15]], p.model_copy(update={"seed": 8}))[0]
    assert other != alone


def test_penalties_match_their_definitions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    counts = torch.tensor([[0, 2, 0, 1, 0, 0], [1, 0, 0, 0, 3, 0]], dtype=torch.float)
    seen = counts > 0
    seen[0, 5] = True  # in the prompt only
    rep, pres, freq = torch.tensor([[1.5], [1.0]]), torch.tensor([[0.5], [0.0]]), torch.tensor([[0.25], [1.0]])
    got = apply_penalties(logits, counts, seen, rep, pres, freq)
    want = logits.clone()
    for b in range(2):
        for t in range(6):
            x = want[b, t]
            if seen[b, t]:
                x = x / rep[b, 0] if x > 0 else x * rep[b, 0]
            want[b, t] = x - freq[b, 0] * counts[b, t] - pres[b, 0] * (counts[b, t] > 0)
    torch.testing.assert_close(got, want)


def test_repetition_penalty_changes_greedy_output():
    model = tiny_model()
    prompt = [3, 9, 27, 5]
    plain = Engine(model).generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert len(set(plain)) < len(plain), "the model should repeat itself without a penalty"
    strict = Engine(model).generate([prompt], SamplingParams(max_tokens=20, temperature=0, frequency_penalty=2.0))
    assert len(set(strict[0])) > len(set(plain))


def test_top_k_and_top_p_keep_the_right_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    probs = filter_logits(logits, torch.ones(2, 1), torch.tensor([[0], [2]]), torch.tensor([[0.85], [1.0]]))
    assert (probs[0] > 0).tolist() == [True, True, True, False, False]  # 0.5 + 0.3 < 0.85 <= 0.9
    assert (probs[1] > 0).sum() == 2
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(probs[0, :3], torch.tensor([0.5, 0.3, 0.1]) / 0.9)


def test_top_k_alone_takes_the_fast_path_with_the_same_result():
    torch.manual_seed(3)
    logits = torch.randn(4, 50)
    temp, k = torch.full((4, 1), 0.7), torch.tensor([[0], [1], [5], [50]])
    fast = filter_logits(logits, temp, k, None)
    full = filter_logits(logits, temp, k, torch.ones(4, 1))  # top_p = 1 forces the sort path
    torch.testing.assert_close(fast, full)
    assert [(fast[i] > 0).sum().item() for i in range(4)] == [50, 1, 5, 50]


def test_ignore_eos_generates_past_the_end_ids():
    model = tiny_model()
    prompt = [3, 9, 27, 5]
    free = naive(model, prompt, 12)
    eng = Engine(model, eos_ids=[free[2]])
    assert eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0)) == [free[:2]]
    assert eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) == [free]


def test_sampling_follows_the_distribution_and_never_picks_zero_mass():
    from gptforge.engine.sampling import sample_rows

    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    logits = torch.log(probs).expand(4000, 5).clone()
    params = [SamplingParams(temperature=1.0)] * 4000
    picks = torch.tensor(sample_rows(logits, params, [None] * 4000))
    freq = torch.bincount(picks, minlength=5) / 4000
    assert freq[1] == 0 and freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    seeded = [SamplingParams(temperature=1.0, seed=5)] * 3
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    a = sample_rows(logits[:3], seeded, gens)
    assert a == sample_rows(logits[:3], seeded, [torch.Generator().manual_seed(5) for _ in range(3)])
