import collections
import itertools
import random

import pytest

from shepherd.config import CircuitBreakerConfig
from shepherd.routing import prefix_index
from shepherd.routing.prefix_index import PAIR_BYTES, BlockLayout, PrefixIndex, mix64
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker


def make_workers(count):
    return tuple(Worker(f"http://w{i}", CircuitBreaker(CircuitBreakerConfig())) for i in range(count))


def text(seed, chars):
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh ") for _ in range(chars))


def test_cuts_are_pages_then_grow_by_an_eighth_of_the_prefix():
    layout = BlockLayout(64)
    cuts = layout.cuts(100_000)
    assert cuts[:16] == [64 * i for i in range(1, 17)]
    for before, after in itertools.pairwise(cuts[15:-1]):
        assert after - before == max(64, before // 8 // 64 * 64)
    assert cuts[-1] == 100_000  # the tail
    assert len(layout.cuts(8192)) == 35  # logarithmic in the prompt length
    assert layout.cuts(100) == [64, 100]
    assert layout.cuts(128) == [64, 128]


def test_keys_are_shared_exactly_by_common_blocks():
    layout = BlockLayout(64)
    shared = text(1, 3000)
    keys_a, ends_a = layout.keys(shared + text(2, 500))
    keys_b, _ = layout.keys(shared + text(3, 500))
    common = sum(1 for end in ends_a if end <= 3000)
    assert keys_a[:common] == keys_b[:common]
    assert keys_a[common] != keys_b[common]
    assert layout.keys(shared) == layout.keys(shared)  # identical prompts: every key, tail included
    assert layout.keys("") == ([], [])


def test_a_remembered_head_gives_the_same_keys_as_hashing_everything():
    layout = BlockLayout(64)
    plain = BlockLayout(64)
    heads = [text(20, 1024), text(21, 3000), "é" + text(22, 5000)]  # one at the limit, one not ASCII
    for round_ in range(2):  # first a miss for every head, then hits
        for i, head in enumerate(heads):
            for tail in (" " + text(30 + i + round_, 40), " " + text(40 + i, 5000)):
                given = (head + ".")[:-1]  # another string object with the same text, as a parsed body gives
                assert layout.keys(head + tail, given) == plain.keys(head + tail)
    assert remembered(layout) == heads


def test_heads_that_look_alike_each_get_their_own_keys():
    layout = BlockLayout(64)
    ending = text(5, 1500)
    first, second = "a" + ending, "b" + ending  # the same length and last characters
    for head in (first, second, first):
        prompt = head + " " + text(6, 300)
        assert layout.keys(prompt, head) == BlockLayout(64).keys(prompt)
    assert remembered(layout) == [first]


def remembered(layout):
    return [head for head, _ in layout._heads.values()]


def test_head_keys_are_not_shared_with_the_caller_and_short_heads_are_not_remembered():
    layout = BlockLayout(64)
    head = text(1, 2000)
    keys, _ = layout.keys(head + " a", head)
    keys.clear()  # a caller's list: the memo must not change with it
    assert layout.keys(head + " b", head) == BlockLayout(64).keys(head + " b")
    layout.keys(text(2, 1023) + " question", text(2, 1023))
    layout.keys(head, head)  # a head that is the whole text: nothing of it follows a cut for sure
    assert remembered(layout) == [head]


def test_remembered_heads_are_bounded_in_characters_least_recent_dropped_first(monkeypatch):
    monkeypatch.setattr(prefix_index, "HEAD_MEMO_CHARS", 5000)
    layout = BlockLayout(64)
    first, second, third = text(1, 2000), text(2, 2000), text(3, 2000)
    for head in (first, second, first, third):  # `first` used again: `second` is now the least recent
        layout.keys(head + " q", head)
    assert remembered(layout) == [first, third]


def test_longest_match_returns_the_deepest_routable_holders():
    index = PrefixIndex(page_chars=64)
    a, b, c = make_workers(3)
    view = index.view((a, b, c))
    entry_a, entry_b, _ = view.entries
    prompt = text(1, 2000)
    keys, ends = index.layout.keys(prompt)
    index.record(entry_a, keys, ends)
    index.record(entry_b, keys[:10], ends[:10])  # b holds only a shorter prefix
    depth, holders, _ = index.longest_match(keys, view.members, 8, 3)
    assert (depth, holders) == (len(keys), [entry_a])
    # When a is not routable, the match falls back to the deepest prefix b holds.
    view_bc = index.view((b, c))
    depth, holders, _ = index.longest_match(keys, view_bc.members, 8, 2)
    assert (depth, holders) == (10, [entry_b])
    other_keys, _ = index.layout.keys(text(2, 2000))
    assert index.longest_match(other_keys, view.members, 8, 3) == (0, [], 0)


def test_view_is_built_once_per_candidates_snapshot():
    index = PrefixIndex()
    fleet = make_workers(4)
    first = index.view(fleet)
    assert index.view(fleet) is first
    assert index.views_built == 1
    smaller = fleet[:3]
    assert index.view(smaller) is not first
    assert index.views_built == 2
    for _ in range(20):  # retries' one-off candidate lists do not evict the registry's snapshot
        index.view(list(fleet[1:]))
        assert index.view(fleet) is first


def test_worker_capacity_evicts_least_recent_keys_leaf_first():
    index = PrefixIndex(page_chars=64, capacity_of=lambda worker: 4096)
    (worker,) = make_workers(1)
    entry = index.view((worker,)).entries[0]
    system = text(0, 1024)
    prompts = [system + text(i, 1024) for i in range(1, 20)]
    for prompt in prompts:
        keys, ends = index.layout.keys(prompt)
        index.record(entry, keys, ends)
        assert entry.chars <= 4096
    assert index.chars == entry.chars
    # The shared system prompt (touched by every request, root last) is still held; the oldest questions are not.
    system_keys, _ = index.layout.keys(system)
    assert all(key in entry.lru for key in system_keys)
    oldest_keys, _ = index.layout.keys(prompts[0])
    assert oldest_keys[-1] not in entry.lru
    newest_keys, _ = index.layout.keys(prompts[-1])
    assert newest_keys[-1] in entry.lru


def test_budget_is_split_among_workers_and_bounds_the_index_under_a_burst():
    budget = 256 * 1024
    index = PrefixIndex(page_chars=64, budget_bytes=budget)
    fleet = make_workers(4)
    view = index.view(fleet)
    per_worker = budget // 4 // PAIR_BYTES
    assert index.fair_share == per_worker and all(entry.key_capacity == per_worker for entry in view.entries)
    for i in range(2000):  # a burst of unique prompts, far more than the budget
        keys, ends = index.layout.keys(text(i, 500 + i % 3000))
        index.record(view.entries[i % 4], keys, ends)
        assert index.estimated_bytes <= budget and index.pairs == sum(len(e.lru) for e in view.entries)
        assert sum(len(owners) for owners in index.holders.values()) == index.pairs
    assert index.estimated_bytes >= budget // 2  # it is a cache, not a leak-free empty set


def test_fleet_growth_shrinks_capacity_and_maintain_trims_in_bounded_steps():
    index = PrefixIndex(page_chars=64, budget_bytes=800 * PAIR_BYTES)
    fleet = make_workers(8)
    view = index.view(fleet[:2])
    for i in range(200):
        keys, ends = index.layout.keys(text(i, 1000))
        index.record(view.entries[i % 2], keys, ends)
    before = index.pairs
    assert before > 800 // 8
    index.view(fleet)  # six more workers: each may now hold 1/8 of the budget
    assert index.fair_share == 100 and index.pending
    assert index.maintain(10) == 10
    while index.pending:
        assert index.maintain(10) <= 10
    assert all(len(entry.lru) <= 100 for entry in index.entries.values())
    assert index.pairs <= 200 < before


def test_removed_worker_is_purged_incrementally():
    index = PrefixIndex(page_chars=64)
    a, b = make_workers(2)
    view = index.view((a, b))
    entry_a, entry_b = view.entries
    for i in range(50):
        keys, ends = index.layout.keys(text(i, 2000))
        index.record(entry_a, keys, ends)
        index.record(entry_b, keys[:5], ends[:5])
    held_by_a = len(entry_a.lru)
    index.remove(a)
    assert a not in index.entries and index.pending
    assert index.maintain(7) == 7
    assert len(entry_a.lru) == held_by_a - 7
    while index.pending:
        index.maintain(100)
    assert all(entry_a not in owners for owners in index.holders.values())
    assert index.chars == entry_b.chars
    assert index.view((b,)).entries == (entry_b,)


def test_traffic_decays_with_later_requests():
    index = PrefixIndex()
    a, b = make_workers(2)
    entry_a, entry_b = index.view((a, b)).entries
    keys, ends = index.layout.keys("x" * 100)
    for _ in range(64):  # one half-life (32 requests per worker, 2 workers)
        index.record(entry_a, keys, ends)
    traffic_a = entry_a.traffic / index.unit
    for _ in range(64):
        index.record(entry_b, keys, ends)
    assert abs(entry_a.traffic / index.unit - traffic_a / 2) < 0.01
    assert entry_b.traffic > entry_a.traffic
    assert index.total_traffic == pytest.approx(entry_a.traffic + entry_b.traffic)


def test_homes_are_the_same_in_every_process_and_spread_evenly():
    # Separate indexes and Worker objects with the same URLs (two gateway replicas) build the same ring.
    view_1 = PrefixIndex().view(make_workers(8))
    view_2 = PrefixIndex().view(tuple(reversed(make_workers(8))))
    points = [mix64(i) for i in range(8000)]
    homes_1 = [view_1.home(point).worker.url for point in points]
    assert homes_1 == [view_2.home(point).worker.url for point in points]
    counts = collections.Counter(homes_1)
    assert len(counts) == 8 and max(counts.values()) / 1000 < 1.3 and min(counts.values()) / 1000 > 0.7
    # A worker leaving moves only its own homes.
    smaller = PrefixIndex().view(make_workers(8)[1:])
    moved = sum(a != smaller.home(p).worker.url for a, p in zip(homes_1, points, strict=True) if a != "http://w0")
    assert moved == 0


def test_longest_match_counts_the_keys_every_worker_holds():
    index = PrefixIndex()
    fleet = make_workers(3)
    view = index.view(fleet)
    system = text(1, 1000)
    for i, entry in enumerate(view.entries):
        index.record(entry, *index.layout.keys(system + text(10 + i, 500)))
    keys, ends = index.layout.keys(system + text(20, 500))
    depth, _, common = index.longest_match(keys, view.members, 8, 3)
    assert ends[common - 1] == 960  # the pages of the system prompt everyone holds
    assert depth == common  # and none holds more of this prompt
    assert index.longest_match(keys, view.members, 8, 4)[2] == 0


def test_rotate_holder_offers_the_least_recently_chosen_holders_first():
    index = PrefixIndex(page_chars=64)
    fleet = make_workers(3)
    view = index.view(fleet)
    keys, ends = index.layout.keys(text(5, 500))
    for entry in view.entries:
        index.record(entry, keys, ends)
    first, second, third = view.entries
    assert index.longest_match(keys, view.members, 2, 3) == (len(keys), [first, second], len(keys))
    index.rotate_holder(first, keys[-1])
    assert index.longest_match(keys, view.members, 2, 3) == (len(keys), [second, third], len(keys))
    index.rotate_holder(first, keys[0])  # other keys keep their own order
    assert list(index.holders[keys[-1]]) == [second, third, first]


def test_every_view_of_an_index_agrees_with_a_ring_of_its_own_workers():
    # One index sees the fleet grow, shrink and split into candidate subsets (a small one builds its own ring); its
    # homes are always those of a fresh index that only ever saw the view's workers.
    fleet = make_workers(60)
    index = PrefixIndex()
    index.view(fleet[:10])
    index.view(fleet)  # grows by more than a quarter: the ring is re-sorted whole
    index.view(tuple(list(fleet)))  # same workers, another snapshot
    grown = index.view((*fleet[:-1], Worker("http://late", CircuitBreaker(CircuitBreakerConfig()))))
    index.remove(fleet[5])
    points = [mix64(i) for i in range(2000)]
    for workers in (fleet[6:], fleet[6:8], grown.source[6:]):
        view, fresh = index.view(workers), PrefixIndex().view(workers)
        assert [view.home(p).worker for p in points] == [fresh.home(p).worker for p in points]


def test_a_growing_fleet_is_checked_against_the_smaller_share_by_maintain():
    index = PrefixIndex(page_chars=64, budget_bytes=40 * PAIR_BYTES)
    view = index.view(make_workers(2))  # 20 keys each
    index.maintain(2)
    for i in range(20):
        index.record(view.entries[0], *index.layout.keys(text(i, 64)))
    assert len(view.entries[0].lru) == 20 and not index.pending
    bigger = index.view(view.source + make_workers(8)[2:])  # 8 workers: 5 keys each
    assert bigger.entries[0].key_capacity == index.fair_share == 5
    assert index.pending  # the check is queued, not done inline
    index.maintain(3)  # checks 3 of the 8 entries (the newest first), evicts nothing yet
    assert len(view.entries[0].lru) == 20
    while index.pending:
        index.maintain(3)
    assert len(view.entries[0].lru) == 5


def test_bisected_lookups_find_what_a_walk_from_the_root_finds_through_records_and_evictions():
    """Closure: a worker holding a key holds every key before it, so the bisections in `depth` and
    `longest_match` agree with a walk from the root, whatever was recorded and evicted."""
    rng = random.Random(7)
    index = PrefixIndex(page_chars=64, capacity_of=lambda worker: 6000)  # small caches: evictions all along
    workers = make_workers(4)
    view = index.view(workers)
    documents = [text(seed, 4000) for seed in range(6)]

    def prompt():
        return rng.choice(documents)[: rng.randrange(1, 4000)] + text(rng.random(), rng.randrange(0, 300))

    for _ in range(400):
        keys, ends = index.layout.keys(prompt())
        index.record(rng.choice(view.entries), keys, ends)
        probe = keys if rng.random() < 0.3 else index.layout.keys(prompt())[0]  # sometimes wholly held
        for entry in view.entries:
            walked = next((i for i, key in enumerate(probe) if key not in entry.lru), len(probe))
            assert entry.depth(probe, len(probe)) == walked
            assert entry.chars == sum(entry.lru.values())  # a record moves the keys it holds, adds only the rest
        somebody = next((i for i, key in enumerate(probe) if key not in index.holders), len(probe))
        everyone = next((i for i, key in enumerate(probe[:somebody]) if len(index.holders[key]) < 4), somebody)
        depth, _, common = index.longest_match(probe, view.members, 8, 4)
        assert (depth, common) == (somebody, everyone)
