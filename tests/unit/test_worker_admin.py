"""The worker admin API and registration jobs, in process: URL validation, PATCH atomicity, job expiry, probes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from shepherd.config import GatewayConfig, HealthCheckConfig
from shepherd.gateway import Gateway
from shepherd.urls import display_url, has_userinfo
from shepherd.workers import manager as manager_module
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.manager import DuplicateWorker, WorkerManager, WorkerSpec
from shepherd.workers.worker import Worker, WorkerStatus
from tests.support.app_server import AppClient, serving_gateway
from tests.support.polling import until
from tests.support.processes import free_port


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig(host="127.0.0.1", port=0, worker_startup_timeout_secs=0.2))
    try:
        yield gw
    finally:
        await gw.manager.close()
        await gw.client.close()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[AppClient]:
    async with serving_gateway(gateway) as test_client:
        yield test_client


def registered(gateway: Gateway, url: str = "http://127.0.0.1:9") -> Worker:
    worker = Worker(url, CircuitBreaker(gateway.config.circuit_breaker), model_id="m")
    worker.status = WorkerStatus.READY
    gateway.registry.add(worker)
    return worker


@pytest.mark.parametrize(
    "url",
    ["http://[::1", "[::1", "http://host:99999", "host:http", "http://", "ftp://host:1", "host", "http://h:1/?q=1"],
)
async def test_malformed_worker_urls_are_400_naming_url(client, url):
    resp = await client.post("/workers", json={"url": url})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "url"


async def test_credentials_in_a_url_are_for_http_only_and_never_echoed(client):
    for body, param in (
        ({"url": "grpc://user:pw-secret@host:1"}, "url"),
        ({"url": "user:pw-secret@host:1"}, "url"),  # bare: it could be probed as gRPC
        ({"url": "http://user:pw-secret@[::1"}, "url"),
        ({"url": "http://user:pw-secret@host:1", "api_key": "k"}, "api_key"),  # one credential per worker
    ):
        resp = await client.post("/workers", json=body)
        text = await resp.text()
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param, body
        assert "pw-secret" not in text
    resp = await client.post("/workers", json={"url": "https://user:pw-secret@host:1"})
    assert resp.status == 202 and (await resp.json())["url"] == "https://user:***@host:1"


async def test_bare_host_port_forms_are_accepted(client, gateway):
    for url in ("127.0.0.1:9", "[::1]:9", "worker-0.workers:8000"):
        resp = await client.post("/workers", json={"url": url})
        assert resp.status == 202, await resp.text()


async def test_priority_zero_is_kept(client, gateway):
    resp = await client.post("/workers", json={"url": "http://127.0.0.1:9", "priority": 0})
    assert resp.status == 202
    (job,) = gateway.manager.jobs.values()
    assert job.spec.priority == 0
    assert WorkerSpec.from_json({"url": "http://h:1"}).priority == 50  # the default when absent


async def test_patch_validates_everything_before_applying_anything(client, gateway):
    worker = registered(gateway)
    before = worker.to_json()
    for bad in (
        {"priority": 5, "cost": "cheap"},
        {"priority": 5, "labels": {"zone": "b"}, "api_key": 7},
        {"cost": 2, "labels": ["zone"]},
        {"priority": True},
        {"priority": 5, "cost": -1},  # the same rules as POST /workers
        {"priority": 5, "cost": float("inf")},
    ):
        resp = await client.patch(f"/workers/{worker.id}", json=bad)
        assert resp.status == 400, bad
        assert worker.to_json() == before, bad  # nothing applied
    resp = await client.patch(f"/workers/{worker.id}", json={"priority": 0, "cost": 2, "labels": {"zone": "b"}})
    assert resp.status == 202
    assert (worker.priority, worker.cost, worker.labels["zone"]) == (0, 2.0, "b")


async def test_failed_registrations_stay_queryable_then_expire(gateway, client):
    gateway.manager.finished_job_ttl_secs = 0.5
    dead = f"http://127.0.0.1:{free_port()}"
    resp = await client.post("/workers", json={"url": dead})
    worker_id = (await resp.json())["worker_id"]
    await gateway.manager.wait_idle()
    resp = await client.get(f"/workers/{worker_id}")
    job = await resp.json()
    assert resp.status == 200 and job["status"] == "failed" and job["job_status"]["status"] == "failed"

    await until(lambda: gateway.manager.job(worker_id) is None, "the failed job to expire", timeout=5)
    assert (await client.get(f"/workers/{worker_id}")).status == 404
    assert worker_id not in gateway.manager.jobs


async def test_finished_jobs_are_capped_oldest_first(gateway):
    manager = gateway.manager
    manager.max_finished_jobs = 3
    ids = []
    for _ in range(5):
        ids.append(manager.submit_add(WorkerSpec(f"http://127.0.0.1:{free_port()}")).worker_id)
        await manager.wait_idle()
    assert [job_id for job_id in ids if manager.job(job_id) is not None] == ids[2:]
    assert len(manager.jobs) == 3


class _Engine:
    """Answers 200 on /ping and 503 on /health: only a probe of the configured endpoint can register it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _any(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if request.path == "/ping":
            return web.json_response({})
        if request.path == "/server_info":
            return web.json_response({"model_path": "probe-model"})
        return web.Response(status=503 if request.path == "/health" else 404)

    async def __aenter__(self) -> _Engine:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_registration_probes_use_the_health_check_endpoint():
    config = GatewayConfig(health_check=HealthCheckConfig(endpoint="/ping"), worker_startup_timeout_secs=2)
    gateway = Gateway(config)
    manager: WorkerManager = gateway.manager
    try:
        async with _Engine() as engine:
            manager.submit_add(WorkerSpec(engine.url))
            await manager.wait_idle()
            (worker,) = gateway.registry.all()
            assert worker.model_id == "probe-model" and worker.status is WorkerStatus.READY
            assert "/ping" in engine.paths and "/health" not in engine.paths
    finally:
        await manager.close()
        await gateway.client.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@h:1", "http://user:***@h:1"),
        ("http://user:p@ss@h:1/x", "http://user:***@h:1/x"),  # an unescaped @ in the password
        ("https://token@h", "https://***@h"),  # a lone userinfo may itself be a secret
        ("http://h:1", "http://h:1"),
        ("grpc://h:1", "grpc://h:1"),
        ("h:1", "h:1"),
        ("http://h:1/a@b", "http://h:1/a@b"),  # an @ in the path is not userinfo
    ],
)
def test_display_url_masks_credentials(url, shown):
    assert display_url(url) == shown
    assert has_userinfo(url) == (shown != url)


