"""KV events of the simulated worker: what `PrefixCache` tells its sink, and how `KvEventPublisher` batches it."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from smg_grpc_proto.generated import common_pb2

from shepherd.sim.kv_cache import PrefixCache
from shepherd.sim.kv_events import KvEventPublisher, Subscriber


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


class Mirror:
    """A recording sink that also applies what it hears, checking that it makes sense on the way: a stored page is
    new and its parent known, a removed page known."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.pages: dict[int, tuple[int | None, list[int]]] = {}

    def stored(self, parent: int | None, pages: list[tuple[int, list[int]]]) -> None:
        self.calls.append(("stored", parent, [(key, list(page)) for key, page in pages]))
        assert pages and (parent is None or parent in self.pages)
        for key, page in pages:
            assert key not in self.pages
            self.pages[key] = (parent, list(page))
            parent = key

    def removed(self, keys: list[int]) -> None:
        self.calls.append(("removed", list(keys)))
        for key in keys:
            del self.pages[key]

    def cleared(self) -> None:
        self.calls.append(("cleared",))
        self.pages.clear()


def resident(cache: PrefixCache) -> dict[int, tuple[int | None, list[int]]]:
    return {page.key: (page.parent, page.tokens) for page in cache.resident_pages()}


# --- PrefixCache and its sink -----------------------------------------------------------------------------------------


def test_acquire_stores_new_pages_in_chain_order_and_nothing_already_resident():
    sink = Mirror()
    cache = PrefixCache(capacity_tokens=1000, page_size=4, events=sink)
    prompt = tokens(0, 10)  # two full pages + 2 tokens
    k1, k2 = cache.page_keys(prompt)
    lease = cache.acquire(prompt)
    assert sink.calls == [("stored", None, [(k1, tokens(0, 4)), (k2, tokens(4, 4))])]
    cache.release(lease)
    cache.release(cache.acquire(prompt))  # all resident: nothing to tell
    assert len(sink.calls) == 1
    other = [*tokens(0, 4), 90, 91, 92, 93, 94]  # shares the first page only
    cache.acquire(other)
    assert sink.calls[1:] == [("stored", k1, [(cache.page_keys(other)[1], [90, 91, 92, 93])])]


def test_release_stores_the_output_pages_with_their_parent_and_tokens():
    sink = Mirror()
    cache = PrefixCache(capacity_tokens=1000, page_size=4, events=sink)
    prompt, output = tokens(0, 6), tokens(500, 7)
    lease = cache.acquire(prompt)
    full = prompt + output  # 13 tokens: pages 0 (the prompt's), 1 and 2
    k0, k1, k2 = cache.page_keys(full)
    cache.release(lease, full)
    assert sink.calls == [("stored", None, [(k0, full[0:4])]), ("stored", k0, [(k1, full[4:8]), (k2, full[8:12])])]
    cache.release(cache.acquire(full), full)  # every page already resident
    assert len(sink.calls) == 2
    assert sink.pages == resident(cache)


def test_eviction_is_removed_before_the_pages_that_needed_the_room():
    sink = Mirror()
    cache = PrefixCache(capacity_tokens=12, page_size=4, events=sink)  # 3 pages
    a, b = tokens(0, 9), tokens(100, 9)
    a1, a2 = cache.page_keys(a)
    b1, b2 = cache.page_keys(b)
    cache.release(cache.acquire(a))
    cache.release(cache.acquire(b))  # b2 needs room: a's leaf a2 goes
    assert sink.calls[1:] == [("removed", [a2]), ("stored", None, [(b1, b[:4]), (b2, b[4:8])])]
    assert set(sink.pages) == {a1, b1, b2} and sink.pages == resident(cache)


def test_a_page_inserted_and_evicted_within_one_release_is_never_announced():
    sink = Mirror()
    cache = PrefixCache(capacity_tokens=8, page_size=4, events=sink)  # 2 pages
    prompt = tokens(0, 5)
    lease = cache.acquire(prompt)  # page 0, pinned
    full = prompt + tokens(50, 8)  # pages 1 and 2 come out of the output
    k0, k1, k2 = cache.page_keys(full)
    # Deepest first: page 2 takes the free slot, then page 1 evicts it (page 0 is pinned).
    cache.release(lease, full)
    assert sink.calls == [("stored", None, [(k0, full[:4])]), ("stored", k0, [(k1, full[4:8])])]
    assert set(sink.pages) == {k0, k1} == set(resident(cache)) and k2 not in sink.pages


