"""A consistent-hash ring of workers keyed by their URLs, updated one worker at a time.

Every worker owns `POINTS_PER_WORKER` points derived from its URL alone, so every gateway process places it alike;
a 64-bit point belongs to the owner of the first ring point at or after it, wrapping around. With 100 points per
worker, homes spread within about 10% of even.

The points are kept sorted in buckets of at most `2 * _BUCKET` (a sorted list cut into pieces), so adding or removing
a worker inserts or deletes its 100 points in O(log n + bucket) each. Re-sorting the whole ring instead cost about
0.5 s of event-loop time at 4,000 workers (400,000 points), on every change of the candidates.

A ring can hold more workers than a lookup may choose: `owner(point, members)` walks on past the points of workers
outside `members`, which gives exactly the owner a ring of the members alone would.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from array import array
from collections.abc import Container, Iterable
from typing import Generic, TypeVar

POINTS_PER_WORKER = 100
_BUCKET = 512  # a bucket splits in two beyond twice this many points
_UNPACK = struct.Struct(f"<{POINTS_PER_WORKER}Q").unpack

T = TypeVar("T")


def ring_points(url: str) -> tuple[int, ...]:
    """The worker's points: 64-bit integers from a stable hash of its URL (the same in every process)."""
    return _UNPACK(hashlib.shake_128(url.encode("utf-8", "surrogatepass")).digest(8 * POINTS_PER_WORKER))


class HashRing(Generic[T]):
    """Owners of points on a ring. Two URLs may share a point (2^-64 odds per pair): the owner added first comes first.

    A removed owner whose point could not be found (a shared point across a bucket boundary) is harmless: lookups
    only return members."""

    __slots__ = ("_maxes", "_owners", "_points", "_size")

    def __init__(self) -> None:
        self._points: list[array[int]] = []  # sorted points, cut into sorted runs (8 bytes a point)
        self._owners: list[list[T]] = []  # the owner of each point, bucket by bucket
        self._maxes: list[int] = []  # the last point of each bucket
        self._size = 0

    def __len__(self) -> int:
        """Points on the ring."""
        return self._size

    def add(self, owner: T, url: str) -> None:
        for point in ring_points(url):
            self._insert(point, owner)

    def add_many(self, items: Iterable[tuple[T, str]]) -> None:
        """Add several owners; when they are many next to the ring, sort it whole once instead."""
        items = list(items)
        if len(items) * POINTS_PER_WORKER * 4 < len(self):
            for owner, url in items:
                self.add(owner, url)
            return
        points = [point for bucket in self._points for point in bucket]
        owners = [owner for bucket in self._owners for owner in bucket]
        for owner, url in items:
            points += ring_points(url)
            owners += [owner] * POINTS_PER_WORKER
        order = sorted(range(len(points)), key=points.__getitem__)  # stable: equal points keep their order
        points = [points[i] for i in order]
        owners = [owners[i] for i in order]
        self._points = [array("Q", points[i : i + _BUCKET]) for i in range(0, len(points), _BUCKET)]
        self._owners = [owners[i : i + _BUCKET] for i in range(0, len(owners), _BUCKET)]
        self._maxes = [bucket[-1] for bucket in self._points]
        self._size = len(points)

    def remove(self, owner: T, url: str) -> None:
        for point in ring_points(url):
            self._delete(point, owner)

    def owner(self, point: int, members: Container[T]) -> T | None:
        """The owner of `point` among `members`: the first member's point at or after it, wrapping around."""
        buckets = self._points
        if not buckets:
            return None
        count = len(buckets)
        first = bisect.bisect_left(self._maxes, point)
        start = 0
        if first == count:
            first = 0
        else:
            start = bisect.bisect_left(buckets[first], point)
        for step in range(count + 1):  # the last step comes back to the first bucket's beginning
            at = (first + step) % count
            owners = self._owners[at]
            low, high = (start, len(owners)) if step == 0 else (0, start if step == count else len(owners))
            for i in range(low, high):
                if owners[i] in members:
                    return owners[i]
        return None

    def _insert(self, point: int, owner: T) -> None:
        self._size += 1
        buckets, maxes = self._points, self._maxes
        if not buckets:
            buckets.append(array("Q", (point,)))
            self._owners.append([owner])
            maxes.append(point)
            return
        b = bisect.bisect_left(maxes, point)
        if b == len(buckets):
            b -= 1
        bucket, owners = buckets[b], self._owners[b]
        i = bisect.bisect_right(bucket, point)
        bucket.insert(i, point)
        owners.insert(i, owner)
        maxes[b] = bucket[-1]
        if len(bucket) > 2 * _BUCKET:
            buckets.insert(b + 1, bucket[_BUCKET:])
            self._owners.insert(b + 1, owners[_BUCKET:])
            del bucket[_BUCKET:], owners[_BUCKET:]
            maxes.insert(b, bucket[-1])

    def _delete(self, point: int, owner: T) -> None:
        buckets, maxes = self._points, self._maxes
        b = bisect.bisect_left(maxes, point)
        if b == len(buckets):
            return
        bucket, owners = buckets[b], self._owners[b]
        i = bisect.bisect_left(bucket, point)
        while i < len(bucket) and bucket[i] == point and owners[i] is not owner:
            i += 1  # a point shared with other owners
        if i == len(bucket) or bucket[i] != point:
            return
        self._size -= 1
        del bucket[i], owners[i]
        if bucket:
            maxes[b] = bucket[-1]
        else:
            del buckets[b], self._owners[b], maxes[b]
