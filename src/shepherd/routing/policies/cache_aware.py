"""cache_aware: send a request where its prompt prefix is probably cached, unless that worker is overloaded.

Per model, a `PrefixIndex` estimates which workers hold which prompt prefixes (see prefix_index.py), each worker's
part bounded by its share of --max-tree-size (bytes) and by its KV cache size (--worker-kv-tokens, else the
`max_total_num_tokens` the worker reported at registration, times --cache-chars-per-token) so the index forgets what
the engine must have evicted. Per request:

1. Survey. Exactly over up to 32 candidates, else over 8 random ones (power of d choices), so the cost does not grow
   with the fleet: `least` has the fewest in-flight requests (`Worker.load`, counted from dispatch), then the
   smallest recent traffic share; `spare` is, among the workers within spill_margin of the least load, the one with
   the emptiest estimated cache, counting half its traffic share relative to the mean on top of its fill, so that
   when every cache is full (cache pressure) the least busy worker is the spare.
2. Match. The longest prefix of the routing text that some routable worker holds, and up to 8 of its holders,
   least recently chosen first. match ratio = matched characters / text length. At or below `cache_threshold` it
   is a miss and goes to `spare`: never to a busy worker (no death spiral), and new prefixes spread over the caches
   instead of following momentary queue lengths.
3. Hit. Among the holders that are not overloaded, the least loaded (then smallest share) wins; if `least` holds the
   same prefix, it wins. A holder is overloaded when
   - SMG's rule holds for it against `least`: load - least > balance_abs_threshold and load > balance_rel_threshold
     * least. Checked for the chosen worker only, so a hot spot elsewhere does not switch every request to load
     balancing;
   - (the rest unless spill_ratio is 0) its batch is full: load >= the `max_running_requests` it reported, while
     `spare` has room. Before that, queue length costs an engine little, far less than a prefill;
   - the requests queued ahead of this one cost more than its cached prefix saves: the holder has at least
     spill_margin more requests in flight than `spare`, and that excess times the request's uncached characters
     exceeds its matched characters. A continuation of a long history (mostly cached) practically never moves; a
     new conversation that shares only a system prompt with the holder's (half cached) goes where the queue is
     shorter, which spreads a burst of new sessions while their histories are still cheap to place;
   - its recent request share is above spill_ratio * mean share plus 2.5 random spreads (`PrefixIndex.share_noise`)
     divided by the number of holders compared (a spill needs all of them hot, which chance rarely makes of
     several), or merely above the mean while `spare`'s share is more than 2.5 spreads below mean / spill_ratio;
     and above `spare`'s by more than spill_margin. Only imbalance beyond chance counts: the noise of random
     arrivals would copy prefixes for nothing.
   If every holder is overloaded, the request spills to `spare`, which then holds the prefix too.
4. Record. The whole routing text is recorded for the chosen worker at dispatch, so concurrent requests with the
   same prefix follow it before the first one finishes.

Maintenance. A record trims its own worker inline (bounded); removed workers and capacity changes are purged by
`maintain` in chunks: up to 64 keys per request and, every `eviction_interval_secs`, a background pass in chunks of
4096 keys per event-loop turn, so no pass stalls the loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from shepherd.config import CacheAwareConfig
from shepherd.routing.context import TOKEN_CHARS, RequestContext
from shepherd.routing.prefix_index import PrefixIndex, WorkerEntry
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.workers.worker import Worker

KV_TOKENS_LABEL = "max_total_num_tokens"  # from the worker's /server_info (SGLang), kept as a label
RUNNING_LIMIT_LABEL = "max_running_requests"  # likewise: beyond this many, requests wait for a batch slot
SCAN_LIMIT = 32  # fleets up to this size are scanned exactly for the least-loaded worker
SAMPLES = 8  # larger fleets: best of this many random candidates
HOLDERS_PROBED = 8  # holders of the matched prefix compared per request
SHARE_NOISE_DEVIATIONS = 2.5  # a share this many random spreads above its cap is sustained imbalance, not chance
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
        self._running_limits: dict[Worker, int] = {}
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
        self._running_limits.pop(worker, None)
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
        """The worker's prefix-cache size in characters: --worker-kv-tokens, else what the worker reported.

        Requests for gRPC workers are indexed by token ids, TOKEN_CHARS characters each (no estimate needed)."""
        tokens = self._config.worker_kv_tokens
        if not tokens:
            reported = worker.labels.get(KV_TOKENS_LABEL, "")
            tokens = int(reported) if reported.isdigit() else 0
        per_token = TOKEN_CHARS if is_grpc_url(worker.base_url) else self._config.chars_per_token
        return int(tokens * per_token)

    def _running_limit(self, worker: Worker) -> int:
        """How many requests the worker runs at once, as it reported at registration; 0 = unknown."""
        limit = self._running_limits.get(worker)
        if limit is None:
            reported = worker.labels.get(RUNNING_LIMIT_LABEL, "")
            limit = self._running_limits[worker] = int(reported) if reported.isdigit() else 0
        return limit

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
        least, spare = self._survey(entries, index.mean_share())
        if not keys:
            return spare
        depth, holders = index.longest_match(keys, members, HOLDERS_PROBED)
        matched = ends[depth - 1] if depth else 0
        if matched <= self._threshold * length:
            return spare
        return self._best_holder(index, holders, least, spare, keys[depth - 1], matched, length - matched)

    def _survey(self, entries: tuple[WorkerEntry, ...], mean_share: float) -> tuple[WorkerEntry, WorkerEntry]:
        """(least loaded, spare) over all entries, or over a random sample of a large fleet.

        least: fewest requests in flight, then smallest share. spare: among those within spill_margin of the least
        load, the smallest estimated cache fill plus half the share relative to the mean. New prefixes and spills go
        to the spare worker: where a prefix lands decides its traffic for a long time, so it should go where the
        cache has room and traffic is light, not merely to the momentarily shortest queue (that spreads prefix
        groups unevenly, and overfull caches thrash). Once every cache is full, fill no longer tells the workers
        apart and the share term decides.
        """
        count = len(entries)
        if count <= SCAN_LIMIT:
            pool: Sequence[WorkerEntry] = entries
        else:
            rand = self._rng.random
            pool = [entries[int(rand() * count)] for _ in range(SAMPLES)]
        least = pool[0]
        least_load = least.worker.load
        least_share = least.share
        for entry in pool:
            load = entry.worker.load
            if load < least_load or (load == least_load and entry.share < least_share):
                least, least_load, least_share = entry, load, entry.share
        spare_limit = least_load + self._spill_margin
        share_weight = 0.5 / mean_share if mean_share > 0 else 0.0
        spare = least
        spare_score = least.fill + least.share * share_weight
        for entry in pool:
            if entry.worker.load <= spare_limit:
                score = entry.fill + entry.share * share_weight
                if score < spare_score:
                    spare, spare_score = entry, score
        self.examined += len(pool)
        return least, spare

    def _best_holder(
        self,
        index: PrefixIndex,
        holders: list[WorkerEntry],
        least: WorkerEntry,
        spare: WorkerEntry,
        key: int,
        matched: int,
        unmatched: int,
    ) -> WorkerEntry:
        """The least-loaded holder that is not overloaded (see the module docstring); `spare` if there is none."""
        least_load = least.worker.load
        spare_load = spare.worker.load
        abs_threshold, rel_threshold, ratio, margin = self._abs, self._rel, self._spill_ratio, self._spill_margin
        if ratio:
            mean_share = index.mean_share()
            noise = SHARE_NOISE_DEVIATIONS * index.share_noise()
            # A spill needs every holder hot: k holders all far above the mean by chance is much less likely than
            # one, so each gets 1/k of the allowance.
            share_cap = ratio * mean_share + noise / len(holders)
            if spare.share < mean_share / ratio - noise:  # spare is cold beyond chance: any excess is too much
                share_cap = min(share_cap, mean_share)
            share_floor = spare.share + margin * index.share_unit
        spare_has_slot = None  # computed when first needed
        chosen: WorkerEntry | None = None
        chosen_load = 0
        for entry in holders:
            worker = entry.worker
            load = worker.load
            if load - least_load > abs_threshold and load > rel_threshold * least_load:
                continue  # SMG's imbalance rule, for this holder only
            if ratio:
                limit = self._running_limit(worker)
                if limit and load >= limit:  # full batch: a hit would wait for a slot
                    if spare_has_slot is None:
                        spare_has_slot = spare_load < (self._running_limit(spare.worker) or limit)
                    if spare_has_slot:
                        continue
                excess = load - spare_load
                if excess >= margin and excess * unmatched > matched:
                    continue  # the queue ahead costs more prefill than the cached prefix saves
                if entry.share > share_cap and entry.share > share_floor:
                    continue  # runs hot by traffic share, beyond what chance explains
            if chosen is None or load < chosen_load or (load == chosen_load and entry.share < chosen.share):
                chosen, chosen_load = entry, load
        self.examined += len(holders)
        if chosen is None:
            return spare  # spill: every holder is overloaded
        least_is_better = least_load < chosen_load or (least_load == chosen_load and least.share < chosen.share)
        if chosen is not least and least_is_better and index.holds(least, key):
            chosen = least
        index.rotate_holder(chosen, key)
        return chosen

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