def test_clear_removes_the_unpinned_pages_or_clears_everything():
    sink = Mirror()
    cache = PrefixCache(capacity_tokens=1000, page_size=4, events=sink)
    done = cache.acquire(tokens(0, 8))
    cache.release(done)
    running = cache.acquire(tokens(100, 8))
    assert cache.clear() == 2
    # Pinned pages stay, so this is no full clear: the dropped pages, in eviction order (the leaf first).
    assert sink.calls[-1] == ("removed", cache.page_keys(tokens(0, 8))[::-1])
    assert sink.pages == resident(cache) and len(sink.pages) == 2
    cache.release(running)
    assert cache.clear() == 2
    assert sink.calls[-1] == ("cleared",) and resident(cache) == {} == sink.pages


def test_resident_pages_lists_parents_first_even_when_inserted_deepest_first():
    cache = PrefixCache(capacity_tokens=1000, page_size=2, events=Mirror())
    lease = cache.acquire([1, 2, 3])
    full = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # release inserts pages 1..4 deepest first
    cache.release(lease, full)
    cache.release(cache.acquire([1, 2, 30, 40, 50]), None)  # a branch off the first page
    pages = cache.resident_pages()
    position = {page.key: i for i, page in enumerate(pages)}
    assert len(pages) == 6
    assert all(page.parent is None or position[page.parent] < position[page.key] for page in pages)
    chain = cache.page_keys(full)
    assert [(p.key, p.tokens) for p in pages if p.key in chain] == [
        (key, full[2 * i : 2 * i + 2]) for i, key in enumerate(chain)
    ]
    with pytest.raises(RuntimeError):
        PrefixCache(1000, 2).resident_pages()  # no sink: no parents or tokens kept


def test_the_events_replay_to_the_resident_pages_under_a_random_workload():
    rng = random.Random(7)
    sink = Mirror()  # asserts as it goes: no duplicate store, no unknown parent, no unknown removal
    cache = PrefixCache(capacity_tokens=40, page_size=4, events=sink)  # 10 pages: constant eviction
    plain = PrefixCache(capacity_tokens=40, page_size=4)
    stems = [tokens(1000 * i, 12) for i in range(4)]
    leases = []
    for step in range(2000):
        if leases and (rng.random() < 0.5 or len(leases) > 3):
            lease, plain_lease, full = leases.pop(rng.randrange(len(leases)))
            cache.release(lease, full)
            plain.release(plain_lease, full)
        else:
            prompt = rng.choice(stems)[: rng.randrange(1, 13)] + [rng.randrange(5) for _ in range(rng.randrange(10))]
            full = prompt + [rng.randrange(5) for _ in range(rng.randrange(10))] if rng.random() < 0.8 else None
            lease, plain_lease = cache.acquire(prompt), plain.acquire(prompt)
            assert lease == plain_lease  # a sink does not change what is cached
            leases.append((lease, plain_lease, full))
        if step % 500 == 499:
            cache.clear()
            plain.clear()
        assert sink.pages == resident(cache)
        assert set(sink.pages) == set(cache._refs) == set(plain._refs)


# --- KvEventPublisher -------------------------------------------------------------------------------------------------


def published_cache(publisher: KvEventPublisher, capacity_tokens: int = 1000, page_size: int = 4) -> PrefixCache:
    cache = PrefixCache(capacity_tokens, page_size, events=publisher)
    publisher.attach(cache.resident_pages)
    return cache


def apply(batch: common_pb2.KvEventBatch, pages: dict[int, tuple[int | None, list[int]]]) -> None:
    """A subscriber's view: apply one batch's events."""
    for event in batch.events:
        kind = event.WhichOneof("data")
        if kind == "cleared":
            pages.clear()
        elif kind == "removed":
            for key in event.removed.block_hashes:
                del pages[key]
        else:
            stored = event.stored
            parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
            for block in stored.blocks:
                assert block.block_hash not in pages and (parent is None or parent in pages)
                assert block.block_size == len(block.token_ids)
                pages[block.block_hash] = (parent, list(block.token_ids))
                parent = block.block_hash


