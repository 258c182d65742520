"""The desired-state reconciler against a real WorkerManager and Registry, with in-process simulated workers."""

from __future__ import annotations

import argparse

import pytest
from prometheus_client import REGISTRY

from shepherd.config import GatewayConfig
from shepherd.discovery.reconciler import SPEC_HASH_LABEL, DesiredWorker, Reconciler, desired_worker
from shepherd.sim.config import SimConfig, add_sim_arguments
from shepherd.sim.server import SimServer
from shepherd.upstream.client import UpstreamClient
from shepherd.workers.manager import WorkerManager, WorkerSpec
from shepherd.workers.registry import Registry
from shepherd.workers.worker import WorkerStatus
from tests.support.polling import until
from tests.support.processes import free_port

SOURCE = "kubernetes"


@pytest.fixture
async def sim_urls():
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    server = SimServer(SimConfig.from_args(parser.parse_args(["--port", "0", "--workers", "3"])))
    await server.start()
    yield server.urls
    await server.stop()


@pytest.fixture
async def manager():
    config = GatewayConfig(worker_startup_timeout_secs=1.0, worker_startup_check_interval=0.1, drain_timeout_secs=0.5)
    client = UpstreamClient()
    manager = WorkerManager(Registry(), client, config)
    yield manager
    await manager.close()
    await client.close()


class Wanted:
    """The provider side of a test: a mutable desired state."""

    def __init__(self) -> None:
        self.workers: dict[str, DesiredWorker] = {}

    def want(self, url: str, uid: str = "uid-1", addable: bool = True, api_key: str | None = None) -> DesiredWorker:
        spec = WorkerSpec(url, api_key=api_key, labels={"smg.ai/pod-uid": uid}, source=SOURCE)
        self.workers[url] = desired_worker(spec, f"default/{uid}", addable=addable, description=f"pod: {uid}")
        return self.workers[url]

    def __call__(self) -> dict[str, DesiredWorker]:
        return self.workers


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": SOURCE, **labels}) or 0.0


def owned(manager: WorkerManager) -> dict[str, str]:
    """url -> pod uid label of the discovery-owned workers."""
    return {w.url: w.labels["smg.ai/pod-uid"] for w in manager.registry.all() if w.source == SOURCE}


async def test_registers_wanted_workers_with_discovery_labels(manager, sim_urls):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    successes = metric("smg_discovery_registrations_total", result="success")
    want = wanted.want(sim_urls[0])
    reconciler.reconcile()
    await until(lambda: owned(manager) == {sim_urls[0]: "uid-1"}, "registration")
    worker = manager.registry.by_url(sim_urls[0])
    assert worker.labels[SPEC_HASH_LABEL] == want.spec_hash
    assert worker.labels["smg.ai/discovery-provider"] == SOURCE
    assert worker.labels["smg.ai/discovery-id"] == "default/uid-1"
    assert worker.model_id == "sim-model"  # capabilities were discovered like any other registration
    await until(lambda: metric("smg_discovery_registrations_total", result="success") == successes + 1, "metric")
    assert metric("smg_discovery_workers_discovered") == 1


async def test_not_ready_pods_reserve_their_url_without_registering(manager, sim_urls):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(sim_urls[0], addable=False)
    reconciler.reconcile()
    assert not manager.jobs and not owned(manager)
    assert metric("smg_discovery_workers_discovered") == 1
    wanted.want(sim_urls[0], addable=True)
    reconciler.reconcile()
    await until(lambda: sim_urls[0] in owned(manager), "registration once ready")
    wanted.want(sim_urls[0], addable=False)  # readiness lost: the worker stays, the health checker judges it
    reconciler.reconcile()
    assert manager.registry.by_url(sim_urls[0]).status is WorkerStatus.READY


