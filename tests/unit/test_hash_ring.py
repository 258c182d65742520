"""The consistent-hash ring of worker URLs: incremental updates give the same owners as a ring built at once."""

from __future__ import annotations

import collections

from shepherd.routing.hash_ring import POINTS_PER_WORKER, HashRing, ring_points
from shepherd.routing.prefix_index import mix64

URLS = [f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(600)]
POINTS = [mix64(i) for i in range(3000)]


def owners(ring: HashRing[str], members: set[str]) -> list[str | None]:
    return [ring.owner(point, members) for point in POINTS]


def built_at_once(urls: list[str]) -> HashRing[str]:
    ring: HashRing[str] = HashRing()
    ring.add_many((url, url) for url in urls)
    return ring


def test_points_depend_on_the_url_alone():
    # Fixed values: gateway replicas (other processes, other versions) must place a worker alike to agree on homes.
    assert ring_points("http://10.0.0.0:8000")[:2] == (6930274327302417093, 15055663637144867624)
    assert len(set(ring_points(URLS[0]))) == POINTS_PER_WORKER
    assert set(ring_points(URLS[0])).isdisjoint(ring_points(URLS[1]))


def test_one_by_one_equals_at_once_in_any_order():
    at_once = built_at_once(URLS)
    one_by_one: HashRing[str] = HashRing()
    for url in reversed(URLS):  # a bucket splits many times on the way
        one_by_one.add(url, url)
    members = set(URLS)
    assert len(one_by_one) == len(at_once) == len(URLS) * POINTS_PER_WORKER
    assert owners(one_by_one, members) == owners(at_once, members)


def test_a_small_batch_joins_a_large_ring_incrementally_with_the_same_owners():
    ring = built_at_once(URLS[:500])
    ring.add_many((url, url) for url in URLS[500:510])
    assert owners(ring, set(URLS[:510])) == owners(built_at_once(URLS[:510]), set(URLS[:510]))


def test_lookups_among_members_equal_a_ring_of_the_members_alone():
    ring = built_at_once(URLS)
    members = set(URLS[::7])
    assert owners(ring, members) == owners(built_at_once(sorted(members)), members)
    assert ring.owner(POINTS[0], set()) is None
    assert HashRing().owner(POINTS[0], {"x"}) is None


def test_removing_a_worker_moves_only_its_own_points():
    ring = built_at_once(URLS)
    before = owners(ring, set(URLS))
    gone = URLS[3]
    ring.remove(gone, gone)
    after = owners(ring, set(URLS))
    assert len(ring) == (len(URLS) - 1) * POINTS_PER_WORKER
    assert gone not in after
    assert all(old == new for old, new in zip(before, after, strict=True) if old != gone)
    assert after == owners(built_at_once([u for u in URLS if u != gone]), set(URLS))
    ring.remove(gone, gone)  # twice: nothing left to remove
    assert len(ring) == (len(URLS) - 1) * POINTS_PER_WORKER


def test_removing_every_worker_empties_the_ring():
    ring = built_at_once(URLS[:20])
    for url in URLS[:20]:
        ring.remove(url, url)
    assert len(ring) == 0 and ring.owner(POINTS[0], set(URLS)) is None
    ring.add(URLS[0], URLS[0])
    assert ring.owner(POINTS[0], {URLS[0]}) == URLS[0]


def test_homes_spread_evenly():
    counts = collections.Counter(owners(built_at_once(URLS[:10]), set(URLS[:10])))
    assert len(counts) == 10 and max(counts.values()) < 1.4 * 300 and min(counts.values()) > 0.6 * 300
