"""Fixed-shape decode steps (the shapes a CUDA graph captures) against the eager engine.

On CPU the steps run uncaptured (`capture=False`): padding rows to a batch bucket and keys to a length bucket must
not change a single generated token or, beyond rounding, a single logit. On a CUDA machine the captured graphs are
checked against the eager engine too, including an engine on a second GPU driven from a thread whose current
device is the first (what AsyncEngine does), and a capture that breaks."""

import threading
import warnings

import pytest
import torch

from gptforge.engine import Engine, SamplingParams
from gptforge.engine import graphs as graphs_mod
from gptforge.engine.graphs import GraphDecoder, buckets
from tests.engine.test_engine import V, naive, tiny_model


def _staggered(eng: Engine) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 1, 3, 9, 17, 30, 12, 2)]
    max_toks = [10, 4, 20, 1, 25, 16, 7, 30]
    arrivals = {0: [0, 1], 1: [2], 6: [3, 4], 9: [5], 12: [6, 7]}
    ids, got = {}, {}
    step = 0
    while step <= max(arrivals) or eng.has_unfinished():
        for i in arrivals.get(step, []):
            ids[eng.add_request(prompts[i], SamplingParams(max_tokens=max_toks[i], temperature=0))] = i
        for out in eng.step():
            got.setdefault(ids[out.request_id], []).extend(out.token_ids)
        step += 1
    refs = {i: naive(eng.model, p, m, stops={0}) for i, (p, m) in enumerate(zip(prompts, max_toks))}
    assert got == refs
    return got


def test_buckets():
    assert buckets(8, 1) == [1, 2, 4, 8]
    assert buckets(5, 1) == [1, 2, 4, 5]
    assert buckets(1, 1) == [1]
    assert buckets(2048, 128) == [128, 256, 512, 1024, 2048]
    assert buckets(48, 48) == [48]


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_fixed_shape_steps_generate_what_the_eager_engine_generates(pos, monkeypatch):
    # Small length buckets, so requests cross from one bucket to the next while they decode.
    monkeypatch.setattr(graphs_mod, "MIN_LENGTH_BUCKET", 8)
    model = tiny_model(pos)
    eng = Engine(model, max_batch_size=5, eos_ids=[0])
    eng.graphs = GraphDecoder(model, eng.cache, capture=False)
    assert eng.graphs.batch_buckets == [1, 2, 4, 5] and eng.graphs.length_buckets == [8, 16, 32, 48]
    seen = set()
    real = eng.graphs._step

    def spy(B, S):
        seen.add((B, S))
        return real(B, S)

    monkeypatch.setattr(eng.graphs, "_step", spy)
    _staggered(eng)
    # Several batch and length buckets were really used (and so padding rows and masked keys were exercised).
    assert len({b for b, _ in seen}) >= 3 and len({s for _, s in seen}) >= 3, seen


def test_fixed_shape_logits_equal_eager_logits():
    model = tiny_model()
    a, b = Engine(model, max_batch_size=4), Engine(model, max_batch_size=4)
    b.graphs = GraphDecoder(model, b.cache, capture=False)
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7]]
    for eng in (a, b):
        for p in prompts:
            eng.add_request(p, SamplingParams(max_tokens=6, temperature=0))
        eng.step()  # prefill (identical on both: only decode differs)
    captured = {}
    for name, eng in (("eager", a), ("static", b)):
        real = eng._sample
        eng._sample = lambda reqs, logits, finished, real=real, name=name: (
            captured.setdefault(name, logits.clone()),
            real(reqs, logits, finished),
        )
        eng.step()
    assert captured["static"].shape == captured["eager"].shape == (3, V)  # 3 rows padded to 4, sliced back to 3
    torch.testing.assert_close(captured["static"], captured["eager"], rtol=1e-12, atol=1e-12)


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine(tiny_model(), max_batch_size=2, cuda_graphs=True)
    assert Engine(tiny_model(), max_batch_size=2).graphs is None  # auto: off on CPU


