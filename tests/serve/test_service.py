"""Service: prompt building, validation messages, incremental detokenization, stop strings, n, deadline, usage."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from gptforge.serve.detok import IncrementalDetokenizer, StopMatcher
from gptforge.serve.protocol import ChatCompletionRequest, CompletionRequest
from gptforge.serve.service import (
    BadRequest,
    GenerationTimeout,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from gptforge.tokenizer.chat import chat_prompt_ids, stop_ids
from tests.serve.utils import REPLY, make_service, run

TEXTS = ["春眠不觉晓，处处闻啼鸟。", "Hello 世界 🙂🚀 naïve café", "a\n\nb 你好\ufffd", "日本語テキスト and 한국어"]


def comp(**kw) -> CompletionRequest:
    return CompletionRequest(**{"model": "tiny", "prompt": "Hi", **kw})


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **kw})


async def events_of(service, plan):
    gen = service.submit(plan)
    return gen, [e async for e in gen.events()]


# ---- detokenization --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text) // 4  # the CJK and emoji really are split over several byte tokens
    for chunk in (1, 2, 3):
        d, pieces = IncrementalDetokenizer(tok), []
        for i in range(0, len(ids), chunk):
            pieces.append(d.push(ids[i : i + chunk]))
        pieces.append(d.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special=True) == text
        # A replacement character is streamed only where the text really has one.
        assert sum(p.count("\ufffd") for p in pieces) == text.count("\ufffd")


def test_detokenizer_flushes_an_incomplete_tail_and_skips_specials(tok):
    ids = tok.encode("你")
    d = IncrementalDetokenizer(tok)
    assert d.push(ids[:-1]) == ""
    assert d.flush() == tok.decode(ids[:-1])  # the model stopped mid-character: say so (U+FFFD), do not hide it
    d = IncrementalDetokenizer(tok)
    assert d.push([tok.special_ids["<|user|>"]] + tok.encode("ok")) == "ok"


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_matcher_equals_reference_on_every_chunking():
    rng = random.Random(0)
    alphabet = "ab c\n你好"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        m, out, hit, cuts = StopMatcher(stops), [], False, sorted(rng.sample(range(len(text) + 1), k=min(4, len(text))))
        prev = 0
        for c in cuts + [len(text)]:
            piece, hit = m.push(text[prev:c])
            out.append(piece)
            prev = c
            # Nothing released may ever be followed by a stop string that starts inside it.
            released = "".join(out)
            assert reference_stop(released, stops)[0] == released or hit
            if hit:
                break
        if not hit:
            out.append(m.flush())
        assert ("".join(out), hit) == reference_stop(text, stops), (text, stops, cuts)


def test_stop_matcher_holds_back_a_partial_stop_string():
    m = StopMatcher(["</answer>"])
    assert m.push("42 </ans") == ("42 ", False)  # "</ans" may become the stop string: held
    assert m.push("wer> more") == ("", True)
    m = StopMatcher(["</answer>"])
    assert m.push("x </a") == ("x ", False)
    assert m.push("b") == ("</ab", False)  # no longer a prefix: released
    assert m.flush() == ""


# ---- requests ------------------------------------------------------------------------------------------------
def test_completion_builds_bos_prompt_and_counts_usage(tok):
    async def main():
        s = make_service(tok)
        s.engine.start()
        plan = await s.prepare_completion(comp(prompt="Once upon", max_tokens=5))
        gen = s.submit(plan)
        results = await gen.collect()
        return s, plan, gen, results

    s, plan, gen, results = run(main())
    assert plan.prompts == [[tok.bos_id] + tok.encode("Once upon")]
    script = tok.encode(REPLY)
    assert results == [(tok.decode(script[:5], skip_special=True), "length")]
    assert (gen.prompt_tokens, gen.completion_tokens) == (len(plan.prompts[0]), 5)
    assert gen.first_token_at is not None and s.engine.num_running == 0


def test_token_id_prompts_and_batches(tok):
    async def main():
        s = make_service(tok)
        s.engine.start()
        p1 = await s.prepare_completion(comp(prompt=[5, 6, 7]))
        p2 = await s.prepare_completion(comp(prompt=["a", "b c"], n=2, max_tokens=3))
        with pytest.raises(BadRequest, match="token id 5000 outside the vocabulary"):
            await s.prepare_completion(comp(prompt=[[1, 2], [5000]]))
        with pytest.raises(BadRequest, match="prompt 1 is an empty list"):
            await s.prepare_completion(comp(prompt=[[1, 2], []]))
        gen = s.submit(p2)
        return p1, p2, gen, await gen.collect()

    p1, p2, gen, results = run(main())
    assert p1.prompts == [[5, 6, 7]]
    assert p2.prompts == [[tok.bos_id] + tok.encode("a"), [tok.bos_id] + tok.encode("b c")]
    assert len(results) == 4 and gen.prompt_tokens == sum(map(len, p2.prompts))  # prompts counted once, not n times


def test_chat_prompt_and_stop_ids(tok):
    async def main():
        s = make_service(tok)
        msgs = [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]
        plan = await s.prepare_chat(chat(messages=msgs, max_completion_tokens=7))
        with pytest.raises(BadRequest, match="only messages\\[0\\] may be"):
            await s.prepare_chat(chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]))
        return plan

    plan = run(main())
    want = chat_prompt_ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert plan.prompts == [want]
    assert set(plan.params[0].stop_token_ids) == stop_ids(tok) and plan.params[0].max_tokens == 7


def test_validation_messages_name_the_problem(tok):
    async def main():
        s = make_service(tok, max_seq_len=64, settings={"max_tokens_limit": 50})
        with pytest.raises(ModelNotFound, match="'gpt-4' does not exist; this server serves 'tiny'"):
            await s.prepare_completion(comp(model="gpt-4"))
        long = "word " * 20
        n = 1 + len(tok.encode(long))
        with pytest.raises(
            BadRequest, match=f"prompt is {n} tokens; with max_tokens 30 that exceeds the model's context of 64 tokens"
        ) as e:
            await s.prepare_completion(comp(prompt=long, max_tokens=30))
        assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
        with pytest.raises(BadRequest, match="max_tokens 51 exceeds this server's limit of 50"):
            await s.prepare_completion(comp(max_tokens=51))
        with pytest.raises(BadRequest, match="leaves no room"):
            await s.prepare_completion(comp(prompt="word " * 200))
        # No max_tokens: the default is capped to the room left (and to the limit).
        plan = await s.prepare_completion(comp(prompt=long))
        return n, plan

    n, plan = run(main())
    assert plan.params[0].max_tokens == min(256, 50, 64 - n)


def test_n_choices_get_seed_plus_i(tok):
    async def main():
        s = make_service(tok)
        s.engine.start()
        _, ev = await events_of(s, await s.prepare_completion(comp(n=3, seed=10, temperature=0.7, max_tokens=4)))
        _, ev2 = await events_of(s, await s.prepare_completion(comp(n=2, max_tokens=2)))
        return s, ev

    s, ev = run(main())
    seeds = [p.seed for _, p in s.engine.submitted]
    assert seeds == [10, 11, 12, None, None]
    texts = {i: "".join(e.text for e in ev if e.index == i) for i in range(3)}
    assert len(set(texts.values())) == 3  # the fake engine offsets its script by the seed


def test_stop_string_cuts_text_and_aborts_the_engine_request(tok):
    stop = "你好"

    async def main():
        s = make_service(tok, token_delay=0.001)
        s.engine.start()
        gen, ev = await events_of(s, await s.prepare_completion(comp(max_tokens=40, stop=[stop, "never"])))
        await asyncio.sleep(0.01)
        return s, gen, ev

    s, gen, ev = run(main())
    text = "".join(e.text for e in ev)
    assert text == REPLY[: REPLY.index(stop)] and ev[-1].finish_reason == "stop"
    assert not any(stop[0] in e.text for e in ev)  # not even the first character of the stop string was streamed
    assert s.engine.num_running == 0 and gen.completion_tokens < 40  # aborted, not run to max_tokens


def test_engine_stop_token_and_text_across_finish(tok):
    eos = tok.eos_id
    script = tok.encode("好的")

    def rule(prompt, params, i):
        return script[i] if i < len(script) else eos

    async def main():
        s = make_service(tok, rule=rule, eos_ids=(eos,))
        s.engine.start()
        return await s.submit(await s.prepare_completion(comp(max_tokens=10))).collect()

    assert run(main()) == [("好的", "stop")]


def test_overload_is_all_or_nothing_and_closed_is_unavailable(tok):
    async def main():
        s = make_service(tok, max_batch_size=1, max_waiting=2, token_delay=0.05)
        with pytest.raises(Unavailable, match="not running"):
            s.submit(await s.prepare_completion(comp()))
        s.engine.start()
        with pytest.raises(Overloaded, match="limit 2"):
            s.submit(await s.prepare_completion(comp(n=4)))
        await asyncio.sleep(0.01)
        left = s.engine.num_running + s.engine.num_waiting
        await s.engine.shutdown(drain=False)
        with pytest.raises(Unavailable, match="shutting down"):
            s.submit(await s.prepare_completion(comp()))
        return left

    assert run(main()) == 0


def test_deadline_aborts_and_raises_timeout(tok):
    async def main():
        s = make_service(tok, token_delay=0.05, settings={"request_timeout_s": 0.2})
        s.engine.start()
        gen = s.submit(await s.prepare_completion(comp(max_tokens=100)))
        with pytest.raises(GenerationTimeout, match="deadline of 0.2 s"):
            await gen.collect()
        await asyncio.sleep(0.1)
        return s.engine.num_running, gen.completion_tokens

    running, produced = run(main())
    assert running == 0 and 0 < produced < 100


def test_long_text_is_tokenized_off_the_event_loop(tok):
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            seen.append(threading.current_thread() is threading.main_thread())
            return tok.encode(text)

    async def main():
        s = make_service(tok, settings={"thread_tokenize_chars": 100})
        s.tok = Spy()
        await s.prepare_completion(comp(prompt="short"))
        await s.prepare_completion(comp(prompt="long " * 40))
        await s.prepare_chat(chat(messages=[{"role": "user", "content": "long " * 40}]))

    run(main())
    assert seen == [True, False, False]


def test_real_engine_greedy_matches_reference(tok):
    import torch

    from gptforge.engine import AsyncEngine, Engine, SamplingParams
    from gptforge.model.gpt import GPT, GPTConfig
    from gptforge.serve.service import Service, ServiceSettings

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    engine = Engine(model, max_batch_size=4, vocab_limit=tok.vocab_size, eos_ids=stop_ids(tok))
    prompt = [tok.bos_id] + tok.encode("春眠")
    want = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]

    async def main():
        ae = AsyncEngine(Engine(model, max_batch_size=4, vocab_limit=tok.vocab_size, eos_ids=stop_ids(tok)))
        s = Service(ae, tok, ServiceSettings(model_name="tiny"))
        ae.start()
        gen = s.submit(await s.prepare_completion(comp(prompt="春眠", max_tokens=12, temperature=0, n=2)))
        out = await gen.collect()
        await ae.shutdown()
        return gen, out

    gen, out = run(main())
    assert out[0] == out[1] and out[0][0] == tok.decode(want, skip_special=True)
    assert gen.completion_tokens == 2 * len(want)
