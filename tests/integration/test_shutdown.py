"""SIGTERM on the real gateway process: readiness drops first while new requests are still served, then the
listener closes, in-flight streams finish, and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import start_sim

WINDOW_SECS = 1.5


async def fresh_get(url: str) -> tuple[int, str]:
    """A GET on a new connection (a kept-alive one would outlive the listener)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(url) as resp:
            return resp.status, await resp.text()


async def test_sigterm_drains_readiness_first_then_streams_and_exits_0(tmp_path):
    # 150 decode steps of 20 ms: the stream outlives the drain window by far.
    with (
        start_sim(tmp_path, 1, "--latency-model", "batch", "--decode-step-ms", "20") as sims,
        start_gateway(
            tmp_path, sims.urls, "--shutdown-drain-window-secs", str(WINDOW_SECS), "--shutdown-grace-period-secs", "20"
        ) as gw,
    ):
        body = {"text": "drain me", "stream": True, "sampling_params": {"max_new_tokens": 150}}
        async with aiohttp.ClientSession() as session, session.post(gw.url + "/generate", json=body) as stream:
            assert stream.status == 200
            assert (await stream.content.readline()).startswith(b"data: ")  # in flight
            gw.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            while (answer := await fresh_get(gw.url + "/readiness"))[0] == 200:  # until the signal is handled
                assert time.monotonic() - signalled < WINDOW_SECS / 2, "readiness stayed 200"
                await asyncio.sleep(0.01)
            assert answer[0] == 503 and json.loads(answer[1]) == {"status": "not ready", "reason": "shutting down"}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as other:
                still = {"text": "still served", "sampling_params": {"max_new_tokens": 1}}
                async with other.post(gw.url + "/generate", json=still) as resp:
                    assert resp.status == 200  # the window: new requests are still accepted and served
            assert time.monotonic() - signalled < WINDOW_SECS

            deadline = time.monotonic() + 10
            while True:  # the listener closes once the window is over
                try:
                    await fresh_get(gw.url + "/liveness")
                except aiohttp.ClientConnectionError:
                    break
                assert time.monotonic() < deadline, "the listener never closed"
                await asyncio.sleep(0.05)
            closed = time.monotonic()
            assert closed - signalled >= WINDOW_SECS * 0.9

            rest = await stream.content.read()  # the in-flight stream runs to its end, after the listener closed
            assert rest.rstrip().endswith(b"data: [DONE]")
            assert time.monotonic() - closed > 0.3
        assert await asyncio.to_thread(gw.process.wait, 20) == 0
