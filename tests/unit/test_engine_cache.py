"""The engines' KV events as cache_aware's view of their caches (routing/engine_cache.py, workers/kv_events.py)."""

import random

import orjson
from smg_grpc_proto.generated import common_pb2

from shepherd.config import CacheAwareConfig, CircuitBreakerConfig
from shepherd.routing.context import GENERATE, RequestContext
from shepherd.routing.engine_cache import BLOCK_BYTES, EngineCache
from shepherd.routing.policies.cache_aware import CacheAwarePolicy
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, FeedLost, batch_events
from shepherd.workers.load_monitor import RankLoad
from shepherd.workers.worker import Worker

BLOCK = 16  # tokens per engine block


def grpc_workers(count):
    labels = {"max_total_num_tokens": "100000"}
    return tuple(
        Worker(f"grpc://w{i}:1", CircuitBreaker(CircuitBreakerConfig()), model_id="m", labels=labels)
        for i in range(count)
    )


def tokens(seed, count):
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(count)]


def stored(ids, parent=None, first_hash=1000):
    """A BlocksStored of the full blocks of `ids`, with engine hashes first_hash, first_hash + 1, ..."""
    blocks = tuple((first_hash + i, tuple(ids[i * BLOCK : (i + 1) * BLOCK])) for i in range(len(ids) // BLOCK))
    return BlocksStored(parent, blocks)


def routed(ids):
    ctx = RequestContext(GENERATE, orjson.dumps({"input_ids": ids, "model": "m"}), "req")
    ctx.route_by_tokens(ids)
    return ctx


def text_of(ids):
    return routed(ids).routing_text


def test_blocks_are_found_by_the_requests_own_tokens_whatever_the_engines_hashes():
    cache = EngineCache()
    a, b = grpc_workers(2)
    prompt = tokens(1, 5 * BLOCK + 3)
    cache.apply(a, [CacheCleared(), stored(prompt[: 3 * BLOCK], first_hash=7)])
    cache.apply(b, [CacheCleared(), stored(prompt[: 2 * BLOCK], first_hash=-99)])  # other hashes, same blocks
    keys = cache.keys(text_of(prompt))
    assert len(keys) == 5 and cache.match(keys, everyone=2) == (3, 2)
    assert cache.depth(a, keys, 3) == 3 and cache.depth(b, keys, 3) == 2
    assert set(cache.holders(keys[2])) == {a}
    # A stored event continuing a chain names its parent by the engine's hash.
    cache.apply(b, [stored(prompt[2 * BLOCK : 4 * BLOCK], parent=-98, first_hash=500)])
    assert cache.match(keys, everyone=2) == (4, 3)
    assert cache.depth(b, keys, 4) == 4 and cache.depth(a, keys, 4) == 3


def test_removed_blocks_and_unknown_parents_and_lost_feeds():
    cache = EngineCache()
    (a,) = grpc_workers(1)
    prompt = tokens(2, 4 * BLOCK)
    cache.apply(a, [CacheCleared(), stored(prompt)])
    assert cache.observes([a]) and cache.blocks_held(a) == 4
    cache.apply(a, [BlocksRemoved((1002, 1003))])
    keys = cache.keys(text_of(prompt))
    assert cache.match(keys, 1) == (2, 2) and cache.depth(a, keys, 2) == 2
    cache.apply(a, [stored(prompt[3 * BLOCK :], parent=1002)])  # its parent is gone: unreachable, not indexed
    assert cache.blocks_held(a) == 2
    version = cache.version
    cache.apply(a, [FeedLost()])
    assert not cache.observes([a]) and cache.blocks_held(a) == 0 and cache.version > version
    assert cache.match(keys, 1) == (0, 0)


def test_a_worker_reporting_more_than_its_share_of_the_budget_is_no_longer_observed():
    cache = EngineCache(budget_bytes=2 * 10 * BLOCK_BYTES)  # two workers: 10 blocks each
    a, b = grpc_workers(2)
    cache.apply(a, [CacheCleared(), stored(tokens(30, 8 * BLOCK))])
    cache.apply(b, [CacheCleared(), stored(tokens(31, 8 * BLOCK))])
    assert cache.observes([a, b])
    cache.apply(b, [stored(tokens(32, 3 * BLOCK), first_hash=5000)])
    assert not cache.observes([a, b]) and cache.observes([a]) and cache.blocks_held(b) == 0
    cache.apply(b, [stored(tokens(33, BLOCK), first_hash=6000)])
    assert cache.blocks_held(b) == 0  # ignored until its feed starts over
    cache.apply(b, [CacheCleared(), stored(tokens(33, BLOCK), first_hash=6000)])
    assert cache.observes([a, b]) and cache.blocks_held(b) == 1


def test_engines_with_blocks_under_16_tokens_are_not_followed():
    cache = EngineCache()
    (a,) = grpc_workers(1)
    page_of_one = BlocksStored(None, tuple((i, (token,)) for i, token in enumerate(tokens(34, 40))))
    cache.apply(a, [CacheCleared(), page_of_one])
    assert cache.block_chars == 0 and not cache.observes([a]) and cache.blocks_held(a) == 0


def test_placed_blocks_count_as_held_until_unplaced():
    cache = EngineCache()
    a, b = grpc_workers(2)
    cache.apply(a, [CacheCleared(), stored(tokens(3, BLOCK))])  # learns the block size
    prompt = text_of(tokens(4, 3 * BLOCK))
    keys = cache.keys(prompt)
    assert len(keys) == 3 and cache.match(keys, 2) == (0, 0)
    cache.place(b, keys)
    cache.place(b, keys)
    assert cache.match(keys, 2) == (3, 0) and cache.depth(b, keys, 3) == 3
    cache.unplace(b, keys)
    assert cache.depth(b, keys, 3) == 3
    cache.unplace(b, keys)
    assert cache.match(keys, 2) == (0, 0)


def test_a_kv_event_batch_becomes_plain_events():
    batch = common_pb2.KvEventBatch(sequence_number=3)
    event = batch.events.add(event_id=1)
    event.stored.parent_block_hash = 5
    event.stored.blocks.add(block_hash=6, token_ids=[1, 2, 3], block_size=3)
    batch.events.add(event_id=2).removed.block_hashes.extend([4, 5])
    batch.events.add(event_id=3).cleared.SetInParent()
    root = batch.events.add(event_id=4)
    root.stored.blocks.add(block_hash=9, token_ids=[7], block_size=1)
    assert batch_events(batch) == [
        BlocksStored(5, ((6, (1, 2, 3)),)),
        BlocksRemoved((4, 5)),
        CacheCleared(),
        BlocksStored(None, ((9, (7,)),)),
    ]


def observed_policy(fleet):
    p = CacheAwarePolicy(CacheAwareConfig(max_share=0), random.Random(0))
    for worker in fleet:
        p.on_kv_events(worker, [CacheCleared()])
    return p


def test_the_engines_report_overrides_what_this_gateway_sent():
    # This gateway sent a prefix to `a`; the engines say `b` holds it (another replica's traffic evicted it from
    # `a` and put it on `b`): the request goes to `b`. When b's feed is lost, the gateway's own model decides again.
    fleet = a, b, c = grpc_workers(3)
    p = observed_policy(fleet)
    system = tokens(5, 40 * BLOCK)
    assert p.pick((a,), routed(system + tokens(6, 20))) is a
    p.on_kv_events(b, [stored(system)])
    p.on_kv_events(c, [stored(tokens(7, BLOCK))])  # c holds something else
    question = routed(system + tokens(8, 20))
    assert p.pick(fleet, question) is b
    p.on_request_done(b, question, True)
    assert p.explain(fleet, routed(system + tokens(9, 20)))["engine_events"] is True
    p.on_kv_events(b, [FeedLost()])
    explained = p.explain(fleet, routed(system + tokens(11, 20)))
    assert explained["engine_events"] is False  # its own model: it sent the prefix to a, then to b
    held = {c["worker"] for c in explained["candidates"] if c["matched_chars"] >= len(system) * 4 * 7 // 8}
    assert held == {a.url, b.url}  # (block cuts of the index: a match is at most 1/8 short)


def test_a_request_matched_by_its_text_is_left_to_the_index_even_when_every_engine_reports():
    # An HTTP request whose model has no tokenizer loaded is routed by its text: the engines' blocks are keyed by
    # token ids, so they cannot say what it matches, and the gateway's own model decides.
    fleet = grpc_workers(2)
    p = observed_policy(fleet)
    p.on_kv_events(fleet[1], [stored(tokens(15, 4 * BLOCK))])  # every engine observed, the block size learned
    prompt = "a long shared document " * 40

    def by_text(question):
        return RequestContext(GENERATE, orjson.dumps({"text": prompt + question, "model": "m"}), "req")

    first = p.pick(fleet, by_text("first?"))
    explained = p.explain(fleet, by_text("second?"))
    assert explained["engine_events"] is False and explained["worker"] == first.url
    assert explained["known_chars"] >= len(prompt) * 7 // 8  # what this gateway sent there


def test_a_prefix_in_flight_is_followed_before_the_engine_reports_it():
    fleet = grpc_workers(4)
    p = observed_policy(fleet)
    p.on_kv_events(fleet[0], [stored(tokens(12, BLOCK))])  # learns the block size
    system = tokens(13, 30 * BLOCK)
    first = routed(system + tokens(14, 10))
    chosen = p.pick(fleet, first)
    later = [routed(system + tokens(20 + q, 10)) for q in range(5)]
    for ctx in later:  # the first request is still prefilling: no event yet, its blocks count as placed
        assert p.explain(fleet, ctx)["known_chars"] == len(system) * 4
        assert p.pick(fleet, ctx) is chosen
    p.on_request_done(chosen, first, True)
    keys = p._engines.keys(routed(system).routing_text)
    assert p._engines.match(keys, 4)[0] == len(keys)  # the later requests are still in flight
    for ctx in later:
        p.on_request_done(chosen, ctx, True)
    assert p._engines.match(keys, 4) == (0, 0)  # ended, and no engine reported the blocks


def test_replicas_following_the_engines_home_a_new_prefix_where_the_engines_store_least():
    # Other replicas route to these workers (the engines report twice this gateway's requests), so the ring home
    # would keep replicas in agreement; but all of them read the same engines: a prompt nobody holds goes to the
    # worker whose engine stored least lately (relative to its cache), which every replica computes alike.
    fleet = grpc_workers(3)
    p = observed_policy(fleet)
    for worker in fleet:
        worker.load = 2
        worker.engine_ranks = (RankLoad(0, 4, 0),)
    p.on_engine_loads(list(fleet))
    for worker in fleet:
        worker.load = 0
    prompt = routed(tokens(40, 20 * BLOCK))
    for n, worker in enumerate(fleet):  # one block each: a tie, which the ring decides
        p.on_kv_events(worker, [stored(tokens(41 + n, BLOCK), first_hash=100 * n)])
    ring = p.explain(fleet, prompt)
    assert ring["home_on_ring"] is True
    ring_home = next(w for w in fleet if w.url == ring["home"])
    busy = [w for w in fleet if w is not ring_home]
    for n, worker in enumerate(busy):  # the engines of the other two stored less than the ring home's
        p.on_kv_events(worker, [stored(tokens(50 + n, 4 * BLOCK), first_hash=7000 + 100 * n)])
    p.on_kv_events(ring_home, [stored(tokens(60, 40 * BLOCK), first_hash=9000)])
    explained = p.explain(fleet, prompt)
    assert explained["home"] != ring_home.url and not explained["home_on_ring"]
    assert p.pick(fleet, prompt).url == explained["home"]


def test_match_bisects_to_what_a_walk_from_the_root_finds_under_leaf_first_eviction():
    """Engines evict a block's descendants before the block, so what somebody holds or was sent is a prefix of a
    prompt's chain: `match` bisects, and agrees with a walk from the root through stores, evictions and placements."""
    rng = random.Random(3)
    cache = EngineCache()
    workers = grpc_workers(3)
    documents = [tokens(seed, 40 * BLOCK) for seed in range(5)]
    lrus = {worker: {} for worker in workers}  # each engine's blocks by hash, least recent first
    for worker in workers:
        cache.apply(worker, [CacheCleared()])
    hashes = iter(range(1, 10**9))
    chains = {}  # (worker, parent hash, block) -> engine hash

    def serve(worker, ids):
        lru, parent, run, run_parent = lrus[worker], None, [], None
        chain = []
        for i in range(len(ids) // BLOCK):
            block = tuple(ids[i * BLOCK : (i + 1) * BLOCK])
            engine_hash = chains.setdefault((worker, parent, block), next(hashes))
            if engine_hash not in lru:
                run_parent = parent if not run else run_parent
                run.append((engine_hash, block))
            chain.append(engine_hash)
            parent = engine_hash
        events = [BlocksStored(run_parent, tuple(run))] if run else []
        for engine_hash in reversed(chain):  # the root most recent
            lru.pop(engine_hash, None)
            lru[engine_hash] = None
        evicted = []
        while len(lru) > 60:
            evicted.append(next(iter(lru)))
            del lru[evicted[-1]]
        return events + ([BlocksRemoved(tuple(evicted))] if evicted else [])

    placed = []
    for _ in range(300):
        ids = rng.choice(documents)[: rng.randrange(BLOCK, 40 * BLOCK)] + tokens(rng.random(), rng.randrange(40))
        worker = rng.choice(workers)
        cache.apply(worker, serve(worker, ids))
        if rng.random() < 0.3:  # a request in flight, its blocks not reported yet
            keys = cache.keys(text_of(rng.choice(documents)[: rng.randrange(BLOCK, 40 * BLOCK)]))
            cache.place(worker, keys)
            placed.append((worker, keys))
        if len(placed) > 5:
            cache.unplace(*placed.pop(0))
        probe = cache.keys(text_of(rng.choice(documents)[: rng.randrange(BLOCK, 40 * BLOCK)]))
        counts = [sum(1 for _ in cache.holders(key)) for key in probe]  # a worker sent what it holds counts twice
        somebody = next((i for i, count in enumerate(counts) if not count), len(probe))
        assert cache.match(probe, everyone=3)[0] == somebody
        assert cache.match(probe, everyone=2)[1] == next((i for i, c in enumerate(counts) if c < 2), somebody)


def test_block_keys_of_a_known_prefix_are_remembered_and_equal_hashing_everything(monkeypatch):
    from shepherd.routing import engine_cache
    from shepherd.routing.prefix_index import BlockLayout

    (a,) = grpc_workers(1)
    cache, plain = EngineCache(), EngineCache()
    for each in (cache, plain):
        each.apply(a, [CacheCleared(), stored(tokens(3, BLOCK))])  # learns the block size
    layout = BlockLayout(64)  # the prefix index's cuts: whole blocks of 16 tokens, 4 characters each
    system = tokens(4, 40 * BLOCK)
    turn = system + tokens(5, 7 * BLOCK + 5)
    cut = tokens(12, 16 * BLOCK)  # 1,024 characters: the index cuts there, and the next blocks differ
    prompts = [system + tokens(6, 9), turn, turn + tokens(7, 3 * BLOCK), system + tokens(8, 50), tokens(9, 300),
               cut + tokens(13, 2 * BLOCK), cut + tokens(14, 2 * BLOCK)]  # fmt: skip
    for ids in prompts:  # new, a shared head, a conversation's next turn, the head again, unrelated, forks at a cut
        text = text_of(ids)
        assert cache.keys(text, *layout.keys(text)) == plain.keys(text)
    assert cache._prefixes
    # Bounded in blocks: full, it starts over.
    monkeypatch.setattr(engine_cache, "PREFIX_BLOCKS_REMEMBERED", 60)
    cache = EngineCache()
    cache.apply(a, [CacheCleared(), stored(tokens(3, BLOCK))])
    for ids in prompts:
        text = text_of(ids)
        assert cache.keys(text, *layout.keys(text)) == plain.keys(text)
        chains = {id(chain): len(chain) for chain, _ in cache._prefixes.values()}
        assert sum(chains.values()) == cache._prefix_blocks <= max(60, len(ids) // BLOCK)


def test_prefixes_that_do_not_end_on_a_block_are_not_remembered():
    (a,) = grpc_workers(1)
    cache = EngineCache()
    cache.apply(a, [CacheCleared(), stored(tokens(3, BLOCK))])
    text = text_of(tokens(10, 5 * BLOCK))
    cache.keys(text, [11, 12, 13], [64, 100, 192])  # 100 characters is 25 tokens: inside a block
    assert {key: count for key, (_, count) in cache._prefixes.items()} == {11: 1, 13: 3}
