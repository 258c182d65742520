"""Gateway metrics (SMG names) and the listener that serves them at `GET /metrics` on the Prometheus port.

Cost model, since this runs for every request:
- Counters and histograms on the request path are cells (see cells.py) found once per worker (created when
  the worker is added, dropped when it is removed) or per (route, method, status); recording is a dict get
  plus an int add or a bisect. No `.labels(...)`, no locks: updates and scrapes share the event loop.
- Gauges (requests in flight per worker, health, breaker state, pool size, admission in-flight and queue
  depth, the engines' polled load) cost nothing per request: `collect` reads them from the registry and the
  admission controller when Prometheus scrapes.
Label values are bounded: workers (removed with the worker), route templates (unknown paths collapse to
`unmatched`), a fixed method set, status codes, models of registered workers and endpoint names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shepherd.exchange import UNMATCHED, Request, Route
from shepherd.observability.cells import Count, CounterFamily, Distribution, HistogramFamily
from shepherd.observability.exposition import TEXT_CONTENT_TYPE
from shepherd.routing.context import INFERENCE_ENDPOINTS, Endpoint
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.relay import RelayOutcome
from shepherd.workers.breaker import CircuitState
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType

if TYPE_CHECKING:
    from shepherd.config import GatewayConfig
    from shepherd.http.admission import Admission
    from shepherd.workers.registry import Registry

log = logging.getLogger(__name__)

# SMG's defaults, in seconds; --prometheus-duration-buckets replaces them.
DEFAULT_DURATION_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 45,
    60, 90, 120, 180, 240, 300, 480, 900, 1200, 1800, 2700, 3600, 5400, 7200,
)  # fmt: skip
# Time per output token lives in milliseconds, far below the duration buckets' resolution.
TPOT_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
UNMATCHED_ROUTE = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CB_STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}


PRESET_STATUSES = (200, 500, 502, 503, 504)


class WorkerCells:
    """One worker's request counter (by status) and latency histogram."""

    __slots__ = ("_label", "_requests", "_statuses", "latency")

    def __init__(self, label: str, requests: CounterFamily, latency: HistogramFamily) -> None:
        self._label = label
        self._requests = requests
        # The usual outcomes exist at 0 from the start: Prometheus cannot see the first increments of a series that
        # appears between two scrapes, so a worker that fails in one short burst would otherwise show no errors.
        self._statuses: dict[int, Count] = {status: requests.child(label, str(status)) for status in PRESET_STATUSES}
        self.latency = latency.child(label)

    def record(self, status: int, seconds: float) -> None:
        """One attempt sent to this worker ended with `status` after `seconds`."""
        cell = self._statuses.get(status)
        if cell is None:
            cell = self._statuses[status] = self._requests.child(self._label, str(status))
        cell.value += 1
        self.latency.observe(seconds)


