"""The one place where a worker's in-flight counter goes up and down."""

from __future__ import annotations

import time

from shepherd.workers.worker import Worker


class Lease:
    """Counts one request on a worker for as long as the `with` block lasts, whatever way it ends."""

    __slots__ = ("_started", "ok", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.ok = False
        self._started = 0.0

    def __enter__(self) -> Lease:
        worker = self.worker
        worker.load += 1
        worker.requests_total += 1
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        worker = self.worker
        worker.load -= 1
        if self.ok:
            worker.latencies.append(time.monotonic() - self._started)
