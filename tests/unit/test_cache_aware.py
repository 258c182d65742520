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
from shepherd.workers.load_monitor import RankLoad
from shepherd.workers.worker import Worker


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


NO_SHARE_CAP = CacheAwareConfig(max_share=0)


def policy(config=None, seed=0):
    return CacheAwarePolicy(config or CacheAwareConfig(), random.Random(seed))


def test_create_policy_builds_cache_aware_and_it_is_the_default():
    config = GatewayConfig()
    assert config.policy == "cache_aware"
    assert isinstance(create_policy("cache_aware", config), CacheAwarePolicy)


def test_requests_sharing_a_prefix_stick_to_one_worker_and_new_prefixes_spread_by_home():
    p = policy()
    fleet = make_workers(8)
    systems = [words(100 + g, 2000) for g in range(12)]
    order = [(g, q) for g in range(12) for q in range(15)]
    random.Random(1).shuffle(order)
    placed = collections.defaultdict(set)
    for g, q in order:
        placed[g].add(p.pick(fleet, ctx(systems[g] + " " + words(1000 * g + q, 300))))
    assert all(len(workers) == 1 for workers in placed.values())
    assert len(set().union(*placed.values())) >= 5  # homes are hashed: 12 groups over 8 workers


def seed(p, worker, text):
    """Make `worker` the only holder of `text` (a pick among itself alone)."""
    assert p.pick((worker,), ctx(text)) is worker


def served(p, fleet, text):
    """A request picked and answered (its prefill no longer pending): the worker it went to."""
    c = ctx(text)
    worker = p.pick(fleet, c)
    p.on_request_done(worker, c, True)
    return worker


def test_a_hot_prefix_spills_only_when_queueing_outweighs_recompute():
    # One request in flight is worth 128 tokens (512 characters) of prefill; the prompt is 4,000 cached characters
    # and a 200-character question: moving costs 4,000 more characters of prefill, i.e. about 8 requests of queue.
    # (The share cap is off: with every request on `a`, it would move the prefix as soon as `a` is busy.)
    p = policy(NO_SHARE_CAP)
    a, b = make_workers(2)
    system = words(40, 4000)
    seed(p, a, system)
    for load, expected in ((0, a), (1, a), (4, a), (7, a), (8, b), (12, b)):
        a.load, b.load = load, 0
        assert served(p, (a, b), system + " " + words(41 + load, 200)) is expected, load
    # A longer cached prefix is worth a longer queue.
    p = policy(NO_SHARE_CAP)
    history = system + " " + words(50, 4000)
    seed(p, a, history)
    a.load, b.load = 12, 0
    assert served(p, (a, b), history + " " + words(51, 200)) is a
    # --cache-queue-tokens sets the exchange rate.
    cheap_queue = policy(dataclasses.replace(NO_SHARE_CAP, queue_tokens=64))
    seed(cheap_queue, a, system)
    a.load, b.load = 12, 0
    assert served(cheap_queue, (a, b), system + " " + words(52, 200)) is a


def test_a_worker_still_prefilling_is_charged_its_pending_prefill_until_the_first_token():
    # `a` holds a 4,000-character prefix. A 40,000-character prompt it does not hold is sent to it; until that
    # request's first token, a quarter of its prefill (10,000 characters) counts against `a`: more than recomputing
    # the prefix on `b` (4,200), so a request for the prefix goes to `b`. Once `a` answers, it is back at `a`.
    p = policy(NO_SHARE_CAP)
    a, b = make_workers(2)
    system = words(40, 4000)
    seed(p, a, system)
    long_prompt = ctx(words(41, 40_000))
    b.load = 20  # `a` is the least loaded: the long prompt goes there
    assert p.pick((a, b), long_prompt) is a
    assert a.prefill_pending == 40_000 and b.prefill_pending == 0
    b.load = 0
    assert served(p, (a, b), system + " " + words(42, 200)) is b
    p.on_first_token(a, long_prompt)
    assert a.prefill_pending == 0
    assert served(p, (a, b), system + " " + words(43, 200)) is a
    p.on_request_done(a, long_prompt, True)  # released once only
    assert a.prefill_pending == 0 and b.prefill_pending == 0


