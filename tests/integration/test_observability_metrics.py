"""Gateway metrics and request logs of a real gateway process in front of simulated workers."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.metrics import Exposition
from tests.support.processes import SimFleet, start_sim

MODEL = "sim-model"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> SimFleet:
    with start_sim(tmp_path_factory.mktemp("obs-sims"), 2) as sims:
        yield sims


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("obs-logs")


@pytest.fixture(scope="module")
def gateway(fleet: SimFleet, log_dir, tmp_path_factory) -> GatewayProcess:
    args = ("--policy", "round_robin", "--log-json", "--log-dir", str(log_dir), "--disable-health-check")
    with start_gateway(tmp_path_factory.mktemp("obs-gw"), fleet.urls, *args) as gw:
        yield gw


@pytest.fixture
def sims(fleet: SimFleet) -> SimFleet:
    fleet.reset()
    return fleet


def routed_count(sims: SimFleet, index: int, *paths: str) -> int:
    counts = sims.log(index)["counts"]
    return sum(counts.get(path, 0) for path in paths)


async def test_counts_after_known_traffic_are_exact(gateway, sims):
    before = gateway.metrics()
    async with aiohttp.ClientSession() as session:
        for i in range(6):
            payload = {"text": f"hello {i}", "sampling_params": {"max_new_tokens": 2}}
            async with session.post(gateway.url + "/generate", json=payload) as resp:
                assert resp.status == 200
        for _ in range(2):
            payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
            async with session.post(gateway.url + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
                await resp.read()
        async with session.post(gateway.url + "/v1/completions", json={"model": MODEL}) as resp:
            assert resp.status == 400  # no prompt: refused before any worker is tried
        async with session.get(gateway.url + "/no/such/route") as resp:
            assert resp.status == 404
        async with session.get(gateway.url + "/metrics") as resp:
            assert resp.status == 404  # metrics live on the Prometheus port only
    after = gateway.metrics()

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    http = "smg_http_requests_total"
    assert delta(http, method="POST", path="/generate", status_code="200") == 6
    assert delta(http, method="POST", path="/v1/chat/completions", status_code="200") == 2
    assert delta(http, method="POST", path="/v1/completions", status_code="400") == 1
    assert delta(http, method="GET", path="unmatched", status_code="404") == 2
    assert delta("smg_http_request_duration_seconds_count", method="POST", path="/generate", status_code="200") == 6
    for index, url in enumerate(sims.urls):
        served = routed_count(sims, index, "/generate", "/v1/chat/completions")
        assert delta("smg_worker_requests_total", worker=url, status="200") == served
        assert delta("smg_worker_latency_seconds_count", worker=url) == served
    assert delta("smg_worker_requests_total") == 8
    assert delta("smg_router_ttft_seconds_count", model=MODEL, endpoint="chat") == 2
    assert delta("smg_router_tpot_seconds_count", model=MODEL, endpoint="chat") == 2
    assert after.value("smg_worker_pool_size", worker_type="regular", connection_mode="http", model=MODEL) == 2
    for url in sims.urls:
        assert after.value("smg_worker_health", worker=url) == 1
        assert after.value("smg_worker_cb_state", worker=url) == 0
    assert not any("request_id" in labels for labels in after.series("smg_http_requests_total"))


async def test_retries_and_worker_errors_are_counted_per_attempt(gateway, sims):
    sims.ctl(0, error_status=503)  # every attempt on worker 0 fails and is retried on worker 1
    before = gateway.metrics()
    async with aiohttp.ClientSession() as session:
        for i in range(4):
            async with session.post(gateway.url + "/generate", json={"text": f"r{i}"}) as resp:
                assert resp.status == 200
    after = gateway.metrics()
    failed_attempts = routed_count(sims, 0, "/generate")
    assert failed_attempts >= 1  # round robin sends some requests to worker 0 first
    assert (
        after.total("smg_worker_requests_total", worker=sims.urls[0], status="503")
        - before.total("smg_worker_requests_total", worker=sims.urls[0], status="503")
        == failed_attempts
    )
    assert (
        after.total("smg_worker_requests_total", worker=sims.urls[1], status="200")
        - before.total("smg_worker_requests_total", worker=sims.urls[1], status="200")
        == 4
    )
    retries = "smg_worker_retries_total"
    labels = {"worker_type": "regular", "endpoint": "generate"}
    assert after.total(retries, **labels) - before.total(retries, **labels) == failed_attempts


async def test_expositions_stay_valid_under_concurrent_scrapes_and_traffic(gateway, sims):
    metrics_url = f"http://127.0.0.1:{gateway.prometheus_port}/metrics"
    async with aiohttp.ClientSession() as session:

        async def scrape_once() -> str:
            async with session.get(metrics_url) as resp:
                assert resp.status == 200
                return await resp.text()

        async def request(i: int) -> int:
            payload = {"text": f"c{i}", "stream": i % 2 == 0, "sampling_params": {"max_new_tokens": 3}}
            async with session.post(gateway.url + "/generate", json=payload) as resp:
                await resp.read()
                return resp.status

        results = await asyncio.gather(*(scrape_once() for _ in range(20)), *(request(i) for i in range(20)))
        async with session.get(f"http://127.0.0.1:{gateway.prometheus_port}/anything-else") as resp:
            assert resp.status == 404 and await resp.read() == b""
    bodies, statuses = results[:20], results[20:]
    assert statuses == [200] * 20
    for body in bodies:
        exposition = Exposition(body)  # raises on an invalid exposition
        assert exposition.families["smg_worker_requests"].type == "counter"
        assert exposition.families["smg_worker_latency_seconds"].type == "histogram"


async def test_json_request_log_lines_carry_request_id_worker_status_and_latency(gateway, sims, log_dir):
    async with aiohttp.ClientSession() as session:
        headers = {"x-request-id": "obs-log-line-1"}
        async with session.post(gateway.url + "/generate", json={"text": "log me"}, headers=headers) as resp:
            assert resp.status == 200
            worker = resp.headers["x-smg-routed-worker-id"]

    def logged() -> list[dict]:
        lines = (log_dir / "shepherd.log").read_text().splitlines()
        return [rec for rec in map(json.loads, lines) if rec.get("request_id") == "obs-log-line-1"]

    gateway.process.wait_for(lambda: bool(logged()), 5, "the request's log line")
    (record,) = logged()
    assert record["level"] == "debug"
    assert record["worker"] == worker
    assert record["status"] == 200
    assert record["method"] == "POST" and record["path"] == "/generate"
    assert isinstance(record["latency_ms"], float) and record["latency_ms"] > 0
