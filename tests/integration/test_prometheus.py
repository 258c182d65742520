"""A real Prometheus scrapes a real gateway in front of simulated workers.

Prometheus scrapes the gateway's metrics port and `/engine_metrics` on its main port every second. After a
workload of plain and streamed requests, 4xx answers, a failing worker (its attempts retried elsewhere until
its breaker opens) and 5xx answers, every query of SMG's per-worker metrics guide and every panel expression of
deploy/grafana/shepherd.json returns series, and what they say agrees with the traffic sent.

The workload runs in rounds with a scrape in between, so every series the last round increments already has
a sample: Prometheus 2.x does not see the first increment of a series born between two scrapes, and the rate
panels would read 0 for it.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.components import require
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import ManagedProcess, SimFleet, free_port, http_request, wait_until

MODEL = "sim-model"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shepherd.json"
# SMG's worker guide: "Per-Worker Metrics" and "Worker Comparison Dashboard".
SEED_QUERIES = {
    "requests per worker": "sum by (worker) (rate(smg_worker_requests_total[5m]))",
    "latency per worker": "histogram_quantile(0.99, sum by (worker, le) (rate(smg_worker_latency_seconds_bucket[5m])))",
    "error rate per worker": 'sum by (worker) (rate(smg_worker_requests_total{status=~"5.."}[5m]))'
    " / sum by (worker) (rate(smg_worker_requests_total[5m]))",
    "compare worker performance": "topk(10, sum by (worker) (rate(smg_worker_requests_total[5m])))",
    "slowest workers": "topk(3, histogram_quantile(0.99,"
    " sum by (worker, le) (rate(smg_worker_latency_seconds_bucket[5m]))))",
}
# What Grafana substitutes when the dashboard shows the last few minutes of a 1 s scrape.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m"}
INFERENCE_PATHS = ("/generate", "/v1/chat/completions")
SENT_PATHS = "/generate|/v1/.+|unmatched"  # the routes the workload calls (not the probes start_gateway uses)
BREAKER_THRESHOLD = 3
WORKER_ERRORS = "Worker error ratio (5xx per attempt)"  # a panel title
PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: shepherd
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
  - job_name: shepherd-engines
    metrics_path: /engine_metrics
    static_configs: [{{targets: ["127.0.0.1:{main_port}"]}}]
"""


class Prometheus:
    """A Prometheus server and its HTTP API."""

    def __init__(self, process: ManagedProcess, url: str) -> None:
        self.process = process
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now."""
        query = urllib.parse.urlencode({"query": promql})
        status, body = http_request("GET", f"{self.url}/api/v1/query?{query}")
        assert status == 200 and body["status"] == "success", f"{promql}: {status} {body}"
        assert body["data"]["resultType"] == "vector", promql
        return body["data"]["result"]

    def values(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        """`promql`'s samples keyed by the values of `labels`."""
        samples = self.query(promql)
        keyed = {tuple(s["metric"].get(name, "") for name in labels): float(s["value"][1]) for s in samples}
        assert len(keyed) == len(samples), f"{promql}: {labels} do not tell its series apart"
        return keyed

    def value(self, promql: str) -> float:
        """The value of `promql`, which must return exactly one series."""
        (only,) = self.values(promql).values()
        return only

    def wait(self, condition: Callable[[], bool], what: str, details: Callable[[], str] = str) -> None:
        """Poll `condition` (PromQL queries) until it holds; on the deadline fail with the targets' health."""

        def error(message: str) -> Exception:
            _, targets = http_request("GET", f"{self.url}/api/v1/targets")
            health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["data"]["activeTargets"]]
            return self.process.fail(f"{message} {details()}; targets: {health}")

        wait_until(condition, 15, what, error=error)

    def wait_scraped_after(self, moment: float) -> None:
        """Wait until every target has been scraped successfully since `moment` (a `time.time()`)."""

        def scraped() -> bool:
            up = self.values("up", "job")
            stamps = self.values("timestamp(up)", "job")
            return len(up) == 2 and all(up.values()) and all(t > moment for t in stamps.values())

        self.wait(scraped, "a scrape of both targets")