class GatewayMetrics:
    def __init__(
        self, registry: Registry, admission: Admission, duration_buckets: tuple[float, ...] | None = None
    ) -> None:
        self._registry = registry
        self._admission = admission
        buckets = duration_buckets or DEFAULT_DURATION_BUCKETS
        self.http_requests = CounterFamily(
            "smg_http_requests", "HTTP requests by method, route and status", ("method", "path", "status_code")
        )
        self.http_duration = HistogramFamily(
            "smg_http_request_duration_seconds",
            "HTTP request duration (until the last byte, streams included) by method, route and status",
            ("method", "path", "status_code"),
            buckets,
        )
        self.worker_requests = CounterFamily(
            "smg_worker_requests",
            "Requests sent to a worker (each retry attempt counts) by status",
            ("worker", "status"),
        )
        self.worker_latency = HistogramFamily(
            "smg_worker_latency_seconds", "Duration of one attempt on a worker, streams included", ("worker",), buckets
        )
        self.retries = CounterFamily(
            "smg_worker_retries", "Retry attempts by worker type and endpoint", ("worker_type", "endpoint")
        )
        self.ttft = HistogramFamily(
            "smg_router_ttft_seconds",
            "Time to first token of streamed requests (dispatch to the first relayed chunk), by model and endpoint",
            ("model", "endpoint"),
            buckets,
        )
        self.tpot = HistogramFamily(
            "smg_router_tpot_seconds",
            "Time per output token of streamed requests (one SSE data event counted as one token)",
            ("model", "endpoint"),
            TPOT_BUCKETS,
        )
        self.cb_transitions = CounterFamily(
            "smg_worker_cb_transitions",
            "Circuit breaker state transitions by worker, from, to",
            ("worker", "from", "to"),
        )
        self.health_checks = CounterFamily(
            "smg_worker_health_checks", "Health check results by worker type and result", ("worker_type", "result")
        )
        self.engine_scrapes = CounterFamily(
            "smg_engine_metrics_scrapes",
            "Worker /metrics scrapes made for GET /engine_metrics, by result",
            ("result",),
        )
        self._families = (
            self.http_requests,
            self.http_duration,
            self.worker_requests,
            self.worker_latency,
            self.retries,
            self.ttft,
            self.tpot,
            self.cb_transitions,
            self.health_checks,
            self.engine_scrapes,
        )
        self._per_worker = (self.worker_requests, self.worker_latency, self.cb_transitions)
        for worker_type in WorkerType:
            for name in {e.name for e in INFERENCE_ENDPOINTS}:
                self.retries.child(worker_type.value, name)
            for result in ("success", "failure"):
                self.health_checks.child(worker_type.value, result)
        self._workers: dict[Worker, WorkerCells] = {}
        # Records of a worker removed while its request was in flight go here and are never exported.
        self._detached = WorkerCells(
            "", CounterFamily("detached", "", ("worker", "status")), HistogramFamily("detached", "", ("worker",), ())
        )
        self._http: dict[tuple[Any, str, int], tuple[Count, Distribution]] = {}
        self._streams: dict[tuple[str, str], tuple[Distribution, Distribution]] = {}
        registry.subscribe(
            on_added=self._on_worker_added, on_removed=self._on_worker_removed, on_breaker=self._on_breaker_transition
        )

    # --- request path --------------------------------------------------------------------------------------
    def worker_cells(self, worker: Worker) -> WorkerCells:
        return self._workers.get(worker) or self._detached

    def record_http(self, request: Request, status: int, seconds: float) -> None:
        method = request.method
        self._record_http(request.route, method if method in _METHODS else "OTHER", status, seconds)

    def record_rejected(self, status: int) -> None:
        """A request the HTTP server refused before any route saw it (malformed, head too large or too slow, body
        declared too large): counted under the unmatched route, method OTHER."""
        self._record_http(UNMATCHED, "OTHER", status, 0.0)

    def _record_http(self, route: Route, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        cells = self._http.get(key)
        if cells is None:
            path = route.template or UNMATCHED_ROUTE
            labels = (method, path, str(status))
            cells = self._http[key] = (self.http_requests.child(*labels), self.http_duration.child(*labels))
        cells[0].value += 1
        cells[1].observe(seconds)

    def record_stream(
        self, worker: Worker, endpoint: Endpoint, ttft_seconds: float, tokens: int, decode_seconds: float
    ) -> None:
        """A stream from `worker` ended: its time to first token, and time per output token after the first."""
        key = (worker.model_id, endpoint.name)
        cells = self._streams.get(key)
        if cells is None:
            cells = self._streams[key] = (self.ttft.child(*key), self.tpot.child(*key))
        cells[0].observe(ttft_seconds)
        if tokens > 1:
            cells[1].observe(decode_seconds / (tokens - 1))

    def record_relay(self, worker: Worker, endpoint: Endpoint, started: float, outcome: RelayOutcome) -> None:
        """A relayed stream ended; `started` is the perf_counter() when the gateway began dispatching it."""
        if outcome.first_chunk_at:
            self.record_stream(
                worker,
                endpoint,
                outcome.first_chunk_at - started,
                outcome.events,
                time.perf_counter() - outcome.first_chunk_at,
            )

    def record_retry(self, worker_type: WorkerType, endpoint: Endpoint) -> None:
        self.retries.child(worker_type.value, endpoint.name).inc()

    # --- control plane hooks -------------------------------------------------------------------------------
    def on_health_probe(self, worker: Worker, ok: bool) -> None:
        self.health_checks.child(worker.worker_type.value, "success" if ok else "failure").inc()

    def record_engine_scrape(self, ok: bool) -> None:
        self.engine_scrapes.child("success" if ok else "failure").inc()

    def _on_worker_added(self, worker: Worker) -> None:
        self._workers[worker] = WorkerCells(worker.url, self.worker_requests, self.worker_latency)

    def _on_worker_removed(self, worker: Worker) -> None:
        self._workers.pop(worker, None)
        for family in self._per_worker:
            family.remove_matching("worker", worker.url)

    def _on_breaker_transition(self, worker_url: str, old: CircuitState, new: CircuitState) -> None:
        if self._registry.by_url(worker_url) is not None:  # not for a breaker of a worker already removed
            self.cb_transitions.child(worker_url, old.value, new.value).inc()

    # --- scrape --------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """Every gateway metric family; gauges are read from live state now."""
        yield from self._collect_gauges()
        for family in self._families:
            yield family.collect()

    def _collect_gauges(self) -> Iterator[GaugeMetricFamily]:
        workers = self._registry.all()
        active = GaugeMetricFamily("smg_worker_requests_active", "Requests in flight per worker", labels=["worker"])
        health = GaugeMetricFamily("smg_worker_health", "Worker health (1=ready, 0=not)", labels=["worker"])
        cb_state = GaugeMetricFamily(
            "smg_worker_cb_state", "Circuit breaker state per worker (0=closed, 1=open, 2=half_open)", labels=["worker"]
        )
        cb_failures = GaugeMetricFamily(
            "smg_worker_cb_consecutive_failures", "Current consecutive failure count per worker", labels=["worker"]
        )
        cb_successes = GaugeMetricFamily(
            "smg_worker_cb_consecutive_successes", "Current consecutive success count per worker", labels=["worker"]
        )
        pool: dict[tuple[str, str, str], int] = {}
        for worker in workers:
            label = [worker.url]
            active.add_metric(label, worker.load)
            health.add_metric(label, 1 if worker.status is WorkerStatus.READY else 0)
            breaker = worker.breaker
            cb_state.add_metric(label, _CB_STATE_VALUE[breaker.state])
            cb_failures.add_metric(label, breaker.consecutive_failures)
            cb_successes.add_metric(label, breaker.consecutive_successes)
            mode = "grpc" if is_grpc_url(worker.base_url) else "http"
            key = (worker.worker_type.value, mode, worker.model_id)
            pool[key] = pool.get(key, 0) + 1
        pool_size = GaugeMetricFamily(
            "smg_worker_pool_size",
            "Registered workers by worker_type, connection_mode, model",
            labels=["worker_type", "connection_mode", "model"],
        )
        for key, count in pool.items():
            pool_size.add_metric(key, count)
        inflight = GaugeMetricFamily("smg_admission_inflight", "Requests holding an admission permit")
        inflight.add_metric([], self._admission.in_flight)
        queued = GaugeMetricFamily("smg_admission_queue_depth", "Requests waiting in the admission queue")
        queued.add_metric([], self._admission.queued)
        yield from (active, health, cb_state, cb_failures, cb_successes, pool_size, inflight, queued)
        yield from _engine_load_families(workers)


_ENGINE_GAUGES = (  # (name, help, RankLoad field) of SMG's gauges from load polling
    ("smg_engine_running_requests", "Requests the engine runs, per DP rank (last load poll)", "running"),
    ("smg_engine_waiting_requests", "Requests waiting in the engine's queue, per DP rank (last load poll)", "waiting"),
    ("smg_engine_token_usage", "Share of the engine's KV cache in use, per DP rank (last load poll)", "token_usage"),
    ("smg_engine_gen_throughput", "Engine generation throughput in tokens/s (last GetLoads poll)", "gen_throughput"),
    ("smg_engine_cache_hit_rate", "Engine prefix cache hit rate (last GetLoads poll)", "cache_hit_rate"),
)


def _engine_load_families(workers: list[Worker]) -> Iterator[Any]:
    """What each worker's engine said at its last answered load poll; nothing for a worker whose last poll failed
    (no stale figures), and a gauge only where the answer carries it (`/get_load` has no throughput or hit rate)."""
    labels = ["worker", "model", "dp_rank"]
    gauges = [GaugeMetricFamily(name, text, labels=labels) for name, text, _ in _ENGINE_GAUGES]
    polls = CounterMetricFamily("smg_engine_load_polls", "Load polls a worker answered", labels=["worker", "mode"])
    for worker in workers:
        if worker.engine_polls:
            polls.add_metric([worker.url, "poll"], worker.engine_polls)
        for rank in worker.engine_ranks or ():
            label = [worker.url, worker.model_id, str(rank.dp_rank)]
            for gauge, (_, _, field) in zip(gauges, _ENGINE_GAUGES, strict=True):
                value = getattr(rank, field)
                if value is not None:
                    gauge.add_metric(label, value)
    yield from gauges
    yield polls


class _Exposition:
    """What the listener serves: the gateway's metrics, then prometheus_client's default registry
    (process metrics, and families other modules register there, e.g. discovery)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        yield from self._metrics.collect()
        yield from REGISTRY.collect()


class MetricsListener:
    """`GET /metrics` on its own host and port; every other path answers 404 with an empty body."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self._exposition = _Exposition(metrics)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    @classmethod
    def for_config(cls, metrics: GatewayMetrics, config: GatewayConfig) -> MetricsListener:
        """The listener at --prometheus-host/--prometheus-port; the default host follows an IPv6 --host."""
        host = config.prometheus_host
        if host == "0.0.0.0" and ":" in config.host:
            host = "::"
        return cls(metrics, host, config.prometheus_port)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        app.router.add_route("*", "/{tail:.*}", _not_found)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port, reuse_address=True).start()
        log.info("metrics listening on http://%s:%d/metrics", self._host, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._exposition), headers={"Content-Type": TEXT_CONTENT_TYPE})


async def _not_found(_request: web.Request) -> web.Response:
    return web.Response(status=404)
