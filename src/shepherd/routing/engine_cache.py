"""What the engines themselves say they cache, from their KV events (workers/kv_events.py), for cache_aware.

Keys. An engine names its blocks by hashes of its own making; this index re-keys every block by the routing text it
covers (requests for such engines are routed by their token ids, TOKEN_CHARS characters each: route_by_tokens),
chained like the engine's chain: key = hash((key of the block before, block text)). A request's prefix is then
looked up by cutting its own routing text into blocks of the engines' size (learned from the first block), without
knowing the engine's hash function. Each worker's map from engine hash to key is what lets a removal find its key.
Hashing a 2k-token prompt's blocks costs about 20 µs, so the block keys of a prefix are remembered by its key in the
policy's prefix index (which the request has already): a prompt that repeats a prefix seen before (a system prompt,
a conversation's earlier turns) hashes only its new blocks.

Placed blocks. Between the moment the gateway sends a prompt to a worker and the moment the engine reports its blocks
stored, the engine does not yet hold them, but the next request with the same prefix should still go there: the
blocks of every request in flight count as held by its worker until the request ends (`place` / `unplace`).

Observed workers. A worker is observed from its feed's first batch (which starts with `CacheCleared`) until the feed
is lost; cache_aware trusts this index for a fleet whose every candidate is observed, and its own model otherwise.

Bounds. Each block costs about BLOCK_BYTES; the index keeps at most `budget_bytes` (--max-tree-size, the same budget
as the prefix index's), divided evenly among the workers it follows. A worker whose engine reports more blocks than
its share is no longer observed (until its feed starts over): the policy's own bounded model takes over, with one
warning. Engines with blocks under MIN_BLOCK_TOKENS tokens (SGLang's default page size is 1) are not followed at
all: one key per token would cost a hash per token on every decision and a block per token in memory.
"""

from __future__ import annotations

import bisect
import logging
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence

from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, FeedLost, KvEvent
from shepherd.workers.worker import Worker

log = logging.getLogger(__name__)

# Bytes one block costs when no other worker holds it, measured with tracemalloc: its entry in the feed's map from
# engine hash to key (about 100) and its own map of holders (about 260).
BLOCK_BYTES = 384
MIN_BLOCK_TOKENS = 16
# Block keys the remembered prefixes hold at most, about 12 MB (then it starts over): bounded in blocks, not in
# prefixes, because one long conversation adds a prefix of all its blocks at every turn.
PREFIX_BLOCKS_REMEMBERED = 1 << 18
HALF_LIFE_BLOCKS_PER_WORKER = 1024  # a worker's `stored` count halves every this many blocks stored per worker
_RENORMALIZE_AT = 1e18


def _leading(keys: Sequence[int], present: Callable[[int], bool], limit: int | None = None) -> int:
    """How many of the first `limit` keys (all by default) are `present`, for a predicate true of a prefix of a chain
    and false after it: an engine evicts a block's descendants before the block. A bisection."""
    return bisect.bisect_left(keys, True, 0, len(keys) if limit is None else limit, key=lambda key: not present(key))


class _Feed:
    __slots__ = ("keys", "observed", "overflowed", "stored")

    def __init__(self) -> None:
        self.keys: dict[int, int] = {}  # engine block hash -> this index's key
        self.observed = False
        self.overflowed = False  # it reported more than its share of the budget: ignored until it starts over
        self.stored = 0.0  # decayed count of blocks its engine stored, in units of EngineCache._unit


