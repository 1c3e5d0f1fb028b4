"""AsyncEngine: concurrent requests from asyncio, eager refusals, abandoned streams free their slots, drain."""

import asyncio
import gc

import pytest

from gptforge.engine import AsyncEngine, Engine, EngineClosed, EngineError, EngineOverloaded, SamplingParams
from tests.engine.test_engine import naive, tiny_model


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def collect(stream):
    toks, last = [], None
    async for out in stream:
        toks += out.token_ids
        last = out
    return toks, last


def test_concurrent_requests_match_reference_and_report_usage():
    model = tiny_model()
    prompts = [[1, 2, 3], [4] * 9, [5, 6], [7, 8, 9, 10, 11, 12]]

    async def main():
        ae = AsyncEngine(Engine(model, max_batch_size=2), max_waiting=8)
        ae.start()
        res = await asyncio.gather(
            *(collect(ae.generate(p, SamplingParams(max_tokens=8, temperature=0))) for p in prompts)
        )
        stats = ae.stats()
        await ae.shutdown()
        return res, stats

    res, stats = run(main())
    for p, (toks, last) in zip(prompts, res):
        assert toks == naive(model, p, 8)
        assert last.finished and last.prompt_tokens == len(p) and last.completion_tokens == len(toks)
    assert stats["requests_finished"] == 4 and stats["tokens_generated"] == sum(len(t) for t, _ in res)


def test_overload_and_closed_are_raised_eagerly():
    async def main():
        ae = AsyncEngine(Engine(tiny_model(), max_batch_size=1), max_waiting=2)
        with pytest.raises(EngineClosed, match="not running"):
            ae.generate([1], SamplingParams())
        ae.start()
        p = SamplingParams(max_tokens=30, temperature=0)
        streams = [ae.generate([1, 2], p) for _ in range(2)]  # both wait: the thread has not stepped yet, or 1 runs
        with pytest.raises(EngineOverloaded, match="limit 2"):
            for _ in range(3):
                streams.append(ae.generate([1, 2], p))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ae.generate([10_000], p)
        await ae.shutdown(drain=False)
        with pytest.raises(EngineClosed, match="shutting down"):
            ae.generate([1], p)
        finals = [(await collect(s))[1] for s in streams]
        assert all(f.finished for f in finals)

    run(main())


def test_abandoned_streams_free_their_slots():
    async def main():
        ae = AsyncEngine(Engine(tiny_model(block_size=512), max_batch_size=2), max_waiting=4)
        ae.start()
        p = SamplingParams(max_tokens=400, temperature=0)
        s1 = ae.generate([1, 2, 3], p)
        async for _ in s1:
            break  # `async for ... break` never calls aclose: the stream must abort itself when collected
        del s1
        gc.collect()
        s2 = ae.generate([4, 5], p)
        await s2.__anext__()
        await s2.aclose()

        async def consume():
            await collect(ae.generate([6], p))

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        for _ in range(200):
            if ae.num_running == 0 and ae.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        running = ae.num_running
        finished = ae.stats()["tokens_generated"]
        await ae.shutdown()
        return running, finished

    running, generated = run(main())
    assert running == 0
    assert generated < 3 * 400  # nobody generated to the end


def test_shutdown_drains_in_flight_requests():
    model = tiny_model()

    async def main():
        ae = AsyncEngine(Engine(model, max_batch_size=2))
        ae.start()
        task = asyncio.create_task(collect(ae.generate([3, 1, 4], SamplingParams(max_tokens=20, temperature=0))))
        await asyncio.sleep(0)
        await ae.shutdown(drain=True, timeout=30)
        assert not ae.is_running
        return await task

    toks, last = run(main())
    assert last.finish_reason == "length" and toks == naive(model, [3, 1, 4], 20)


def test_a_failing_step_fails_its_requests_and_the_engine_recovers():
    model = tiny_model()

    async def main():
        eng = Engine(model, max_batch_size=2)
        ae = AsyncEngine(eng)
        ae.start()
        real_step = eng.step
        calls = {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated out of memory")
            return real_step()

        eng.step = flaky_step
        with pytest.raises(EngineError, match="simulated out of memory"):
            await collect(ae.generate([1, 2], SamplingParams(max_tokens=10, temperature=0)))
        toks, last = await collect(ae.generate([1, 2], SamplingParams(max_tokens=5, temperature=0)))
        await ae.shutdown()
        return toks, last

    toks, last = run(main())
    assert toks == naive(model, [1, 2], 5) and last.finish_reason == "length"