async def test_unwanted_workers_are_drained_and_removed(manager, sim_urls):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(sim_urls[0])
    wanted.want(sim_urls[1], uid="uid-2")
    reconciler.reconcile()
    await until(lambda: len(owned(manager)) == 2, "two registrations")
    removals = metric("smg_discovery_deregistrations_total", reason="reconciled")
    leaving = manager.registry.by_url(sim_urls[1])
    leaving.load = 1  # an in-flight request: the worker drains before it leaves
    del wanted.workers[sim_urls[1]]
    reconciler.reconcile()
    assert leaving.status is WorkerStatus.DRAINING
    assert metric("smg_discovery_deregistrations_total", reason="reconciled") == removals + 1
    leaving.load = 0
    await until(lambda: owned(manager) == {sim_urls[0]: "uid-1"}, "removal after drain")
    reconciler.reconcile()  # idempotent
    assert metric("smg_discovery_deregistrations_total", reason="reconciled") == removals + 1


async def test_workers_of_other_sources_are_never_touched(manager, sim_urls):
    static = manager.submit_add(WorkerSpec(sim_urls[0], source="static"))
    api = manager.submit_add(WorkerSpec(sim_urls[1], source="api"))
    await manager.wait_idle()
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(sim_urls[0])  # a pod at a url someone registered by hand
    reconciler.reconcile()
    reconciler.reconcile()
    assert not manager.jobs
    assert manager.registry.by_url(sim_urls[0]).id == static.worker_id
    wanted.workers.clear()
    reconciler.reconcile()
    assert {w.id for w in manager.registry.all()} == {static.worker_id, api.worker_id}
    assert all(w.status is WorkerStatus.READY for w in manager.registry.all())


async def test_a_new_identity_at_the_same_url_replaces_the_worker(manager, sim_urls):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(sim_urls[0], uid="uid-old")
    reconciler.reconcile()
    await until(lambda: owned(manager) == {sim_urls[0]: "uid-old"}, "first pod")
    old_id = manager.registry.by_url(sim_urls[0]).id
    wanted.want(sim_urls[0], uid="uid-new")
    reconciler.reconcile()  # drains the old worker; its removal triggers the pass that adds the new one
    await until(lambda: owned(manager) == {sim_urls[0]: "uid-new"}, "replacement")
    assert manager.registry.by_url(sim_urls[0]).id != old_id


async def test_a_changed_api_key_replaces_the_worker(manager, sim_urls):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(sim_urls[0], api_key="old")
    reconciler.reconcile()
    await until(lambda: sim_urls[0] in owned(manager), "registration")
    wanted.want(sim_urls[0], api_key="new")
    reconciler.reconcile()
    await until(lambda: getattr(manager.registry.by_url(sim_urls[0]), "api_key", None) == "new", "re-registration")


async def test_registration_in_flight_is_cancelled_when_no_longer_wanted(manager):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the registration keeps probing
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    wanted.want(dead)
    reconciler.reconcile()
    (job,) = manager.jobs.values()
    wanted.workers.clear()
    reconciler.reconcile()
    assert not manager.jobs
    await until(lambda: job.task.done(), "cancelled job")
    assert job.task.cancelled()


async def test_failed_registration_is_counted_forgotten_and_retried(manager):
    dead = f"http://127.0.0.1:{free_port()}"
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.01)
    failures = metric("smg_discovery_registrations_total", result="failed")
    wanted.want(dead)
    reconciler.reconcile()
    await until(
        lambda: metric("smg_discovery_registrations_total", result="failed") == failures + 1, "failure", timeout=5
    )
    assert not manager.jobs  # a failed job does not linger
    reconciler.reconcile()
    assert len(manager.jobs) == 1


async def test_a_burst_of_changes_costs_one_pass(manager):
    wanted = Wanted()
    reconciler = Reconciler(manager, SOURCE, wanted, coalesce_secs=0.05)
    passes = metric("smg_discovery_sync_duration_seconds_count")
    for _ in range(20):
        reconciler.schedule()
    await until(lambda: metric("smg_discovery_sync_duration_seconds_count") >= passes + 1, "the pass")
    reconciler.schedule()  # a later change gets its own pass, and no leftover of the burst runs with it
    await until(lambda: metric("smg_discovery_sync_duration_seconds_count") >= passes + 2, "the next pass")
    assert metric("smg_discovery_sync_duration_seconds_count") == passes + 2
    reconciler.close()
