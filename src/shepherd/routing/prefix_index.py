"""An approximate, bounded index of which workers were recently sent which prompt prefixes (one per model).

The index estimates each worker's prefix (KV) cache from the traffic the gateway sent it; it never talks to workers.

Keys. Every prompt is cut at the same character positions: every page (`page_chars`, 64 by default, about one
16-token KV page) up to 16 pages, then every 1/8 of the prefix so far, rounded down to whole pages. A block's key
hashes the previous block's key with the block's text, so one key stands for the whole prefix up to the block's end,
and two prompts share exactly the keys of the blocks they have in common. A prompt that does not end on a cut gets
one more key for its tail, so a repeated prompt matches completely. Growing blocks keep the number of keys
logarithmic in prompt length (8k characters: 35 keys; 100k: 57) while a measured match is at most 1/8 shorter than
the true shared prefix, which is precise enough for a ratio threshold. Hashing the blocks is a quarter of a
decision's cost, so the keys of a chat's first message (a system prompt, usually, repeated verbatim by many
requests) are remembered by its text, and the next prompt with the same head hashes only the rest.

Holders. `holders[key]` is the set of workers believed to hold the prefix ending at that key. A lookup bisects the
request's keys for the deepest one present: its cost depends on the prompt, not on the number of workers.

Capacity. Each worker's keys form an LRU, bounded two ways. Memory: the model's budget in bytes is divided evenly
among its workers, and each (key, worker) pair is charged `PAIR_BYTES`, what it costs when no other worker shares the
key (shared keys cost less), so the whole index stays within its budget however short the prompts are (the text is
never stored: a key costs the same for 1 character as for 1000). Engine cache: when `capacity_of(worker)` gives the
worker's KV cache size in characters, its indexed characters stay within it, so the index forgets what a bounded
engine cache would have evicted. A request touches its keys deepest first, so a prompt's root is more recent than its
leaves and eviction goes leaf first, like an engine's radix cache. A record that pushes its worker over capacity
evicts at once (bounded work, so bursts are trimmed as they arrive); larger backlogs (a removed worker, a fleet that
grew) are queued for `maintain(budget)`, which the policy runs in small chunks. A change of the fleet costs the index
O(1) Python work per worker that changed, never a pass over the fleet: at 4,000 workers registered one by one, a pass
per arrival added up to seconds of event-loop time.

Closure. A worker that holds a key holds every key before it: every prompt with the deeper key has the shallower
one, a record touches the shallower one later, and eviction takes the least recent first. So the keys a worker
holds are a prefix of a prompt's keys, and so are the keys somebody holds and the keys many hold: lookups bisect.

Traffic. Recording a request also adds it to the worker's exponentially decayed request count (half-life: 32
requests per worker): the policy's expected load of a worker is its share of that times the requests in flight.
The characters a record adds to the worker's LRU decay alike (`inserted`): over the worker's capacity, that is how
fast its cache turns over (`turnover`), so how long a prefix placed there now will stay.

Homes. `FleetView.home(point)` is the worker a stable 64-bit point belongs to on a consistent-hash ring of the view's
workers (keyed by their URLs, so every gateway process builds the same ring for the same fleet); the policy hashes
a prompt's anchor block to a point, which gives every prefix a home that all replicas agree on. The index keeps one
ring of all its workers, updated as workers come and go (`HashRing`); a view looks its members up on it, and a view
of a small part of the fleet builds a ring of its own once.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from shepherd.routing.hash_ring import POINTS_PER_WORKER, HashRing
from shepherd.workers.worker import Worker

_GROWTH = 8  # beyond 2 * _GROWTH pages, cuts are 1/_GROWTH of the prefix apart
# A head (a chat's first message, its system prompt usually) of at least HEAD_MIN_CHARS has its blocks' keys
# remembered (a shorter one has at most the 16 page keys, cheap to hash again); the heads kept hold HEAD_MEMO_CHARS
# characters at most, least recently used dropped first.
HEAD_MIN_CHARS = 1024
HEAD_MEMO_CHARS = 1 << 22
_HEAD_SAMPLE_CHARS = 64
_EVICT_SLACK = 64  # inline evictions allowed per record beyond the number of keys it touched
_MAX_VIEWS = 8
_HOLDER_SCAN_FACTOR = 4  # look at up to this many times `limit` holders per key before giving up on it
# Bytes one (key, worker) pair costs, measured with tracemalloc (tests/unit/test_prefix_index_memory.py) when no other
# worker holds the key, its worst case: the key's int (32) and its block size (28 when > 256), the LRU's OrderedDict
# entry (~100), the holders map's entry for the key (~40) and its own one-holder dict (~230), plus the slack of
# tables that grow by doubling (about 480 bytes measured in steady state). Pairs of a key held by several workers cost
# less: they share the key's entry and dict.
PAIR_BYTES = 512
_UNBOUNDED = 2**62
# Capacity calibration from the workers' reported cached_tokens: a report below 3/4 of what the index expected (the
# worker forgot sooner) shrinks the modelled capacity by this step, one above 4/3 of it grows it back, between a
# quarter of the configured capacity and the configured capacity itself (growing past it made hot prefixes stick:
# zipf-prefix's busiest worker went from 1.25 to 1.43 times the mean). Ratios rather than differences, so a steady
# chars-per-token error does not drift the capacity.
CALIBRATION_STEP = 0.02
_CALIBRATION_BAND = (0.75, 4 / 3)
_FOREIGN_WINDOW = 64  # reports the `foreign` average spans (an exponential moving average)
_HALF_LIFE_PER_WORKER = 32  # traffic halves every this many records per worker
_RENORMALIZE_AT = 1e18
_OWN_RING_FRACTION = 8  # a view of fewer than 1/8 of the index's workers builds its own ring (shorter walks)
_MASK = 2**64 - 1


def mix64(x: int) -> int:
    """A stable 64-bit mix (splitmix64's finalizer): unlike hash(), the same in every process."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class BlockLayout:
    """The cut positions every prompt shares, and the chained keys of a prompt's blocks."""

    def __init__(self, page_chars: int) -> None:
        if page_chars < 1:
            raise ValueError("page_chars must be >= 1")
        self.page_chars = page_chars
        self._cuts = [page_chars]
        # (length, last characters) of a head -> (the head, its blocks' keys), least recently used first
        self._heads: OrderedDict[tuple[int, str], tuple[str, list[int]]] = OrderedDict()
        self._head_chars = 0

    def cuts(self, length: int) -> list[int]:
        """Cut positions up to `length`, plus `length` itself when it is not a cut."""
        cuts = self._cuts
        page = self.page_chars
        while cuts[-1] < length:
            last = cuts[-1]
            cuts.append(last + max(page, last // _GROWTH // page * page))
        ends = cuts[: bisect.bisect_right(cuts, length)]
        if not ends or ends[-1] != length:
            ends.append(length)
        return ends

    def keys(self, text: str, head: str = "") -> tuple[list[int], list[int]]:
        """(keys, ends): keys[i] identifies text[:ends[i]]. Empty text has no keys.

        `head`: a shorter start of `text` that many prompts repeat (a system prompt). The keys of its blocks are
        remembered, so the next prompt with the same head hashes only the rest."""
        if not text:
            return [], []
        ends = self.cuts(len(text))
        if len(head) < HEAD_MIN_CHARS or len(head) >= len(text):
            return self._chain(text, ends, []), ends
        heads = self._heads
        # Looked up by its length and last characters, then compared whole: hashing a long text costs more than
        # comparing two.
        sample = (len(head), head[-_HEAD_SAMPLE_CHARS:])
        known = heads.get(sample)
        if known is not None and known[0] == head:
            heads.move_to_end(sample)
            return self._chain(text, ends, known[1].copy()), ends
        keys = self._chain(text, ends, [])
        if known is not None:  # another head of the same sample: this one replaces it
            del heads[sample]
            self._head_chars -= len(known[0])
        heads[sample] = (head, keys[: bisect.bisect_right(ends, len(head))])  # whole cuts only: the text goes on
        self._head_chars += len(head)
        while self._head_chars > HEAD_MEMO_CHARS:
            self._head_chars -= heads.popitem(last=False)[0][0]
        return keys, ends

    @staticmethod
    def _chain(text: str, ends: list[int], keys: list[int]) -> list[int]:
        """`keys` (those of the first blocks) followed by the keys of the rest of the blocks."""
        done = len(keys)
        key = keys[-1] if done else 0
        start = ends[done - 1] if done else 0
        append = keys.append
        for end in ends[done:]:
            key = hash((key, text[start:end]))
            append(key)
            start = end
        return keys


class _Share:
    """Each worker's share of an index's memory budget, in keys: one cell all its entries read, so a change of the
    fleet's size updates one number instead of every entry."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys = 1


class WorkerEntry:
    """What one index believes about one worker: the prefixes it holds, least recently used first."""

    __slots__ = (
        "_share",
        "alive",
        "base_capacity",
        "char_capacity",
        "chars",
        "inserted",
        "lru",
        "traffic",
        "worker",
    )

    def __init__(self, worker: Worker, kv_chars: int, share: _Share) -> None:
        self.worker = worker
        self.lru: OrderedDict[int, int] = OrderedDict()  # key -> characters of its block
        self.chars = 0
        self.char_capacity = kv_chars if kv_chars > 0 else _UNBOUNDED  # the worker's KV cache in characters
        self.base_capacity = self.char_capacity  # as configured or reported; char_capacity is calibrated from it
        self._share = share
        self.traffic = 0.0  # decayed count of requests recorded, in units of PrefixIndex.unit
        self.inserted = 0.0  # decayed characters those records added to the LRU, in the same units
        self.alive = True

    @property
    def key_capacity(self) -> int:
        """Its share of the memory budget, in keys."""
        return self._share.keys

    @property
    def turnover(self) -> float:
        """Recently inserted characters over the modelled capacity: the faster its cache turns over, the sooner a
        prefix placed there now is evicted (a comparison between workers of one index, not a time)."""
        return self.inserted / self.char_capacity

    @property
    def over(self) -> bool:
        return self.chars > self.char_capacity or len(self.lru) > self.key_capacity

    def matched(self, keys: list[int], ends: list[int], limit: int) -> int:
        """Characters of the prompt (of these keys and ends) this worker holds, looking at most `limit` keys deep."""
        depth = self.depth(keys, limit)
        return ends[depth - 1] if depth else 0

    def depth(self, keys: list[int], limit: int) -> int:
        """How many leading keys of `keys` (at most `limit`) this worker holds.

        A worker holding a key holds every key before it (see "Closure"): a bisection, after checking both ends
        (most workers hold all of a match or none of it)."""
        lru = self.lru
        if not limit or keys[0] not in lru:
            return 0
        if keys[limit - 1] in lru:
            return limit
        low, high = 1, limit - 1  # keys[:low] held, keys[high] not
        while low < high:
            middle = (low + high) // 2
            if keys[middle] in lru:
                low = middle + 1
            else:
                high = middle
        return low

    def __repr__(self) -> str:
        return f"WorkerEntry({self.worker.url}, chars={self.chars})"


class FleetView:
    """The entries of one candidates snapshot, resolved once per snapshot instead of once per request."""

    __slots__ = ("_ring", "entries", "homes", "members", "observed", "source")

    def __init__(self, source: Sequence[Worker], entries: tuple[WorkerEntry, ...], ring: HashRing[WorkerEntry]) -> None:
        self.source = source
        self.entries = entries
        self.members = frozenset(entries)
        self._ring = ring  # the index's ring of all its workers; replaced by the view's own when it is a small part
        self.homes: dict[int, WorkerEntry] = {}  # the policy's memo of anchor key -> home (bounded by it)
        self.observed: tuple[int, bool] = (-1, False)  # the policy's memo: (feeds' version, all engines report)

    def home(self, point: int) -> WorkerEntry:
        """The entry owning `point` on the ring of the view's entries: the first of their points at or after it."""
        ring = self._ring
        if len(self.entries) * POINTS_PER_WORKER * _OWN_RING_FRACTION < len(ring):
            ring = self._ring = HashRing()
            ring.add_many((entry, entry.worker.url) for entry in self.entries)
        owner = ring.owner(point, self.members)
        assert owner is not None, "every entry of a view is on its index's ring"
        return owner


class PrefixIndex:
    def __init__(
        self, page_chars: int = 64, budget_bytes: int = 2**26, capacity_of: Callable[[Worker], int] | None = None
    ) -> None:
        if budget_bytes < 1:
            raise ValueError("budget_bytes must be >= 1")
        self.layout = BlockLayout(page_chars)
        self.budget_bytes = budget_bytes
        self._capacity_of = capacity_of
        self.holders: dict[int, dict[WorkerEntry, None]] = {}
        self.entries: dict[Worker, WorkerEntry] = {}
        self.chars = 0  # indexed characters over all (key, worker) pairs, removed workers' until purged
        self.pairs = 0  # (key, worker) pairs, removed workers' until purged
        self.fair_share = 1  # keys per worker: its part of the memory budget
        self.unit = 1.0  # weight of the next record in `traffic`; grows so that older records decay
        self.total_traffic = 0.0
        self.foreign = 0.0  # share of recent reports showing more cache than this index placed there (`calibrate`)
        self._growth = 1.0
        self._views: OrderedDict[int, FleetView] = OrderedDict()  # least recently used first
        self._ring: HashRing[WorkerEntry] = HashRing()  # every live entry, by worker URL
        self._share = _Share()
        self._dead: deque[WorkerEntry] = deque()
        self._over: dict[WorkerEntry, None] = {}  # live entries above capacity, trimmed by maintain()
        self._unchecked: list[WorkerEntry] = []  # entries to check against a smaller share, by maintain()
        # Cost accounting (plain counters, read by tests and `shepherd bench policy`).
        self.lookups = 0  # holder-map probes and holders looked at
        self.views_built = 0
        self._fleet_changed()

    # --- fleet -----------------------------------------------------------------------------------------------
    def view(self, candidates: Sequence[Worker]) -> FleetView:
        """Entries for `candidates`; O(1) while the registry hands out the same snapshot object."""
        key = id(candidates)
        view = self._views.get(key)
        if view is not None and view.source is candidates:
            self._views.move_to_end(key)  # retries' one-off lists must not push out the registry's snapshot
            return view
        return self._build_view(candidates)

    def remove(self, worker: Worker) -> None:
        """Forget `worker` now for routing; its keys are purged by maintain() in bounded steps."""
        entry = self.entries.pop(worker, None)
        if entry is None:
            return
        entry.alive = False
        self.total_traffic -= entry.traffic
        self._over.pop(entry, None)
        self._dead.append(entry)
        self._ring.remove(entry, worker.url)
        self._views.clear()
        self._fleet_changed()

    def _build_view(self, candidates: Sequence[Worker]) -> FleetView:
        if len(self._views) >= _MAX_VIEWS:
            self._views.popitem(last=False)
        entries = list(map(self.entries.get, candidates))  # C-speed: a snapshot can hold thousands of workers
        if None in entries:
            new = []
            for i, worker in enumerate(candidates):
                if entries[i] is None:
                    kv_chars = self._capacity_of(worker) if self._capacity_of else 0
                    entry = entries[i] = self.entries[worker] = WorkerEntry(worker, kv_chars, self._share)
                    new.append((entry, worker.url))
            self._ring.add_many(new)
            self._fleet_changed()
        view = self._views[id(candidates)] = FleetView(candidates, tuple(entries), self._ring)  # type: ignore[arg-type]
        self.views_built += 1
        return view

    @property
    def estimated_bytes(self) -> int:
        """Memory the index is charged for (at most `budget_bytes` once maintenance caught up)."""
        return self.pairs * PAIR_BYTES

    def _fleet_changed(self) -> None:
        workers = max(1, len(self.entries))
        fair_share = max(1, self.budget_bytes // workers // PAIR_BYTES)
        if fair_share < self.fair_share:
            self._unchecked = list(self.entries.values())  # which of them are now over is maintain()'s business
        self.fair_share = self._share.keys = fair_share
        self._growth = 2.0 ** (1.0 / (_HALF_LIFE_PER_WORKER * workers))

    # --- lookups ---------------------------------------------------------------------------------------------
    def longest_match(
        self, keys: list[int], members: frozenset[WorkerEntry], limit: int, everyone: int
    ) -> tuple[int, list[WorkerEntry], int]:
        """(depth, holders, common): the most keys of `keys` that some member holds, up to `limit` such members,
        and how many leading keys at least `everyone` workers hold (a prefix everyone holds says nothing about
        where to go)."""
        holders = self.holders
        # Bisections (see "Closure"): the keys some worker holds are a prefix of `keys`, and so are those at
        # least `everyone` workers hold.
        low, high = 0, len(keys)  # keys[:low] held, keys[high:] not
        probes = 0
        while low < high:
            middle = (low + high) // 2
            probes += 1
            if keys[middle] in holders:
                low = middle + 1
            else:
                high = middle
        depth = low
        low, high = 0, depth
        while low < high:
            middle = (low + high) // 2
            probes += 1
            if len(holders[keys[middle]]) >= everyone:
                low = middle + 1
            else:
                high = middle
        common = low
        scan = limit * _HOLDER_SCAN_FACTOR
        found: list[WorkerEntry] = []
        while depth:
            seen = 0
            for entry in holders[keys[depth - 1]]:
                seen += 1
                if entry in members:
                    found.append(entry)
                    if len(found) == limit:
                        break
                elif seen >= scan:
                    break
            probes += seen
            if found:
                break
            depth -= 1  # the deepest holders are gone or not routable right now: settle for a shorter match
        self.lookups += probes
        return depth, found, common

    def rotate_holder(self, entry: WorkerEntry, key: int) -> None:
        """Move `entry` behind the other holders of `key`, so longest_match offers the least recently chosen first."""
        owners = self.holders.get(key)
        if owners is not None and owners.pop(entry, False) is None:
            owners[entry] = None

    # --- updates ---------------------------------------------------------------------------------------------
    def record(self, entry: WorkerEntry, keys: list[int], ends: list[int]) -> None:
        """`entry`'s worker was just sent the text with these keys: it now holds all of them, most recently."""
        lru = entry.lru
        holders = self.holders
        added = 0
        held = len(lru)
        depth = entry.depth(keys, len(keys))  # the keys it already holds: they only move (see "Closure")
        for i in range(len(keys) - 1, depth - 1, -1):  # deepest first, so the root ends up most recent
            key = keys[i]
            size = ends[i] - ends[i - 1] if i else ends[0]
            lru[key] = size
            added += size
            owners = holders.get(key)
            if owners is None:
                holders[key] = {entry: None}
            else:
                owners[entry] = None
        if depth:
            deque(map(lru.move_to_end, keys[depth - 1 :: -1]), 0)  # in C: a Python loop was a third of a record
        entry.chars += added
        self.chars += added
        self.pairs += len(lru) - held
        unit = self.unit
        entry.inserted += added * unit
        entry.traffic += unit
        self.total_traffic += unit
        self.unit = unit * self._growth
        if self.unit > _RENORMALIZE_AT:
            self._renormalize()
        if entry.over:
            self._trim(entry, len(keys) + _EVICT_SLACK)
            if entry.over:
                self._over[entry] = None

    def scale_capacity(self, factor: float) -> None:
        """Model every worker's cache as `factor` times the size it was modelled at (other clients fill it too);
        workers now over capacity are trimmed by `maintain`."""
        for entry in self.entries.values():
            if entry.base_capacity >= _UNBOUNDED:
                continue
            entry.base_capacity = max(1, int(entry.base_capacity * factor))
            entry.char_capacity = max(1, int(entry.char_capacity * factor))
            if entry.over:
                self._over[entry] = None

    def calibrate(self, entry: WorkerEntry, expected: int, reported: int) -> None:
        """Correct `entry`'s modelled capacity from what its worker reported it had cached of a prompt (`reported`)
        against what this index expected (`expected`), both in characters; and keep `foreign`, the share of recent
        reports showing more than this index placed there (another gateway replica routes to the same workers)."""
        low, high = _CALIBRATION_BAND
        unexplained = reported > expected * high + self.layout.page_chars
        self.foreign += ((1.0 if unexplained else 0.0) - self.foreign) / _FOREIGN_WINDOW
        base = entry.base_capacity
        if base >= _UNBOUNDED or not entry.alive:
            return
        if reported < expected * low:
            entry.char_capacity = max(base // 4, int(entry.char_capacity * (1 - CALIBRATION_STEP)))
            if entry.over:
                self._over[entry] = None
        elif reported > expected * high + self.layout.page_chars:
            entry.char_capacity = min(base, int(entry.char_capacity * (1 + CALIBRATION_STEP)))

    @property
    def pending(self) -> bool:
        """Whether maintain() has work queued."""
        return bool(self._dead or self._over or self._unchecked)

    def maintain(self, budget: int) -> int:
        """Purge removed workers and trim over-capacity ones, evicting at most `budget` keys (and checking at most
        `budget` workers against a smaller share); returns keys evicted."""
        unchecked = self._unchecked
        for _ in range(min(budget, len(unchecked))):
            entry = unchecked.pop()
            if entry.alive and entry.over:
                self._over[entry] = None
        done = 0
        dead = self._dead
        while done < budget and dead:
            entry = dead[0]
            if not entry.lru:
                dead.popleft()
                continue
            self._evict_oldest(entry)
            done += 1
        over = self._over
        while done < budget and over:
            entry = next(iter(over))
            if not entry.alive or not entry.over:
                del over[entry]
                continue
            done += self._trim(entry, budget - done)
        return done

    def _trim(self, entry: WorkerEntry, limit: int) -> int:
        evicted = 0
        lru, char_capacity, key_capacity = entry.lru, entry.char_capacity, entry.key_capacity
        while (entry.chars > char_capacity or len(lru) > key_capacity) and evicted < limit and lru:
            self._evict_oldest(entry)
            evicted += 1
        return evicted

    def _evict_oldest(self, entry: WorkerEntry) -> None:
        key, size = entry.lru.popitem(last=False)
        entry.chars -= size
        self.chars -= size
        self.pairs -= 1
        owners = self.holders.get(key)
        if owners is not None:
            owners.pop(entry, None)
            if not owners:
                del self.holders[key]

    def _renormalize(self) -> None:
        unit = self.unit
        for entry in self.entries.values():
            entry.traffic /= unit
            entry.inserted /= unit
        self.total_traffic /= unit
        self.unit = 1.0
