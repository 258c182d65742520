import asyncio
import collections
import dataclasses
import random
import time

import orjson
import pytest

from shepherd.cli import build_parser, config_from_args
from shepherd.config import CacheAwareConfig, CircuitBreakerConfig, ConfigError, GatewayConfig
from shepherd.routing.context import GENERATE, RequestContext
from shepherd.routing.policies import create_policy
from shepherd.routing.policies.cache_aware import HOLDERS_PROBED, SAMPLES, CacheAwarePolicy
from shepherd.routing.prefix_index import PAIR_BYTES
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker

NO_SPILL = CacheAwareConfig(spill_ratio=0)


def make_workers(count, model="m", labels=None):
    return tuple(
        Worker(f"http://w{i}", CircuitBreaker(CircuitBreakerConfig()), model_id=model, labels=labels)
        for i in range(count)
    )


def words(seed, chars):
    rng = random.Random(seed)
    out = []
    total = 0
    while total < chars:
        word = rng.choice(("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "tau"))
        out.append(word)
        total += len(word) + 1
    return " ".join(out)[:chars]


def ctx(text, model="m"):
    return RequestContext(GENERATE, orjson.dumps({"text": text, "model": model}), "req")


def policy(config=None, seed=0):
    return CacheAwarePolicy(config or CacheAwareConfig(), random.Random(seed))


def test_create_policy_builds_cache_aware_and_it_is_the_default():
    config = GatewayConfig()
    assert config.policy == "cache_aware"
    assert isinstance(create_policy("cache_aware", config), CacheAwarePolicy)


def test_requests_sharing_a_prefix_stick_to_one_worker():
    p = policy(NO_SPILL)
    fleet = make_workers(8)
    systems = [words(100 + g, 2000) for g in range(12)]
    order = [(g, q) for g in range(12) for q in range(15)]
    random.Random(1).shuffle(order)
    placed = collections.defaultdict(set)
    for g, q in order:
        placed[g].add(p.pick(fleet, ctx(systems[g] + " " + words(1000 * g + q, 300))))
    assert all(len(workers) == 1 for workers in placed.values())
    assert len(set().union(*placed.values())) == 8  # first requests of new prefixes went to the least loaded


def test_default_config_keeps_affinity_and_balances_prefix_groups():
    p = policy()
    fleet = make_workers(8)
    systems = [words(100 + g, 2000) for g in range(32)]
    order = [(g, q) for g in range(32) for q in range(20)]
    random.Random(2).shuffle(order)
    per_group = collections.defaultdict(collections.Counter)
    per_worker = collections.Counter()
    for g, q in order:
        worker = p.pick(fleet, ctx(systems[g] + " " + words(1000 * g + q, 300)))
        per_group[g][worker] += 1
        per_worker[worker] += 1
    on_primary = sum(counts.most_common(1)[0][1] for counts in per_group.values())
    assert on_primary / len(order) >= 0.9
    assert max(per_worker.values()) / (len(order) / 8) <= 1.3


def test_random_arrival_order_alone_rarely_copies_prefixes():
    # One prefix group per worker, shuffled, no load: traffic shares wander only by chance, no reason for replicas.
    replicas = []
    for seed in range(10):
        p = policy(seed=seed)
        fleet = make_workers(8)
        systems = [words(100 + g, 2000) for g in range(8)]
        order = [(g, q) for g in range(8) for q in range(40)]
        random.Random(seed).shuffle(order)
        placed = collections.defaultdict(set)
        for g, q in order:
            placed[g].add(p.pick(fleet, ctx(systems[g] + " " + words(1000 * g + q, 300))))
        assert len(set().union(*placed.values())) == 8
        replicas.append(sum(len(workers) - 1 for workers in placed.values()))
    # A share test without a noise allowance copies 54 groups here; one counting chance out of 80 groups copies 3.
    assert replicas.count(0) >= 8 and sum(replicas) <= 5


def test_two_workers_keep_their_prefix_groups():
    p = policy()
    fleet = make_workers(2)
    systems = [words(100 + g, 2000) for g in range(2)]
    order = [(g, q) for g in range(2) for q in range(100)]
    random.Random(3).shuffle(order)
    placed = collections.defaultdict(collections.Counter)
    for g, q in order:
        placed[g][p.pick(fleet, ctx(systems[g] + " " + words(1000 * g + q, 300)))] += 1
    assert [len(counts) for counts in placed.values()] == [1, 1]


def test_a_hit_moves_only_when_the_queue_ahead_costs_more_than_the_cached_prefix_saves():
    p = policy()
    a, b = make_workers(2)
    system = words(40, 2000)
    history = system + " " + words(41, 2000)
    assert p.pick((a, b), ctx(history)) is a
    a.load, b.load = 1, 0  # one request difference is within the margin: affinity wins
    assert p.pick((a, b), ctx(system + " " + words(42, 2000))) is a
    a.load, b.load = 3, 0
    # The next turn of the long history: almost all of it is cached on a, worth more than a short queue.
    assert p.pick((a, b), ctx(history + " " + words(43, 200))) is a
    # A new conversation sharing only the system prompt: half of it is cached on a, three requests queue there.
    assert p.pick((a, b), ctx(system + " " + words(44, 2000))) is b


def test_misses_go_to_the_worker_with_less_traffic_once_every_cache_is_full():
    p = policy(dataclasses.replace(CacheAwareConfig(), worker_kv_tokens=1000))  # 4,000 characters each
    a, b = make_workers(2)
    for i in range(10):  # a serves many prompts and keeps evicting
        assert p.pick((a,), ctx(words(50 + i, 1990))) is a
    assert p.pick((b,), ctx(words(70, 4000))) is b  # b holds one prompt that all but fills it
    entry_a, entry_b = p.index_for("m").view((a, b)).entries
    assert 0.95 < entry_a.fill < entry_b.fill
    # Both caches are full: fill hardly tells them apart, traffic does. b's cache churns far less.
    assert p.pick((a, b), ctx(words(80, 3000))) is b


def test_match_ratio_must_exceed_the_threshold():
    p = policy(dataclasses.replace(NO_SPILL, cache_threshold=0.5))
    a, b = make_workers(2)
    shared = words(1, 1024)
    assert p.pick((a, b), ctx(shared + words(2, 64))) is a
    a.load = 1  # b is now the least loaded; only a holds `shared`
    assert p.pick((a, b), ctx(shared + " " + words(4, 600))) is a  # 1024 of 1625 chars match: a hit
    assert p.pick((a, b), ctx(shared + " " + words(3, 1400))) is b  # 1024 of 2425: a miss


def test_load_check_is_about_the_chosen_worker_not_the_fleet():
    p = policy(dataclasses.replace(NO_SPILL, balance_abs_threshold=4, balance_rel_threshold=1.5))
    a, b, c = make_workers(3)
    prompt = words(7, 3000)
    assert p.pick((a, b, c), ctx(prompt)) is a
    c.load = 100  # the fleet is imbalanced, but not because of a
    a.load = 1
    assert p.pick((a, b, c), ctx(prompt)) is a
    a.load = 4  # 4 - 0 is not above the absolute threshold
    assert p.pick((a, b, c), ctx(prompt)) is a
    a.load = 5  # 5 - 0 > 4 and 5 > 1.5 * 0: route by load
    assert p.pick((a, b, c), ctx(prompt)) is b


def test_no_death_spiral_misses_and_hits_avoid_an_overloaded_worker():
    p = policy()
    fleet = make_workers(4, labels={"max_running_requests": "32"})  # as reported in /server_info
    hot = fleet[0]
    prompt = words(9, 3000)
    assert p.pick(fleet, ctx(prompt)) is hot
    hot.load = 50
    for i in range(200):
        worker = p.pick(fleet, ctx(words(10_000 + i, 800)))  # misses
        assert worker is not hot
        worker.load += 1
        if i % 4 == 3:
            for w in fleet[1:]:
                w.load = max(0, w.load - 1)
    # Its own prefix spills rather than wait for one of the 32 batch slots.
    assert p.pick(fleet, ctx(prompt + " again")) is not hot


def test_misses_go_to_the_emptiest_of_the_least_loaded_workers():
    p = policy()
    a, b, c = make_workers(3)
    for i in range(5):
        assert p.pick((a,), ctx(words(20 + i, 2000))) is a  # a holds a lot
    a.load, b.load, c.load = 0, 2, 3
    assert p.pick((a, b, c), ctx(words(30, 2000))) is b  # within the margin of the least load, and emptier
    a.load, b.load, c.load = 0, 3, 3
    assert p.pick((a, b, c), ctx(words(31, 2000))) is a  # the others are too busy


def test_holder_with_a_full_batch_spills_to_a_spare_worker_which_then_shares_the_prefix():
    p = policy()
    a, b, c = make_workers(3, labels={"max_running_requests": "8"})
    prompt = words(11, 4000)
    assert p.pick((a, b, c), ctx(prompt + " q0")) is a
    a.load, b.load, c.load = 7, 2, 1
    assert p.pick((a, b, c), ctx(prompt + " q1")) is a  # a busy batch is no reason to lose the cache
    a.load, b.load, c.load = 8, 5, 1
    assert p.pick((a, b, c), ctx(prompt + " q2")) is c  # a is full: a hit there would wait for a slot
    a.load, b.load, c.load = 3, 0, 2
    # a and c both hold the prefix, neither is full: the less loaded holder wins over the idle non-holder b.
    assert p.pick((a, b, c), ctx(prompt + " q3")) is c


def test_shared_system_prompt_does_not_pull_every_new_conversation_onto_one_worker():
    p = policy()
    fleet = make_workers(8)
    system = words(12, 3000)
    first_turn = {s: system + " " + words(100 + s, 400) for s in range(64)}
    home = {s: p.pick(fleet, ctx(first_turn[s])) for s in range(64)}  # idle fleet: in-flight counts say nothing
    spread = collections.Counter(home.values())
    assert len(spread) == 8 and max(spread.values()) <= 8 * 1.5
    second_turn = {s: first_turn[s] + " " + words(200 + s, 800) for s in range(64)}
    stayed = sum(p.pick(fleet, ctx(second_turn[s])) is home[s] for s in range(64))
    assert stayed >= 0.9 * 64


def test_index_stays_within_its_byte_budget_under_a_burst():
    budget = 200_000
    p = policy(CacheAwareConfig(max_tree_size=budget))
    fleet = make_workers(4)
    index = p.index_for("m")
    for i in range(3000):
        p.pick(fleet, ctx(words(i, 1500)))
        assert index.estimated_bytes <= budget
    assert index.estimated_bytes > budget // 2


def test_worker_capacity_estimate_forgets_prefixes_a_bounded_cache_has_evicted():
    p = policy(dataclasses.replace(NO_SPILL, worker_kv_tokens=2000))  # 8000 characters per worker
    a, b = make_workers(2)
    old = words(13, 3000)
    assert p.pick((a, b), ctx(old)) is a
    b.load = 3
    for i in range(3):  # newer prefixes push `old` out of a's estimated cache
        assert p.pick((a, b), ctx(words(14 + i, 3000))) is a
    b.load = 0
    a.load = 1
    assert p.pick((a, b), ctx(old)) is b  # not a hit any more: a miss goes to the idle, empty worker


def test_chars_per_token_comes_from_the_command_line_and_must_be_positive():
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["launch", "--worker-urls", "http://w0", *argv]))

    assert parse().cache_aware.chars_per_token == 4.0
    config = parse("--cache-chars-per-token", "3.5")
    assert config.cache_aware.chars_per_token == 3.5
    config.validate()
    with pytest.raises(ConfigError):
        parse("--cache-chars-per-token", "0").validate()