def test_pending_prefill_is_released_per_worker_whatever_ends_the_attempt():
    # One context picked by two policies (a PD pair's prefill and decode sides) and retried: each worker's charge is
    # released by its own attempt's end, and a second pick on a worker whose end nobody reported replaces the first.
    prefill_policy, decode_policy = policy(), policy()
    prefills, decodes = make_workers(2), make_workers(2)
    c = ctx(words(44, 3000))
    p_worker = prefill_policy.pick(prefills, c)
    d_worker = decode_policy.pick(decodes, c)
    assert p_worker.prefill_pending == d_worker.prefill_pending == 3000
    decode_policy.on_request_done(d_worker, c, False)
    assert d_worker.prefill_pending == 0 and p_worker.prefill_pending == 3000
    # A retry on the same worker, the first attempt unreported: its charge is replaced by the retry's, which is 0
    # because the index now places the whole prompt there.
    assert prefill_policy.pick(prefills, c) is p_worker
    assert p_worker.prefill_pending == 0
    prefill_policy.on_request_done(p_worker, c, True)
    assert all(w.prefill_pending == 0 for w in prefills + decodes)


def test_a_busy_worker_above_the_share_cap_spills_its_hot_prefix():
    # Queueing alone would keep the hot prefix on `a` (one request ahead costs less than recomputing 4,000
    # characters); the cap moves it once `a` has served more than 1.3 times the mean share and is busier than average.
    fleet = make_workers(4)
    a = fleet[0]
    hot = words(60, 4000)
    for capped, expected_spill in ((CacheAwareConfig(), True), (NO_SHARE_CAP, False)):
        p = policy(capped)
        seed(p, a, hot)
        for i in range(8):  # idle: the cap does not apply, the prefix stays put
            assert p.pick(fleet, ctx(hot + " " + words(61 + i, 200))) is a
        a.load = 1
        spilled = p.pick(fleet, ctx(hot + " " + words(70, 200))) is not a
        a.load = 0
        assert spilled is expected_spill


def test_a_busy_worker_within_its_share_keeps_its_prefix():
    fleet = make_workers(4)
    a = fleet[0]
    p = policy()
    hot = words(62, 4000)
    seed(p, a, hot)
    for i in range(64):  # even traffic: the workers' shares stay near the mean
        p.pick((fleet[i % 4],), ctx(words(5_000 + i, 300)))
    a.load = 1
    assert p.pick(fleet, ctx(hot + " " + words(63, 200))) is a


def test_a_miss_never_lands_on_an_overloaded_worker():
    p = policy()
    fleet = make_workers(4, labels={"max_running_requests": "32"})  # as reported in /server_info
    hot = fleet[0]
    prompt = words(9, 3000)
    seed(p, hot, prompt)
    hot.load = 50
    for i in range(200):
        worker = served(p, fleet, words(10_000 + i, 800))  # misses, some of them homed on `hot`
        assert worker is not hot
        worker.load += 1
        if i % 4 == 3:
            for w in fleet[1:]:
                w.load = max(0, w.load - 1)
    # Its own prefix spills rather than wait for one of the 32 batch slots.
    assert p.pick(fleet, ctx(prompt + " again")) is not hot
    # Without a batch limit the cost model alone keeps misses off a queue: 5 requests are worth 2,560 characters.
    plain = policy()
    fleet = make_workers(4)
    fleet[0].load = 5
    for i in range(100):
        assert served(plain, fleet, words(20_000 + i, 800)) is not fleet[0]


def test_a_returning_conversation_finds_its_worker():
    p = policy()
    fleet = make_workers(8)
    system = words(12, 3000)
    turns = {s: system + " " + words(100 + s, 1200) for s in range(64)}
    inflight = collections.deque()
    placed = {}
    for s in range(64):  # a burst of new conversations under load: they spread
        worker = placed[s] = p.pick(fleet, ctx(turns[s]))
        worker.load += 1
        inflight.append(worker)
        if len(inflight) > 16:
            inflight.popleft().load -= 1
    assert len(set(placed.values())) >= 4
    returned = 0
    for s in range(64):  # the next turns, under the same load
        turns[s] += " " + words(200 + s, 300)
        worker = p.pick(fleet, ctx(turns[s]))
        returned += worker is placed[s]
        worker.load += 1
        inflight.append(worker)
        if len(inflight) > 16:
            inflight.popleft().load -= 1
    assert returned >= 0.9 * 64