async def next_batch(queue: Subscriber) -> common_pb2.KvEventBatch | None:
    return await asyncio.wait_for(queue.get(), timeout=5)  # a deadline, so that a missing batch fails the test


def drain(queue: Subscriber) -> list[common_pb2.KvEventBatch]:
    batches = []
    while not queue.empty():
        batches.append(queue.get_nowait())
    return batches


async def test_the_events_of_one_loop_turn_make_one_batch():
    publisher = KvEventPublisher(dp_rank=1)
    cache = published_cache(publisher, capacity_tokens=12)  # 3 pages
    queue: Subscriber = asyncio.Queue()
    publisher.subscribe(queue)
    (snapshot,) = drain(queue)
    assert snapshot.sequence_number == 0 and snapshot.snapshot.count == 1 and snapshot.snapshot.blocks == 0
    assert [e.WhichOneof("data") for e in snapshot.events] == ["cleared"]

    before = time.time()
    a, b = tokens(0, 9), tokens(100, 13)
    cache.release(cache.acquire(a))  # stores a1, a2
    lease_b = cache.acquire(b)  # evicts a2 then a1 to make room, stores b1, b2, b3
    first = await next_batch(queue)
    assert queue.empty()  # everything of the turn in one batch
    assert first.sequence_number == 1 and first.dp_rank == 1 and before <= first.timestamp <= time.time()
    assert not first.HasField("snapshot") and not first.HasField("load")
    assert [e.event_id for e in first.events] == [1, 2, 3]
    assert [e.WhichOneof("data") for e in first.events] == ["stored", "removed", "stored"]
    a1, a2 = cache.page_keys(a)
    stored = first.events[0].stored
    assert not stored.HasField("parent_block_hash")
    assert [(blk.block_hash, list(blk.token_ids), blk.block_size) for blk in stored.blocks] == [
        (a1, a[:4], 4),
        (a2, a[4:8], 4),
    ]
    assert list(first.events[1].removed.block_hashes) == [a2, a1]  # two evictions, merged into one event
    assert [blk.block_hash for blk in first.events[2].stored.blocks] == cache.page_keys(b)

    b1, b2, b3 = cache.page_keys(b)
    cache.release(lease_b)
    branch = [*b[:4], 7, 7, 7, 7, 7]
    cache.acquire(branch)  # b1 is resident; the new page evicts b3, the least recently used
    cache.clear()  # b1 and the new page are pinned: only b2 goes
    second = await next_batch(queue)
    assert queue.empty() and second.sequence_number == 2
    assert [e.WhichOneof("data") for e in second.events] == ["removed", "stored", "removed"]
    assert [e.event_id for e in second.events] == [4, 5, 6]
    assert list(second.events[0].removed.block_hashes) == [b3]
    (child,) = second.events[1].stored.blocks
    assert second.events[1].stored.parent_block_hash == b1 and list(child.token_ids) == [7] * 4
    assert child.block_hash == cache.page_keys(branch)[1]
    assert list(second.events[2].removed.block_hashes) == [b2]

    cache.clear()  # everything left is pinned: nothing dropped, nothing to tell
    cache.acquire(branch)  # all resident: nothing stored
    assert queue.empty() and publisher.sequence == 2