def test_worker_reported_kv_capacity_is_used_when_not_configured():
    p = policy(NO_SPILL)
    a, b = make_workers(2)
    a.labels["max_total_num_tokens"] = "2000"  # as discovered from its /server_info
    entry_a, entry_b = p.index_for("m").view((a, b)).entries
    assert entry_a.char_capacity == 8000
    assert entry_b.char_capacity > 2**60  # unknown: only the memory budget applies
    assert entry_a.key_capacity == entry_b.key_capacity == CacheAwareConfig().max_tree_size // 2 // PAIR_BYTES
    configured = policy(dataclasses.replace(NO_SPILL, worker_kv_tokens=1000))
    assert configured.index_for("m").view((a, b)).entries[0].char_capacity == 4000
    denser = policy(dataclasses.replace(NO_SPILL, chars_per_token=3.0))  # e.g. code, or the simulator's text
    assert denser.index_for("m").view((a, b)).entries[0].char_capacity == 6000


def test_removed_worker_leaves_the_index():
    p = policy()
    fleet = make_workers(3)
    for i in range(30):
        p.pick(fleet, ctx(words(i % 6, 2000) + str(i)))
    gone = fleet[0]
    index = p.index_for("m")
    gone_entry = index.entries[gone]
    assert gone_entry.lru
    p.on_worker_removed(gone)
    while p.maintain(16):
        pass
    assert gone not in index.entries and not gone_entry.lru
    assert all(gone_entry not in owners for owners in index.holders.values())
    rest = fleet[1:]
    assert all(p.pick(rest, ctx(words(i % 6, 2000) + str(i))) in rest for i in range(30))