class EngineCache:
    def __init__(self, budget_bytes: int = 2**26) -> None:
        self.budget_bytes = budget_bytes
        self.block_chars = 0  # characters of routing text per engine block (0: no block seen yet)
        # key -> workers whose engines reported the block (a dict, not a set: iterated in the same order in every
        # process, so decisions do not depend on where Worker objects happen to live in memory)
        self._held: dict[int, dict[Worker, None]] = {}
        self._placed: dict[int, dict[Worker, int]] = {}  # key -> workers it was sent to (requests in flight)
        self._feeds: dict[Worker, _Feed] = {}
        # a prompt prefix's key in the prefix index -> (block keys of a prompt it starts, how many are the prefix's)
        self._prefixes: dict[int, tuple[tuple[int, ...], int]] = {}
        self._prefix_blocks = 0  # block keys the remembered chains hold
        self.version = 0  # counts changes of which workers are observed
        self._unit = 1.0  # weight of the next stored block; grows so that older ones decay
        self._small_blocks_logged = False

    # --- events ------------------------------------------------------------------------------------------
    def apply(self, worker: Worker, events: Iterable[KvEvent]) -> None:
        feed = self._feeds.get(worker)
        if feed is None:
            feed = self._feeds[worker] = _Feed()
        for event in events:
            if isinstance(event, BlocksStored):
                self._stored(worker, feed, event)
            elif isinstance(event, BlocksRemoved):
                self._removed(worker, feed, event.hashes)
            elif isinstance(event, CacheCleared | FeedLost):
                self._removed(worker, feed, list(feed.keys))
                feed.overflowed = False
                self._observe(feed, isinstance(event, CacheCleared))

    def _observe(self, feed: _Feed, observed: bool) -> None:
        if feed.observed != observed:
            feed.observed = observed
            self.version += 1

    def _stored(self, worker: Worker, feed: _Feed, event: BlocksStored) -> None:
        keys = feed.keys
        if feed.overflowed:
            return
        if len(keys) + len(event.blocks) > self.budget_bytes // max(1, len(self._feeds)) // BLOCK_BYTES:
            log.warning(
                "%s reports more KV blocks than its share of --max-tree-size (%d bytes): routing models its cache",
                worker.url,
                self.budget_bytes,
            )
            self._removed(worker, feed, list(keys))
            feed.overflowed = True
            self._observe(feed, False)
            return
        if event.parent is None:
            key = 0
        else:
            parent = keys.get(event.parent)
            if parent is None:
                return  # its parent was evicted: unreachable from the root, as in the engine's own lookups
            key = parent
        held = self._held
        count = len(event.blocks)
        feed.stored += count * self._unit
        self._unit *= 2.0 ** (count / (HALF_LIFE_BLOCKS_PER_WORKER * len(self._feeds)))
        if self._unit > _RENORMALIZE_AT:
            for other in self._feeds.values():
                other.stored /= self._unit
            self._unit = 1.0
        for engine_hash, token_ids in event.blocks:
            text = array("I", token_ids).tobytes().decode("latin-1")
            if not self.block_chars:
                if len(token_ids) < MIN_BLOCK_TOKENS:
                    if not self._small_blocks_logged:
                        self._small_blocks_logged = True
                        log.info("KV blocks of %d tokens are too small to follow: routing models the caches",
                                 len(token_ids))  # fmt: skip
                    return
                self.block_chars = len(text)
            elif len(text) != self.block_chars:
                return  # a partial block is never matched by a lookup
            key = hash((key, text))
            keys[engine_hash] = key
            holders = held.get(key)
            if holders is None:
                held[key] = {worker: None}
            else:
                holders[worker] = None

    def _removed(self, worker: Worker, feed: _Feed, hashes: Iterable[int]) -> None:
        held = self._held
        for engine_hash in hashes:
            key = feed.keys.pop(engine_hash, None)
            holders = held.get(key) if key is not None else None
            if holders is not None:
                holders.pop(worker, None)
                if not holders:
                    del held[key]

    def forget(self, worker: Worker) -> None:
        """The worker left the fleet."""
        feed = self._feeds.pop(worker, None)
        if feed is not None:
            self._removed(worker, feed, list(feed.keys))
            self.version += 1

    def observes(self, workers: Sequence[Worker]) -> bool:
        feeds = self._feeds
        for worker in workers:
            feed = feeds.get(worker)
            if feed is None or not feed.observed:
                return False
        return bool(workers) and self.block_chars > 0

    def stored(self, worker: Worker) -> float:
        """Blocks the worker's engine stored lately (decayed), in a unit shared by all workers: comparable between
        them, the same in every gateway that follows the same engines."""
        feed = self._feeds.get(worker)
        return feed.stored if feed is not None else 0.0

    def blocks_held(self, worker: Worker) -> int:
        feed = self._feeds.get(worker)
        return len(feed.keys) if feed is not None else 0

    # --- placements --------------------------------------------------------------------------------------
    def keys(self, text: str, prefix_keys: Sequence[int] = (), prefix_ends: Sequence[int] = ()) -> list[int]:
        """The keys of every full block of `text`.

        `prefix_keys` name the prefixes of `text` that end at `prefix_ends` (the prefix index's keys, which the
        request has already). The block keys of a prefix that ends on a block boundary are remembered by its name,
        so a prompt repeating a known prefix (a system prompt, a conversation's earlier turns) hashes only its new
        blocks."""
        size = self.block_chars
        if not size:
            return []
        remembered = self._prefixes
        keys: list[int] = []
        found = -1
        for i in range(len(prefix_keys) - 1, -1, -1):
            known = remembered.get(prefix_keys[i])
            if known is not None:
                chain, count = known
                keys = list(chain[:count])
                found = i
                break
        key = keys[-1] if keys else 0
        for start in range(len(keys) * size, len(text) - size + 1, size):
            key = hash((key, text[start : start + size]))
            keys.append(key)
        new = [(prefix_keys[i], prefix_ends[i] // size) for i in range(found + 1, len(prefix_keys))
               if prefix_ends[i] % size == 0]  # fmt: skip
        if new:
            if self._prefix_blocks + len(keys) > PREFIX_BLOCKS_REMEMBERED:
                remembered.clear()
                self._prefix_blocks = 0
            chain = tuple(keys)
            self._prefix_blocks += len(chain)
            for prefix, blocks in new:
                remembered[prefix] = (chain, blocks)
        return keys

    def place(self, worker: Worker, keys: Sequence[int]) -> None:
        placed = self._placed
        for key in keys:
            workers = placed.get(key)
            if workers is None:
                placed[key] = {worker: 1}
            else:
                workers[worker] = workers.get(worker, 0) + 1

    def unplace(self, worker: Worker, keys: Sequence[int]) -> None:
        placed = self._placed
        for key in keys:
            workers = placed[key]
            count = workers[worker] - 1
            if count:
                workers[worker] = count
            else:
                del workers[worker]
                if not workers:
                    del placed[key]

    # --- lookups -----------------------------------------------------------------------------------------
    def match(self, keys: list[int], everyone: int) -> tuple[int, int]:
        """(depth, common): how many of `keys` (a prompt's, from `keys`) some worker holds or was sent, from the
        root; and how many leading ones at least `everyone` workers hold."""
        held, placed = self._held, self._placed
        # What one worker holds or was sent is a prefix of the chain (see `depth`), so what somebody holds is too,
        # and the count of holders only falls along the chain.
        depth = _leading(keys, lambda key: key in held or key in placed)
        return depth, _leading(keys, lambda key: len(held.get(key, ())) + len(placed.get(key, ())) >= everyone, depth)

    def holds(self, worker: Worker, key: int) -> bool:
        holders = self._held.get(key)
        if holders is not None and worker in holders:
            return True
        sent = self._placed.get(key)
        return sent is not None and worker in sent

    def holders(self, key: int) -> Iterator[Worker]:
        """The workers holding `key` or sent it (a worker may come twice)."""
        yield from self._held.get(key, ())
        yield from self._placed.get(key, ())

    def depth(self, worker: Worker, keys: list[int], limit: int) -> int:
        """How many of the first `limit` of `keys` the worker holds from the root (a binary search: an engine evicts a
        block's descendants before the block, so what one worker holds is a prefix of the chain)."""
        return _leading(keys, lambda key: self.holds(worker, key), limit)
