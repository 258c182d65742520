import asyncio
import gc
import weakref

import pytest

from shepherd.sim.engine import Engine, LatencyModel, Sequence, SequenceGroup
from shepherd.sim.kv_cache import PrefixCache
from shepherd.sim.metrics import WorkerStats
from shepherd.sim.tokenizer import generate
from tests.support.polling import until


def make_engine(latency: LatencyModel | None, max_running: int = 64, kv_tokens: int = 100_000) -> Engine:
    return Engine(PrefixCache(kv_tokens, 16), WorkerStats(), max_running, latency)


def submit(engine: Engine, prompt: list[int], new_tokens: int) -> SequenceGroup:
    group = SequenceGroup([Sequence(prompt, generate(prompt, new_tokens))])
    engine.submit(group.seqs[0])
    return group


def ttft(seq: Sequence) -> float:
    assert seq.first_token_at is not None
    return seq.first_token_at - seq.created


def test_step_time_grows_with_batch_and_prefill():
    model = LatencyModel(prefill_tokens_per_ms=10, decode_step_ms=2, decode_step_ms_per_request=0.5)
    by_batch = [model.step_seconds(batch, 0) for batch in (0, 1, 8, 64)]
    by_prefill = [model.step_seconds(4, tokens) for tokens in (0, 10, 1000, 8000)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_prefill == sorted(by_prefill) and len(set(by_prefill)) == 4


async def test_immediate_mode_finishes_inside_submit_and_counts_cache_hits():
    engine = make_engine(None)
    prompt = list(range(100))
    first = submit(engine, prompt, 4)
    assert first.done and first.seqs[0].generated == 4
    second = submit(engine, prompt, 4)
    assert second.seqs[0].cached_tokens == 96
    assert engine.stats.prompt_tokens == 200 and engine.stats.cached_tokens == 96
    assert engine.cache.pinned_tokens == 0


async def test_ttft_grows_with_uncached_prompt_tokens():
    engine = make_engine(LatencyModel(prefill_tokens_per_ms=20, decode_step_ms=1, decode_step_ms_per_request=0))
    try:
        long_prompt = list(range(1000))  # ~50 ms of prefill
        cold = submit(engine, long_prompt, 2)
        await cold.wait()
        short = submit(engine, list(range(5000, 5010)), 2)
        await short.wait()
        warm = submit(engine, long_prompt, 2)  # all but the last page is cached now
        await warm.wait()
        assert warm.seqs[0].cached_tokens == 992
        assert ttft(cold.seqs[0]) > 0.045
        assert ttft(cold.seqs[0]) > 3 * ttft(short.seqs[0])
        assert ttft(cold.seqs[0]) > 3 * ttft(warm.seqs[0])
    finally:
        await engine.close()


async def test_inter_token_latency_grows_with_batch_size():
    model = LatencyModel(prefill_tokens_per_ms=1000, decode_step_ms=1, decode_step_ms_per_request=2)
    engine = make_engine(model)
    try:
        alone = submit(engine, [1, 2, 3], 6)
        await alone.wait()
        crowd = [submit(engine, [i, 2, 3], 6) for i in range(10, 18)]
        await asyncio.gather(*(g.wait() for g in crowd))

        def itl(seq: Sequence) -> float:
            return (seq.finished_at - ttft(seq) - seq.created) / (seq.generated - 1)

        assert itl(crowd[0].seqs[0]) > 3 * itl(alone.seqs[0])
        assert engine.stats.itl.count == 9 * 5
    finally:
        await engine.close()


async def test_requests_beyond_max_running_queue_and_stream_tokens_over_time():
    engine = make_engine(LatencyModel(decode_step_ms=2, decode_step_ms_per_request=0), max_running=2)
    try:
        groups = [submit(engine, [i] * 20, 5) for i in range(4)]
        await until(lambda: engine.running, "the step loop to admit", interval=0)
        assert len(engine.running) == 2 and len(engine.waiting) == 2
        seen = [seq.generated async for seq in groups[0].updates()]
        assert seen == [1, 2, 3, 4, 5]
        await asyncio.gather(*(g.wait() for g in groups))
        assert ttft(groups[3].seqs[0]) > ttft(groups[0].seqs[0]) + 0.008  # waited for a slot
        assert not engine.running and not engine.waiting
        assert engine.stats.num_requests == 4 and engine.stats.generation_tokens == 20
    finally:
        await engine.close()


async def test_kv_capacity_limits_admission():
    engine = make_engine(LatencyModel(decode_step_ms=1, decode_step_ms_per_request=0), kv_tokens=100)
    try:
        groups = [submit(engine, [i] * 60, 3) for i in range(2)]  # 63 tokens each: only one fits
        await until(lambda: engine.running, "the step loop to admit", interval=0)
        assert len(engine.running) == 1 and len(engine.waiting) == 1
        await asyncio.gather(*(g.wait() for g in groups))
    finally:
        await engine.close()


@pytest.mark.parametrize("where", ["waiting", "running"])
async def test_abort_frees_the_slot_and_the_pages(where):
    engine = make_engine(LatencyModel(decode_step_ms=50), max_running=1)
    try:
        blocker = submit(engine, [7] * 40, 3)
        victim = submit(engine, [9] * 40, 3)
        await until(lambda: engine.running, "the step loop to admit", interval=0)
        target = victim if where == "waiting" else blocker
        target.abort()
        assert target.seqs[0].aborted
        assert target.seqs[0] not in engine.running and target.seqs[0] not in engine.waiting
        other = blocker if target is victim else victim
        await other.wait()
        assert engine.cache.pinned_tokens == 0
    finally:
        await engine.close()


async def test_zero_new_tokens_finishes_after_prefill():
    engine = make_engine(LatencyModel(decode_step_ms=1))
    try:
        group = submit(engine, [1] * 30, 0)
        await group.wait()
        assert group.seqs[0].generated == 0 and group.seqs[0].text == ""
    finally:
        await engine.close()


async def test_a_finished_request_is_freed_without_the_cycle_collector():
    # `shepherd bench scale` serves thousands of workers from one sim process: a reference cycle per request made its
    # garbage collections pause it for tens of milliseconds.
    engine = make_engine(None)
    gc.disable()
    try:
        group = submit(engine, list(range(50)), 4)
        await group.wait()
        queue = weakref.ref(group._queue)
        del group
        assert queue() is None
    finally:
        gc.enable()
