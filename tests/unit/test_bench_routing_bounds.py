"""Hit-rate bounds of `shepherd bench routing`: exact on small cases, and never beaten by a placement of requests."""

from __future__ import annotations

import random

import pytest

from shepherd.bench.cache_bounds import (
    capacity_hit_rate,
    infinite_cache_hit_rate,
    pooled_lru_hit_rate,
    reused_prefix_tokens,
)
from shepherd.bench.workloads import multi_turn, shared_prefix
from shepherd.sim.kv_cache import PrefixCache

PAGE = 16


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def test_infinite_cache_counts_full_pages_before_the_last_token() -> None:
    prompt = tokens(0, 64)
    # The repeat hits 3 of its 4 pages: the page holding the last token is always computed.
    assert infinite_cache_hit_rate([(prompt, []), (prompt, [])], PAGE) == pytest.approx(48 / 128)
    assert infinite_cache_hit_rate([(tokens(0, 64), []), (tokens(1000, 64), [])], PAGE) == 0.0


def test_answers_are_cached_for_the_next_turn() -> None:
    first = tokens(0, 32)
    answer = tokens(500, 16)
    second = first + answer + tokens(900, 16)
    assert infinite_cache_hit_rate([(first, answer), (second, [])], PAGE) == pytest.approx(48 / (32 + 64))


def test_pooled_lru_thrashes_on_a_cycle_larger_than_it_where_belady_keeps_part() -> None:
    # Three 2-page prefixes (plus a fresh last page each) visited in a cycle, in a cache of 4 pages: LRU always
    # evicts the prefix that comes next; the optimal cache keeps two of them for good (2/3 of the turns hit 2 of
    # their 3 pages, less the first visits).
    prefixes = [tokens(1000 * i, 32) for i in range(3)]
    turns = [(prefixes[i % 3] + tokens(10_000 + i, 16), []) for i in range(30)]
    assert pooled_lru_hit_rate(turns, PAGE, 4 * PAGE) == 0.0
    assert capacity_hit_rate(turns, PAGE, 4 * PAGE) == pytest.approx(0.4)
    assert pooled_lru_hit_rate(turns, PAGE, 64 * PAGE) == pytest.approx(infinite_cache_hit_rate(turns, PAGE))


def test_prefix_set_counts_each_reused_page_once() -> None:
    system = tokens(0, 64)
    turns = [(system + tokens(1000 * i, 16), []) for i in range(1, 5)]
    # Three later prompts reuse the 4 system pages; the questions are never reused.
    assert reused_prefix_tokens(turns, PAGE) == 64
    assert reused_prefix_tokens([(tokens(0, 64), []), (tokens(100, 64), [])], PAGE) == 0
    first, answer = tokens(0, 32), tokens(500, 16)
    assert reused_prefix_tokens([(first, answer), (first + answer + tokens(900, 16), [])], PAGE) == 48


def test_capacity_bound_equals_the_infinite_bound_when_everything_fits_and_zero_without_room() -> None:
    turns = list(shared_prefix(4, 4, 64, 8, 2).replay())
    infinite = infinite_cache_hit_rate(turns, PAGE)
    assert infinite > 0.5
    assert capacity_hit_rate(turns, PAGE, 1 << 20) == pytest.approx(infinite)
    assert capacity_hit_rate(turns, PAGE, 0) == 0.0


def test_optimal_replacement_beats_lru_on_a_cyclic_pattern() -> None:
    a, b, c = tokens(0, 33), tokens(100, 33), tokens(200, 33)
    turns = [(p, []) for p in (a, b, c) * 4]
    lru = PrefixCache(64, PAGE)  # room for two prompts' pages: LRU evicts each prompt just before it returns
    hits = 0
    for prompt, _ in turns:
        lease = lru.acquire(prompt)
        hits += lease.cached_tokens
        lru.release(lease, prompt)
    assert hits == 0
    assert capacity_hit_rate(turns, PAGE, 64) > 0.2


@pytest.mark.parametrize(
    "workload",
    [shared_prefix(12, 6, 96, 8, 4, seed=5), multi_turn(10, 4, 64, 8, 4, seed=5)],
    ids=["shared-prefix", "multi-turn"],
)
def test_no_placement_of_requests_on_lru_workers_beats_the_bounds(workload) -> None:
    turns = list(workload.replay())
    order = list(workload.nominal_order())
    workers, capacity = 3, 256
    infinite = infinite_cache_hit_rate(turns, PAGE)
    bound = capacity_hit_rate(turns, PAGE, workers * capacity)
    assert bound <= infinite + 1e-12
    rng = random.Random(0)
    placements = [lambda i, conv: conv % workers, lambda i, conv: i % workers]
    placements += [lambda i, conv: rng.randrange(workers) for _ in range(5)]
    for place in placements:
        caches = [PrefixCache(capacity, PAGE) for _ in range(workers)]
        cached = prompt_tokens = 0
        for i, ((prompt, answer), (conversation, _)) in enumerate(zip(turns, order, strict=True)):
            cache = caches[place(i, conversation)]
            lease = cache.acquire(prompt)
            cached += lease.cached_tokens
            prompt_tokens += len(prompt)
            cache.release(lease, prompt + answer)
        assert cached / prompt_tokens <= bound + 1e-12
