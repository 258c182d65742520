"""Engine load of gRPC workers, polled with `GetLoads` every `--load-monitor-interval`, as SMG does.

HTTP workers expose their load at `/get_load`, read on demand by `GET /get_loads`; a gRPC worker has no HTTP API,
so its last `GetLoads` answer is kept on the worker (`Worker.engine_load`) for `/get_loads` and `/workers`.
"""

from __future__ import annotations

import asyncio
import logging

from shepherd.config import GatewayConfig
from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus

log = logging.getLogger(__name__)


class LoadMonitor:
    def __init__(self, registry: Registry, clients: GrpcClients, config: GatewayConfig) -> None:
        self._registry = registry
        self._clients = clients
        self._config = config
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self._config.load_monitor_interval_secs)

    async def poll(self) -> None:
        """One `GetLoads` per gRPC engine (DP ranks share theirs), concurrently."""
        engines: dict[str, list[Worker]] = {}
        for worker in self._registry.all():
            if is_grpc_url(worker.base_url) and worker.status is WorkerStatus.READY:
                engines.setdefault(worker.base_url, []).append(worker)
        if engines:
            await asyncio.gather(*(self._poll_one(url, workers) for url, workers in engines.items()))

    async def _poll_one(self, base_url: str, workers: list[Worker]) -> None:
        import grpc

        client = self._clients.get(base_url, workers[0].api_key or self._config.api_key)
        try:
            loads = await client.loads(self._config.health_check.timeout_secs)
        except grpc.aio.AioRpcError as exc:
            log.debug("GetLoads on %s failed: %s", base_url, exc.details())
            return
        for worker in workers:
            worker.engine_load = loads
