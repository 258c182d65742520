"""What the metrics hooks cost per request on the hot path (a microbenchmark with a generous ceiling).

Per proxied request the gateway runs: the HTTP-layer record (middleware), the per-attempt worker record
(router) and, for streams, the stream record plus a byte count per chunk. Gauges cost nothing per request.
The measured figure is printed (`pytest -s`) so it can be tracked; the assertion only catches regressions
of an order of magnitude on a busy shared machine.
"""

from __future__ import annotations

import time

from shepherd.config import GatewayConfig
from shepherd.exchange import Request
from shepherd.gateway import Gateway
from shepherd.http.app import build_routes
from shepherd.routing.context import CHAT
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker, WorkerStatus

ITERATIONS = 50_000
CEILING_US = 20.0


class _Connection:
    """What a `Request` asks of its connection outside of body reading: the peer, and whether it is gone."""

    peer = None
    closed = False


async def test_hot_path_hooks_cost_a_few_microseconds_per_request():
    gateway = Gateway(GatewayConfig(host="127.0.0.1", port=0))
    routes = build_routes(gateway)
    request = Request(_Connection(), "POST", b"/v1/chat/completions", [])  # type: ignore[arg-type]
    request.route = routes.resolve(request)  # what the pipeline does before the handler runs
    assert request.route.template == "/v1/chat/completions"
    worker = Worker("http://w:1", CircuitBreaker(gateway.config.circuit_breaker), model_id="m")
    worker.status = WorkerStatus.READY
    gateway.registry.add(worker)
    metrics = gateway.metrics
    chunk = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'

    def one_request(stream: bool) -> None:
        started = time.perf_counter()
        attempt_started = time.perf_counter()
        if stream:
            events = 0
            for _ in range(8):  # an 8-token stream: the per-chunk work
                events += chunk.count(b"data:")
            metrics.record_stream(worker, CHAT, time.perf_counter() - started, events, 0.01)
        metrics.worker_cells(worker).record(200, time.perf_counter() - attempt_started)
        metrics.record_http(request, 200, time.perf_counter() - started)

    def baseline(stream: bool) -> None:  # the same clock reads and loop, no metrics
        started = time.perf_counter()
        attempt_started = time.perf_counter()
        if stream:
            events = 0
            for _ in range(8):
                events += len(chunk)
            _ = time.perf_counter() - started
        _ = time.perf_counter() - attempt_started
        _ = time.perf_counter() - started

    results = {}
    for stream in (False, True):
        costs = []
        for _ in range(3):  # best of three: the least disturbed by other processes
            t0 = time.process_time()
            for _ in range(ITERATIONS):
                one_request(stream)
            t1 = time.process_time()
            for _ in range(ITERATIONS):
                baseline(stream)
            t2 = time.process_time()
            costs.append(((t1 - t0) - (t2 - t1)) / ITERATIONS * 1e6)
        results["stream" if stream else "plain"] = min(costs)
    print(f"\nmetrics hooks CPU per request: plain {results['plain']:.2f} us, stream {results['stream']:.2f} us")
    assert results["plain"] < CEILING_US
    assert results["stream"] < CEILING_US
    await gateway.client.close()