def test_state_is_kept_per_model():
    p = policy()
    m1 = make_workers(2, "m1")
    m2 = make_workers(2, "m2")
    prompt = words(15, 2000)
    assert p.pick(m1, ctx(prompt, "m1")) is m1[0]
    assert p.pick(m2, ctx(prompt, "m2")) is m2[0]
    index_m1, index_m2 = p.index_for("m1"), p.index_for("m2")
    assert set(index_m1.entries) == set(m1) and set(index_m2.entries) == set(m2)
    assert index_m1.chars == index_m1.entries[m1[0]].chars == len(prompt)
    assert index_m2.chars == index_m2.entries[m2[0]].chars == len(prompt)


def test_cost_per_decision_does_not_grow_with_the_fleet():
    prompts = [words(g, 6000) + " " + words(1000 + i, 2000) for i, g in enumerate([i % 32 for i in range(400)])]
    per_decision = {}
    for size in (100, 1000, 5000):
        p = policy(seed=1)
        fleet = make_workers(size)
        inflight = collections.deque()
        for prompt in prompts:
            worker = p.pick(fleet, ctx(prompt))
            worker.load += 1
            inflight.append(worker)
            if len(inflight) > 2 * size:
                inflight.popleft().load -= 1
        index = p.index_for("m")
        keys = len(index.layout.cuts(8001))
        assert index.views_built == 1  # the fleet is resolved once per snapshot, not per request
        assert p.examined <= len(prompts) * (SAMPLES + HOLDERS_PROBED)
        assert index.lookups <= len(prompts) * (keys + 1 + 4 * HOLDERS_PROBED)
        per_decision[size] = (p.examined + index.lookups) / len(prompts)
    assert per_decision[5000] <= per_decision[1000] * 1.1
    assert per_decision[1000] <= per_decision[100] * 1.1


async def test_background_eviction_purges_a_removed_worker_without_traffic():
    p = policy(CacheAwareConfig(eviction_interval_secs=0.01))
    fleet = make_workers(2)
    for i in range(20):
        p.pick(fleet, ctx(words(i, 3000)))
    index = p.index_for("m")
    p.on_worker_removed(fleet[0])
    assert index.pending
    deadline = time.monotonic() + 5
    while index.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert not index.pending
    assert index.chars == index.entries[fleet[1]].chars
