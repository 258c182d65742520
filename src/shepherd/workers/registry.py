"""The single source of truth for the fleet.

The data plane reads immutable snapshots (tuples of routable workers per type and model, in registration order)
that change only when something changes, so picking a worker never scans or locks the whole fleet. A change to one
worker (added, removed, its status, breaker or routing hold) updates only the two snapshots it belongs to, in C-speed
tuple operations rather than a Python pass over the fleet: registering 4,000 workers one by one would otherwise cost
a quadratic 6 s of event-loop time.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.workers.breaker import CircuitBreaker, CircuitState
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType

log = logging.getLogger(__name__)

WorkerListener = Callable[[Worker], None]
BreakerListener = Callable[[str, CircuitState, CircuitState], None]  # (worker url, old, new)
SnapshotKey = tuple[WorkerType, str | None]
_ANY_MODEL = None


class Registry:
    def __init__(self) -> None:
        self._by_id: dict[str, Worker] = {}
        self._by_url: dict[str, Worker] = {}
        self._by_base: dict[str, list[Worker]] = {}  # base URL -> its workers (DP ranks share one)
        self._order: dict[Worker, int] = {}  # registration sequence: the order of every snapshot
        self._next_order = 0
        self._routable: dict[SnapshotKey, tuple[Worker, ...]] = {}
        self._placed: set[Worker] = set()  # the workers in the snapshots
        self._served: dict[WorkerType, Counter[str]] = {}  # workers that could serve each model, routable or not
        self._grpc_routable: Counter[str | None] = Counter()
        # Workers whose engines publish KV events over ZeroMQ, by (type, model) and (type, None) for any model.
        self._publishing: Counter[tuple[WorkerType, str | None]] = Counter()
        self._on_added: list[WorkerListener] = []
        self._on_removed: list[WorkerListener] = []
        self._on_changed: list[WorkerListener] = []
        self._on_breaker: list[BreakerListener] = []
        self._reopen_timer: asyncio.TimerHandle | None = None
        self._reopen_at = 0.0  # loop time the reopen timer fires at
        self._tokenized_models: frozenset[str] = frozenset()
        # Registrations under way (the worker manager's jobs, however they end): while no worker is registered, a
        # request hears that workers are coming (503, retry) rather than that none serves its model (404).
        self.registrations_pending = 0

    # --- subscriptions -------------------------------------------------------------------------------------
    def subscribe(
        self,
        on_added: WorkerListener | None = None,
        on_removed: WorkerListener | None = None,
        on_changed: WorkerListener | None = None,
        on_breaker: BreakerListener | None = None,
    ) -> None:
        """Policies and observers learn about the fleet here; callbacks must not block."""
        if on_added:
            self._on_added.append(on_added)
        if on_removed:
            self._on_removed.append(on_removed)
        if on_changed:
            self._on_changed.append(on_changed)
        if on_breaker:
            self._on_breaker.append(on_breaker)

    # --- membership ----------------------------------------------------------------------------------------
    def add(self, worker: Worker) -> None:
        if worker.url in self._by_url:
            raise ValueError(f"worker {worker.url} is already registered")
        self._by_id[worker.id] = worker
        self._by_url[worker.url] = worker
        self._by_base.setdefault(worker.base_url, []).append(worker)
        self._order[worker] = self._next_order
        self._next_order += 1
        if self.can_serve(worker):
            self._served.setdefault(worker.worker_type, Counter())[worker.model_id] += 1
        if worker.kv_events_endpoints:
            self._publishing.update(((worker.worker_type, worker.model_id), (worker.worker_type, None)))
        # A half-open worker's trial slots filled up or one freed: it leaves or rejoins the candidates.
        worker.breaker.on_trials = lambda _breaker: self._update(worker)
        self._update(worker)
        for listener in self._on_added:
            listener(worker)

    def remove(self, worker: Worker) -> None:
        if self._by_id.pop(worker.id, None) is None:
            return
        self._by_url.pop(worker.url, None)
        siblings = self._by_base[worker.base_url]
        siblings.remove(worker)
        if not siblings:
            del self._by_base[worker.base_url]
        worker.breaker.on_trials = None
        self._place(worker, False)
        del self._order[worker]
        if self.can_serve(worker):
            self._served[worker.worker_type][worker.model_id] -= 1
        if worker.kv_events_endpoints:
            self._publishing.subtract(((worker.worker_type, worker.model_id), (worker.worker_type, None)))
        for listener in self._on_removed:
            listener(worker)

    def get(self, worker_id: str) -> Worker | None:
        return self._by_id.get(worker_id)

    def by_url(self, url: str) -> Worker | None:
        return self._by_url.get(url)

    def at_base_url(self, base_url: str) -> list[Worker]:
        """The workers whose requests go to `base_url` (several for DP ranks)."""
        return list(self._by_base.get(base_url, ()))

    def all(self) -> list[Worker]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    # --- state changes -------------------------------------------------------------------------------------
    def set_status(self, worker: Worker, status: WorkerStatus) -> None:
        if worker.status is status:
            return
        old, worker.status = worker.status, status
        log.info("worker %s: %s -> %s", worker.url, old.value, status.value)
        self.changed(worker)

    def set_routing_hold(self, worker: Worker, reason: str | None) -> None:
        """Keep a registered worker out of routing (`reason`) or let it back (None), whatever its health says."""
        if worker.routing_hold == reason:
            return
        worker.routing_hold = reason
        if reason is None:
            log.info("worker %s: back in routing", worker.url)
        else:
            log.info("worker %s: out of routing: %s", worker.url, reason)
        self.changed(worker)

    def changed(self, worker: Worker | None = None) -> None:
        """Something that affects a worker's routability changed (status, breaker, hold); None: re-judge them all."""
        if worker is None:
            self._rebuild()
            return
        if worker.id in self._by_id:
            self._update(worker)
        for listener in self._on_changed:
            listener(worker)

    def breaker_listener(self, worker_url: str) -> Callable[[CircuitBreaker, CircuitState, CircuitState], None]:
        """A transition listener for a worker's breaker that keeps the snapshots right."""

        def on_transition(_breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
            log.warning("worker %s: circuit %s -> %s", worker_url, old.value, new.value)
            for listener in self._on_breaker:
                listener(worker_url, old, new)
            worker = self._by_url.get(worker_url)
            if worker is not None and new is not CircuitState.HALF_OPEN:
                self.changed(worker)

        return on_transition

    # --- reads for the data plane --------------------------------------------------------------------------
    def candidates(self, worker_type: WorkerType, model: str | None) -> tuple[Worker, ...]:
        """Routable workers (ready; circuit closed, or half-open with a trial slot free) of a type serving `model`
        (None: any model)."""
        return self._routable.get((worker_type, model), ())

    def set_tokenized_models(self, models: frozenset[str]) -> None:
        """The models the gateway has a tokenizer for: only their gRPC workers are routable."""
        if models != self._tokenized_models:
            self._tokenized_models = models
            self._rebuild()

    def has_grpc(self, model: str | None) -> bool:
        """Whether routable gRPC workers serve `model` (None: any model); cheap, read per request."""
        return self._grpc_routable[model] > 0

    def publishes_kv_events(self, worker_type: WorkerType, model: str | None) -> bool:
        """Whether a registered worker of the type serving `model` (None: any model) has an engine publishing KV
        events over ZeroMQ; cheap, read per request."""
        return self._publishing[worker_type, model] > 0

    def can_serve(self, worker: Worker) -> bool:
        """Whether requests can be sent to this worker once it is ready: a gRPC worker needs its tokenizer."""
        return not is_grpc_url(worker.base_url) or worker.model_id in self._tokenized_models

    def awaiting_tokenizer(self, model: str | None) -> bool:
        """Whether ready gRPC workers serve `model` but cannot be routed to for want of its tokenizer."""
        return any(
            w.status is WorkerStatus.READY and not self.can_serve(w)
            for w in self._by_id.values()
            if model is None or w.model_id == model
        )

    def serves(self, worker_type: WorkerType, model: str) -> bool:
        """Whether any registered worker of the type serves `model`, routable or not."""
        served = self._served.get(worker_type)
        return served is not None and served[model] > 0

    def models(self) -> list[str]:
        """Models with a worker that could serve them: every HTTP worker's, a gRPC worker's once its tokenizer
        is loaded."""
        return sorted({model for served in self._served.values() for model, count in served.items() if count > 0})

    def of_type(self, worker_type: WorkerType) -> list[Worker]:
        return [w for w in self._by_id.values() if w.worker_type is worker_type]

    def _routable_now(self, worker: Worker) -> bool:
        """Ready, not held, servable (a gRPC worker takes token ids: it needs its model's tokenizer) and its breaker
        allows traffic: closed, or half-open with a trial slot free. An open breaker turns half-open by time alone,
        so the registry re-judges every worker when the earliest one is due."""
        if worker.status is not WorkerStatus.READY or worker.routing_hold or not self.can_serve(worker):
            return False
        breaker = worker.breaker
        if breaker.allows():
            return True
        if breaker.state is CircuitState.OPEN:
            self._schedule_reopen(breaker.reopen_in())
        return False

    def _update(self, worker: Worker) -> None:
        """Re-judge one worker: it joins or leaves its snapshots."""
        self._place(worker, self._routable_now(worker))

    def _place(self, worker: Worker, routable: bool) -> None:
        """Put `worker` into (or take it out of) its type's snapshot and its model's, keeping registration order."""
        if routable == (worker in self._placed):
            return
        grpc = is_grpc_url(worker.base_url)
        for key in _snapshot_keys(worker):
            current = self._routable.get(key, ())
            if routable:
                order = self._order
                if not current or order[current[-1]] < order[worker]:  # the common case: the newest worker
                    self._routable[key] = (*current, worker)
                else:
                    at = bisect.bisect(current, order[worker], key=order.__getitem__)
                    self._routable[key] = (*current[:at], worker, *current[at:])
            elif len(current) == 1:
                del self._routable[key]
            else:
                at = current.index(worker)
                self._routable[key] = current[:at] + current[at + 1 :]
            if grpc:
                self._grpc_routable[key[1]] += 1 if routable else -1
        if routable:
            self._placed.add(worker)
        else:
            self._placed.discard(worker)

    def _rebuild(self) -> None:
        """Re-judge every worker from scratch (a change that concerns them all, or an open breaker's timeout)."""
        if self._reopen_timer is not None:
            self._reopen_timer.cancel()
            self._reopen_timer = None
        routable: dict[SnapshotKey, list[Worker]] = {}
        self._placed = set()
        self._grpc_routable = Counter()
        self._served = {}
        for worker in self._by_id.values():  # registration order
            if self.can_serve(worker):
                self._served.setdefault(worker.worker_type, Counter())[worker.model_id] += 1
            if not self._routable_now(worker):
                continue
            self._placed.add(worker)
            for key in _snapshot_keys(worker):
                routable.setdefault(key, []).append(worker)
                if is_grpc_url(worker.base_url):
                    self._grpc_routable[key[1]] += 1
        self._routable = {key: tuple(workers) for key, workers in routable.items()}

    def _schedule_reopen(self, delay: float) -> None:
        """Re-judge every worker once an open breaker may be tried again (unless an earlier re-judging is due)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        when = loop.time() + delay + 0.001
        if self._reopen_timer is not None:
            if self._reopen_at <= when:
                return
            self._reopen_timer.cancel()
        self._reopen_at = when
        self._reopen_timer = loop.call_at(when, self._on_reopen)

    def _on_reopen(self) -> None:
        self._reopen_timer = None
        self._rebuild()


def _snapshot_keys(worker: Worker) -> tuple[SnapshotKey, SnapshotKey]:
    """The snapshots a routable worker is in: its type's for any model, and its type's for its model."""
    return (worker.worker_type, _ANY_MODEL), (worker.worker_type, worker.model_id)


def count_by_type(workers: Iterable[Worker]) -> dict[str, int]:
    stats = {"regular_count": 0, "prefill_count": 0, "decode_count": 0}
    for worker in workers:
        stats[f"{worker.worker_type.value}_count"] += 1
    return stats