def test_two_replicas_send_a_new_prefix_to_the_same_worker():
    # Two gateway processes: separate policies and Worker objects, the same worker URLs, different traffic.
    first, second = policy(seed=1), policy(seed=2)
    fleet_1, fleet_2 = make_workers(8), make_workers(8)
    for i in range(40):  # each replica has seen different prompts before
        served(first, fleet_1, words(5000 + i, 1500))
        served(second, fleet_2, words(6000 + i, 1500))
    agreed = 0
    for g in range(32):
        prefix = words(300 + g, 2500)
        one = served(first, fleet_1, prefix + " " + words(400 + g, 200))
        two = served(second, fleet_2, prefix + " " + words(500 + g, 200))
        agreed += one.url == two.url
    assert agreed == 32
    # A conversation behind a system prompt every worker holds: turn 1 on one replica, turn 2 on the other.
    system = words(13, 3000)
    for replica, fleet in ((first, fleet_1), (second, fleet_2)):
        for worker in fleet:
            seed(replica, worker, system + " " + words(700, 100))
    for c in range(16):
        turn_1 = system + " " + words(800 + c, 1200)
        one = served(first, fleet_1, turn_1)
        two = served(second, fleet_2, turn_1 + " " + words(900 + c, 300))
        assert one.url == two.url


def test_a_replica_that_sees_others_cache_sends_an_unknown_prompt_home_despite_its_queue():
    fleet = make_workers(4)
    prompt = words(30, 3000) + " " + words(31, 200)
    home = policy().pick(fleet, ctx(prompt))  # all idle: a new prompt goes to its home
    others = [w for w in fleet if w is not home]
    home.load = 3  # three requests ahead: more than the one queued request a home is presumed to be worth
    assert policy().pick(fleet, ctx(prompt)) is not home
    # Answers report whole prompts cached that this gateway never sent anywhere: another replica did.
    p = policy()
    for i in range(16):
        request = ctx(words(2000 + i, 2000))
        worker = p.pick(others, request)
        p.on_request_done(worker, request, True, cached_tokens=500)
    assert p.index_for("m").foreign > 0.02
    assert p.pick(fleet, ctx(prompt)) is home
    home.load = 100  # the hard limits still apply
    assert p.pick(fleet, ctx(prompt)) is not home


def test_requests_without_a_model_use_the_index_of_the_model_they_are_routed_to():
    p = policy()
    a, b = make_workers(2)
    prompt = words(16, 2000)
    seed(p, a, prompt)
    request = RequestContext(GENERATE, orjson.dumps({"text": prompt + " more"}), "req")
    assert request.model is None
    b.load = 0
    a.load = 1
    assert p.pick((a, b), request) is a
    assert set(p.index_for("m").entries) == {a, b} and None not in p._indexes


def test_load_check_is_about_the_chosen_worker_not_the_fleet():
    p = policy(dataclasses.replace(CacheAwareConfig(), balance_abs_threshold=4, balance_rel_threshold=1.5))
    a, b, c = make_workers(3)
    prompt = words(7, 40_000)  # so long that only SMG's rule moves it
    seed(p, a, prompt)
    c.load = 3  # c is busier than a would be, yet SMG's rule compares a with the least loaded, b
    a.load = 4  # 4 - 0 is not above the absolute threshold
    assert p.pick((a, b, c), ctx(prompt)) is a
    a.load = 5  # 5 - 0 > 4 and 5 > 1.5 * 0: SMG's rule excludes a
    assert p.pick((a, b, c), ctx(prompt)) is b


def test_holder_with_a_full_batch_spills_and_the_new_copy_is_then_preferred_when_less_loaded():
    p = policy()
    a, b, c = make_workers(3, labels={"max_running_requests": "8"})
    prompt = words(11, 16_000)
    seed(p, a, prompt + " q0")
    a.load, b.load, c.load = 7, 2, 1
    assert served(p, (a, b, c), prompt + " q1") is a  # a busy batch is no reason to lose 16,000 cached characters
    a.load, b.load, c.load = 8, 5, 1
    assert served(p, (a, b, c), prompt + " q2") is c  # a is full: a hit there would wait for a slot
    a.load, b.load, c.load = 3, 0, 2
    # a and c both hold the prefix, neither is full: the less loaded holder wins over the idle non-holder b.
    assert served(p, (a, b, c), prompt + " q3") is c


