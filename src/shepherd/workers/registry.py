"""The single source of truth for the fleet.

The data plane reads immutable snapshots (tuples of routable workers per type and model) that are rebuilt
only when something changes, so picking a worker never scans or locks the whole fleet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.workers.breaker import CircuitBreaker, CircuitState
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType

log = logging.getLogger(__name__)

WorkerListener = Callable[[Worker], None]
BreakerListener = Callable[[str, CircuitState, CircuitState], None]  # (worker url, old, new)
_ANY_MODEL = None


class Registry:
    def __init__(self) -> None:
        self._by_id: dict[str, Worker] = {}
        self._by_url: dict[str, Worker] = {}
        self._routable: dict[tuple[WorkerType, str | None], tuple[Worker, ...]] = {}
        self._models: dict[WorkerType, frozenset[str]] = {}
        self._on_added: list[WorkerListener] = []
        self._on_removed: list[WorkerListener] = []
        self._on_changed: list[WorkerListener] = []
        self._on_breaker: list[BreakerListener] = []
        self._reopen_timer: asyncio.TimerHandle | None = None
        self._tokenized_models: frozenset[str] = frozenset()
        self._grpc_models: frozenset[str | None] = frozenset()  # models with routable gRPC workers (None: any)

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
        worker.breaker.on_trials = self._on_trials
        self._rebuild()
        for listener in self._on_added:
            listener(worker)

    def remove(self, worker: Worker) -> None:
        if self._by_id.pop(worker.id, None) is None:
            return
        self._by_url.pop(worker.url, None)
        worker.breaker.on_trials = None
        self._rebuild()
        for listener in self._on_removed:
            listener(worker)

    def get(self, worker_id: str) -> Worker | None:
        return self._by_id.get(worker_id)

    def by_url(self, url: str) -> Worker | None:
        return self._by_url.get(url)

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
        """Something that affects routability changed (status, breaker, model)."""
        self._rebuild()
        if worker is not None:
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

    def _on_trials(self, _breaker: CircuitBreaker) -> None:
        # A half-open worker's trial slots filled up or one freed: it leaves or rejoins the candidates.
        self._rebuild()

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
        return model in self._grpc_models

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
        return model in self._models.get(worker_type, frozenset())

    def models(self) -> list[str]:
        """Models with a worker that could serve them: every HTTP worker's, a gRPC worker's once its tokenizer
        is loaded."""
        names: set[str] = set()
        for models in self._models.values():
            names |= models
        return sorted(names)

    def of_type(self, worker_type: WorkerType) -> list[Worker]:
        return [w for w in self._by_id.values() if w.worker_type is worker_type]

    def _rebuild(self) -> None:
        routable: dict[tuple[WorkerType, str | None], list[Worker]] = {}
        models: dict[WorkerType, set[str]] = {}
        next_reopen: float | None = None
        grpc_models: set[str | None] = set()
        for worker in self._by_id.values():
            if self.can_serve(worker):
                models.setdefault(worker.worker_type, set()).add(worker.model_id)
            if worker.status is not WorkerStatus.READY or worker.routing_hold or not self.can_serve(worker):
                continue  # a gRPC worker takes token ids: without its model's tokenizer, nothing can be sent to it
            breaker = worker.breaker
            if not breaker.allows():
                if breaker.state is CircuitState.OPEN:
                    wait = breaker.reopen_in()
                    next_reopen = wait if next_reopen is None else min(next_reopen, wait)
                continue  # open, or half-open with every trial slot taken (a trial's end rebuilds)
            routable.setdefault((worker.worker_type, _ANY_MODEL), []).append(worker)
            routable.setdefault((worker.worker_type, worker.model_id), []).append(worker)
            if is_grpc_url(worker.base_url):
                grpc_models.update((_ANY_MODEL, worker.model_id))
        self._routable = {key: tuple(workers) for key, workers in routable.items()}
        self._models = {key: frozenset(names) for key, names in models.items()}
        self._grpc_models = frozenset(grpc_models)
        self._schedule_reopen(next_reopen)

    def _schedule_reopen(self, delay: float | None) -> None:
        """Open breakers turn half-open by time alone, so rebuild when the earliest one is due."""
        if self._reopen_timer is not None:
            self._reopen_timer.cancel()
            self._reopen_timer = None
        if delay is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reopen_timer = loop.call_later(delay + 0.001, self._rebuild)


def count_by_type(workers: Iterable[Worker]) -> dict[str, int]:
    stats = {"regular_count": 0, "prefill_count": 0, "decode_count": 0}
    for worker in workers:
        stats[f"{worker.worker_type.value}_count"] += 1
    return stats
