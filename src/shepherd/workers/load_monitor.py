"""Engine load, polled every `--load-monitor-interval` as SMG does: an HTTP worker's `GET /get_load`, a gRPC worker's
`GetLoads` (one call per engine: DP ranks share theirs).

Each worker keeps its engine's last answer (`Worker.engine_load`, shown by `/workers` and `/get_loads` for gRPC
workers) and the requests it reported running or waiting for that worker (`Worker.engine_requests`). After every
round the listeners see the polled workers: the engine counts every client's requests, the gateway only its own, so
the two together tell how much of each worker's traffic goes through this gateway (routing/policies/cache_aware.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from shepherd.config import GatewayConfig
from shepherd.upstream.client import UpstreamClient
from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus, worker_auth_headers

log = logging.getLogger(__name__)

LoadListener = Callable[[list[Worker]], None]


def engine_requests(answer: Any, dp_rank: int | None) -> int | None:
    """Requests running or waiting in an engine's load answer, for one DP rank or all of them; None if the answer
    does not say. `/get_load` is a list of `{dp_rank, num_reqs, ...}`; `GetLoads` has `loads: [{dp_rank,
    num_total_reqs, ...}]`."""
    if isinstance(answer, dict):
        entries, field = answer.get("loads"), "num_total_reqs"
    else:
        entries, field = answer, "num_reqs"
    if not isinstance(entries, list):
        return None
    total = None
    for entry in entries:
        if not isinstance(entry, dict) or (dp_rank is not None and entry.get("dp_rank", 0) != dp_rank):
            continue
        count = entry.get(field, 0)  # proto3 leaves zeros out
        if isinstance(count, str) and count.isdigit():
            count = int(count)
        if not isinstance(count, int):
            return None
        total = (total or 0) + count
    return total


class LoadMonitor:
    def __init__(
        self, registry: Registry, client: UpstreamClient, grpc_clients: GrpcClients, config: GatewayConfig
    ) -> None:
        self._registry = registry
        self._client = client
        self._grpc_clients = grpc_clients
        self._config = config
        self._timeout = aiohttp.ClientTimeout(total=config.health_check.timeout_secs)
        self._listeners: list[LoadListener] = []
        self._task: asyncio.Task | None = None

    def subscribe(self, listener: LoadListener) -> None:
        """Call `listener` with the polled workers after every round."""
        self._listeners.append(listener)

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
        """One load call per engine (DP ranks share theirs), concurrently; then the listeners."""
        engines: dict[str, list[Worker]] = {}
        for worker in self._registry.all():
            if worker.status is WorkerStatus.READY:
                engines.setdefault(worker.base_url, []).append(worker)
        if not engines:
            return
        await asyncio.gather(*(self._poll_one(url, workers) for url, workers in engines.items()))
        polled = [worker for workers in engines.values() for worker in workers if worker.engine_requests is not None]
        for listener in self._listeners:
            listener(polled)

    async def _poll_one(self, base_url: str, workers: list[Worker]) -> None:
        key = workers[0].api_key or self._config.api_key
        answer = await (self._grpc_loads(base_url, key) if is_grpc_url(base_url) else self._http_load(base_url, key))
        for worker in workers:
            if is_grpc_url(base_url):
                worker.engine_load = answer
            worker.engine_requests = None if answer is None else engine_requests(answer, worker.dp_rank)

    async def _grpc_loads(self, base_url: str, api_key: str | None) -> dict[str, Any] | None:
        import grpc

        try:
            return await self._grpc_clients.get(base_url, api_key).loads(self._config.health_check.timeout_secs)
        except grpc.aio.AioRpcError as exc:
            log.debug("GetLoads on %s failed: %s", base_url, exc.details())
            return None

    async def _http_load(self, base_url: str, api_key: str | None) -> Any:
        try:
            async with self._client.session.get(
                base_url + "/get_load", headers=worker_auth_headers(base_url, api_key), timeout=self._timeout
            ) as resp:
                body = await resp.read()
                return orjson.loads(body) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            log.debug("GET /get_load on %s failed: %s", base_url, exc)
            return None
