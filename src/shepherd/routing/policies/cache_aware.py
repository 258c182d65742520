"""cache_aware: send a request where its expected time to first token is lowest (docs/routing.md, "One decision").

One cost model, in characters of prefill. For each candidate worker w:

    cost(w) = queue_chars * load(w) + pending_weight * pending(w) + (1 + fill(w)) * (prompt length - matched(w))

- `pending(w)`: the prefill w still owes: for every attempt sent to w whose first token has not come back, the part
  of its prompt the index did not place on w (`Worker.prefill_pending`). An engine prefills in arrival order, so a new
  request waits for all of it; --cache-pending-prefill-weight (a quarter) is how much of that wait counts against
  moving a cached prefix, which later requests pay for.
- `load(w)`: the larger of the requests the gateway has in flight on w and those w's share of recent traffic implies
  (its decayed request count over the fleet's, times the requests in flight over the fleet): a hot worker counts as
  busy before its queue shows it, and a momentary burst counts too.
- `queue_chars` = --cache-queue-tokens x --cache-chars-per-token: what one request ahead costs beyond its prefill.
- `matched(w)`: the prefix w is believed to hold, from a `PrefixIndex` per model (the model the request is routed to
  when it names none): what the gateway sent w, bounded by w's share of --max-tree-size (bytes) and by its KV cache
  (--worker-kv-tokens, else the `max_total_num_tokens` it reported, times --cache-chars-per-token), divided by how
  many gateways fill it as fast as this one (its engine's polled requests over this gateway's own).
  Where every candidate's engine publishes KV events (SGLang's `SubscribeKvEvents` for gRPC workers, its ZeroMQ
  publisher for HTTP ones) and the request is matched by token ids, `matched(w)` is what w's engine reports it
  holds instead (routing/engine_cache.py), plus the blocks of this gateway's requests in flight on w, which the
  engine has not reported yet: every replica then sees the same caches.
- `fill(w)`: how full w's estimated cache is (0 to 1), or its engine's reported one. Prefill on a full cache evicts
  as much of other prefixes, which some later request pays again: on a full cache an uncached character costs twice.

The request goes to the cheapest candidate; ties go to the longer known match, then to the prompt's home.

Home. Every prompt has a home that every gateway process computes alike: its anchor block, the first block that not
every candidate holds (a prefix everyone holds, such as a system prompt on a warm fleet, says nothing about where to
go), hashed onto a consistent-hash ring of the candidates' URLs. Prompts that share a prefix beyond what everyone
holds share the anchor and the home: a prefix group's requests, a conversation's turns. When the index knows nothing
of a prompt beyond what everyone holds, it may have gone to another gateway replica, which (following the same rule)
sent it home: the home is presumed to hold up to --cache-home-requests queued requests' worth of it, so a new prefix
goes home unless the home is busier than that, and every replica agrees. A gateway that has evidence it is not alone
(more than 2% of recent answers report cached prefixes beyond what it placed on that worker) presumes the home holds
the whole prompt: the other replicas sent it there, and only the hard limits below send it elsewhere. A gateway
that knows it is alone (its load polls show the engines' requests are its own) needs no agreement: the home of a
prompt nobody holds is then the candidate whose cache turns over slowest (characters recently inserted over its
capacity), where the prefix will stay cached longest, the ring's choice on a tie. Replicas that all read the
engines' KV events agree on that without the ring: they compare what each engine reported storing lately.

Candidates: the least loaded worker (exactly over up to 32 candidates, else the best of 8 random ones), the home and
the deepest holders of the prompt (up to 4). Three hard limits keep a request off an overloaded worker whatever its
cache: SMG's imbalance rule against the least loaded (load - least > --balance-abs-threshold and load >
--balance-rel-threshold * least); a full batch (load >= the `max_running_requests` it reported) while the least
loaded worker has room; and the share cap: a worker busier than the mean whose recent traffic is above
--cache-max-share times the mean (and above what chance explains: the mean plus two Poisson standard deviations).
The cap is what moves a hot prefix that queueing alone would leave on one worker (a Zipf head takes 16% of the
requests of eight workers, 1.3 times a worker's share, before anything else homed there).

The whole routing text is recorded for the chosen worker at dispatch, so concurrent requests with the same prefix
follow it before the first one finishes. Maintenance: a record trims its own worker inline (bounded); removed
workers and capacity changes are purged by `maintain` in chunks: up to 64 keys per request and, every
`eviction_interval_secs`, a background pass in chunks of 4096 keys per event-loop turn.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import zlib
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from shepherd.config import CacheAwareConfig
from shepherd.routing.context import TOKEN_CHARS, RequestContext
from shepherd.routing.engine_cache import EngineCache
from shepherd.routing.prefix_index import FleetView, PrefixIndex, WorkerEntry, mix64
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.workers.kv_events import KvEvent
from shepherd.workers.worker import KV_TOKENS_LABEL, RUNNING_LIMIT_LABEL, Worker

SCAN_LIMIT = 32  # fleets up to this size are scanned exactly for the least-loaded worker
SAMPLES = 8  # larger fleets: best of this many candidates (a window at a random offset)
HOLDERS_PROBED = 4  # holders of the matched prefix compared per request
REPLICA_EVIDENCE = 0.02  # share of answers reporting cache this gateway did not place: others route here too
HOMES_REMEMBERED = 65536  # anchors whose home a fleet view remembers (then it starts over)
POLL_DECAY = 0.8  # weight of the previous load polls in the sharers estimate (about the last 5 count)
SHARERS_SAMPLE = 4  # requests of this gateway's own, over the weighted polls, before the estimate counts
SHARERS_STEP = 0.1  # the modelled caches change only when the estimate moved by more than this fraction
ALONE_BELOW = 1.5  # sharers below this: no other gateway replica routes to these workers (two measure about 2)
_INLINE_MAINTENANCE = 64
_BACKGROUND_CHUNK = 4096


class Prediction:
    """What the policy expected of one attempt on one worker: the prefix it holds, the prefill charged to it, and
    the engine blocks placed on it (when the engines' KV events are followed)."""

    __slots__ = ("blocks", "entry", "expected", "index", "prefill")

    def __init__(self, index: PrefixIndex, entry: WorkerEntry, expected: int, prefill: int) -> None:
        self.index = index
        self.entry = entry
        self.expected = expected  # characters of the prompt the index believed the worker held
        self.prefill = prefill  # characters added to the worker's `prefill_pending`, until released
        self.blocks: Sequence[int] = ()  # EngineCache keys placed on the worker until the attempt ends

    def release(self) -> None:
        self.entry.worker.prefill_pending -= self.prefill
        self.prefill = 0

    def end(self, engines: EngineCache) -> None:
        self.release()
        if self.blocks:
            engines.unplace(self.entry.worker, self.blocks)
            self.blocks = ()


_turnover = attrgetter("turnover")
_NOT_REPORTED: list[Any] = []  # stands in for `explain`'s list of costed candidates in a decision (never appended to)


class CacheAwarePolicy:
    name = "cache_aware"
    reads_cached_tokens = True
    reads_kv_events = True

    def __init__(self, config: CacheAwareConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()
        self._abs = config.balance_abs_threshold
        self._rel = config.balance_rel_threshold
        self._queue_chars = config.queue_tokens * config.chars_per_token
        self._home_chars = config.home_requests * self._queue_chars
        self._max_share = config.max_share  # 0: no cap
        self._pending_prefill_weight = config.pending_prefill_weight
        self._indexes: dict[str | None, PrefixIndex] = {}
        self._engines = EngineCache(config.max_tree_size)  # what the engines report they hold, where they publish
        self._running_limits: dict[Worker, int] = {}
        self._engine_chars: dict[Worker, int] = {}  # each worker's whole KV cache, in characters
        self._sharers = 1.0  # how many gateways (or other clients) fill the workers' caches as much as this one
        self._alone = False  # the polls showed no other gateway replica: homes need not follow the ring
        self._polled = False  # the polls have shown whether other replicas share the workers
        self._polled_engine = self._polled_own = 0.0  # decayed sums of requests polled from engines, and our own
        self._timer: asyncio.TimerHandle | None = None
        self._timer_checked = False
        self._background_running = False
        self.examined = 0  # worker loads read and candidates costed, for cost accounting

    # --- Policy protocol -------------------------------------------------------------------------------------
    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        index, view, text, keys, ends = self._prepare(candidates, ctx)
        if len(view.entries) == 1:
            target = view.entries[0]
        else:
            blocks = self._engine_keys(view, ctx, text, keys, ends)
            target, expected = self._choose(index, view, text, keys, ends, blocks)
            prediction = Prediction(index, target, expected, (ends[-1] if keys else 0) - expected)
            target.worker.prefill_pending += prediction.prefill
            if blocks:  # the next request with this prefix follows it before the engine reports it
                prediction.blocks = blocks
                self._engines.place(target.worker, blocks)
            if ctx.predictions is None:
                ctx.predictions = {target.worker: prediction}
            else:
                self._replace(ctx.predictions, prediction)
        if keys:
            index.record(target, keys, ends)
        if index.pending:
            index.maintain(_INLINE_MAINTENANCE)
        if not self._timer_checked:
            self._start_timer()
        return target.worker

    def explain(self, candidates: Sequence[Worker], ctx: RequestContext) -> dict[str, Any]:
        """What `pick` would choose for `ctx` and every term of its cost, changing nothing (docs/routing.md)."""
        index, view, text, keys, ends = self._prepare(candidates, ctx)
        length = ends[-1] if keys else 0
        explained: dict[str, Any] = {"policy": self.name, "prompt_chars": length}
        if len(view.entries) == 1:
            return {**explained, "worker": view.entries[0].worker.url, "reason": "the only candidate"}
        report: dict[str, Any] = {}
        examined = self.examined
        blocks = self._engine_keys(view, ctx, text, keys, ends)
        target, matched = self._choose(index, view, text, keys, ends, blocks, report)
        self.examined = examined  # not a decision: the cost accounting counts decisions only
        return {
            **explained,
            "worker": target.worker.url,
            "matched_chars": matched,
            **report,
            "terms": {
                "queue_chars_per_request": self._queue_chars,
                "pending_prefill_weight": self._pending_prefill_weight,
                "home_requests_chars": self._home_chars,  # --cache-home-requests, in characters
                "sharers": round(self._sharers, 3),
                "replica_evidence": round(index.foreign, 4),
            },
        }

    def _prepare(
        self, candidates: Sequence[Worker], ctx: RequestContext
    ) -> tuple[PrefixIndex, FleetView, str, list[int], list[int]]:
        model = ctx.model or candidates[0].model_id  # no `model`: the index of the model it is routed to
        index = self._indexes.get(model)
        if index is None:
            index = self.index_for(model)
        text = ctx.routing_text
        return index, index.view(candidates), text, *index.layout.keys(text, ctx.routing_head)

    def on_first_token(self, worker: Worker, ctx: RequestContext) -> None:
        """The worker answered with its first token: the request's prefill no longer queues ahead of others."""
        prediction = ctx.predictions and ctx.predictions.get(worker)
        if prediction:
            prediction.release()

    def on_request_done(self, worker: Worker, ctx: RequestContext, ok: bool, cached_tokens: int | None = None) -> None:
        """The attempt's prefill is over, if its first token did not say so already; and learn from the truth: a
        worker's reported `cached_tokens` calibrates its modelled capacity (too low a report: it forgets sooner than
        modelled; too high: later). Failed requests stay recorded: the engine may have cached the prefix anyway,
        and LRU forgets it if not."""
        prediction = ctx.predictions and ctx.predictions.pop(worker, None)
        if not prediction:
            return
        prediction.end(self._engines)
        if cached_tokens is not None:
            prediction.index.calibrate(
                prediction.entry, prediction.expected, int(cached_tokens * self._chars_per_token(worker))
            )

    def _replace(self, predictions: dict[Worker, Prediction], prediction: Prediction) -> None:
        """Keep the attempt's prediction (a retry of the same request); one for the same worker whose end nobody
        reported gives its prefill charge back."""
        earlier = predictions.get(prediction.entry.worker)
        if earlier is not None:
            earlier.end(self._engines)
        predictions[prediction.entry.worker] = prediction

    def on_engine_loads(self, workers: list[Worker]) -> None:
        """How much of the workers' traffic goes through this gateway. An engine counts every client's requests, the
        gateway its own: over recent polls, their ratio is how many gateway replicas (or other clients) fill the
        workers' caches as fast as this one. The index models each worker's cache as that fraction of its size, so
        it forgets a prefix about when the engine does, instead of sending requests to a worker the other replicas'
        traffic has long since flushed."""
        self._polled_engine = self._polled_engine * POLL_DECAY + sum(w.engine_requests or 0 for w in workers)
        self._polled_own = self._polled_own * POLL_DECAY + sum(w.load for w in workers)
        if self._polled_own < SHARERS_SAMPLE:
            return
        sharers = max(1.0, self._polled_engine / self._polled_own)
        self._alone = sharers < ALONE_BELOW
        self._polled = True
        if abs(sharers - self._sharers) > SHARERS_STEP * self._sharers:
            factor = self._sharers / sharers
            self._sharers = sharers
            for index in self._indexes.values():
                index.scale_capacity(factor)

    def on_kv_events(self, worker: Worker, events: list[KvEvent]) -> None:
        """What the worker's engine reported it stored or evicted: the truth the index otherwise models."""
        self._engines.apply(worker, events)

    def on_worker_removed(self, worker: Worker) -> None:
        self._running_limits.pop(worker, None)
        self._engine_chars.pop(worker, None)
        self._engines.forget(worker)
        for index in self._indexes.values():
            index.remove(worker)

    # --- inspection and maintenance -------------------------------------------------------------------------
    @property
    def engines(self) -> EngineCache:
        """What the engines reported they hold (KV events)."""
        return self._engines

    def index_for(self, model: str | None) -> PrefixIndex:
        index = self._indexes.get(model)
        if index is None:
            config = self._config
            index = self._indexes[model] = PrefixIndex(config.block_chars, config.max_tree_size, self._kv_chars)
        return index

    def _kv_chars(self, worker: Worker) -> int:
        """The worker's prefix-cache size in characters: --worker-kv-tokens, else what the worker reported; this
        gateway's share of it when others fill it too (`on_engine_loads`).

        Requests for gRPC workers are indexed by token ids, TOKEN_CHARS characters each (no estimate needed)."""
        tokens = self._config.worker_kv_tokens
        if not tokens:
            reported = worker.labels.get(KV_TOKENS_LABEL, "")
            tokens = int(reported) if reported.isdigit() else 0
        return int(tokens * self._chars_per_token(worker) / self._sharers)

    def _observed(self, view: FleetView) -> bool:
        """Whether every candidate's engine reports its cache (KV events): remembered per view until a feed changes."""
        engines = self._engines
        if not engines.block_chars:
            return False
        version, observed = view.observed
        if version != engines.version:
            observed = engines.observes(view.source)
            view.observed = (engines.version, observed)
        return observed

    def _engine_keys(
        self, view: FleetView, ctx: RequestContext, text: str, keys: list[int], ends: list[int]
    ) -> list[int] | None:
        """The prompt's engine-block keys when the engines decide what each candidate holds: every candidate's
        engine reports its cache, and the request is routed by the token ids the engines report (an HTTP request
        whose model has no tokenizer loaded is matched by its text on the index)."""
        return self._engines.keys(text, keys, ends) if ctx.by_tokens and self._observed(view) else None

    def _cache_chars(self, worker: Worker) -> int:
        """The worker's whole KV cache in characters (not this gateway's share of it): what its engine's reports
        fill."""
        chars = self._engine_chars.get(worker)
        if chars is None:
            chars = self._engine_chars[worker] = int(self._kv_chars(worker) * self._sharers) or 1
        return chars

    def _chars_per_token(self, worker: Worker) -> float:
        """Requests are matched by token ids for gRPC engines and for HTTP ones publishing KV events."""
        by_ids = is_grpc_url(worker.base_url) or worker.kv_events_endpoints
        return TOKEN_CHARS if by_ids else self._config.chars_per_token

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
    @staticmethod
    def home(view: FleetView, text: str, keys: list[int], ends: list[int], common: int) -> WorkerEntry:
        """The prompt's home: its anchor block (the first one not every candidate holds) hashed onto the ring.

        Remembered per view by the anchor's key (the same prefix always has the same home on the same fleet)."""
        anchor = min(common, len(keys) - 1)
        homes = view.homes
        home = homes.get(keys[anchor])
        if home is None:
            start = ends[anchor - 1] if anchor else 0
            block = text[start : ends[anchor]].encode("utf-8", "surrogatepass")
            home = view.home(mix64(zlib.crc32(block) << 24 | anchor))
            if len(homes) >= HOMES_REMEMBERED:
                homes.clear()
            homes[keys[anchor]] = home
        return home

    def _traffic_cap(self, index: PrefixIndex, workers: int) -> float:
        """The recent traffic above which a busy worker is not chosen: --cache-max-share times the mean, and more
        than chance explains (the mean plus two standard deviations of a Poisson count), in the index's units."""
        if not self._max_share:
            return math.inf
        unit = index.unit
        mean = index.total_traffic / workers / unit  # in requests
        return max(self._max_share * mean, mean + 2 * math.sqrt(mean)) * unit

    def _least(self, entries: tuple[WorkerEntry, ...]) -> tuple[WorkerEntry, float, Sequence[WorkerEntry]]:
        """The candidate with the fewest requests in flight, and the mean in flight, exactly or over a random sample
        of a large fleet (returned too)."""
        count = len(entries)
        if count <= SCAN_LIMIT:
            pool: Sequence[WorkerEntry] = entries
        else:  # a window at a random offset: every worker is as likely to be in it, and slicing is C-speed
            start = int(self._rng.random() * count)
            pool = entries[start : start + SAMPLES]
            if len(pool) < SAMPLES:
                pool += entries[: SAMPLES - len(pool)]
        least = pool[0]
        least_load = least.worker.load
        total = 0
        for entry in pool:
            load = entry.worker.load
            total += load
            if load < least_load:
                least, least_load = entry, load
        self.examined += len(pool)
        return least, total / len(pool), pool

    def _choose(
        self,
        index: PrefixIndex,
        view: FleetView,
        text: str,
        keys: list[int],
        ends: list[int],
        blocks: list[int] | None = None,
        report: dict[str, Any] | None = None,
    ) -> tuple[WorkerEntry, int]:
        """The cheapest candidate, and how much of the prompt the index believes it holds (characters).

        `blocks`: the prompt's engine-block keys, when every candidate's engine reports its cache (they decide what
        each holds). With `report` (`explain`): fills it with every candidate's terms and changes nothing."""
        entries = view.entries
        least, mean_load, pool = self._least(entries)
        if not keys:
            if report is not None:
                report["least_loaded"] = least.worker.url
            return least, 0
        length = ends[-1]
        engines = self._engines
        observed = blocks is not None
        if blocks is not None:  # the engines say what they hold: their blocks replace the index's model of them
            depth, common_blocks = engines.match(blocks, len(entries))
            block_chars = engines.block_chars
            known = depth * block_chars
            specific = depth > common_blocks
            holders = self._engine_holders(index, view, blocks[depth - 1]) if depth else []
            common = bisect.bisect_right(ends, common_blocks * block_chars)
        else:
            depth, holders, common = index.longest_match(keys, view.members, HOLDERS_PROBED, len(entries))
            known = ends[depth - 1] if depth else 0
            specific = depth > common
        home = ring_home = self.home(view, text, keys, ends, common)
        if not specific and (self._alone or (observed and self._polled)):
            # No other replica follows the ring, or all see the engines' own reports: a prompt nobody holds goes
            # where it will stay cached longest.
            turnover = _turnover if self._alone else self._engine_turnover
            slowest = min(pool, key=turnover)
            if turnover(slowest) < turnover(home):
                home = slowest
        # What this replica has not seen of the prompt may be at its home, but only when it knows nothing specific
        # about the prompt (no holder beyond what every worker holds): a known holder is better evidence.
        home_chars = length if index.foreign > REPLICA_EVIDENCE else self._home_chars
        presumed = 0 if specific else known + min(length - known, home_chars)
        # A worker's expected load: its share of recent traffic times the fleet's requests in flight.
        per_traffic = mean_load * len(entries) / index.total_traffic if index.total_traffic else 0.0
        traffic_cap = self._traffic_cap(index, len(entries))
        least_load = least.worker.load
        least_limit = self._running_limit(least.worker)
        least_has_room = not least_limit or least_load < least_limit
        abs_threshold, rel_threshold, queue_chars = self._abs, self._rel, self._queue_chars
        pending_prefill_weight = self._pending_prefill_weight
        limits = self._running_limits

        candidates = [least] if home is least else [least, home]
        candidates += [entry for entry in holders if entry is not least and entry is not home]
        best = least
        best_cost = best_matched = 0
        costed: list[dict[str, Any]] = [] if report is not None else _NOT_REPORTED
        for entry in candidates:
            worker = entry.worker
            load = worker.load
            excluded = None
            if entry is not least:
                if load - least_load > abs_threshold and load > rel_threshold * least_load:
                    excluded = "imbalance"  # SMG's imbalance rule
                elif entry.traffic > traffic_cap and load > mean_load:
                    excluded = "share_cap"  # busier than average and above --cache-max-share of recent requests
                elif least_has_room:
                    limit = limits.get(worker)
                    if limit is None:
                        limit = self._running_limit(worker)
                    if limit and load >= limit:
                        excluded = "full_batch"  # the request would wait for a slot, not just queue
                if excluded:
                    if report is not None:
                        costed.append({"worker": worker.url, "load": load, "excluded": excluded})
                    continue
            expected = entry.traffic * per_traffic
            if blocks is not None:
                matched = known if depth and entry in holders else engines.depth(worker, blocks, depth) * block_chars
                fill = engines.blocks_held(worker) * block_chars / self._cache_chars(worker)
            else:
                matched = known if depth and entry in holders else entry.matched(keys, ends, depth)
                fill = entry.chars / entry.char_capacity
            uncached = length - (presumed if entry is home and presumed > matched else matched)
            cost = (
                queue_chars * (load if load > expected else expected)
                + pending_prefill_weight * worker.prefill_pending
                + uncached * (1 + (fill if fill < 1 else 1))
            )
            if report is not None:
                costed.append({"worker": worker.url, "load": load, "expected_load": round(expected, 3),
                               "prefill_pending_chars": worker.prefill_pending, "matched_chars": matched,
                               "uncached_chars": uncached, "fill": round(min(fill, 1.0), 4), "cost": round(cost, 1),
                               "excluded": None})  # fmt: skip
            if (
                entry is least
                or cost < best_cost
                or (cost == best_cost and (matched > best_matched or (matched == best_matched and entry is home)))
            ):
                best, best_cost, best_matched = entry, cost, matched
        if report is not None:
            report.update(
                engine_events=observed,
                known_chars=known,
                common_chars=ends[common - 1] if common else 0,
                least_loaded=least.worker.url,
                home=home.worker.url,
                home_on_ring=home is ring_home,
                home_presumed_chars=presumed,
                candidates=costed,
            )
            return best, best_matched
        self.examined += len(candidates)
        if depth and best_matched == known and not observed:
            index.rotate_holder(best, keys[depth - 1])
        return best, best_matched

    def _engine_turnover(self, entry: WorkerEntry) -> float:
        """What the entry's engine stored lately over its cache size: how soon a prefix placed there is evicted."""
        worker = entry.worker
        return self._engines.stored(worker) / self._cache_chars(worker)

    def _engine_holders(self, index: PrefixIndex, view: FleetView, key: int) -> list[WorkerEntry]:
        """Up to HOLDERS_PROBED candidates whose engines hold (or were just sent) the block `key`."""
        found: list[WorkerEntry] = []
        entries, members = index.entries, view.members
        for worker in self._engines.holders(key):
            entry = entries.get(worker)
            if entry is not None and entry in members and entry not in found:
                found.append(entry)
                if len(found) == HOLDERS_PROBED:
                    break
        return found

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