async def test_a_late_subscriber_gets_a_snapshot_then_live_batches_with_nothing_lost_or_repeated():
    publisher = KvEventPublisher(dp_rank=0)
    cache = published_cache(publisher, capacity_tokens=40)  # 10 pages: evictions happen
    early: Subscriber = asyncio.Queue()
    publisher.subscribe(early)
    early_view: dict[int, tuple[int | None, list[int]]] = {}
    for batch in drain(early):
        apply(batch, early_view)
    rng = random.Random(3)
    late: Subscriber = asyncio.Queue()
    late_batches: list[common_pb2.KvEventBatch] = []

    def unique(turn: int, op: int) -> list[int]:  # a first page never seen before: the op stores something
        return [100 + 3 * turn + op] * 4 + [rng.randrange(4) for _ in range(rng.randrange(8))]

    for turn in range(30):
        for op in range(3):
            prompt = unique(turn, op) if op != 1 else [rng.randrange(4) for _ in range(rng.randrange(4, 20))]
            cache.release(cache.acquire(prompt), prompt + [rng.randrange(4) for _ in range(6)])
            if turn == 12 and op == 0:  # mid-turn: this turn's events so far belong to the snapshot
                publisher.subscribe(late)
        # One batch per turn; two in the turn of the subscription (the events before it and after it).
        for _ in range(2 if turn == 12 else 1):
            apply(await next_batch(early), early_view)
        if turn >= 12:
            late_batches += drain(late)
    assert early.empty() and late.empty()
    assert early_view == resident(cache)

    snapshot = [b for b in late_batches if b.HasField("snapshot")]
    live = late_batches[len(snapshot) :]
    assert snapshot and not any(b.HasField("snapshot") for b in live)
    assert all(e.event_id == 0 for b in snapshot for e in b.events)
    late_view: dict[int, tuple[int | None, list[int]]] = {}
    for batch in late_batches:
        apply(batch, late_view)
    assert late_view == resident(cache)
    sequences = [b.sequence_number for b in late_batches]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))  # no gap, no repeat
    assert live[-1].sequence_number == publisher.sequence


def test_snapshots_are_chunked_and_numbered_up_to_the_last_batch():
    publisher = KvEventPublisher(snapshot_chunk_blocks=2)
    cache = published_cache(publisher)
    prompt = tokens(0, 20)  # 5 pages
    cache.acquire(prompt)  # no event loop: one batch per change
    assert publisher.sequence == 1
    queue: Subscriber = asyncio.Queue()
    publisher.subscribe(queue)
    two = drain(queue)  # 3 chunks would be needed, but only sequences 0 and 1 are free
    assert [(b.sequence_number, b.snapshot.index, b.snapshot.count, b.snapshot.blocks) for b in two] == [
        (0, 0, 2, 5),
        (1, 1, 2, 5),
    ]
    cache.release(cache.acquire(tokens(100, 8)))
    drain(queue)
    assert publisher.sequence == 2
    three = KvEventPublisher(snapshot_chunk_blocks=2)
    three.sequence = 7
    three.attach(cache.resident_pages)
    three.subscribe(queue)
    chunks = drain(queue)
    assert [(b.sequence_number, b.snapshot.index, b.snapshot.count) for b in chunks] == [
        (4, 0, 4),
        (5, 1, 4),
        (6, 2, 4),
        (7, 3, 4),
    ]
    assert [e.WhichOneof("data") for e in chunks[0].events] == ["cleared", "stored"]
    view: dict[int, tuple[int | None, list[int]]] = {}
    for batch in chunks:
        assert sum(len(e.stored.blocks) for e in batch.events) <= 2
        apply(batch, view)
    assert view == resident(cache) and len(view) == 7
    first_chain = [blk.block_hash for e in [*chunks[0].events[1:], *chunks[1].events] for blk in e.stored.blocks]
    assert first_chain[:4] == cache.page_keys(prompt)[:4]  # a chain split across chunks keeps its parents


def test_a_subscriber_that_falls_behind_is_dropped_and_the_others_keep_going():
    publisher = KvEventPublisher(max_backlog=3)
    cache = published_cache(publisher)
    slow: Subscriber = asyncio.Queue()
    fast: Subscriber = asyncio.Queue()
    publisher.subscribe(slow)
    publisher.subscribe(fast)
    assert publisher.subscribers == 2
    received = []
    for i in range(5):
        cache.acquire(tokens(100 * i, 4))  # no event loop: one batch each
        received += drain(fast)
    batches = drain(slow)
    assert [b.sequence_number for b in batches[:-1]] == [0, 1, 2] and batches[-1] is None
    assert [b.sequence_number for b in received] == [0, 1, 2, 3, 4, 5]
    assert publisher.subscribers == 1
    publisher.unsubscribe(fast)
    publisher.unsubscribe(fast)  # idempotent
    assert publisher.subscribers == 0
    cache.acquire(tokens(1000, 4))
    assert publisher.sequence == 6 and fast.empty()
