"""Level-triggered reconciliation shared by every discovery provider.

A provider only says what it wants: `{url -> DesiredWorker}`. The reconciler compares that with the workers the
same source owns in the registry (and its registrations in flight) and closes the gap through the WorkerManager:

- a registered worker whose url is no longer wanted, or is wanted with a different identity (a new pod uid at the
  same IP, a changed role or bootstrap port, a new API key), is drained and removed;
- a registered worker that is still wanted but not addable (its pod turned NotReady) stays registered but leaves
  routing at once (`Worker.routing_hold`), and comes back when it is addable again, as a Kubernetes Service does;
- a wanted, addable url with nothing registered is submitted for registration; a replaced worker is re-added once
  its predecessor has left the registry (a removal triggers another pass);
- a registration in flight for a url that is no longer wanted (or wanted differently) is cancelled.

Workers of other sources (static `--worker-urls`, the admin API, another provider) are never touched; a wanted url
held by one of them is left alone with a warning. Because each pass starts from the full desired state, a missed
event is repaired by the next pass, which runs after every change and on the provider's interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from shepherd.discovery import metrics
from shepherd.urls import display_url
from shepherd.workers.manager import DuplicateWorker, Job, WorkerManager, WorkerSpec
from shepherd.workers.worker import Worker, WorkerStatus

log = logging.getLogger(__name__)

PROVIDER_LABEL = "smg.ai/discovery-provider"
ID_LABEL = "smg.ai/discovery-id"
SPEC_HASH_LABEL = "smg.ai/discovery-spec-hash"


@dataclass(frozen=True, slots=True)
class DesiredWorker:
    """One worker a provider wants; build it with `desired_worker`."""

    spec: WorkerSpec
    spec_hash: str
    addable: bool = True  # False reserves the url (e.g. a pod not Ready yet) without registering it
    description: str = ""  # for logs: "pod: worker-0 (10.0.0.5:8000)"

    def matches(self, worker: Worker) -> bool:
        return (
            worker.labels.get(SPEC_HASH_LABEL) == self.spec_hash
            and worker.api_key == self.spec.api_key
            and _userinfo(worker.base_url) == _userinfo(self.spec.url)
        )


def address(url: str) -> str:
    """`host:port` of a worker URL: a worker registered at `http://` or `grpc://` is the one wanted at `host:port`
    (a pod is wanted without a scheme, and registration finds out which protocol it speaks)."""
    return url.split("://", 1)[-1]


def _userinfo(url: str) -> str:
    """The credentials of a worker URL (`user:password`), or ''."""
    return address(url).partition("/")[0].rpartition("@")[0]


def desired_worker(
    spec: WorkerSpec, discovery_id: str, *, addable: bool = True, description: str = ""
) -> DesiredWorker:
    """Stamp the provider's labels and a hash of everything that defines the worker onto `spec`.

    The hash leaves out the API key and a password in the URL (labels are public); `DesiredWorker.matches` compares
    those directly.
    """
    spec.labels[PROVIDER_LABEL] = spec.source
    spec.labels[ID_LABEL] = discovery_id
    identity = {
        "url": display_url(spec.url),
        "worker_type": spec.worker_type.value,
        "bootstrap_port": spec.bootstrap_port,
        "labels": spec.labels,
        "priority": spec.priority,
        "cost": spec.cost,
        "model_id": spec.model_id,
    }
    digest = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    spec.labels[SPEC_HASH_LABEL] = digest
    return DesiredWorker(spec, digest, addable, description or display_url(spec.url))


@dataclass(slots=True)
class _Pass:
    """Counts of one reconciliation, for the debug log."""

    added: int = 0
    removed: int = 0
    cancelled: int = 0


class Reconciler:
    """Drives the registry towards `desired()` for one source; all methods run on the event loop."""

    def __init__(
        self,
        manager: WorkerManager,
        source: str,
        desired: Callable[[], Mapping[str, DesiredWorker]],
        coalesce_secs: float = 0.2,
    ) -> None:
        self._manager = manager
        self._registry = manager.registry
        self._source = source
        self._desired = desired
        self._coalesce_secs = coalesce_secs
        self._jobs: dict[str, Job] = {}  # url -> our registration in flight
        self._held_elsewhere: set[str] = set()  # urls wanted but registered by another source (warned once)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        metrics.preregister(source)
        self._registry.subscribe(on_removed=self._on_removed)

    def schedule(self) -> None:
        """Reconcile soon; a burst of changes within the coalescing window costs one pass."""
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self._coalesce_secs, self._run_scheduled)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run_scheduled(self) -> None:
        self._timer = None
        self.reconcile()

    def _on_removed(self, worker: Worker) -> None:
        # A replaced worker has left: its successor can be registered now.
        if worker.source == self._source:
            self.schedule()

    def reconcile(self) -> None:
        if self._closed:
            return
        started = time.perf_counter()
        desired = {address(url): want for url, want in self._desired().items()}
        metrics.WORKERS_DISCOVERED.labels(self._source).set(len(desired))
        owned: dict[str, list[Worker]] = {}
        for worker in self._registry.all():
            if worker.source == self._source:
                owned.setdefault(address(worker.base_url), []).append(worker)
        outcome = _Pass()
        self._remove_unwanted(desired, owned, outcome)
        self._hold_unready(desired, owned)
        self._cancel_unwanted_jobs(desired, outcome)
        self._add_missing(desired, owned, outcome)
        self._held_elsewhere &= desired.keys()
        elapsed = time.perf_counter() - started
        metrics.SYNC_DURATION.labels(self._source).observe(elapsed)
        log.debug(
            "%s discovery: reconciled %d desired, %d registered: %d added, %d removed, %d cancelled in %.1f ms",
            self._source,
            len(desired),
            len(owned),
            outcome.added,
            outcome.removed,
            outcome.cancelled,
            elapsed * 1000,
        )

    def _remove_unwanted(
        self, desired: Mapping[str, DesiredWorker], owned: dict[str, list[Worker]], outcome: _Pass
    ) -> None:
        for url, workers in owned.items():
            want = desired.get(url)
            if want is not None and want.matches(workers[0]):
                continue
            live = [w for w in workers if w.status is not WorkerStatus.DRAINING]
            if not live:
                continue  # already leaving
            reason = "no longer discovered" if want is None else f"replaced by {want.description}"
            log.info("Removing worker: %s (%s)", display_url(url), reason)
            for worker in live:
                self._manager.submit_remove(worker)
            metrics.DEREGISTRATIONS.labels(self._source, "reconciled").inc()
            outcome.removed += 1

    def _hold_unready(self, desired: Mapping[str, DesiredWorker], owned: dict[str, list[Worker]]) -> None:
        for url, workers in owned.items():
            want = desired.get(url)
            if want is None or not want.matches(workers[0]):
                continue  # being removed
            reason = None if want.addable else f"{want.description} is not ready"
            for worker in workers:
                self._registry.set_routing_hold(worker, reason)

    def _cancel_unwanted_jobs(self, desired: Mapping[str, DesiredWorker], outcome: _Pass) -> None:
        for url, job in list(self._jobs.items()):
            want = desired.get(url)
            if want is not None and want.addable and want.spec_hash == job.spec.labels.get(SPEC_HASH_LABEL):
                continue
            log.info("Cancelling registration of %s: no longer wanted as submitted", display_url(url))
            self._manager.cancel_job(job)
            del self._jobs[url]
            outcome.cancelled += 1

    def _add_missing(
        self, desired: Mapping[str, DesiredWorker], owned: dict[str, list[Worker]], outcome: _Pass
    ) -> None:
        for url, want in desired.items():
            if not want.addable or url in owned or url in self._jobs:
                continue
            try:
                job = self._manager.submit_add(want.spec)
            except DuplicateWorker as exc:
                if url not in self._held_elsewhere:
                    self._held_elsewhere.add(url)
                    log.warning("Discovered %s but %s; leaving that worker alone", want.description, exc)
                continue
            log.info("Discovered new %s", want.description)
            self._jobs[url] = job
            if job.task is not None:
                job.task.add_done_callback(lambda task, url=url, job=job: self._on_job_done(url, job, task))
            outcome.added += 1

    def _on_job_done(self, url: str, job: Job, task: asyncio.Task) -> None:
        if self._jobs.get(url) is job:
            del self._jobs[url]
        if task.cancelled():
            return
        if job.status == "failed":
            metrics.REGISTRATIONS.labels(self._source, "failed").inc()
            # Forget the failed job; the next periodic pass tries again if the worker is still wanted.
            self._manager.cancel_job(job)
            return
        metrics.REGISTRATIONS.labels(self._source, "success").inc()
        log.info("Registered worker: %s", display_url(url))
