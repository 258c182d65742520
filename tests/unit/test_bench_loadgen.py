"""The benchmark load generator against a small in-process aiohttp server."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from shepherd.bench.fleet import free_port
from shepherd.bench.loadgen import (
    LoadGenPool,
    LoadPlan,
    LoadResult,
    RequestSpec,
    _FirstContentDetector,
    frame_has_content,
    percentile,
    run_plan,
)
from tests.support.local_server import serving

ECHO = RequestSpec("/echo", b'{"x": 1}')
STREAM = RequestSpec("/stream", b'{"stream": true}', stream=True)
FIRST_CONTENT_DELAY = 0.05


class Upstream:
    """Counts requests and the most that were in flight at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.count = 0
        self.app = web.Application()
        self.app.router.add_post("/echo", self.echo)
        self.app.router.add_post("/stream", self.stream)
        self.app.router.add_post("/fail", self.fail)

    async def echo(self, request: web.Request) -> web.Response:
        self.count += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        body = await request.read()
        await asyncio.sleep(0.002)
        self.in_flight -= 1
        return web.Response(body=body, content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
        await asyncio.sleep(FIRST_CONTENT_DELAY)
        await response.write(b'data: {"choices":[{"delta":{"con')  # a frame split across two writes
        await asyncio.sleep(0.001)
        await response.write(b'tent":"hi"}}]}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response

    async def fail(self, request: web.Request) -> web.Response:
        return web.Response(status=503)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    server = Upstream()
    async with serving(server.app) as url:
        yield server, url


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (b'{"choices":[{"delta":{"content":"a"}}]}', True),
        (b'{"choices":[{"delta":{"role":"assistant","content":""}}]}', False),
        (b'{"choices":[{"text":"a"}]}', True),
        (b'{"text":"cumulative","meta_info":{}}', True),
        (b'{"text":""}', False),
        (b"[DONE]", False),
        (b"not json", False),
    ],
)
def test_frame_has_content_recognizes_generated_text(frame: bytes, expected: bool) -> None:
    assert frame_has_content(frame) is expected


def test_first_content_detector_handles_frames_split_across_chunks() -> None:
    detector = _FirstContentDetector()
    assert not detector.feed(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\ndata: {"choices":[{"del')
    assert not detector.feed(b'ta":{"content":"x"}}]}\r\n')
    assert detector.feed(b"\r\n")


def test_plan_requires_exactly_one_load_shape() -> None:
    with pytest.raises(ValueError):
        LoadPlan(("http://x",), ECHO, 10)
    with pytest.raises(ValueError):
        LoadPlan(("http://x",), ECHO, 10, concurrency=2, rate=5.0)
    with pytest.raises(ValueError):
        LoadPlan((), ECHO, 10, concurrency=2)


def test_split_divides_requests_concurrency_and_rate() -> None:
    closed = LoadPlan(("http://x",), ECHO, 101, concurrency=32).split(3)
    assert [p.requests for p in closed] == [34, 34, 33]
    assert sum(p.concurrency for p in closed) == 32  # type: ignore[misc]
    opened = LoadPlan(("http://x",), ECHO, 10, rate=90.0).split(2)
    assert [p.rate for p in opened] == [45.0, 45.0]
    assert len(LoadPlan(("http://x",), ECHO, 10, concurrency=1).split(4)) == 1


def test_summary_counts_failures_and_excludes_them_from_latency() -> None:
    result = LoadResult(elapsed=2.0)
    result.record(0.010, math.nan, 200, 5)
    result.record(0.020, math.nan, 200, 5)
    result.record(9.000, math.nan, 503, 0)
    summary = result.summary()
    assert (summary["requests"], summary["ok"], summary["failed"]) == (3, 2, 1)
    assert summary["rps"] == 1.0
    assert summary["latency_ms"]["p50"] == pytest.approx(15.0)
    assert summary["failed_statuses"] == {"503": 1}
    assert "ttft_ms" not in summary


async def test_closed_loop_sends_every_request_and_respects_concurrency(upstream) -> None:
    server, url = upstream
    result = await run_plan(LoadPlan((url,), ECHO, 60, concurrency=4))
    assert result.count == 60 == server.count
    assert result.ok == 60
    assert server.max_in_flight <= 4
    assert all(size == len(ECHO.body) for size in result.sizes)


async def test_closed_loop_rotates_over_base_urls(upstream) -> None:
    server, url = upstream
    other = Upstream()
    async with serving(other.app) as other_url:
        await run_plan(LoadPlan((url, other_url), ECHO, 10, concurrency=1))
    assert server.count == other.count == 5


async def test_stream_ttft_is_time_to_first_content_frame(upstream) -> None:
    _, url = upstream
    result = await run_plan(LoadPlan((url,), STREAM, 3, concurrency=1))
    assert result.ok == 3
    for ttft, latency in zip(result.ttfts, result.latencies, strict=True):
        assert FIRST_CONTENT_DELAY <= ttft <= latency
    assert result.summary()["ttft_ms"]["p50"] >= FIRST_CONTENT_DELAY * 1e3


async def test_non_2xx_and_transport_errors_are_recorded(upstream) -> None:
    _, url = upstream
    failed = await run_plan(LoadPlan((url,), RequestSpec("/fail", b"{}"), 2, concurrency=1))
    assert failed.statuses == [503, 503]
    refused = await run_plan(LoadPlan((f"http://127.0.0.1:{free_port()}",), ECHO, 2, concurrency=1))
    assert refused.statuses == [0, 0]
    assert refused.errors and "Connect" in refused.errors[0]


async def test_max_secs_ends_the_run_early(upstream) -> None:
    _, url = upstream
    result = await run_plan(LoadPlan((url,), STREAM, 10_000, concurrency=1, max_secs=0.2))
    assert 1 <= result.count < 10_000
    assert result.elapsed < 2.0


async def test_open_loop_paces_requests_at_the_rate(upstream) -> None:
    server, url = upstream
    started = time.perf_counter()
    result = await run_plan(LoadPlan((url,), ECHO, 20, rate=100.0))
    elapsed = time.perf_counter() - started
    assert result.count == 20 == server.count
    assert elapsed >= 19 / 100.0  # the last request is scheduled at 0.19 s
    assert elapsed < 3.0


async def test_pool_of_two_processes_merges_their_results(upstream) -> None:
    server, url = upstream
    with LoadGenPool(processes=2) as pool:
        result = await asyncio.to_thread(pool.run, LoadPlan((url,), ECHO, 40, concurrency=4))
    assert result.count == 40 == server.count
    assert result.ok == 40
    assert result.client_cpu > 0
