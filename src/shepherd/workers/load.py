"""The one place where a worker's in-flight counter goes up and down."""

from __future__ import annotations

import time

from shepherd.workers.breaker import CircuitState
from shepherd.workers.worker import Worker


class Lease:
    """Counts one request on a worker for as long as the `with` block lasts, whatever way it ends; while the
    worker's breaker is half-open the request is also one of its limited trials."""

    __slots__ = ("_started", "_trial", "ok", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.ok = False
        self._started = 0.0
        self._trial: int | None = None

    def __enter__(self) -> Lease:
        worker = self.worker
        worker.load += 1
        worker.requests_total += 1
        if worker.breaker.state is CircuitState.HALF_OPEN:
            self._trial = worker.breaker.begin_trial()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        worker = self.worker
        worker.load -= 1
        if self._trial is not None:
            worker.breaker.end_trial(self._trial)
        if self.ok:
            worker.record_latency(time.monotonic() - self._started)
