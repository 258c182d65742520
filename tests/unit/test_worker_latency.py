"""A worker's p99 latency (shown by GET /workers) is sorted once per new sample, not once per listing."""

from __future__ import annotations

from shepherd.config import CircuitBreakerConfig
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.load import Lease
from shepherd.workers.worker import Worker


def test_p99_follows_new_samples():
    worker = Worker("http://a", CircuitBreaker(CircuitBreakerConfig()))
    assert worker.latency_p99_ms() == 0.0
    for i in range(100):
        worker.record_latency(i / 1000)
    assert worker.latency_p99_ms() == 99.0
    assert worker.latency_p99_ms() == 99.0  # cached: the same answer without new samples
    for _ in range(5):
        worker.record_latency(1.0)
    assert worker.latency_p99_ms() == 1000.0
    with Lease(worker) as lease:
        lease.ok = True
    assert len(worker.latencies) == 106 and worker.p99_cache is None
