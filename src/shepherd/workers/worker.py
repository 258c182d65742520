"""A worker: one routing target (an engine URL, or one DP rank of it) and its live state."""

from __future__ import annotations

import uuid
from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shepherd.upstream.client import auth_headers
from shepherd.urls import display_url, has_userinfo
from shepherd.workers.breaker import CircuitBreaker

if TYPE_CHECKING:
    from shepherd.workers.load_monitor import RankLoad

KV_TOKENS_LABEL = "max_total_num_tokens"  # from the worker's /server_info (SGLang), kept as a label
RUNNING_LIMIT_LABEL = "max_running_requests"  # likewise: beyond this many, requests wait for a batch slot


def worker_auth_headers(url: str, api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer api_key` for a call to `url`, unless the URL carries credentials of its own (aiohttp
    sends those as Basic auth and refuses a second Authorization header)."""
    return {} if has_userinfo(url) else auth_headers(api_key)


class WorkerStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"
    FAILED = "failed"
    DRAINING = "draining"


class WorkerType(StrEnum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


UNKNOWN_MODEL = "unknown"
_LATENCY_SAMPLES = 512


class Worker:
    """State the registry keeps per routing target.

    `url` is the identity shown to operators (`base_url@rank` for DP-aware ranks), built from `display_url`; requests
    go to `base_url`, which may carry credentials and is never shown as it is. The API key is kept here only to
    authenticate to this worker and is never serialized.
    """

    __slots__ = (
        "api_key",
        "base_url",
        "bootstrap_port",
        "breaker",
        "cost",
        "dp_rank",
        "dp_size",
        "engine_load",
        "engine_polls",
        "engine_ranks",
        "health_failures",
        "health_probes",
        "health_successes",
        "id",
        "kv_events",
        "kv_events_endpoints",
        "labels",
        "latencies",
        "load",
        "model_id",
        "p99_cache",
        "prefill_pending",
        "priority",
        "requests_total",
        "routing_hold",
        "source",
        "status",
        "url",
        "userinfo",
        "worker_type",
    )

    def __init__(
        self,
        url: str,
        breaker: CircuitBreaker,
        *,
        worker_type: WorkerType = WorkerType.REGULAR,
        model_id: str = UNKNOWN_MODEL,
        api_key: str | None = None,
        bootstrap_port: int | None = None,
        labels: dict[str, str] | None = None,
        priority: int = 50,
        cost: float = 1.0,
        base_url: str | None = None,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        source: str = "static",
        worker_id: str | None = None,
        kv_events_endpoints: tuple[str, ...] = (),
    ) -> None:
        self.id = worker_id or str(uuid.uuid4())
        self.url = url
        self.base_url = base_url or url
        self.userinfo = has_userinfo(self.base_url)  # its own credentials: no Bearer key goes with requests
        self.breaker = breaker
        self.worker_type = worker_type
        self.model_id = model_id
        self.api_key = api_key
        self.bootstrap_port = bootstrap_port
        self.labels = dict(labels or {})
        self.priority = priority
        self.cost = cost
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.source = source
        self.status = WorkerStatus.PENDING
        # Why the worker's source keeps it out of routing while it stays registered (its pod is NotReady); the
        # health checker keeps judging `status` meanwhile. None: routable by status and breaker alone.
        self.routing_hold: str | None = None
        self.load = 0
        # Characters of prompt the routing policy expects the worker still to prefill for the requests sent to it
        # (cache_aware: the part of each prompt it did not hold, until that request's first token comes back).
        self.prefill_pending = 0
        self.requests_total = 0
        self.latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self.p99_cache: float | None = None  # latency_p99_ms() until the next sample
        self.health_successes = 0
        self.health_failures = 0
        self.health_probes = 0
        self.engine_load: dict[str, Any] | None = None  # gRPC workers: the last GetLoads answer
        self.engine_ranks: tuple[RankLoad, ...] | None = None  # the last load poll, rank by rank (None: it failed)
        self.engine_polls = 0  # load polls it answered
        # Its engine's KV event stream (workers/kv_events.py): "live", "lost" (subscribing again), "unpublished"
        # (the engine publishes none); None: not followed (no policy reads the events, or an HTTP engine that
        # reports no ZeroMQ publisher or has not published since it was subscribed to).
        self.kv_events: str | None = None
        self.kv_events_endpoints = kv_events_endpoints  # HTTP engines: the ZeroMQ endpoints of its ranks' events

    @property
    def engine_requests(self) -> int | None:
        """Requests running or waiting in its engine at the last load poll (None: the poll failed)."""
        ranks = self.engine_ranks
        return None if ranks is None else sum(rank.running + rank.waiting for rank in ranks)

    @property
    def is_ready(self) -> bool:
        return self.status is WorkerStatus.READY

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.p99_cache = None

    def latency_p99_ms(self) -> float:
        """Sorted once per new sample at most: `GET /workers` over a fleet of idle workers sorts nothing."""
        if self.p99_cache is None:
            ordered = sorted(self.latencies)
            self.p99_cache = (
                round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3) if ordered else 0.0
            )
        return self.p99_cache

    def to_json(self) -> dict[str, Any]:
        healthy = self.status is WorkerStatus.READY
        data: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "model": self.model_id,
            "model_id": self.model_id,
            "worker_type": self.worker_type.value,
            "connection_mode": "grpc" if self.url.startswith("grpc") else "http",
            "status": self.status.value,
            "healthy": healthy,
            "is_healthy": healthy,
            "requests_total": self.requests_total,
            "requests_active": self.load,
            "load": self.load,
            "prefill_pending_chars": self.prefill_pending,
            "engine_requests": self.engine_requests,
            "kv_events": self.kv_events,
            "latency_p99_ms": self.latency_p99_ms(),
            "circuit_state": self.breaker.state.value,
            "routing_hold": self.routing_hold,
            "labels": self.labels,
            "priority": self.priority,
            "cost": self.cost,
            "source": self.source,
        }
        if self.worker_type is WorkerType.PREFILL:
            data["bootstrap_port"] = self.bootstrap_port
        if self.dp_rank is not None:
            data.update(dp_rank=self.dp_rank, dp_size=self.dp_size, dp_base_url=display_url(self.base_url))
        if self.engine_load is not None:
            data["engine_load"] = self.engine_load
        return data
