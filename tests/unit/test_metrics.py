"""Gateway metrics: exact values after known events, live gauges, bounded labels, and a valid exposition."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client import generate_latest

from shepherd.config import CircuitBreakerConfig, GatewayConfig
from shepherd.gateway import Gateway
from shepherd.http.admission import Admission
from shepherd.observability.metrics import PRESET_STATUSES, GatewayMetrics, MetricsListener
from shepherd.routing.context import CHAT, GENERATE
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.load_monitor import RankLoad
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType
from tests.support.app_server import serving_gateway
from tests.support.metrics import Exposition
from tests.support.polling import until
from tests.support.processes import free_port


def scrape(metrics: GatewayMetrics) -> Exposition:
    return Exposition(generate_latest(metrics).decode())


def make_worker(registry: Registry, url: str, **kwargs) -> Worker:
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=2), registry.breaker_listener(url))
    worker = Worker(url, breaker, **kwargs)
    worker.status = WorkerStatus.READY
    registry.add(worker)
    return worker


def setup(buckets: tuple[float, ...] | None = None) -> tuple[Registry, Admission, GatewayMetrics]:
    registry = Registry()
    admission = Admission(limit=1, queue_size=5, timeout_secs=5)
    return registry, admission, GatewayMetrics(registry, admission, buckets)


def test_worker_requests_and_latency_after_known_attempts():
    registry, _, metrics = setup()
    a = make_worker(registry, "http://a:1")
    b = make_worker(registry, "http://b:1")
    for _ in range(3):
        metrics.worker_cells(a).record(200, 0.004)
    metrics.worker_cells(a).record(503, 0.2)
    metrics.worker_cells(b).record(502, 30.0)
    exp = scrape(metrics)
    assert exp.value("smg_worker_requests_total", worker="http://a:1", status="200") == 3
    assert exp.value("smg_worker_requests_total", worker="http://a:1", status="503") == 1
    assert exp.value("smg_worker_requests_total", worker="http://b:1", status="502") == 1
    # The usual outcomes are exported at 0 from the start, so a first burst of errors is never lost between scrapes.
    assert exp.value("smg_worker_requests_total", worker="http://b:1", status="500") == 0
    statuses = {(s["worker"], s["status"]) for s in exp.series("smg_worker_requests_total")}
    assert statuses == {(w, str(c)) for w in ("http://a:1", "http://b:1") for c in PRESET_STATUSES}
    assert exp.value("smg_worker_latency_seconds_count", worker="http://a:1") == 4
    assert exp.value("smg_worker_latency_seconds_bucket", worker="http://a:1", le="0.005") == 3
    assert exp.value("smg_worker_latency_seconds_bucket", worker="http://a:1", le="0.25") == 4
    assert exp.value("smg_worker_latency_seconds_bucket", worker="http://b:1", le="15.0") == 0
    assert exp.value("smg_worker_latency_seconds_bucket", worker="http://b:1", le="30.0") == 1  # le is inclusive
    assert abs(exp.value("smg_worker_latency_seconds_sum", worker="http://a:1") - 0.212) < 1e-9


def test_removed_worker_series_disappear_and_late_records_are_not_exported():
    registry, _, metrics = setup()
    gone = make_worker(registry, "http://gone:1")
    stays = make_worker(registry, "http://stays:1")
    cells = metrics.worker_cells(gone)
    cells.record(200, 0.01)
    metrics.worker_cells(stays).record(200, 0.01)
    registry.remove(gone)
    cells.record(200, 0.01)  # a request that was in flight when the worker left
    metrics.worker_cells(gone).record(500, 0.01)
    exp = scrape(metrics)
    workers = {labels["worker"] for labels in exp.series("smg_worker_requests_total")}
    workers |= {labels["worker"] for labels in exp.series("smg_worker_latency_seconds_count")}
    workers |= {labels["worker"] for labels in exp.series("smg_worker_health")}
    assert workers == {"http://stays:1"}


def test_gauges_are_read_from_live_state_at_scrape_time():
    registry, _, metrics = setup()
    busy = make_worker(registry, "http://busy:1", model_id="m1")
    make_worker(registry, "http://idle:1", model_id="m1")
    prefill = make_worker(registry, "http://p:1", model_id="m1", worker_type=WorkerType.PREFILL)
    busy.load = 3
    registry.set_status(prefill, WorkerStatus.NOT_READY)
    busy.breaker.record_failure()
    busy.breaker.record_failure()  # threshold 2: open
    exp = scrape(metrics)
    assert exp.value("smg_worker_requests_active", worker="http://busy:1") == 3
    assert exp.value("smg_worker_requests_active", worker="http://idle:1") == 0
    assert exp.value("smg_worker_health", worker="http://busy:1") == 1
    assert exp.value("smg_worker_health", worker="http://p:1") == 0
    assert exp.value("smg_worker_cb_state", worker="http://busy:1") == 1
    assert exp.value("smg_worker_cb_state", worker="http://idle:1") == 0
    assert exp.value("smg_worker_pool_size", worker_type="regular", connection_mode="http", model="m1") == 2
    assert exp.value("smg_worker_pool_size", worker_type="prefill", connection_mode="http", model="m1") == 1
    assert exp.value("smg_worker_cb_transitions_total", worker="http://busy:1", **{"from": "closed", "to": "open"}) == 1
    busy.load = 0
    assert scrape(metrics).value("smg_worker_requests_active", worker="http://busy:1") == 0


async def test_admission_gauges_follow_permits_and_waiters():
    _, admission, metrics = setup()  # limit 1
    async with admission:
        waiter = asyncio.create_task(admission.__aenter__())
        await until(lambda: admission.queued == 1, "the waiter to queue up", interval=0)
        exp = scrape(metrics)
        assert exp.value("smg_admission_inflight") == 1
        assert exp.value("smg_admission_queue_depth") == 1
    await waiter  # it got the permit we released
    await admission.__aexit__(None, None, None)
    exp = scrape(metrics)
    assert exp.value("smg_admission_inflight") == 0
    assert exp.value("smg_admission_queue_depth") == 0


def test_breaker_transitions_are_counted_per_worker_and_edge():
    registry, _, metrics = setup()
    worker = make_worker(registry, "http://w:1")
    breaker = worker.breaker
    breaker.record_failure()
    breaker.record_failure()  # closed -> open
    assert breaker.allows(now=time.monotonic() + 3600)  # past the open timeout: open -> half_open
    breaker.record_failure()  # half_open -> open
    exp = scrape(metrics)
    edge = lambda a, b: exp.value("smg_worker_cb_transitions_total", worker="http://w:1", **{"from": a, "to": b})  # noqa: E731
    assert edge("closed", "open") == 1
    assert edge("open", "half_open") == 1
    assert edge("half_open", "open") == 1


def test_streams_record_ttft_and_time_per_output_token():
    registry, _, metrics = setup()
    worker = make_worker(registry, "http://w:1", model_id="m1")
    metrics.record_stream(worker, CHAT, ttft_seconds=0.2, tokens=11, decode_seconds=0.5)  # 10 gaps of 50 ms
    metrics.record_stream(worker, CHAT, ttft_seconds=0.3, tokens=1, decode_seconds=0.0)  # one token: no TPOT
    exp = scrape(metrics)
    assert exp.value("smg_router_ttft_seconds_count", model="m1", endpoint="chat") == 2
    assert exp.value("smg_router_ttft_seconds_bucket", model="m1", endpoint="chat", le="0.25") == 1
    assert exp.value("smg_router_tpot_seconds_count", model="m1", endpoint="chat") == 1
    assert abs(exp.value("smg_router_tpot_seconds_sum", model="m1", endpoint="chat") - 0.05) < 1e-9


def test_retries_and_health_checks_are_preregistered_then_counted():
    registry, _, metrics = setup()
    worker = make_worker(registry, "http://w:1")
    assert scrape(metrics).value("smg_worker_retries_total", worker_type="regular", endpoint="generate") == 0
    metrics.record_retry(WorkerType.REGULAR, GENERATE)
    metrics.record_retry(WorkerType.REGULAR, GENERATE)
    metrics.on_health_probe(worker, True)
    metrics.on_health_probe(worker, False)
    metrics.on_health_probe(worker, False)
    exp = scrape(metrics)
    assert exp.value("smg_worker_retries_total", worker_type="regular", endpoint="generate") == 2
    assert exp.value("smg_worker_retries_total", worker_type="regular", endpoint="chat") == 0
    assert exp.value("smg_worker_health_checks_total", worker_type="regular", result="success") == 1
    assert exp.value("smg_worker_health_checks_total", worker_type="regular", result="failure") == 2


def test_duration_buckets_can_be_overridden():
    registry, _, metrics = setup(buckets=(0.5, 2.0))
    worker = make_worker(registry, "http://w:1")
    metrics.worker_cells(worker).record(200, 1.0)
    exp = scrape(metrics)
    les = [labels["le"] for labels in exp.series("smg_worker_latency_seconds_bucket")]
    assert les == ["0.5", "2.0", "+Inf"]
    assert exp.value("smg_worker_latency_seconds_bucket", le="2.0") == 1


async def test_http_labels_use_route_templates_and_collapse_unknown_paths_and_methods():
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=0))
    async with serving_gateway(gateway) as client:
        for path in ("/nowhere/1", "/nowhere/2", "/x?id=3"):
            assert (await client.get(path)).status == 404
        for worker_id in ("abc", "def"):
            assert (await client.get(f"/workers/{worker_id}")).status == 404
        assert (await client.get("/liveness")).status == 200
        assert (await client.request("PROPFIND", "/liveness")).status == 405
    exp = scrape(gateway.metrics)
    series = {
        (s["method"], s["path"], s["status_code"]): exp.value("smg_http_requests_total", **s)
        for s in exp.series("smg_http_requests_total")
    }
    assert series == {
        ("GET", "unmatched", "404"): 3,
        ("GET", "/workers/{worker_id}", "404"): 2,
        ("GET", "/liveness", "200"): 1,
        ("OTHER", "unmatched", "405"): 1,
    }
    assert exp.value("smg_http_request_duration_seconds_count", method="GET", path="/liveness", status_code="200") == 1
    await gateway.client.close()


async def test_listener_serves_valid_expositions_under_concurrent_scrapes_and_404s_elsewhere():
    registry, _, metrics = setup()
    workers = [make_worker(registry, f"http://w{i}:1") for i in range(4)]
    port = free_port()
    listener = MetricsListener(metrics, "127.0.0.1", port)
    await listener.start()
    stop = asyncio.Event()

    async def traffic() -> None:  # keeps changing values while the scrapes run
        i = 0
        while not stop.is_set():
            metrics.worker_cells(workers[i % 4]).record(200 if i % 5 else 503, 0.001 * (i % 50))
            i += 1
            await asyncio.sleep(0)

    try:
        task = asyncio.create_task(traffic())
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> tuple[int, str, str]:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    return resp.status, resp.headers.get("Content-Type", ""), await resp.text()

            results = await asyncio.gather(*(get("/metrics") for _ in range(30)))
            other = await get("/other")
            main_path = await get("/workers")
        stop.set()
        await task
    finally:
        await listener.stop()
    for status, content_type, body in results:
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        exp = Exposition(body)  # raises if the text is not a valid exposition
        total = sum(exp.value("smg_worker_latency_seconds_count", worker=w.url) or 0 for w in workers)
        by_status = sum(s.value for s in exp.samples if s.name == "smg_worker_requests_total")
        assert total == by_status  # each scrape is a consistent snapshot
        assert "process_cpu_seconds_total" in exp.text or "python_gc_objects_collected_total" in exp.text
    assert other[0] == 404 and other[2] == ""
    assert main_path[0] == 404


async def test_requests_the_http_server_refuses_are_counted_under_unmatched():
    """Malformed HTTP (400) and too many headers (431) never reach a route; they are counted all the same."""
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=0))
    too_many = b"".join(b"x-h%d: 1\r\n" % i for i in range(gateway.config.http.max_header_count + 1))
    messages = (
        b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /liveness HTTP/1.1\r\nHost: t\r\n" + too_many + b"\r\n",
    )
    async with serving_gateway(gateway) as client:
        for message in messages:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(message)
            status_line = await reader.readline()
            writer.close()
            await writer.wait_closed()
            assert status_line.split()[1] in (b"400", b"431")
    exp = scrape(gateway.metrics)
    assert exp.value("smg_http_requests_total", method="OTHER", path="unmatched", status_code="400") == 1
    assert exp.value("smg_http_requests_total", method="OTHER", path="unmatched", status_code="431") == 1
    await gateway.client.close()


def test_engine_load_gauges_show_each_workers_last_answered_poll_rank_by_rank():
    registry, _, metrics = setup()
    http = make_worker(registry, "http://a:1", model_id="m")
    grpc = make_worker(registry, "grpc://b:1", model_id="m")
    silent = make_worker(registry, "http://c:1", model_id="m")
    http.engine_ranks = (RankLoad(0, 2, 1, 0.5), RankLoad(1, 4, 0, 0.25))
    http.engine_polls = 3
    grpc.engine_ranks = (RankLoad(0, 1, 0, 0.75, 88.0, 0.4),)
    grpc.engine_polls = 1
    silent.engine_polls = 5  # answered before, failed at the last poll: no stale figures
    exp = scrape(metrics)
    assert exp.value("smg_engine_running_requests", worker="http://a:1", model="m", dp_rank="1") == 4
    assert exp.value("smg_engine_waiting_requests", worker="http://a:1", dp_rank="0") == 1
    assert exp.value("smg_engine_token_usage", worker="grpc://b:1", dp_rank="0") == 0.75
    assert exp.value("smg_engine_gen_throughput", worker="grpc://b:1") == 88.0
    assert exp.value("smg_engine_cache_hit_rate", worker="grpc://b:1") == 0.4
    # /get_load says nothing of throughput or hit rate: no series rather than a made-up 0.
    assert {s["worker"] for s in exp.series("smg_engine_gen_throughput")} == {"grpc://b:1"}
    assert {s["worker"] for s in exp.series("smg_engine_running_requests")} == {"http://a:1", "grpc://b:1"}
    assert exp.value("smg_engine_load_polls_total", worker="http://a:1", mode="poll") == 3
    assert exp.value("smg_engine_load_polls_total", worker="http://c:1", mode="poll") == 5
