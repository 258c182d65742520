"""GET /engine_metrics against stand-in engines on loopback: fan-out, timeouts, failures, credentials, dedup."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shepherd.config import GatewayConfig, HealthCheckConfig
from shepherd.gateway import Gateway
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker, WorkerStatus
from tests.support.app_server import serving_gateway
from tests.support.processes import free_port, start_sim

SCRAPE_TIMEOUT = 0.5


class StandInEngine:
    """An HTTP server whose /metrics answers `text` (or `status`, or never); it records the headers it saw."""

    def __init__(self, text: str = "", status: int = 200, hang: asyncio.Event | None = None) -> None:
        self.text, self.status, self.hang = text, status, hang
        self.seen: list[dict[str, str]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        if self.hang is not None:
            await self.hang.wait()
        return web.Response(status=self.status, text=self.text)

    async def start(self, port: int = 0) -> StandInEngine:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def gauge(name: str, value: float) -> str:
    return f'# HELP {name} A gauge.\n# TYPE {name} gauge\n{name}{{model_name="m"}} {value}\n'


def register(gateway: Gateway, url: str, base_url: str | None = None, api_key: str | None = None) -> None:
    worker = Worker(
        url, CircuitBreaker(gateway.config.circuit_breaker), base_url=base_url, api_key=api_key, model_id="m"
    )
    worker.status = WorkerStatus.READY
    gateway.registry.add(worker)


def make_gateway() -> Gateway:
    config = GatewayConfig(
        host="127.0.0.1", port=0, api_key="gw-key", health_check=HealthCheckConfig(timeout_secs=SCRAPE_TIMEOUT)
    )
    return Gateway(config)


async def test_scrape_merges_good_engines_skips_failing_ones_and_keeps_keys_where_they_belong():
    release = asyncio.Event()
    keyed = await StandInEngine(gauge("sglang:num_running_reqs", 3)).start()
    unkeyed = await StandInEngine(gauge("sglang:num_running_reqs", 1)).start()
    slow = await StandInEngine(gauge("sglang:num_running_reqs", 7), hang=release).start()
    broken = await StandInEngine("oops", status=500).start()
    # A gRPC engine's sidecar listens on grpc_port + 10000; OS ports are above 32768, so this gRPC port is valid.
    sidecar = await StandInEngine(gauge("sglang:num_running_reqs", 5)).start()
    grpc_url = f"grpc://127.0.0.1:{sidecar.port - 10000}"
    refused = f"http://127.0.0.1:{free_port()}"
    engines = (keyed, unkeyed, slow, broken, sidecar)
    gateway = make_gateway()
    try:
        register(gateway, f"http://127.0.0.1:{keyed.port}", api_key="key-1")
        register(gateway, f"http://127.0.0.1:{unkeyed.port}")
        register(gateway, f"http://127.0.0.1:{slow.port}")
        register(gateway, f"http://127.0.0.1:{broken.port}")
        register(gateway, refused)
        register(gateway, grpc_url + "@0", base_url=grpc_url, api_key="grpc-secret")  # two DP ranks, one sidecar
        register(gateway, grpc_url + "@1", base_url=grpc_url, api_key="grpc-secret")
        async with serving_gateway(gateway) as client:
            started = time.monotonic()
            resp = await client.get("/engine_metrics")  # public: no key needed even under --api-key
            body = await resp.text()
            elapsed = time.monotonic() - started
    finally:
        release.set()
        for engine in engines:
            await engine.stop()
        await gateway.client.close()

    assert resp.status == 200, body
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert elapsed < SCRAPE_TIMEOUT + 1.0  # the hanging engine cost at most the timeout
    (family,) = [f for f in text_string_to_metric_families(body) if f.name == "sglang:num_running_reqs"]
    values = {s.labels["worker_addr"]: s.value for s in family.samples}
    assert values == {f"http://127.0.0.1:{keyed.port}": 3, f"http://127.0.0.1:{unkeyed.port}": 1, grpc_url: 5}
    assert body.startswith("# shepherd engine_metrics: scraped 3 of 6 workers\n")
    failed_lines = [line for line in body.splitlines() if line.startswith("# shepherd engine_metrics: failed")]
    assert len(failed_lines) == 3
    assert any(
        f"127.0.0.1:{slow.port}" in line and f"no answer within {SCRAPE_TIMEOUT:g}s" in line for line in failed_lines
    )
    assert any(f"127.0.0.1:{broken.port}" in line and "HTTP 500" in line for line in failed_lines)
    assert any(refused in line for line in failed_lines)

    assert [h.get("Authorization") for h in keyed.seen] == ["Bearer key-1"]  # its own key, once
    assert [h.get("Authorization") for h in unkeyed.seen] == ["Bearer gw-key"]
    assert len(sidecar.seen) == 1  # both ranks, one scrape
    assert not any(k.lower() == "authorization" for k in sidecar.seen[0])  # no key of any kind
    assert all("key-1" not in str(engine.seen) for engine in (unkeyed, slow, broken, sidecar))

    scrapes = {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(generate_latest(gateway.metrics).decode())
        if f.name == "smg_engine_metrics_scrapes"
        for s in f.samples
    }
    assert scrapes == {"success": 3, "failure": 3}


async def test_no_workers_and_all_failed_are_clear_errors():
    gateway = make_gateway()
    try:
        async with serving_gateway(gateway) as client:
            resp = await client.get("/engine_metrics")
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "no_workers"
            register(gateway, f"http://127.0.0.1:{free_port()}")
            resp = await client.get("/engine_metrics")
            error = (await resp.json())["error"]
            assert resp.status == 502 and error["code"] == "engine_metrics_unavailable"
            assert "Every worker scrape failed" in error["message"]
    finally:
        await gateway.client.close()


async def test_a_burst_of_calls_scrapes_each_worker_once_and_the_cache_expires(tmp_path):
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=0, engine_metrics_cache_secs=1.0))
    with start_sim(tmp_path, 2) as sims:
        for url in sims.urls:
            register(gateway, url)

        def scrapes() -> list[int]:
            return [sims.log(i)["counts"].get("/metrics", 0) for i in range(2)]

        try:
            async with serving_gateway(gateway) as client:
                burst = await asyncio.gather(*(client.get("/engine_metrics") for _ in range(20)))
                bodies = {await resp.text() for resp in burst}
                assert {resp.status for resp in burst} == {200} and len(bodies) == 1
                assert "scraped 2 of 2 workers" in bodies.pop()
                assert await asyncio.to_thread(scrapes) == [1, 1]  # one shared scrape for the whole burst
                assert (await client.get("/engine_metrics")).status == 200  # still cached
                assert await asyncio.to_thread(scrapes) == [1, 1]

                async def scraped_again() -> bool:
                    assert (await client.get("/engine_metrics")).status == 200
                    return await asyncio.to_thread(scrapes) == [2, 2]

                deadline = time.monotonic() + 5
                while not await scraped_again():
                    assert time.monotonic() < deadline, "the cached answer never expired"
                    await asyncio.sleep(0.05)
        finally:
            await gateway.client.close()
