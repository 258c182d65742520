"""The batching latency model seen from outside: streams over time, live load, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import SimFleet, http_request, start_sim, wait_until

STEP_MS = 4


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    args = ("--latency-model", "batch", "--decode-step-ms", str(STEP_MS), "--decode-step-ms-per-request", "0")
    with start_sim(tmp_path_factory.mktemp("sim"), 1, *args, "--max-running-requests", "2") as fleet:
        yield fleet


def gauges(sim: SimFleet) -> dict[str, float]:
    text = http_request("GET", sim.urls[0] + "/metrics")[1]
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_stream_frames_arrive_over_time(sim: SimFleet):
    body = {"text": "tick tock", "sampling_params": {"max_new_tokens": 8}, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session, session.post(sim.urls[0] + "/generate", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic(), line[6:].strip()))
    assert arrivals[-1][1] == b"[DONE]"
    frames = [json.loads(payload) for _, payload in arrivals[:-1]]
    assert [f["meta_info"]["completion_tokens"] for f in frames] == list(range(1, 9))
    texts = [f["text"] for f in frames]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert frames[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert [f["meta_info"]["finish_reason"] for f in frames[:-1]] == [None] * 7
    assert arrivals[-2][0] - arrivals[0][0] >= 7 * STEP_MS / 1000 * 0.9


async def test_load_and_metrics_reflect_running_and_queued_requests(sim: SimFleet):
    body = {"text": "busy", "sampling_params": {"max_new_tokens": 10_000}}  # runs until cancelled
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.ensure_future(session.post(sim.urls[0] + "/generate", json=body)) for _ in range(4)]

        def saturated() -> bool:  # all 4 arrived and the engine's next step admitted its batch of 2
            load = http_request("GET", sim.urls[0] + "/get_load")[1][0]
            return load["num_reqs"] == 4 and load["num_waiting_reqs"] == 2

        await asyncio.to_thread(wait_until, saturated, 5, "4 requests on the worker, 2 of them waiting")
        load = http_request("GET", sim.urls[0] + "/get_load")[1][0]
        assert load["num_waiting_reqs"] == 2 and load["num_tokens"] > 0
        live = gauges(sim)
        assert live["sglang:num_running_reqs"] == 2 and live["sglang:num_queue_reqs"] == 2
        assert live["sglang:token_usage"] > 0
        for request in requests:
            request.cancel()  # the clients go away: the sim aborts their sequences
        await asyncio.gather(*requests, return_exceptions=True)

    def idle() -> bool:
        return http_request("GET", sim.urls[0] + "/get_load")[1][0]["num_reqs"] == 0

    await asyncio.to_thread(wait_until, idle, 5, "the cancelled requests to be aborted")


async def test_client_disconnect_mid_stream_is_recorded_and_aborts_the_request(sim: SimFleet):
    sim.clear_log(0)
    body = {"messages": [{"role": "user", "content": "long answer"}], "max_tokens": 5000, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(sim.urls[0] + "/v1/chat/completions", json=body)
        chunks = 0
        async for line in resp.content:
            chunks += line.startswith(b"data: ")
            if chunks == 3:
                break
        resp.close()  # the client goes away mid-stream

    def recorded() -> bool:
        log = sim.log(0)
        return log["disconnects"] == 1 and log["running"] == 0

    await asyncio.to_thread(wait_until, recorded, 5, "the disconnect to be recorded")
    entry = sim.log(0)["requests"][-1]
    assert entry["path"] == "/v1/chat/completions" and entry["disconnected"] is True
    assert sim.log(0)["completion_tokens"] < 5000


async def test_repeated_long_prompt_is_faster_when_cached(sim: SimFleet):
    prompt = "lorem ipsum dolor sit amet " * 400  # ~2000 tokens: ~100 ms of prefill at 20 tokens/ms
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 1}}
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.urls[0] + "/generate", json=body) as resp:
            cold = (await resp.json())["meta_info"]
        async with session.post(sim.urls[0] + "/generate", json=body) as resp:
            warm = (await resp.json())["meta_info"]
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] > 0.95 * warm["prompt_tokens"]
    assert warm["e2e_latency"] < cold["e2e_latency"] / 3
