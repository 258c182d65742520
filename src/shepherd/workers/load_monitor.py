"""Engine load, polled every `--load-monitor-interval` as SMG does: an HTTP worker's `GET /get_load`, a gRPC worker's
`GetLoads` (one call per engine: DP ranks share theirs).

Each worker keeps its engine's last answer (`Worker.engine_load`, shown by `/workers` and `/get_loads` for gRPC
workers) and what it says rank by rank (`Worker.engine_ranks`, exported as SMG's `smg_engine_*` gauges; their
running and waiting requests are `Worker.engine_requests`). After every round the listeners see the polled workers:
the engine counts every client's requests, the gateway only its own, so the two together tell how much of each
worker's traffic goes through this gateway (routing/policies/cache_aware.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from shepherd.config import GatewayConfig
from shepherd.upstream.client import UpstreamClient
from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.workers.registry import Registry
from shepherd.workers.worker import KV_TOKENS_LABEL, Worker, WorkerStatus, worker_auth_headers

log = logging.getLogger(__name__)

LoadListener = Callable[[list[Worker]], None]


@dataclass(frozen=True, slots=True)
class RankLoad:
    """One DP rank's load as its engine reported it at the last poll; None where the answer does not say."""

    dp_rank: int
    running: int
    waiting: int
    token_usage: float | None = None  # share of the KV cache in use
    gen_throughput: float | None = None  # tokens/s
    cache_hit_rate: float | None = None


def rank_loads(answer: Any, dp_rank: int | None, kv_tokens: int = 0) -> tuple[RankLoad, ...] | None:
    """The ranks of an engine's load answer (`dp_rank`'s, or all of them); None if the answer does not say.

    `/get_load` is a list of `{dp_rank, num_reqs, num_waiting_reqs, num_tokens}`: `num_reqs` counts the waiting
    ones too, and token usage is `num_tokens` over the `kv_tokens` the worker reported (unknown without them).
    `GetLoads` has `loads: [{dp_rank, num_running_reqs, num_waiting_reqs, token_usage, gen_throughput,
    cache_hit_rate, ...}]`, rendered by MessageToDict: zero fields left out, 64-bit integers as strings.
    """
    grpc = isinstance(answer, dict)
    entries = answer.get("loads") if grpc else answer
    if not isinstance(entries, list):
        return None
    ranks = []
    try:
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            rank = _count(entry, "dp_rank")
            if dp_rank is not None and rank != dp_rank:
                continue
            if grpc:
                load = RankLoad(rank, _count(entry, "num_running_reqs"), _count(entry, "num_waiting_reqs"),
                                _ratio(entry, "token_usage"), _ratio(entry, "gen_throughput"),
                                _ratio(entry, "cache_hit_rate"))  # fmt: skip
            else:
                waiting = _count(entry, "num_waiting_reqs")
                usage = _count(entry, "num_tokens") / kv_tokens if kv_tokens and "num_tokens" in entry else None
                load = RankLoad(rank, max(0, _count(entry, "num_reqs") - waiting), waiting, usage)
            ranks.append(load)
    except ValueError:
        return None
    return tuple(ranks) or None


def _count(entry: dict[str, Any], field: str) -> int:
    value = entry.get(field, 0)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(field)
    return value


def _ratio(entry: dict[str, Any], field: str) -> float:
    value = entry.get(field, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(field)
    return float(value)


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
        polled = [worker for workers in engines.values() for worker in workers if worker.engine_ranks is not None]
        for listener in self._listeners:
            listener(polled)

    async def _poll_one(self, base_url: str, workers: list[Worker]) -> None:
        key = workers[0].api_key or self._config.api_key
        answer = await (self._grpc_loads(base_url, key) if is_grpc_url(base_url) else self._http_load(base_url, key))
        for worker in workers:
            if is_grpc_url(base_url):
                worker.engine_load = answer
            reported = worker.labels.get(KV_TOKENS_LABEL, "")
            kv_tokens = int(reported) if reported.isdigit() else 0
            ranks = None if answer is None else rank_loads(answer, worker.dp_rank, kv_tokens)
            worker.engine_ranks = ranks
            if ranks is not None:
                worker.engine_polls += 1

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
