"""Reliability across real processes: health states, circuit breakers, retries, admission, auth, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import aiohttp
import pytest

from tests.support.gateway import start_gateway
from tests.support.processes import http_request, start_sim

FAST_HEALTH = ("--health-check-interval-secs", "0.2", "--health-check-timeout-secs", "0.5",
               "--health-failure-threshold", "2", "--health-success-threshold", "2")  # fmt: skip


def generate_attempts(sims, index: int) -> list[dict]:
    return [r for r in sims.log(index)["requests"] if r["path"] == "/generate"]


def test_health_states_follow_probes_and_recover(tmp_path):
    with start_sim(tmp_path, 2) as sims, start_gateway(tmp_path, sims.urls, *FAST_HEALTH) as gw:
        sims.ctl(0, health_status=503)
        workers = gw.wait_workers(
            lambda ws: {w["url"]: w["status"] for w in ws}[sims.urls[0]] == "not_ready", "worker 0 not_ready"
        )
        assert gw.get("/readiness")[0] == 200
        assert {w["url"]: w["healthy"] for w in workers} == {sims.urls[0]: False, sims.urls[1]: True}
        for _ in range(6):  # only the ready worker receives traffic
            status, _body = gw.post("/generate", {"text": "x"})
            assert status == 200
        assert not generate_attempts(sims, 0)
        gw.wait_workers(lambda ws: {w["url"]: w["status"] for w in ws}[sims.urls[0]] == "failed", "worker 0 failed")
        sims.ctl(0, reset=True)
        gw.wait_workers(lambda ws: all(w["status"] == "ready" for w in ws), "worker 0 to recover")


def test_failed_workers_are_removed_when_asked(tmp_path):
    args = (*FAST_HEALTH, "--remove-unhealthy-workers")
    with start_sim(tmp_path, 2) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(1, health_status=500)
        gw.wait_workers(lambda ws: [w["url"] for w in ws] == [sims.urls[0]], "the failed worker to be removed")


def test_breaker_opens_half_opens_and_closes(tmp_path):
    args = ("--disable-retries", "--disable-health-check", "--cb-failure-threshold", "2",
            "--cb-success-threshold", "2", "--cb-timeout-duration-secs", "1")  # fmt: skip
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(0, error_status=503)
        assert gw.post("/generate", {"text": "a"})[0] == 503
        assert gw.workers()[0]["circuit_state"] == "closed"
        assert gw.post("/generate", {"text": "a"})[0] == 503
        assert gw.workers()[0]["circuit_state"] == "open"
        status, body = gw.post("/generate", {"text": "a"})
        assert status == 503 and body["error"]["code"] == "no_available_workers"
        assert len(generate_attempts(sims, 0)) == 2  # the open breaker kept the third request away
        sims.ctl(0, reset=True)
        opened = time.monotonic()
        gw.process.wait_for(lambda: gw.post("/generate", {"text": "a"})[0] == 200, 5, "the half-open trial")
        assert time.monotonic() - opened > 0.5
        assert gw.workers()[0]["circuit_state"] == "half_open"
        assert gw.post("/generate", {"text": "a"})[0] == 200
        assert gw.workers()[0]["circuit_state"] == "closed"


def test_client_errors_do_not_trip_the_breaker(tmp_path):
    args = ("--disable-health-check", "--cb-failure-threshold", "1")
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(0, error_status=400, error_body={"error": {"message": "bad sampling params"}})
        status, body = gw.post("/generate", {"text": "a"})
        assert status == 400 and body == {"error": {"message": "bad sampling params"}}  # passed through
        assert len(generate_attempts(sims, 0)) == 1  # 400 is not retried
        assert gw.workers()[0]["circuit_state"] == "closed"


def test_retries_count_attempts_back_off_and_pass_the_worker_error_through(tmp_path):
    args = ("--disable-health-check", "--disable-circuit-breaker", "--retry-max-retries", "4",
            "--retry-initial-backoff-ms", "150", "--retry-backoff-multiplier", "1",
            "--retry-jitter-factor", "0")  # fmt: skip
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(0, error_status=503, error_body={"error": {"message": "engine overloaded"}})
        status, body = gw.post("/generate", {"text": "retry me"})
        assert status == 503 and body == {"error": {"message": "engine overloaded"}}
        attempts = generate_attempts(sims, 0)
        assert len(attempts) == 4  # --retry-max-retries counts total attempts
        assert all(a["body"] == {"text": "retry me"} for a in attempts)  # replayed unchanged
        gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(attempts)]
        assert all(0.13 <= gap <= 0.6 for gap in gaps), gaps


def test_retry_prefers_an_untried_worker_so_one_bad_worker_costs_nothing(tmp_path):
    args = ("--disable-health-check", "--disable-circuit-breaker", "--policy", "round_robin",
            "--retry-initial-backoff-ms", "1")  # fmt: skip
    with start_sim(tmp_path, 2) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(0, error_status=500)
        for _ in range(10):
            assert gw.post("/generate", {"text": "x"})[0] == 200
        assert len(generate_attempts(sims, 1)) == 10


def test_refused_connections_are_retried_on_another_worker(tmp_path):
    args = ("--disable-health-check", "--policy", "round_robin", "--retry-initial-backoff-ms", "1")
    with start_sim(tmp_path, 2) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(1, refuse=True)
        retries_before = gw.metrics().total("smg_worker_retries_total")
        assert all(gw.post("/generate", {"text": "x"})[0] == 200 for _ in range(6))
        assert len(generate_attempts(sims, 0)) == 6  # every request ended on worker 0
        assert gw.metrics().total("smg_worker_retries_total") > retries_before  # after a refusal by worker 1
        sims.ctl(1, refuse=False)


async def test_a_stream_cut_midway_is_not_retried_and_counts_against_the_worker(tmp_path):
    args = ("--disable-health-check", "--policy", "round_robin", "--cb-failure-threshold", "2")
    with (
        start_sim(tmp_path, 2, "--latency-model", "batch", "--decode-step-ms", "2") as sims,
        start_gateway(tmp_path, sims.urls, *args) as gw,
    ):
        for i in range(2):
            sims.ctl(i, disconnect_after_chunks=3)
        payload = {"text": "cut", "stream": True, "sampling_params": {"max_new_tokens": 20}}
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/generate", json=payload) as resp:
                assert resp.status == 200
                body = await resp.read()
        assert b"upstream_stream_interrupted" in body and b"[DONE]" not in body
        assert sum(len(generate_attempts(sims, i)) for i in range(2)) == 1
        routed = resp.headers["x-smg-routed-worker-id"]
        async with aiohttp.ClientSession() as session:  # round robin: the third request is the same worker's second
            for _ in range(2):
                async with session.post(gw.url + "/generate", json=payload) as resp:
                    await resp.read()
        workers = gw.wait_workers(lambda ws: all(w["requests_active"] == 0 for w in ws), "load back to 0", 5)
        assert {w["url"]: w["circuit_state"] for w in workers}[routed] == "open"  # 200 headers do not hide a cut


async def test_client_disconnect_cancels_the_upstream_stream(tmp_path):
    with (
        start_sim(tmp_path, 1, "--latency-model", "batch", "--decode-step-ms", "20") as sims,
        start_gateway(tmp_path, sims.urls) as gw,
    ):
        payload = {"text": "long", "stream": True, "sampling_params": {"max_new_tokens": 500}}
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/generate", json=payload) as resp:
                await resp.content.readline()  # the stream has started
        # the client is gone: the worker must see its own connection close, long before 500 steps
        await asyncio.to_thread(
            gw.process.wait_for, lambda: sims.log(0)["disconnects"] == 1, 3, "the worker to see the disconnect"
        )
        workers = gw.wait_workers(lambda ws: ws[0]["requests_active"] == 0, "load back to 0", 5)
        assert workers[0]["circuit_state"] == "closed"  # leaving is the client's doing, not the worker's
        assert gw.metrics().total("smg_worker_retries_total") == 0


async def test_admission_limit_queue_and_timeout(tmp_path):
    args = ("--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "0.5")
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, *args) as gw:
        sims.ctl(0, latency_ms=1500)
        async with aiohttp.ClientSession() as session:
            holder = asyncio.create_task(session.post(gw.url + "/generate", json={"text": "slow"}))
            await asyncio.to_thread(
                gw.wait_workers, lambda ws: ws[0]["requests_active"] == 1, "the first request in flight"
            )
            queued = asyncio.create_task(session.post(gw.url + "/generate", json={"text": "queued"}))
            await asyncio.to_thread(
                gw.process.wait_for,
                lambda: gw.metrics().value("smg_admission_queue_depth") == 1,
                5,
                "the second request to take the only queue slot",
            )
            async with session.post(gw.url + "/generate", json={"text": "rejected"}) as resp:
                assert resp.status == 429 and resp.headers["retry-after"]
                assert (await resp.json())["error"]["code"] == "admission_queue_full"
            async with session.get(gw.url + "/health") as resp:
                assert resp.status == 200  # probes are never throttled
            timed_out = await queued
            assert timed_out.status == 503
            assert (await timed_out.json())["error"]["code"] == "admission_queue_timeout"
            assert (await holder).status == 200


def test_api_key_protects_data_and_admin_routes_but_not_probes(tmp_path):
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, api_key="gw-key") as gw:
        status, body = gw.post("/generate", {"text": "x"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert gw.post("/generate", {"text": "x"}, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert gw.post("/generate", {"text": "x"}, headers={"Authorization": "Bearer gw-key"})[0] == 200
        assert gw.get("/workers")[0] == 401
        for path in ("/health", "/liveness", "/readiness", "/v1/models"):
            assert gw.get(path)[0] == 200, path
        assert gw.get("/not-a-route")[0] == 404


def test_per_worker_api_key_goes_to_that_worker_only(tmp_path):
    with (
        start_sim(tmp_path / "keyed", 1, "--api-key", "worker-secret") as keyed,
        start_sim(tmp_path / "open", 1) as plain,
        start_gateway(tmp_path, plain.urls, "--policy", "round_robin") as gw,
    ):
        assert gw.post("/workers", {"url": keyed.urls[0], "api_key": "worker-secret"})[0] == 202
        gw.wait_ready_workers(2)
        for _ in range(4):
            assert gw.post("/generate", {"text": "x"})[0] == 200
        keyed_auth = {r["headers"].get("authorization") for r in keyed.log(0)["requests"]}
        plain_auth = {r["headers"].get("authorization") for r in plain.log(0)["requests"]}
        assert keyed_auth == {"Bearer worker-secret"}
        assert plain_auth == {None}
        assert "worker-secret" not in str(gw.workers())
        assert "worker-secret" not in gw.process.log_tail(1000)


async def test_cors_preflight_and_response_headers_streams_included(tmp_path):
    with (
        start_sim(tmp_path, 1) as sims,
        start_gateway(tmp_path, sims.urls, "--cors-allowed-origins", "https://app.example") as gw,
    ):
        allowed, denied = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
        async with aiohttp.ClientSession() as session:
            async with session.options(gw.url + "/v1/chat/completions", headers=allowed) as resp:
                assert resp.status == 200 and "POST" in resp.headers["access-control-allow-methods"]
            async with session.get(gw.url + "/v1/models", headers=allowed) as resp:
                assert resp.headers["access-control-allow-origin"] == "https://app.example"
            async with session.get(gw.url + "/v1/models", headers=denied) as resp:
                assert "access-control-allow-origin" not in resp.headers
            stream = {"text": "x", "stream": True}
            async with session.post(gw.url + "/generate", json=stream, headers=allowed) as resp:
                assert resp.headers["access-control-allow-origin"] == "https://app.example"
                assert (await resp.read()).rstrip().endswith(b"[DONE]")


async def test_sigterm_lets_in_flight_streams_finish_then_exits_zero(tmp_path):
    with start_sim(tmp_path, 1, "--latency-model", "batch", "--decode-step-ms", "20") as sims:
        gw = start_gateway(tmp_path, sims.urls, "--shutdown-grace-period-secs", "10")
        payload = {"text": "finish me", "stream": True, "sampling_params": {"max_new_tokens": 50}}
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/generate", json=payload) as resp:
                await resp.content.readline()
                gw.process.send_signal(signal.SIGTERM)
                body = await resp.read()
        assert body.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(gw.process.wait, 10) == 0
        gw.stop()
        with pytest.raises(OSError):
            http_request("GET", gw.url + "/liveness", timeout=1)
