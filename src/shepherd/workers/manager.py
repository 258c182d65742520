"""Every way a worker arrives or leaves goes through here: static URLs, the admin API, discovery.

Adding is a background job: probe the worker until it answers, discover its model and capabilities, then
register it ready. Removing drains: the worker takes no new requests and leaves once its in-flight ones end.

Jobs start at most DISCOVERY_RATE attempts a second between them, so registering thousands of workers is a steady
stream of calls that leaves the event loop to requests, not one burst that floods it (4,000 at once held requests up
for hundreds of milliseconds). A rate rather than a cap on attempts in flight, so that workers whose probes hang
until they time out cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from shepherd.config import GatewayConfig
from shepherd.upstream.client import UpstreamClient
from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.urls import display_url, has_userinfo
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.grpc_info import grpc_worker_info
from shepherd.workers.kv_events_zmq import zmq_endpoints
from shepherd.workers.registry import Registry
from shepherd.workers.worker import (
    UNKNOWN_MODEL,
    Worker,
    WorkerStatus,
    WorkerType,
    worker_auth_headers,
)

if TYPE_CHECKING:
    from shepherd.upstream.grpc_client import SglangClient

log = logging.getLogger(__name__)

_URL_SCHEMES = ("http", "https", "grpc", "grpcs")
_LABEL_VALUE_MAX = 256
FINISHED_JOB_TTL_SECS = 300.0  # a failed registration stays visible at GET /workers/{id} this long
MAX_FINISHED_JOBS = 1000  # and at most this many of them are kept (the oldest go first)
DISCOVERY_RATE = 500.0  # registration attempts (a probe, then the worker's info) started per second, at most
_SECRET_NAME = re.compile(r"api_key|secret|password|credential|keyfile|(^|_)token$", re.IGNORECASE)


class SpecError(ValueError):
    """An invalid worker specification; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(slots=True)
class WorkerSpec:
    """What a source says about a worker before the worker itself has been asked."""

    url: str
    worker_type: WorkerType = WorkerType.REGULAR
    api_key: str | None = None
    bootstrap_port: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 50
    cost: float = 1.0
    model_id: str | None = None
    source: str = "api"

    @classmethod
    def from_json(cls, data: Any, source: str = "api") -> WorkerSpec:
        if not isinstance(data, dict):
            raise SpecError("body", "the request body must be a JSON object")
        url = data.get("url")
        if not isinstance(url, str) or not url:
            raise SpecError("url", "field 'url' is required and must be a string")
        worker_type = data.get("worker_type", "regular")
        try:
            wtype = WorkerType(worker_type)
        except ValueError:
            raise SpecError("worker_type", "field 'worker_type' must be regular, prefill or decode") from None
        spec = cls(url=normalize_url(url), worker_type=wtype, source=source)
        spec.api_key = _optional(data, "api_key", str)
        if spec.api_key is not None and has_userinfo(spec.url):
            raise SpecError("api_key", "give a worker's credentials in its URL or as 'api_key', not both")
        spec.bootstrap_port = _optional(data, "bootstrap_port", int)
        if spec.bootstrap_port is not None and not 0 < spec.bootstrap_port < 65536:
            raise SpecError("bootstrap_port", "field 'bootstrap_port' must be a port number")
        spec.labels = _labels(data.get("labels"))
        priority = _optional(data, "priority", int)
        spec.priority = spec.priority if priority is None else priority
        cost = _optional(data, "cost", (int, float))
        spec.cost = 1.0 if cost is None else valid_cost(cost)
        spec.model_id = _optional(data, "model_id", str) or _optional(data, "model", str)
        return spec


def valid_cost(value: float) -> float:
    """A worker's cost weight: finite and not negative (raises SpecError naming `cost`)."""
    if not math.isfinite(value) or value < 0:
        raise SpecError("cost", "field 'cost' must be a finite number >= 0")
    return float(value)