async def test_a_url_duplicates_a_registered_or_pending_worker_at_the_same_address(gateway):
    manager = gateway.manager
    worker = registered(gateway, "http://127.0.0.1:9")
    for url in ("http://127.0.0.1:9", "127.0.0.1:9"):  # a bare host:port names whatever answers there
        with pytest.raises(DuplicateWorker) as raised:
            manager.submit_add(WorkerSpec(url))
        assert raised.value.worker_id == worker.id
    bare, full = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    pending = manager.submit_add(WorkerSpec(bare))
    manager.submit_add(WorkerSpec(full))
    for url in (bare, full, full.removeprefix("http://")):
        with pytest.raises(DuplicateWorker):
            manager.submit_add(WorkerSpec(url))
    manager.cancel_job(pending)  # a cancelled registration is forgotten at once
    again = manager.submit_add(WorkerSpec(bare))
    await manager.wait_idle()
    assert again.status == "failed"  # nothing listens there; a failed registration blocks nobody
    manager.submit_add(WorkerSpec(bare))
    manager.submit_add(WorkerSpec(full))
    await manager.wait_idle()


async def test_registration_attempts_start_at_a_bounded_rate(gateway, monkeypatch):
    monkeypatch.setattr(manager_module, "DISCOVERY_RATE", 0.01)  # one attempt per 100 s: waits are recorded, not slept
    waits: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(manager_module.asyncio, "sleep", fake_sleep)
    for _ in range(4):
        await gateway.manager._attempt_turn()
    assert len(waits) == 3  # the first attempt starts at once, the next ones 100 s apart each
    for i, wait in enumerate(waits, start=1):
        assert 100 * i - 1 < wait <= 100 * i