def test_a_failed_capture_warns_once_and_decodes_the_same_tokens_eagerly(monkeypatch):
    monkeypatch.setattr(graphs_mod, "MIN_LENGTH_BUCKET", 8)
    model = tiny_model()
    eng = Engine(model, max_batch_size=5, eos_ids=[0])
    dec = GraphDecoder(model, eng.cache, capture=False)
    dec.capture = True  # as on a GPU: the capture itself is what breaks below
    calls = []

    def broken(B, S):
        calls.append((B, S))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dec, "_capture", broken)
    eng.graphs = dec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _staggered(eng)  # every request completes, equal to the naive reference
    assert got == _staggered(Engine(model, max_batch_size=5, eos_ids=[0]))  # and to the eager engine
    told = [w for w in caught if "CUDA graph capture" in str(w.message)]
    assert len(told) == 1 and told[0].category is RuntimeWarning, [str(w.message) for w in caught]
    assert "operation not permitted" in str(told[0].message) and "continues without" in str(told[0].message)
    assert len(calls) == 1, calls  # tried once, not at every step or bucket
    assert dec.capture is False and "operation not permitted" in dec.capture_error and dec.captured == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7], [3, 3]]


@cuda
def test_captured_graphs_on_cuda_generate_what_eager_cuda_generates():
    model = tiny_model().float().cuda()
    prompts = PROMPTS
    p = SamplingParams(max_tokens=30, temperature=0)
    eager = Engine(model, max_batch_size=4, cuda_graphs=False).generate(prompts, p)
    eng = Engine(model, max_batch_size=4)
    assert eng.graphs is not None
    assert eng.generate(prompts, p) == eager
    assert eng.graphs.captured  # graphs were captured and replayed
    # A second round replays the same graphs (no new capture) and still agrees.
    n = len(eng.graphs.captured)
    assert eng.generate(prompts, p) == eager and len(eng.graphs.captured) == n
    assert eng.graphs.capture_error is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphs_on_a_second_gpu_captured_from_another_thread():
    # The engine thread's current device is cuda:0; an engine on cuda:1 must still capture (and replay) on cuda:1,
    # not record an empty graph that replays stale logits.
    model = tiny_model().float().to("cuda:1")
    p = SamplingParams(max_tokens=30, temperature=0)
    eager = Engine(model, max_batch_size=4, cuda_graphs=False).generate(PROMPTS, p)
    eng = Engine(model, max_batch_size=4)
    got = {}

    def run():
        got["current_device"] = torch.cuda.current_device()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got["tokens"] = [eng.generate(PROMPTS, p) for _ in range(2)]
        got["warnings"] = [str(w.message) for w in caught]

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got["current_device"] == 0 and got["tokens"] == [eager, eager], got.get("warnings")
    assert eng.graphs.captured and eng.graphs.capture_error is None
    assert not [w for w in got["warnings"] if "CUDA Graph is empty" in w or "CUDA graph capture" in w]


@cuda
def test_a_capture_broken_by_a_host_sync_on_cuda_falls_back_to_eager(monkeypatch):
    model = tiny_model().float().cuda()
    p = SamplingParams(max_tokens=30, temperature=0)
    eager = Engine(model, max_batch_size=4, cuda_graphs=False).generate(PROMPTS, p)
    eng = Engine(model, max_batch_size=4)
    real = eng.graphs._step

    def syncing(B, S):
        out = real(B, S)
        if torch.cuda.is_current_stream_capturing():
            out.sum().item()  # a host sync: not allowed while capturing, so the capture fails
        return out

    monkeypatch.setattr(eng.graphs, "_step", syncing)
    with pytest.warns(RuntimeWarning, match="continues without"):
        assert eng.generate(PROMPTS, p) == eager
    assert not eng.graphs.captured and eng.graphs.capture_error and eng.graphs.capture is False
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture's stream is not left on
    assert eng.generate(PROMPTS, p) == eager  # and it goes on working
