"""Engine metrics and gRPC workers across real processes.

HTTP workers are `shepherd sim`s; gRPC workers are `shepherd sim --grpc` (SglangScheduler and grpc.health.v1 on its
port, its HTTP app -- /metrics and the request log -- on the derived sidecar port) or, for the production path,
a grpc.aio health server plus `shepherd metrics-sidecar` serving real Prometheus multiprocess files.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest

from shepherd.observability.sidecar_address import sidecar_metrics_url, sidecar_port
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.grpc_worker import NOT_SERVING, GrpcHealthWorker
from tests.support.metrics import Exposition
from tests.support.processes import ManagedProcess, SimFleet, http_request, start_sim

MODEL = "sim-model"
GATEWAY_KEY = "gateway-key"
WORKER_KEY = "grpc-worker-secret"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture(scope="module")
def http_sims(tmp_path_factory) -> SimFleet:
    with start_sim(tmp_path_factory.mktemp("eng-http"), 2) as sims:
        yield sims


@pytest.fixture(scope="module")
def grpc_sim(tmp_path_factory) -> SimFleet:
    """A simulated gRPC engine; its `urls` are the sidecar (HTTP) addresses, for ctl and log."""
    with start_sim(tmp_path_factory.mktemp("eng-grpc"), 1, "--grpc") as sims:
        sims.grpc_url = sims.urls[0]
        assert sims.grpc_url.startswith("grpc://")
        sims.urls = [sidecar_metrics_url(sims.grpc_url).removesuffix("/metrics")]
        yield sims


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eng-logs")


@pytest.fixture(scope="module")
def gateway(http_sims, grpc_sim, log_dir, tmp_path_factory) -> GatewayProcess:
    args = (
        *("--health-check-interval-secs", "1", "--health-check-timeout-secs", "1"),
        *("--health-failure-threshold", "1", "--health-success-threshold", "1"),
        *("--log-level", "info", "--log-dir", str(log_dir), "--policy", "round_robin"),
        *("--engine-metrics-cache-secs", "0"),  # each test's call scrapes the engines as they are now
    )
    with start_gateway(tmp_path_factory.mktemp("eng-gw"), http_sims.urls, *args, api_key=GATEWAY_KEY) as gw:
        status, body = gw.post(
            "/workers", {"url": grpc_sim.grpc_url, "model_id": MODEL, "api_key": WORKER_KEY}, headers=AUTH
        )
        assert status == 202, body
        gw.wait_workers(
            lambda ws: any(w["url"] == grpc_sim.grpc_url and w["status"] == "ready" for w in ws), "gRPC worker ready"
        )
        yield gw


@pytest.fixture(autouse=True)
def clean_workers(http_sims, grpc_sim):
    http_sims.reset()
    grpc_sim.reset()


def engine_metrics(gateway: GatewayProcess) -> tuple[str, Exposition]:
    status, text = gateway.get("/engine_metrics")  # a public route: no key even under --api-key
    assert status == 200, text
    return text, Exposition(text)


def worker_status(workers: list[dict], url: str) -> str | None:
    return next((w["status"] for w in workers if w["url"] == url), None)


def grpc_worker_status(gateway: GatewayProcess, url: str) -> str | None:
    return worker_status(gateway.workers(), url)


def test_grpc_registration_reads_the_model_from_the_worker(gateway, grpc_sim):
    status, body = gateway.post("/workers", {"url": "grpc://127.0.0.1:9"}, headers=AUTH)
    assert status == 202, body  # no model needed: GetModelInfo names it once the worker answers
    http_request("DELETE", f"{gateway.url}/workers/{body['worker_id']}", headers=AUTH)
    worker = next(w for w in gateway.workers() if w["url"] == grpc_sim.grpc_url)
    assert worker["connection_mode"] == "grpc" and worker["model_id"] == MODEL
    assert worker["labels"]["served_model_name"] == MODEL


def test_grpc_health_is_probed_with_the_healthcheck_rpc(gateway, grpc_sim):
    grpc_sim.ctl(0, health_status=503)  # the sim's HealthCheck now answers healthy=false
    gateway.process.wait_for(lambda: grpc_worker_status(gateway, grpc_sim.grpc_url) == "not_ready", 10, "not_ready")
    assert gateway.metrics().value("smg_worker_health", worker=grpc_sim.grpc_url) == 0
    grpc_sim.ctl(0, health_status=None)
    gateway.process.wait_for(lambda: grpc_worker_status(gateway, grpc_sim.grpc_url) == "ready", 10, "ready again")
    exposition = gateway.metrics()
    assert exposition.value("smg_worker_health", worker=grpc_sim.grpc_url) == 1
    assert exposition.value("smg_worker_pool_size", worker_type="regular", connection_mode="grpc", model=MODEL) == 1


def test_a_mixed_fleet_serves_from_http_and_grpc_workers(gateway, http_sims, grpc_sim):
    for i in range(6):
        status, body = gateway.post("/generate", {"model": MODEL, "text": f"x{i}"}, headers=AUTH)
        assert status == 200, body
    over_grpc = grpc_sim.log(0)["counts"].get("/sglang.grpc.scheduler.SglangScheduler/Generate", 0)
    over_http = sum(http_sims.log(i)["counts"].get("/generate", 0) for i in range(2))
    assert over_grpc + over_http == 6


def test_engine_metrics_merge_http_and_grpc_workers_and_skip_a_failing_one(gateway, http_sims, grpc_sim):
    before = gateway.metrics()
    http_sims.ctl(1, refuse=True)
    text, exposition = engine_metrics(gateway)
    good, failing = http_sims.urls
    running = exposition.families["sglang:num_running_reqs"]
    assert running.type == "gauge"
    assert {s.labels["worker_addr"] for s in running.samples} == {good, grpc_sim.grpc_url}
    assert text.count("# TYPE sglang:num_running_reqs gauge") == 1
    assert exposition.families["sglang:time_to_first_token_seconds"].type == "histogram"
    assert text.startswith("# shepherd engine_metrics: scraped 2 of 3 workers\n")
    assert f"# shepherd engine_metrics: failed {failing} ({failing}/metrics)" in text
    failures = "smg_engine_metrics_scrapes_total"
    assert gateway.metrics().total(failures, result="failure") - before.total(failures, result="failure") == 1


def test_no_key_reaches_the_sidecar_and_http_workers_get_only_their_own(gateway, http_sims, grpc_sim):
    engine_metrics(gateway)
    sidecar_seen = [r for r in grpc_sim.log(0)["requests"] if r["path"] == "/metrics"]
    assert len(sidecar_seen) == 1  # scraped once
    assert "authorization" not in sidecar_seen[0]["headers"]
    assert WORKER_KEY not in str(sidecar_seen) and GATEWAY_KEY not in str(sidecar_seen)
    for index in range(2):
        (seen,) = [r for r in http_sims.log(index)["requests"] if r["path"] == "/metrics"]
        assert seen["headers"]["authorization"] == f"Bearer {GATEWAY_KEY}"  # no worker key: the gateway's


def test_request_lines_are_not_logged_at_info_but_state_changes_are(gateway, log_dir):
    status, _ = gateway.post("/generate", {"text": "quiet"}, headers={**AUTH, "x-request-id": "obs-info-level-1"})
    assert status == 200
    gateway.process.wait_for(lambda: "registered worker" in (log_dir / "shepherd.log").read_text(), 5, "log")
    assert "obs-info-level-1" not in (log_dir / "shepherd.log").read_text()


# --- the production path: real multiprocess files served by `shepherd metrics-sidecar` -----------------------
def write_multiprocess_metrics(directory: Path) -> None:
    """What an engine's processes leave in PROMETHEUS_MULTIPROC_DIR (written by a separate process)."""
    code = textwrap.dedent(
        """
        from prometheus_client import Counter, Histogram
        Counter("sglang:num_requests", "Requests.", ["model_name"]).labels("sim-model").inc(3)
        Histogram("sglang:e2e_request_latency_seconds", "Latency.", buckets=(0.1, 1.0)).observe(0.5)
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)


def sidecar_command(directory: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "shepherd.cli", "metrics-sidecar", "--multiproc-dir", str(directory), *args]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def test_metrics_sidecar_serves_a_grpc_engine_end_to_end(gateway, tmp_path):
    # The gRPC stand-in is served by this test's event loop: blocking waits run in threads.
    write_multiprocess_metrics(tmp_path)
    async with GrpcHealthWorker(model=MODEL) as engine:
        if not port_is_free(sidecar_port(engine.port)):
            pytest.skip(f"sidecar port {sidecar_port(engine.port)} of gRPC port {engine.port} is taken")
        command = sidecar_command(tmp_path, "--host", "127.0.0.1", "--grpc-port", str(engine.port))
        with ManagedProcess(command, "sidecar", log_dir=tmp_path).start() as sidecar:
            await asyncio.to_thread(sidecar.wait_http, sidecar_metrics_url(engine.url))
            status, body = await asyncio.to_thread(
                gateway.post, "/workers", {"url": engine.url, "model": MODEL}, headers=AUTH
            )
            assert status == 202, body
            await asyncio.to_thread(gateway.wait_workers, lambda ws: worker_status(ws, engine.url) == "ready", "ready")
            try:
                _, exposition = await asyncio.to_thread(engine_metrics, gateway)
                assert exposition.value("sglang:num_requests_total", worker_addr=engine.url, model_name=MODEL) == 3
                assert exposition.value("sglang:e2e_request_latency_seconds_count", worker_addr=engine.url) == 1
                await engine.set(NOT_SERVING)
                await asyncio.to_thread(
                    gateway.wait_workers, lambda ws: worker_status(ws, engine.url) == "not_ready", "not_ready"
                )
            finally:
                quoted = urllib.parse.quote(engine.url, safe="")
                await asyncio.to_thread(http_request, "DELETE", f"{gateway.url}/workers/{quoted}", headers=AUTH)
                await asyncio.to_thread(
                    gateway.wait_workers, lambda ws: worker_status(ws, engine.url) is None, "worker removed"
                )
            assert sidecar.stop() == 0  # SIGTERM: a clean exit


def test_metrics_sidecar_binds_ipv6_and_fails_clearly_on_a_taken_port(tmp_path):
    write_multiprocess_metrics(tmp_path)
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    command = sidecar_command(tmp_path, "--host", "::1", "--port", str(port))
    with ManagedProcess(command, "v6", log_dir=tmp_path).start() as v6:
        v6.wait_http(f"http://[::1]:{port}/metrics")
        status, text = http_request("GET", f"http://[::1]:{port}/metrics")
        assert status == 200 and 'sglang:num_requests_total{model_name="sim-model"} 3.0' in text
        assert http_request("GET", f"http://[::1]:{port}/other")[0] == 404
        taken = subprocess.run(
            sidecar_command(tmp_path, "--host", "::1", "--port", str(port)), capture_output=True, text=True, timeout=30
        )
        assert taken.returncode == 1
        assert f"cannot listen on [::1]:{port}" in taken.stderr and "address already in use" in taken.stderr
        assert v6.stop() == 0