def _optional(data: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SpecError(name, f"field '{name}' has the wrong type")
    return value


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError("labels", "field 'labels' must be an object of string keys")
    return {k: str(v) for k, v in value.items()}


def normalize_url(url: str) -> str:
    """Validate a worker URL and drop a trailing slash; raises SpecError naming the `url` field.

    A bare `host:port` is kept as it is: registration probes it for HTTP and for gRPC (`_unreachable_reason`).
    Credentials (`http://user:password@host:port`) are allowed on HTTP(S) URLs only, and never echoed.
    """
    shown = display_url(url)
    bare = "://" not in url
    try:
        parts = urlsplit("//" + url if bare else url)
        port = parts.port
    except ValueError:  # an unbalanced IPv6 bracket, a port that is not a number or out of range
        raise SpecError("url", f"field 'url' is not a valid worker URL: {shown!r}") from None
    if bare:
        if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise SpecError("url", f"field 'url' is not a valid worker URL: {shown!r} (need scheme://host:port)")
    elif parts.scheme not in _URL_SCHEMES or not parts.hostname:
        raise SpecError("url", f"field 'url' is not a valid worker URL: {shown!r} (need http(s)://host:port)")
    elif parts.query or parts.fragment:
        raise SpecError("url", f"field 'url' must not carry a query or fragment: {shown!r}")
    elif port is None and is_grpc_url(url):
        raise SpecError("url", f"a gRPC worker URL needs a port: {shown!r}")
    if (parts.username is not None or parts.password is not None) and parts.scheme not in ("http", "https"):
        raise SpecError("url", f"credentials in a worker URL need http:// or https://: {shown!r}")
    return url.rstrip("/")


@dataclass(slots=True)
class Job:
    """A pending registration, visible at GET /workers/{id} until the worker is registered."""

    worker_id: str
    spec: WorkerSpec
    status: str = "pending"
    message: str | None = None
    started: float = field(default_factory=time.time)
    task: asyncio.Task | None = None

    def to_json(self) -> dict[str, Any]:
        url = display_url(self.spec.url)
        return {
            "id": self.worker_id,
            "url": url,
            "worker_type": self.spec.worker_type.value,
            "status": "pending" if self.status != "failed" else "failed",
            "healthy": False,
            "is_healthy": False,
            "job_status": {
                "job_type": "AddWorker",
                "worker_url": url,
                "status": self.status,
                "message": self.message,
                "timestamp": int(self.started),
            },
        }


class DuplicateWorker(Exception):
    def __init__(self, url: str, worker_id: str) -> None:
        super().__init__(f"Worker already exists at URL '{display_url(url)}' with ID {worker_id}")
        self.worker_id = worker_id


class WorkerManager:
    def __init__(
        self,
        registry: Registry,
        client: UpstreamClient,
        config: GatewayConfig,
        grpc_clients: GrpcClients | None = None,
    ) -> None:
        self.registry = registry
        self._client = client
        self._grpc = grpc_clients or GrpcClients()
        self._config = config
        self.jobs: dict[str, Job] = {}
        self._jobs_at: dict[str, dict[str, Job]] = {}  # address (URL without scheme) -> its jobs, by worker id
        self._next_attempt = 0.0  # event-loop time the next registration attempt may start at
        self._finished: OrderedDict[str, float] = OrderedDict()  # failed job id -> when it failed, oldest first
        self.finished_job_ttl_secs = FINISHED_JOB_TTL_SECS
        self.max_finished_jobs = MAX_FINISHED_JOBS
        self._tasks: set[asyncio.Task] = set()

    # --- adding --------------------------------------------------------------------------------------------
    def submit_add(self, spec: WorkerSpec) -> Job:
        """Queue a registration; raises DuplicateWorker when the URL is registered or being registered."""
        existing = self.registry.by_url(spec.url) or next(iter(self._registered_at(spec.url)), None)
        if existing is not None:
            raise DuplicateWorker(spec.url, existing.id)
        for job in self._jobs_at.get(_address(spec.url), {}).values():
            if _same_worker(job.spec.url, spec.url) and job.status != "failed":
                raise DuplicateWorker(spec.url, job.worker_id)
        job = Job(worker_id=str(uuid.uuid4()), spec=spec)
        self.jobs[job.worker_id] = job
        self._jobs_at.setdefault(_address(spec.url), {})[job.worker_id] = job
        job.task = self._spawn(self._register(job))
        self.registry.registrations_pending += 1
        job.task.add_done_callback(self._registration_over)
        return job

    def _registration_over(self, _task: asyncio.Task) -> None:
        self.registry.registrations_pending -= 1

    def _registered_at(self, url: str) -> list[Worker]:
        """Registered workers at `url`; a bare `host:port` names whatever protocol answered there."""
        if "://" in url:
            return self.registry.at_base_url(url)
        return [w for scheme in _URL_SCHEMES for w in self.registry.at_base_url(f"{scheme}://{url}")]

    def _forget_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        address = _address(job.spec.url)  # a bare URL that got its scheme keeps its address
        same = self._jobs_at.get(address)
        if same is not None:
            same.pop(job_id, None)
            if not same:
                del self._jobs_at[address]

    async def _register(self, job: Job) -> None:
        spec = job.spec
        job.status = "processing"
        try:
            workers = self._build_workers(job, await self._discover(spec))
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
            job.status, job.message = "failed", f"worker {display_url(spec.url)} could not be registered: {exc}"
            log.error("%s", job.message)
            self._finished[job.worker_id] = time.monotonic()
            self._expire_jobs()
            await self._release_channel(spec.url)
            return
        except asyncio.CancelledError:
            await asyncio.shield(self._release_channel(spec.url))
            raise
        for worker in workers:
            if self.registry.by_url(worker.url) is not None:
                continue
            worker.status = WorkerStatus.READY
            self.registry.add(worker)
            log.info("registered worker %s (model %s, %s)", worker.url, worker.model_id, worker.worker_type.value)
        self._forget_job(job.worker_id)

    async def _discover(self, spec: WorkerSpec) -> dict[str, Any]:
        """Wait until the worker answers its health probe, then read its server and model info.

        A bare `host:port` is probed for HTTP and for SGLang gRPC at once; HTTP wins when both answer, and
        `spec.url` gets the scheme that answered.
        """
        deadline = time.monotonic() + self._config.worker_startup_timeout_secs
        delay = 0.2
        timeout = aiohttp.ClientTimeout(total=self._config.health_check.timeout_secs)
        while True:
            await self._attempt_turn()
            if (last := await self._unreachable_reason(spec, timeout)) is None:
                return await self._read_info(spec, timeout)
            if time.monotonic() + delay > deadline:
                raise TimeoutError(last)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.worker_startup_check_interval)

    async def _attempt_turn(self) -> None:
        """Wait for this attempt's turn: attempts start 1 / DISCOVERY_RATE seconds apart."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        turn = max(now, self._next_attempt)
        self._next_attempt = turn + 1.0 / DISCOVERY_RATE
        if turn > now:
            await asyncio.sleep(turn - now)

    async def _read_info(self, spec: WorkerSpec, timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
        """What a worker that answered says about itself: its server and model info."""
        if is_grpc_url(spec.url):
            return await grpc_worker_info(self._grpc_client(spec), self._config.health_check.timeout_secs)
        server_info = await self._get_json(spec, ("/server_info", "/get_server_info"), timeout)
        model_info = await self._get_json(spec, ("/model_info", "/get_model_info"), timeout)
        models = await self._get_json(spec, ("/v1/models",), timeout)
        return {"server_info": server_info, "model_info": model_info, "models": models}

    async def _unreachable_reason(self, spec: WorkerSpec, timeout: aiohttp.ClientTimeout) -> str | None:
        """None once one probe reaches the worker, else what the probes saw."""
        if "://" not in spec.url:
            http_url, grpc_url = f"http://{spec.url}", f"grpc://{spec.url}"
            http_reason, grpc_reason = await asyncio.gather(
                self._http_unhealthy_reason(http_url, spec, timeout), self._grpc_unreachable_reason(grpc_url, spec)
            )
            if http_reason is None or grpc_reason is None:
                spec.url = http_url if http_reason is None else grpc_url
                return None
            return f"neither HTTP ({http_reason}) nor SGLang gRPC ({grpc_reason}) answered"
        if is_grpc_url(spec.url):
            return await self._grpc_unreachable_reason(spec.url, spec)
        return await self._http_unhealthy_reason(spec.url, spec, timeout)

    async def _http_unhealthy_reason(self, url: str, spec: WorkerSpec, timeout: aiohttp.ClientTimeout) -> str | None:
        path = self._config.health_check.endpoint
        try:
            async with self._client.session.get(url + path, headers=self._auth_headers(spec), timeout=timeout) as resp:
                return None if resp.status < 400 else f"{path} answered {resp.status}"
        except aiohttp.ClientConnectorCertificateError:
            raise  # an untrusted certificate will not change by waiting: the registration fails now
        except (TimeoutError, aiohttp.ClientError) as exc:
            return str(exc) or type(exc).__name__

    async def _grpc_unreachable_reason(self, url: str, spec: WorkerSpec) -> str | None:
        """As SMG does, a successful `HealthCheck` RPC is enough to register; its `healthy` flag is the
        health checker's business afterwards."""
        import grpc

        client = self._grpc.get(url, spec.api_key or self._config.api_key)
        try:
            await client.health_check(self._config.health_check.timeout_secs)
        except grpc.aio.AioRpcError as exc:
            if "://" not in spec.url:
                await self._grpc.discard(url)  # a probe only: keep no channel to what may be an HTTP worker
            return f"{exc.code().name}: {exc.details()}"
        return None

    def _grpc_client(self, spec: WorkerSpec) -> SglangClient:
        return self._grpc.get(spec.url, spec.api_key or self._config.api_key)

    def _auth_headers(self, spec: WorkerSpec) -> dict[str, str]:
        """The worker's own key, else the gateway's `--api-key`, as for inference requests (DP discovery needs it)."""
        return worker_auth_headers(spec.url, spec.api_key or self._config.api_key)

    async def _get_json(
        self, spec: WorkerSpec, paths: tuple[str, ...], timeout: aiohttp.ClientTimeout
    ) -> dict[str, Any]:
        """GET the first of `paths` that exists (later ones are fallbacks for 404); {} when none answers."""
        for path in paths:
            try:
                async with self._client.session.get(
                    spec.url + path, headers=self._auth_headers(spec), timeout=timeout
                ) as resp:
                    if resp.status == 404:
                        continue
                    if resp.status >= 400:
                        return {}
                    data = await resp.json(content_type=None)
                    return data if isinstance(data, dict) else {}
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return {}
        return {}

    def _build_workers(self, job: Job, info: dict[str, Any]) -> list[Worker]:
        spec = job.spec
        server_info, model_info = info["server_info"], info["model_info"]
        model_id = spec.model_id or info.get("model_id") or resolve_model_id(server_info, info["models"])
        labels = discovered_labels(server_info, model_info)
        labels.update(spec.labels)
        dp_size = server_info.get("dp_size")
        engine_ranks = dp_size if isinstance(dp_size, int) and dp_size >= 1 else 1

        def make(url: str, worker_id: str, dp_rank: int | None = None, dp_size: int | None = None) -> Worker:
            ranks = range(engine_ranks) if dp_rank is None else range(dp_rank, dp_rank + 1)
            breaker = CircuitBreaker(self._config.circuit_breaker, self.registry.breaker_listener(url))
            return Worker(
                url,
                breaker,
                worker_type=spec.worker_type,
                model_id=model_id,
                api_key=spec.api_key,
                bootstrap_port=spec.bootstrap_port,
                labels=labels,
                priority=spec.priority,
                cost=spec.cost,
                base_url=spec.url,
                dp_rank=dp_rank,
                dp_size=dp_size,
                source=spec.source,
                worker_id=worker_id,
                kv_events_endpoints=() if is_grpc_url(spec.url) else zmq_endpoints(server_info, spec.url, ranks),
            )

        shown = display_url(spec.url)
        if not self._config.dp_aware:
            return [make(shown, job.worker_id)]
        if not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"--dp-aware: worker {shown} reports no dp_size in its server info")
        return [
            make(f"{shown}@{rank}", job.worker_id if rank == 0 else str(uuid.uuid4()), rank, dp_size)
            for rank in range(dp_size)
        ]

    # --- removing ------------------------------------------------------------------------------------------
    def submit_remove(self, worker: Worker) -> None:
        """Drain then remove; a second call while draining is harmless."""
        if worker.status is WorkerStatus.DRAINING:
            return
        self.registry.set_status(worker, WorkerStatus.DRAINING)
        self._spawn(self._drain_and_remove(worker))

    def cancel_job(self, job: Job) -> None:
        if job.task is not None:
            job.task.cancel()
        self._forget_job(job.worker_id)
        self._finished.pop(job.worker_id, None)

    def job(self, key: str) -> Job | None:
        """A registration by worker id or URL: pending, or failed and not expired yet."""
        self._expire_jobs()
        job = self.jobs.get(key)
        if job is None:
            url = key.rstrip("/")
            job = next((j for j in self.jobs.values() if url in (j.spec.url, display_url(j.spec.url))), None)
        return job

    def _expire_jobs(self) -> None:
        """Forget failed registrations older than the TTL, and the oldest beyond the cap."""
        finished = self._finished
        horizon = time.monotonic() - self.finished_job_ttl_secs
        while finished:
            job_id, failed_at = next(iter(finished.items()))
            if failed_at > horizon and len(finished) <= self.max_finished_jobs:
                break
            del finished[job_id]
            self._forget_job(job_id)

    async def _drain_and_remove(self, worker: Worker) -> None:
        deadline = time.monotonic() + self._config.drain_timeout_secs
        while worker.load > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.registry.remove(worker)
        log.info("removed worker %s", worker.url)
        # Calls still running after the drain timeout keep their channel until they end (or time out).
        deadline = time.monotonic() + self._config.request_timeout_secs
        while worker.load > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self._release_channel(worker.base_url)

    async def _release_channel(self, url: str) -> None:
        """Close the gRPC channel to `url` unless a registered worker still uses it."""
        if is_grpc_url(url) and not self.registry.at_base_url(url):
            await self._grpc.discard(url)

    def workers_at(self, url: str) -> list[Worker]:
        """The worker registered at `url`, or every DP rank of that base URL."""
        url = url.rstrip("/")
        exact = self.registry.by_url(url)
        if exact is not None:
            return [exact]
        return self.registry.at_base_url(url)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def add_static(self) -> None:
        config = self._config
        for url in config.worker_urls:
            self.submit_add(WorkerSpec(normalize_url(url), source="static"))
        for prefill in config.prefill:
            self.submit_add(
                WorkerSpec(
                    normalize_url(prefill.url),
                    WorkerType.PREFILL,
                    bootstrap_port=prefill.bootstrap_port,
                    source="static",
                )
            )
        for url in config.decode:
            self.submit_add(WorkerSpec(normalize_url(url), WorkerType.DECODE, source="static"))

    async def wait_idle(self) -> None:
        """Wait for every queued job (used by tests and at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _address(url: str) -> str:
    """A URL without its scheme: what a bare `host:port` is compared on."""
    return url.split("://", 1)[-1]


def _same_worker(registered: str, wanted: str) -> bool:
    """A bare `host:port` names whatever protocol answers there."""
    if "://" in wanted:
        return registered == wanted
    return registered.split("://", 1)[-1] == wanted


def resolve_model_id(server_info: dict[str, Any], models: dict[str, Any]) -> str:
    for key in ("model_id", "model", "served_model_name"):
        value = server_info.get(key)
        if isinstance(value, str) and value:
            return value
    data = models.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
        return data[0]["id"]
    model_path = server_info.get("model_path")
    if isinstance(model_path, str) and model_path:
        return model_path.rstrip("/").rsplit("/", 1)[-1]
    return UNKNOWN_MODEL


def is_secret_name(key: str) -> bool:
    """Whether a reported field looks like a credential (an engine's info can list its own arguments)."""
    return _SECRET_NAME.search(key) is not None


def discovered_labels(*infos: dict[str, Any]) -> dict[str, str]:
    """Scalar facts the worker reported about itself, as string labels (long values and secrets left out).

    Labels are shown by `GET /workers`, and an engine's server info lists its own arguments, `--api-key` included.
    """
    labels: dict[str, str] = {}
    for info in infos:
        for key, value in info.items():
            if is_secret_name(key):
                continue
            if isinstance(value, bool):
                labels[key] = "true" if value else "false"
            elif isinstance(value, (int, float, str)) and len(str(value)) <= _LABEL_VALUE_MAX:
                labels[key] = str(value)
    return labels
