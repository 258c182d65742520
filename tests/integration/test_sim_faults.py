"""Run-time fault injection (``/__ctl``) and request inspection (``/__log``)."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from shepherd.sim.tokenizer import tokenize
from tests.support.processes import SimFleet, http_request, start_sim, wait_until

GENERATE = {"text": "fault me", "sampling_params": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with start_sim(tmp_path_factory.mktemp("sim"), 2) as fleet:
        yield fleet


@pytest.fixture(autouse=True)
def _clean(sim: SimFleet):
    yield
    sim.reset()


def generate(sim: SimFleet, index: int = 0, stream: bool = False) -> tuple[int, object]:
    return http_request("POST", sim.urls[index] + "/generate", {**GENERATE, "stream": stream})


def test_error_status_with_custom_body_and_rate(sim: SimFleet):
    state = sim.ctl(0, error_status=503, error_body={"error": "overloaded"})
    assert state["error_status"] == 503 and state["error_rate"] == 1.0
    assert generate(sim) == (503, {"error": "overloaded"})
    chat = {"messages": [{"content": "x"}]}
    assert http_request("POST", sim.urls[0] + "/v1/chat/completions", chat)[0] == 503
    assert generate(sim, index=1)[0] == 200  # siblings are unaffected
    assert http_request("GET", sim.urls[0] + "/health")[0] == 200  # health is separate

    sim.ctl(0, error_status=500, error_body=None, error_rate=0.5)
    results = [generate(sim) for _ in range(40)]
    assert {status for status, _ in results} == {200, 500}
    failure = next(body for status, body in results if status == 500)
    assert failure == {"error": {"message": "Injected fault", "type": "server_error", "code": 500}}
    assert sim.ctl(0, reset=True)["error_status"] is None
    assert generate(sim)[0] == 200


def test_health_status(sim: SimFleet):
    sim.ctl(1, health_status=503)
    assert http_request("GET", sim.urls[1] + "/health")[0] == 503
    assert http_request("GET", sim.urls[1] + "/health_generate")[0] == 503
    assert generate(sim, index=1)[0] == 200


def test_latency_ms(sim: SimFleet):
    sim.ctl(0, latency_ms=150)
    start = time.monotonic()
    assert generate(sim)[0] == 200
    assert time.monotonic() - start >= 0.15


async def test_hang_until_reset_and_client_timeout_is_recorded(sim: SimFleet):
    sim.ctl(0, hang=True)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(sim.urls[0] + "/generate", json=GENERATE, timeout=aiohttp.ClientTimeout(total=0.2))
        await asyncio.to_thread(wait_until, lambda: sim.log(0)["disconnects"] == 1, 5, "the disconnect")
        entry = next(r for r in sim.log(0)["requests"] if r["path"] == "/generate")
        assert entry["disconnected"] is True

        pending = asyncio.ensure_future(session.post(sim.urls[0] + "/generate", json=GENERATE))
        await asyncio.to_thread(
            wait_until, lambda: sim.log(0)["counts"].get("/generate") == 2, 5, "the second request to reach the worker"
        )
        done, _ = await asyncio.wait([pending], timeout=0.1)  # a hang is the absence of an answer: give it time
        assert not done  # still hanging
        await asyncio.to_thread(sim.ctl, 0, hang=False)
        async with await pending as resp:
            assert resp.status == 200


async def test_disconnect_after_chunks_cuts_streams_and_plain_responses(sim: SimFleet):
    sim.ctl(0, disconnect_after_chunks=1)
    frames = []
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(sim.urls[0] + "/generate", json={**GENERATE, "stream": True}) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        frames.append(line)
        assert len(frames) == 1 and frames[0] != b"data: [DONE]\n"

        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(sim.urls[0] + "/generate", json=GENERATE)
    assert sim.log(0)["disconnects"] == 0  # the sim cut them: not a client disconnect


def test_refuse_closes_the_listener_and_drops_open_connections(sim: SimFleet):
    host, port = sim.urls[1].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as pooled:
        pooled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while not response.endswith(b"\r\n\r\n"):  # /health has an empty body
            response += pooled.recv(1000)
        assert response.startswith(b"HTTP/1.1 200")
        sim.ctl(1, refuse=True)
        assert pooled.recv(100) == b""  # the idle keep-alive connection was closed
    with pytest.raises(ConnectionRefusedError):
        http_request("GET", sim.urls[1] + "/health")
    assert http_request("GET", sim.urls[0] + "/health")[0] == 200
    assert sim.log(1)["worker"] == 1  # inspected through the sibling
    sim.ctl(1, refuse=False)
    assert http_request("GET", sim.urls[1] + "/health")[0] == 200


def test_a_worker_can_refuse_through_its_own_control_route(sim: SimFleet):
    status, state = http_request("POST", sim.urls[0] + "/__ctl", {"refuse": True})
    assert status == 200 and state["refuse"] is True
    with pytest.raises(ConnectionRefusedError):
        http_request("GET", sim.urls[0] + "/health")
    assert sim.ctl(0, refuse=False)["refuse"] is False  # sent through worker 1
    assert http_request("GET", sim.urls[0] + "/health")[0] == 200


def test_log_records_requests_headers_and_token_counters(sim: SimFleet):
    sim.clear_log(1)
    http_request("GET", sim.urls[1] + "/health")
    http_request("POST", sim.urls[1] + "/generate", GENERATE, {"X-Request-Id": "abc-123"})
    log = sim.log(1)
    assert log["counts"] == {"/health": 1, "/generate": 1}
    entry = log["requests"][-1]
    assert entry["method"] == "POST" and entry["path"] == "/generate" and entry["status"] == 200
    assert entry["headers"]["x-request-id"] == "abc-123"
    assert entry["body"] == GENERATE
    assert entry["disconnected"] is False
    assert log["prompt_tokens"] == len(tokenize(GENERATE["text"]))
    assert log["cached_tokens"] == 0 and log["completion_tokens"] == 4
    assert log["running"] == 0 and log["queued"] == 0 and log["disconnects"] == 0

    sim.clear_log(1)
    cleared = sim.log(1)
    assert cleared["requests"] == [] and cleared["counts"] == {} and cleared["prompt_tokens"] == 0


def test_crash_exits_the_process(tmp_path):
    fleet = start_sim(tmp_path, 1)
    try:
        status, state = http_request("POST", fleet.urls[0] + "/__ctl", {"crash": True})
        assert status == 200 and state["crashing"] is True
        assert fleet.process.wait(timeout=5) == 1
    finally:
        fleet.stop()


def test_sigterm_exits_cleanly_despite_a_hung_request(tmp_path):
    fleet = start_sim(tmp_path, 1)
    fleet.ctl(0, hang=True)
    host, port = fleet.urls[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n{"text":"x"}')
        wait_until(lambda: fleet.log(0)["counts"].get("/generate") == 1, 5, "the hung request")
        assert fleet.process.stop() == 0