@pytest.fixture
def gateway(sims: SimFleet, tmp_path: Path) -> Iterator[GatewayProcess]:
    args = (
        *("--policy", "round_robin", "--disable-health-check"),
        *("--retry-max-retries", "2", "--retry-initial-backoff-ms", "1", "--retry-max-backoff-ms", "1"),
        *("--cb-failure-threshold", str(BREAKER_THRESHOLD), "--cb-timeout-duration-secs", "600"),
        *("--load-monitor-interval", "1"),  # the engines' polled load (smg_engine_*) within the test's time
    )
    with start_gateway(tmp_path / "gateway", sims.urls, *args) as gw:
        yield gw


@pytest.fixture
def prometheus(gateway: GatewayProcess, tmp_path: Path) -> Iterator[Prometheus]:
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(metrics_port=gateway.prometheus_port, main_port=gateway.port))
    port = free_port()
    argv = [
        require("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with ManagedProcess(argv, "prometheus", log_dir=tmp_path).start() as process:
        server = Prometheus(process, f"http://127.0.0.1:{port}")
        process.wait_http(server.url + "/-/ready")
        yield server


class Workload:
    """Sends requests through the gateway and tallies its answers as `smg_http_requests_total` labels them."""

    def __init__(self, gateway: GatewayProcess, sims: SimFleet) -> None:
        self.gateway = gateway
        self.sims = sims
        self.answers: Counter[tuple[str, str, str]] = Counter()
        self.failing = sims.urls[0]  # the worker that fails, and whose breaker opens
        self.streams = 0
        self._sent = 0

    def each_worker(self, *values: float) -> dict[tuple[str, ...], float]:
        """`values` (one for all, or one per worker) keyed like `Prometheus.values(q, "worker")`."""
        return {(url,): values[i % len(values)] for i, url in enumerate(self.sims.urls)}

    def call(self, method: str, path: str, body: Any = None, route: str | None = None) -> int:
        status, _ = http_request(method, self.gateway.url + path, body, timeout=10)
        self.answers[(method, route or path, str(status))] += 1
        return status

    def generate(self) -> int:
        self._sent += 1
        return self.call(
            "POST", "/generate", {"text": f"request {self._sent}", "sampling_params": {"max_new_tokens": 4}}
        )

    def healthy_traffic(self) -> None:
        """Plain and streamed requests every worker answers, and two the gateway refuses itself."""
        for _ in range(4):
            assert self.generate() == 200
        for i in range(2):
            messages = [{"role": "user", "content": f"stream {self._sent} {i}"}]
            body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 5}
            assert self.call("POST", "/v1/chat/completions", body) == 200
            self.streams += 1
        assert self.call("POST", "/v1/completions", {"model": MODEL}) == 400  # no prompt
        assert self.call("GET", "/no/such/route", route="unmatched") == 404

    def failures(self, index: int) -> int:
        """Attempts worker `index` answered with 500."""
        return sum(entry["status"] == 500 for entry in self.sims.log(index)["requests"])

    def fail_once(self, index: int) -> None:
        """Worker `index` fails one attempt, which is retried on another worker."""
        self.sims.ctl(index, error_status=500)
        before = self.failures(index)
        for _ in self.sims.urls:  # round robin reaches every worker within one turn
            assert self.generate() == 200
            if self.failures(index) > before:
                break
        else:
            pytest.fail(f"round robin never sent a request to worker {index}")
        self.sims.ctl(index, reset=True)

    def trip_breaker(self, index: int) -> None:
        """Worker `index` fails until its breaker opens; every failed attempt is retried elsewhere."""
        url = self.sims.urls[index]
        self.sims.ctl(index, error_status=500)
        for _ in range(BREAKER_THRESHOLD * len(self.sims.urls)):
            assert self.generate() == 200
            if self.gateway.metrics().value("smg_worker_cb_state", worker=url) == 1:
                break
        else:
            pytest.fail(f"the breaker of {url} never opened")
        self.sims.ctl(index, reset=True)

    def fail_everywhere(self) -> None:
        """Every worker fails: the request's attempts all fail and the gateway answers 500."""
        for index in range(len(self.sims.urls)):
            self.sims.ctl(index, error_status=500)
        assert self.generate() == 500
        for index in range(len(self.sims.urls)):
            self.sims.ctl(index, reset=True)

    def attempts(self) -> Counter[tuple[str, str]]:
        """Inference attempts each worker saw, by (worker, status), from the workers' own request logs."""
        seen: Counter[tuple[str, str]] = Counter()
        for index, url in enumerate(self.sims.urls):
            log = self.sims.log(index)
            entries = [e for e in log["requests"] if e["path"] in INFERENCE_PATHS]
            assert len(entries) == sum(log["counts"].get(p, 0) for p in INFERENCE_PATHS), "request log truncated"
            seen.update((url, str(e["status"])) for e in entries)
        return seen


def dashboard_expressions() -> dict[str, list[str]]:
    """Every panel's target expressions by panel title (rows' nested panels included), Grafana variables filled."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    expressions: dict[str, list[str]] = {}
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a Grafana variable the test does not fill: {expr}"
            expressions.setdefault(panel["title"], []).append(expr)
    return expressions


def test_seed_queries_and_dashboard_panels_agree_with_the_traffic(
    gateway: GatewayProcess, sims: SimFleet, prometheus: Prometheus
) -> None:
    workload = Workload(gateway, sims)
    panels = {title: Panel(prometheus, exprs) for title, exprs in dashboard_expressions().items()}
    queries = [*SEED_QUERIES.values(), *(expr for panel in panels.values() for expr in panel.exprs)]
    prometheus.wait_scraped_after(time.time())  # pre-registered series (retries) start from 0

    # Rounds 1 and 2 are healthy: the error ratios read 0, not "no data". Round 3 creates the failure series, so
    # that round 4 moves every series the queries read; the failing worker's breaker opens.
    workload.healthy_traffic()
    prometheus.wait_scraped_after(time.time())
    workload.healthy_traffic()
    errors: list[Any] = []

    def no_errors() -> bool:
        errors[:] = [
            panels[title].values(*labels) for title, labels in (("Error ratio", ()), (WORKER_ERRORS, ("worker",)))
        ]
        return errors[0][0] == {(): 0} and errors[1] == [workload.each_worker(0)]  # 5xx ratio, per worker

    prometheus.wait(no_errors, "0 error ratios after healthy traffic", lambda: f"(error ratios: {errors})")
    workload.fail_once(0)
    workload.fail_everywhere()
    prometheus.wait_scraped_after(time.time())
    workload.healthy_traffic()
    workload.trip_breaker(0)
    workload.fail_everywhere()  # the open breaker keeps worker 0 out: the others fail

    # Rates need two samples of each series after the workload, and /engine_metrics may answer from a scrape of
    # the workers a moment old (--engine-metrics-cache-secs): poll until every query has series and the engines'
    # request counters have caught up with what the workers report.
    finished = time.time()
    engine_expected = workload.each_worker(*(float(sims.log(i)["num_requests"]) for i in range(len(sims.urls))))
    empty: list[str] = []
    engine: dict[tuple[str, ...], float] = {}

    def settled() -> bool:
        empty[:] = [q for q in queries if not prometheus.query(q)]
        engine.update(prometheus.values("sum by (worker_addr) (sglang:num_requests_total)", "worker_addr"))
        return not empty and engine == engine_expected

    prometheus.wait_scraped_after(finished)
    prometheus.wait(settled, "series for every query", lambda: f"(empty: {empty}; engine requests: {engine})")

    check_counters(prometheus, workload, engine)
    check_seed_queries(prometheus, workload)
    check_panels(panels, workload)


class Panel:
    """A dashboard panel's expressions, evaluated now."""

    def __init__(self, prometheus: Prometheus, exprs: list[str]) -> None:
        self.prometheus = prometheus
        self.exprs = exprs

    def values(self, *labels: str) -> list[dict[tuple[str, ...], float]]:
        """Each expression's samples keyed by the values of `labels`."""
        return [self.prometheus.values(expr, *labels) for expr in self.exprs]


def check_counters(prometheus: Prometheus, workload: Workload, engine: dict[tuple[str, ...], float]) -> None:
    """Counters equal the traffic: the gateway's answers, each worker's attempts, failures, retries, streams."""
    sent = f'sum by (method, path, status_code) (smg_http_requests_total{{path=~"{SENT_PATHS}"}})'
    assert prometheus.values(sent, "method", "path", "status_code") == workload.answers
    answered_500 = workload.answers[("POST", "/generate", "500")]
    assert answered_500 == 2
    attempts = workload.attempts()
    per_worker = prometheus.values("sum by (worker, status) (smg_worker_requests_total)", "worker", "status")
    assert {key: n for key, n in per_worker.items() if n} == attempts  # usual statuses also exist at 0
    injected = sum(n for (_, status), n in attempts.items() if status == "500")
    assert injected == sum(workload.failures(i) for i in range(len(workload.sims.urls)))
    assert prometheus.value('sum(smg_worker_requests_total{status=~"5.."})') == injected
    assert attempts[(workload.failing, "500")] >= BREAKER_THRESHOLD + 1
    retried = injected - answered_500  # the last failed attempt of a request is answered, not retried
    assert prometheus.value('sum(smg_worker_retries_total{endpoint="generate"})') == retried
    assert prometheus.value("sum(smg_worker_retries_total)") == retried
    assert prometheus.value('sum(smg_router_ttft_seconds_count{endpoint="chat"})') == workload.streams
    assert prometheus.value('sum(smg_router_tpot_seconds_count{endpoint="chat"})') == workload.streams
    transitions = "sum by (worker, from, to) (smg_worker_cb_transitions_total)"
    assert prometheus.values(transitions, "worker", "from", "to") == {(workload.failing, "closed", "open"): 1}
    assert sum(engine.values()) == sum(n for (_, status), n in attempts.items() if status == "200")


def check_seed_queries(prometheus: Prometheus, workload: Workload) -> None:
    """SMG's per-worker queries see every worker, the failing one's errors, finite latencies."""
    workers = set(workload.each_worker(0))
    per_worker = prometheus.values(SEED_QUERIES["requests per worker"], "worker")
    assert set(per_worker) == workers and all(v > 0 for v in per_worker.values())
    latency = prometheus.values(SEED_QUERIES["latency per worker"], "worker")
    assert set(latency) == workers and all(math.isfinite(v) for v in latency.values())
    assert prometheus.values(SEED_QUERIES["error rate per worker"], "worker")[(workload.failing,)] > 0
    assert set(prometheus.values(SEED_QUERIES["compare worker performance"], "worker")) == workers
    slowest = prometheus.values(SEED_QUERIES["slowest workers"], "worker")
    assert len(slowest) == 3 and all(math.isfinite(v) for v in slowest.values())


def check_panels(panels: dict[str, Panel], workload: Workload) -> None:
    """Each panel shows the traffic: rates above 0 where it flowed, finite quantiles, the states it left."""
    workers = set(workload.each_worker(0))
    failing = (workload.failing,)
    per_worker = panels["Requests per worker"].values("worker")[0]
    assert set(per_worker) == workers and all(v > 0 for v in per_worker.values())
    assert all(ratio[()] > 0 for ratio in panels["Error ratio"].values())  # 5xx, 4xx
    worker_errors = panels[WORKER_ERRORS].values("worker")[0]
    assert set(worker_errors) == workers and worker_errors[failing] > 0
    quantiles = (
        "Inference latency (gateway, whole response)",
        "Time to first token (streams)",
        "Time per output token (streams)",
    )
    for title in quantiles:
        assert all(math.isfinite(q[()]) for q in panels[title].values()), title
    p99 = panels["p99 latency per worker"].values("worker")[0]
    assert set(p99) == workers and all(math.isfinite(v) for v in p99.values())
    assert panels["Retries by endpoint"].values("endpoint")[0][("generate",)] > 0
    assert panels["Circuit breaker state"].values("worker")[0] == {**workload.each_worker(0), failing: 1}
    assert (workload.failing, "open") in panels["Breaker transitions"].values("worker", "to")[0]
    pool, ready = panels["Worker pool"].values("worker_type", "connection_mode")
    assert pool == {("regular", "http"): len(workers)} and ready == {("", ""): len(workers)}
    assert panels["Worker health (1 = ready)"].values("worker")[0] == workload.each_worker(1)
    assert panels["Requests in flight per worker"].values("worker")[0] == workload.each_worker(0)
    engine, gateway = panels["Requests in each engine (polled) and through this gateway"].values("worker")
    assert set(engine) == set(gateway) == workers and all(v >= 0 for v in engine.values())
    assert panels["Admission: in flight and queued"].values() == [{(): 0}, {(): 0}]
    engines = ("Prefix cache hit rate", "Running and queued requests", "KV token usage", "Generation throughput")
    for title in engines:
        assert all(set(series) == workers for series in panels[title].values("worker_addr")), title
    engine_ttft = panels["Engine time to first token p99"].values("worker_addr")[0]
    assert set(engine_ttft) == workers and all(math.isfinite(v) for v in engine_ttft.values())
