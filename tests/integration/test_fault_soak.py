"""A bounded, seeded soak: thousands of mixed requests while faults come and go on all but one worker.

Asserts the promises that matter under chaos: with one healthy worker every non-stream request succeeds, streams
either finish or end with the documented interruption frame, nothing hangs, every load counter returns to zero and
the gateway holds no more sockets than after an equally busy fault-free warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import start_sim

SEED = 20261127
REQUESTS = 2000
CONCURRENCY = 16
FAULTS = (
    {"error_status": 503, "error_rate": 0.5},
    {"error_status": 500, "error_rate": 0.3},
    {"error_status": 429, "error_rate": 0.5},
    {"latency_ms": 40},
    {"disconnect_after_chunks": 2},
    {"health_status": 503},
    {"hang": True},
    {"reset": True},
)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run_load(url: str, rng: random.Random, count: int, outcomes: Counter[str]) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    timeout = aiohttp.ClientTimeout(total=15)

    async def one(session: aiohttp.ClientSession, i: int, kind: float) -> None:
        if kind < 0.65:
            async with session.post(url + "/generate", json={"text": f"soak {i % 50}"}) as resp:
                await resp.read()
                outcomes["ok" if resp.status == 200 else f"generate {resp.status}"] += 1
        elif kind < 0.9:
            payload = {"model": "sim-model", "messages": [{"role": "user", "content": f"s{i}"}], "stream": True,
                       "max_tokens": 6}  # fmt: skip
            async with session.post(url + "/v1/chat/completions", json=payload) as resp:
                body = await resp.read()
                if resp.status != 200:
                    outcomes[f"stream {resp.status}"] += 1
                elif body.rstrip().endswith(b"data: [DONE]"):
                    outcomes["ok"] += 1
                elif b"upstream_stream_interrupted" in body:
                    outcomes["stream interrupted"] += 1
                else:
                    outcomes["stream truncated"] += 1
        else:  # a client that gives up early
            try:
                async with session.post(url + "/generate", json={"text": "bye"}, timeout=aiohttp.ClientTimeout(0.01)):
                    pass
            except TimeoutError:
                pass
            outcomes["abandoned"] += 1

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await one(session, i, rng.random())

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))


async def test_randomized_faults_keep_every_promise(tmp_path):
    args = ("--policy", "round_robin", "--health-check-interval-secs", "0.3", "--health-failure-threshold", "2",
            "--health-success-threshold", "1", "--cb-failure-threshold", "3", "--cb-timeout-duration-secs", "0.5",
            "--retry-max-retries", "3", "--retry-initial-backoff-ms", "2", "--request-timeout-secs", "1")  # fmt: skip
    rng = random.Random(SEED)
    with (
        start_sim(tmp_path, 3, "--latency-model", "batch", "--decode-step-ms", "1") as sims,
        start_gateway(tmp_path, sims.urls, *args) as gw,
    ):
        await run_load(gw.url, random.Random(1), 300, Counter())
        baseline_fds = open_fds(gw.process.pid)

        stop = asyncio.Event()

        async def inject_faults() -> None:
            while not stop.is_set():
                index = rng.choice((1, 2))  # worker 0 always stays healthy
                fault = rng.choice(FAULTS)
                await asyncio.to_thread(sims.ctl, index, reset=True, **{k: v for k, v in fault.items() if k != "reset"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.15)

        outcomes: Counter[str] = Counter()
        injector = asyncio.create_task(inject_faults())
        await asyncio.wait_for(run_load(gw.url, rng, REQUESTS, outcomes), timeout=240)
        stop.set()
        await injector
        for index in (1, 2):
            sims.ctl(index, reset=True)

        unexpected = {k: v for k, v in outcomes.items() if k not in ("ok", "stream interrupted", "abandoned")}
        assert unexpected == {}, outcomes
        assert sum(outcomes.values()) == REQUESTS
        gw.wait_workers(lambda ws: all(w["requests_active"] == 0 for w in ws), "load counters back to 0", 10)
        assert open_fds(gw.process.pid) <= baseline_fds + 2 * CONCURRENCY, (baseline_fds, outcomes)
