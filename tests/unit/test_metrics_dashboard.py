"""The Grafana dashboard queries only series the gateway exports (or engine series from /engine_metrics)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from shepherd.config import CircuitBreakerConfig
from shepherd.http.admission import Admission
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.context import CHAT
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.load_monitor import RankLoad
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shepherd.json"
# Engine series the dashboard reads (SGLang names; the sim exports them too), matched by a name regex.
ENGINE_SERIES = {"cache_hit_rate", "num_running_reqs", "num_queue_reqs", "token_usage", "gen_throughput"}


def exported_sample_names() -> set[str]:
    registry = Registry()
    metrics = GatewayMetrics(registry, Admission(1, 1, 1))
    worker = Worker("http://w:1", CircuitBreaker(CircuitBreakerConfig(), registry.breaker_listener("http://w:1")))
    worker.status = WorkerStatus.READY
    worker.engine_ranks = (RankLoad(0, 1, 0, 0.5),)  # what a load poll of an HTTP worker gives
    registry.add(worker)
    metrics.worker_cells(worker).record(200, 0.1)
    metrics.record_stream(worker, CHAT, 0.1, 3, 0.1)
    for _ in range(CircuitBreakerConfig().failure_threshold):
        worker.breaker.record_failure()
    metrics.record_engine_scrape(True)
    metrics.http_requests.child("POST", "/generate", "200").inc()  # what record_http does for a request
    metrics.http_duration.child("POST", "/generate", "200").observe(0.1)
    text = generate_latest(metrics).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_is_valid_and_queries_only_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert exprs
    exported = exported_sample_names()
    for expr in exprs:
        for name in re.findall(r"\bsmg_[a-z_]+", expr):
            assert name in exported, f"{name} in {expr!r} is not exported"
        for engine in re.findall(r"sglang\[:_\]([a-z_]+)", expr):
            assert engine.removesuffix("_bucket").removesuffix("_seconds") in ENGINE_SERIES | {"time_to_first_token"}
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "error", "latency", "time to first token", "health", "breaker", "cache hit"):
        assert topic in titles