def test_queue_and_home_flags_come_from_the_command_line():
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["launch", "--worker-urls", "http://w0", *argv]))

    config = parse("--cache-queue-tokens", "64", "--cache-home-requests", "2")
    assert (config.cache_aware.queue_tokens, config.cache_aware.home_requests) == (64, 2)
    assert parse("--cache-pending-prefill-weight", "0.5").cache_aware.pending_prefill_weight == 0.5
    with pytest.raises(ConfigError):
        parse("--cache-pending-prefill-weight", "-1").validate()
    config.validate()
    with pytest.raises(ConfigError):
        parse("--cache-home-requests", "-1").validate()
    with pytest.raises(ConfigError):
        parse("--cache-queue-tokens", "-1").validate()
    assert parse("--cache-max-share", "1.5").cache_aware.max_share == 1.5
    with pytest.raises(ConfigError):
        parse("--cache-max-share", "0.5").validate()


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
    p = policy(dataclasses.replace(CacheAwareConfig(), worker_kv_tokens=2000))  # 8000 characters per worker
    a, b = make_workers(2)
    old = words(13, 3000)
    seed(p, a, old)
    keys, ends = p.index_for("m").layout.keys(old)
    assert p.index_for("m").entries[a].matched(keys, ends, len(keys)) == 3000
    for i in range(3):  # newer prefixes push `old` out of a's estimated cache
        seed(p, a, words(14 + i, 3000))
    assert p.index_for("m").entries[a].matched(keys, ends, len(keys)) == 0
    a.load = 1
    assert p.pick((a, b), ctx(old)) is b  # not a hit any more: a miss goes to the idle worker


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
    p = policy(CacheAwareConfig())
    a, b = make_workers(2)
    a.labels["max_total_num_tokens"] = "2000"  # as discovered from its /server_info
    entry_a, entry_b = p.index_for("m").view((a, b)).entries
    assert entry_a.char_capacity == 8000
    assert entry_b.char_capacity > 2**60  # unknown: only the memory budget applies
    assert entry_a.key_capacity == entry_b.key_capacity == CacheAwareConfig().max_tree_size // 2 // PAIR_BYTES
    configured = policy(dataclasses.replace(CacheAwareConfig(), worker_kv_tokens=1000))
    assert configured.index_for("m").view((a, b)).entries[0].char_capacity == 4000
    denser = policy(dataclasses.replace(CacheAwareConfig(), chars_per_token=3.0))  # e.g. code, or the simulator's text
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
    p.pick(m1, ctx(prompt, "m1"))
    p.pick(m2, ctx(prompt, "m2"))
    index_m1, index_m2 = p.index_for("m1"), p.index_for("m2")
    assert set(index_m1.entries) == set(m1) and set(index_m2.entries) == set(m2)
    assert index_m1.chars == len(prompt) == index_m2.chars


def test_cost_per_decision_does_not_grow_with_the_fleet():
    prompts = [words(g, 6000) + " " + words(1000 + i, 2000) for i, g in enumerate([i % 32 for i in range(400)])]
    per_decision = {}
    for size in (100, 1000, 5000):
        # Without the share cap, placement is the same at every size (the cap spreads 400 requests more thinly over
        # a larger fleet: more holders to compare, which is placement, not cost per worker).
        p = policy(NO_SHARE_CAP, seed=1)
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
        assert p.examined <= len(prompts) * (SAMPLES + 2 + HOLDERS_PROBED)
        assert index.lookups <= len(prompts) * (2 * keys + 2 + 4 * HOLDERS_PROBED)
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


