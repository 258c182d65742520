"""Periodic health probes and the worker state machine they drive.

ready -> not_ready after F consecutive failures; not_ready -> failed at 3F; not_ready/failed/pending -> ready
after S consecutive successes. Draining workers are not probed. Every interval, a sweep starts one probe per base
URL (DP ranks share one) unless the previous probe of that URL is still running, so a slow worker never delays the
others or piles up probes. The sweep spreads its probes evenly over the interval: 4,000 workers probed at once would
take the event loop away from requests for a second or more; spread out, they cost a steady trickle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from shepherd.config import HealthCheckConfig
from shepherd.upstream.client import UpstreamClient
from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus, worker_auth_headers

log = logging.getLogger(__name__)

FAILED_MULTIPLIER = 3


class HealthChecker:
    def __init__(
        self,
        registry: Registry,
        client: UpstreamClient,
        config: HealthCheckConfig,
        on_failed: Callable[[Worker], None] | None = None,
        on_probe: Callable[[Worker, bool], None] | None = None,
        gateway_api_key: str | None = None,
        grpc_clients: GrpcClients | None = None,
    ) -> None:
        self._registry = registry
        self._client = client
        self._grpc = grpc_clients or GrpcClients()
        self._config = config
        self._on_failed = on_failed
        self._on_probe = on_probe
        self._gateway_api_key = gateway_api_key  # for workers without a key of their own
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_secs)
        self._in_flight: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if not self._config.disabled:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.interval_secs
        started = loop.time()
        while True:
            started += interval
            await asyncio.sleep(max(0.0, started - loop.time()))
            await self.sweep(interval)

    async def sweep(self, spread_secs: float) -> None:
        """Start one probe per base URL whose previous probe has finished, evenly spaced over `spread_secs`."""
        groups: dict[str, list[Worker]] = {}
        for worker in self._registry.all():
            if worker.status is not WorkerStatus.DRAINING:
                groups.setdefault(worker.base_url, []).append(worker)
        if not groups:
            return
        loop = asyncio.get_running_loop()
        start, spacing = loop.time(), spread_secs / len(groups)
        for i, (base_url, workers) in enumerate(groups.items()):
            delay = start + i * spacing - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            current = [w for w in workers if self._registry.get(w.id) is w and w.status is not WorkerStatus.DRAINING]
            if current and base_url not in self._in_flight:
                task = loop.create_task(self.probe(base_url, current))
                self._in_flight[base_url] = task
                task.add_done_callback(lambda _t, url=base_url: self._in_flight.pop(url, None))

    async def probe(self, base_url: str, workers: list[Worker]) -> bool:
        ok = await self._check(base_url, workers[0].api_key or self._gateway_api_key)
        for worker in workers:
            self.record(worker, ok)
        return ok

    async def _check(self, base_url: str, api_key: str | None) -> bool:
        if is_grpc_url(base_url):
            return await self._check_grpc(base_url, api_key)
        try:
            async with self._client.session.get(
                base_url + self._config.endpoint, headers=worker_auth_headers(base_url, api_key), timeout=self._timeout
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def _check_grpc(self, base_url: str, api_key: str | None) -> bool:
        """SGLang's own `HealthCheck` RPC (a one-token generation inside the engine), as SMG probes it."""
        import grpc

        try:
            healthy, _message = await self._grpc.get(base_url, api_key).health_check(self._config.timeout_secs)
        except grpc.aio.AioRpcError:
            return False
        return healthy

    def record(self, worker: Worker, ok: bool) -> None:
        """Apply one probe outcome to a worker's counters and state."""
        if worker.status is WorkerStatus.DRAINING:
            return
        worker.health_probes += 1
        if self._on_probe is not None:
            self._on_probe(worker, ok)
        cfg = self._config
        if ok:
            worker.health_failures = 0
            worker.health_successes += 1
            if worker.status is not WorkerStatus.READY and worker.health_successes >= cfg.success_threshold:
                self._registry.set_status(worker, WorkerStatus.READY)
            return
        worker.health_successes = 0
        worker.health_failures += 1
        failures = worker.health_failures
        if worker.status is WorkerStatus.READY and failures >= cfg.failure_threshold:
            self._registry.set_status(worker, WorkerStatus.NOT_READY)
        elif (worker.status is WorkerStatus.NOT_READY and failures >= FAILED_MULTIPLIER * cfg.failure_threshold) or (
            worker.status is WorkerStatus.PENDING and worker.health_probes >= 10 * cfg.failure_threshold
        ):
            self._registry.set_status(worker, WorkerStatus.FAILED)
            if self._on_failed is not None:
                self._on_failed(worker)
