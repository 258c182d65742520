"""cache_aware: send a request where its prompt prefix is probably cached, unless that worker is running hot.

Per model, a `PrefixIndex` estimates which workers hold which prompt prefixes (see prefix_index.py), each worker's
share bounded by its KV cache size (--worker-kv-tokens, else the `max_total_num_tokens` the worker reported at
registration) so the index forgets what the engine must have evicted. Per request:

1. Least loaded. The worker with the fewest in-flight requests (`Worker.load`, counted from dispatch), ties broken
   by the smaller recent traffic share. Exact up to 32 candidates; for larger fleets the best of 8 random samples
   (power of d choices), so the cost does not grow with the fleet. The same pass gives the mean load.
2. Match. The longest prefix of the routing text that some routable worker holds, and up to 8 of its holders,
   least recently chosen first. match ratio = matched characters / text length. At or below `cache_threshold` it
   is a miss: the request goes to the least-loaded worker (never to a busy worker that happens to hold a sliver of
   it, so misses cannot pile onto an overloaded worker).
3. Hit. Among the holders that are not overloaded, the least loaded (then smallest share) wins; if the least-loaded
   worker holds the same prefix, it wins. A holder is overloaded when, compared with the least-loaded worker,
   - SMG's rule holds for it: load - least > balance_abs_threshold and load > balance_rel_threshold * least. This is
     checked for the chosen worker only, so a hot spot elsewhere in the fleet does not switch every request to
     load balancing; or
   - it runs hot (unless spill_ratio is 0): load > spill_ratio * mean load + spill_margin; or its recent request
     share exceeds spill_ratio * mean share + spill_margin, or exceeds the mean while the least-loaded worker's
     share is below mean / spill_ratio - spill_margin (a cold worker). Share tests need the least-loaded worker's
     share to be lower by more than the margin. They catch a popular shared prefix (one system prompt for all
     conversations) collecting every new session while the in-flight counts are still too small to show it.
   If every holder is overloaded, the request spills to the least-loaded worker, which then holds the prefix too:
   a hot prefix gains a replica, and a session on a hot worker migrates at the cost of one re-prefill.
4. Record. The whole routing text is recorded for the chosen worker (also after load-based choices) at dispatch, so
   concurrent requests with the same prefix follow it before the first one finishes.

Maintenance. A record trims its own worker inline (bounded); removed workers and capacity changes are purged by
`maintain` in chunks: up to 64 keys per request and, every `eviction_interval_secs`, a background pass in chunks of
4096 keys per event-loop turn, so no pass stalls the loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from shepherd.config import CacheAwareConfig
from shepherd.routing.context import RequestContext
from shepherd.routing.prefix_index import CHARS_PER_TOKEN, PrefixIndex, WorkerEntry
from shepherd.workers.worker import Worker

KV_TOKENS_LABEL = "max_total_num_tokens"  # from the worker's /server_info (SGLang), kept as a label
SCAN_LIMIT = 32  # fleets up to this size are scanned exactly for the least-loaded worker
SAMPLES = 8  # larger fleets: best of this many random candidates
HOLDERS_PROBED = 8  # holders of the matched prefix compared per request
_INLINE_MAINTENANCE = 64
_BACKGROUND_CHUNK = 4096


class CacheAwarePolicy:
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self._threshold = config.cache_threshold
        self._abs = config.balance_abs_threshold
        self._rel = config.balance_rel_threshold
        self._spill_ratio = config.spill_ratio
        self._spill_margin = config.spill_margin
        self._indexes: dict[str | None, PrefixIndex] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_checked = False
        self._background_running = False
        self.examined = 0  # worker loads read and holders compared, for cost accounting

    # --- Policy protocol -------------------------------------------------------------------------------------
    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        index = self._indexes.get(ctx.model)
        if index is None:
            index = self.index_for(ctx.model)
        view = index.view(candidates)
        text = ctx.routing_text
        keys, ends = index.layout.keys(text)
        target = self._choose(index, view.entries, view.members, keys, ends, len(text))
        index.record(target, keys, ends)
        if index.pending:
            index.maintain(_INLINE_MAINTENANCE)
        if not self._timer_checked:
            self._start_timer()
        return target.worker

    def on_request_done(self, worker: Worker, ctx: RequestContext, ok: bool) -> None:
        # Failed requests stay recorded: the engine may have cached the prefix anyway, and LRU forgets it if not.
        return None

    def on_worker_removed(self, worker: Worker) -> None:
        for index in self._indexes.values():
            index.remove(worker)

    # --- inspection and maintenance -------------------------------------------------------------------------
    def index_for(self, model: str | None) -> PrefixIndex:
        index = self._indexes.get(model)
        if index is None:
            config = self._config
            index = self._indexes[model] = PrefixIndex(config.block_chars, config.max_tree_size, self._kv_chars)
        return index

    def _kv_chars(self, worker: Worker) -> int:
        """The worker's prefix-cache size in characters: --worker-kv-tokens, else what the worker reported."""
        tokens = self._config.worker_kv_tokens
        if not tokens:
            reported = worker.labels.get(KV_TOKENS_LABEL, "")
            tokens = int(reported) if reported.isdigit() else 0
        return tokens * CHARS_PER_TOKEN

    def maintain(self, budget: int = _BACKGROUND_CHUNK) -> bool:
        """Run up to `budget` evictions of queued maintenance; True when work remains."""
        for index in self._indexes.values():
            if budget <= 0:
                break
            budget -= index.maintain(budget)
        return any(index.pending for index in self._indexes.values())

    # --- decision --------------------------------------------------------------------------------------------
    def _choose(
        self,
        index: PrefixIndex,
        entries: tuple[WorkerEntry, ...],
        members: frozenset[WorkerEntry],
        keys: list[int],
        ends: list[int],
        length: int,
    ) -> WorkerEntry:
        if len(entries) == 1:
            return entries[0]
        least, mean_load = self._least_loaded(entries)
        if not keys:
            return least
        depth, holders = index.longest_match(keys, members, HOLDERS_PROBED)
        if not depth or ends[depth - 1] <= self._threshold * length:
            return least
        return self._best_holder(index, holders, least, mean_load, keys[depth - 1])

    def _least_loaded(self, entries: tuple[WorkerEntry, ...]) -> tuple[WorkerEntry, float]:
        """(least-loaded entry, mean load) over all entries, or over a random sample of a large fleet."""
        count = len(entries)
        if count <= SCAN_LIMIT:
            pool: Sequence[WorkerEntry] = entries
        else:
            rand = self._rng.random
            pool = [entries[int(rand() * count)] for _ in range(SAMPLES)]
        best = pool[0]
        best_load = best.worker.load
        best_share = best.share
        total = 0
        for entry in pool:
            load = entry.worker.load
            total += load
            if load < best_load or (load == best_load and entry.share < best_share):
                best, best_load, best_share = entry, load, entry.share
        self.examined += len(pool)
        return best, total / len(pool)

    def _best_holder(
        self, index: PrefixIndex, holders: list[WorkerEntry], least: WorkerEntry, mean_load: float, key: int
    ) -> WorkerEntry:
        least_load = least.worker.load
        mean_share = index.mean_share()
        share_margin = self._spill_margin * index.share_unit
        chosen: WorkerEntry | None = None
        chosen_load = 0
        for entry in holders:
            load = entry.worker.load
            if self._overloaded(entry, load, least, least_load, mean_load, mean_share, share_margin):
                continue
            if chosen is None or load < chosen_load or (load == chosen_load and entry.share < chosen.share):
                chosen, chosen_load = entry, load
        self.examined += len(holders)
        if chosen is None:
            return least  # spill: every holder runs hot
        least_is_better = least_load < chosen_load or (least_load == chosen_load and least.share < chosen.share)
        if chosen is not least and least_is_better and index.holds(least, key):
            chosen = least
        index.rotate_holder(chosen, key)
        return chosen

    def _overloaded(
        self,
        entry: WorkerEntry,
        load: int,
        least: WorkerEntry,
        least_load: int,
        mean_load: float,
        mean_share: float,
        share_margin: float,
    ) -> bool:
        if load - least_load > self._abs and load > self._rel * least_load:
            return True
        ratio = self._spill_ratio
        if not ratio:
            return False
        margin = self._spill_margin
        if load > ratio * mean_load + margin and load > least_load + margin:
            return True
        share = entry.share
        if share <= least.share + share_margin:
            return False
        # Hot by share, or above the mean while the least-loaded worker sits well below it (a cold worker).
        return share > ratio * mean_share + share_margin or (
            share > mean_share and least.share < mean_share / ratio - share_margin
        )

    # --- background maintenance ------------------------------------------------------------------------------
    def _start_timer(self) -> None:
        self._timer_checked = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # used outside an event loop (benchmarks, tests): maintenance runs inline only
        self._timer = loop.call_later(self._config.eviction_interval_secs, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._background_running:
            self._background_running = True
            self._background_step(loop)
        self._timer = loop.call_later(self._config.eviction_interval_secs, self._on_timer, loop)

    def _background_step(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.maintain(_BACKGROUND_CHUNK):
            loop.call_soon(self._background_step, loop)
        else:
            self._background_running = False