def test_reported_cached_tokens_calibrate_the_modelled_capacity_within_bounds():
    """A worker that reports far less cached than the index expected forgets sooner than modelled: its capacity
    shrinks (never below a quarter of the configured one); reports of more than expected let it grow back, never
    above the configured capacity."""
    p = policy(CacheAwareConfig(worker_kv_tokens=4096))
    fleet = make_workers(2)
    system = words(7, 3000)
    for q in range(4):  # the index now expects the system prompt at the worker it sticks to
        chosen = p.pick(fleet, c := ctx(system + " " + words(q, 200)))
    prediction = c.predictions[chosen]
    entry, expected = prediction.entry, prediction.expected
    assert entry.worker is chosen and expected >= 2900
    base = entry.char_capacity

    def report(cached_tokens: int | None) -> None:
        c.predictions[chosen] = prediction  # each report answers one attempt: the same one, again
        p.on_request_done(chosen, c, True, cached_tokens)

    report(10)  # the worker had lost it
    assert entry.char_capacity == int(base * 0.98)
    for _ in range(200):
        report(0)
    assert entry.char_capacity == base // 4
    report(expected // 4)  # as expected (4 characters a token)
    report(None)  # nothing reported
    assert entry.char_capacity == base // 4
    for _ in range(200):
        report(100_000)
    assert entry.char_capacity == base


def test_engines_busier_than_this_gateway_shrink_the_modelled_caches_to_its_share():
    # Engines that report twice the requests this gateway has in flight on them are filled as fast by someone else
    # (another replica): each worker's cache is modelled at about half its size, so the index forgets a prefix about
    # when the engine does; newly seen workers too. When the others go away, the full size comes back.
    p = policy(CacheAwareConfig(worker_kv_tokens=4096))
    fleet = make_workers(4)
    served(p, fleet, words(70, 3000))
    entries = p.index_for("m").entries
    full = fleet_capacity = sum(e.char_capacity for e in entries.values())

    def poll(own: int, engine: int, times: int = 1) -> float:
        for _ in range(times):
            for worker in fleet:
                worker.load, worker.engine_ranks = own, (RankLoad(0, engine, 0),)
            p.on_engine_loads(list(fleet))
        return sum(e.char_capacity for e in entries.values()) / full

    assert poll(0, 0) == 1.0 and poll(0, 5) == 1.0  # nothing of its own in flight: nothing to compare
    assert 0.45 <= poll(2, 4, times=20) <= 0.55
    other = p.index_for("other").view(make_workers(2, model="other")).entries[0]
    assert 0.45 <= other.char_capacity / (fleet_capacity / 4) <= 0.55
    assert 0.9 <= poll(3, 3, times=20) <= 1.0


def test_explain_gives_the_pick_and_every_term_of_its_cost_and_changes_nothing():
    p = policy(dataclasses.replace(CacheAwareConfig(), balance_abs_threshold=4, balance_rel_threshold=1.5))
    fleet = make_workers(4, labels={"max_running_requests": "8"})
    system = words(31, 3000)
    holder = fleet[1]
    seed(p, holder, system)
    busy = fleet[2]
    busy.load = 8  # a full batch, and past the imbalance thresholds
    seed(p, busy, system)
    index = p.index_for("m")
    prompt = system + " " + words(32, 400)
    p.index_for("m").view(fleet)  # the fleet's entries exist (the first request to a fleet creates them)
    before = ({w: e.lru.copy() for w, e in index.entries.items()}, p.examined, [w.prefill_pending for w in fleet])

    explained = p.explain(fleet, ctx(prompt))

    after = ({w: e.lru.copy() for w, e in index.entries.items()}, p.examined, [w.prefill_pending for w in fleet])
    assert after == before  # nothing recorded, charged or counted
    assert explained["worker"] == holder.url
    assert explained["prompt_chars"] == len(prompt)
    assert explained["known_chars"] == explained["matched_chars"] > 2500  # the system prompt, to a page
    rows = {row["worker"]: row for row in explained["candidates"]}
    assert rows[busy.url]["excluded"] == "imbalance"
    costed = {url: row for url, row in rows.items() if row["excluded"] is None}
    assert holder.url in costed and explained["least_loaded"] in costed
    assert min(costed, key=lambda url: costed[url]["cost"]) == holder.url
    for row in costed.values():
        assert row["uncached_chars"] == len(prompt) - max(row["matched_chars"], 0) or row["worker"] == explained["home"]
    assert explained["terms"]["queue_chars_per_request"] == p._queue_chars
    # The pick that follows is the one explained.
    assert p.pick(fleet, ctx(prompt)) is holder


def test_stateless_policies_explain_their_candidates_load_only():
    fleet = make_workers(3)
    fleet[0].load = 2
    explained = create_policy("round_robin", GatewayConfig()).explain(fleet, ctx("hello"))
    assert explained == {
        "policy": "round_robin",
        "worker": None,
        "candidates": [{"worker": w.url, "load": w.load} for w in fleet],
    }


def test_alone_a_new_prefix_goes_where_it_stays_cached_longest_and_with_replicas_to_its_home():
    prompt = words(40, 2000)
    fleet = make_workers(4)
    home = policy().pick(fleet, ctx(prompt))  # an idle fleet: a prefix nobody holds goes to its home on the ring

    def warmed(engine_per_own: int) -> CacheAwarePolicy:
        """Every cache full of old prompts, the home's turning over fastest; then one load poll."""
        p = policy(CacheAwareConfig(worker_kv_tokens=1024))
        for i, worker in enumerate(fleet):
            seed(p, worker, words(4100 + i, 6000))
        for i in range(30):
            seed(p, home, words(4200 + i, 2000))
        for worker in fleet:
            worker.load, worker.engine_ranks = 2, (RankLoad(0, 2 * engine_per_own, 0),)
        p.on_engine_loads(list(fleet))
        for worker in fleet:
            worker.load = 0
        return p

    alone = warmed(1)  # the engines count only this gateway's requests
    entries = alone.index_for("m").entries
    slowest = min(fleet, key=lambda w: entries[w].turnover)
    assert slowest is not home and entries[home].turnover > 2 * entries[slowest].turnover
    explained = alone.explain(fleet, ctx(prompt))
    assert explained["home"] == slowest.url and explained["home_on_ring"] is False
    assert alone.pick(fleet, ctx(prompt)) is slowest
    # Engines at twice this gateway's requests: another replica routes by the same ring, so the home keeps it.
    assert warmed(2).pick(fleet, ctx(prompt)) is home
