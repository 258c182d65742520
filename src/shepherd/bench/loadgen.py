"""Asynchronous HTTP load generator for the benchmarks.

Two shapes of load:
- closed loop: `concurrency` clients, each sending its next request as soon as the previous one finished;
- open loop: requests start on a fixed schedule (`rate` per second) whatever the server's speed. Latency is measured
  from the scheduled start, so a server that falls behind is charged for the queueing it causes.

Each request records its latency, its TTFT when streamed (time to the first SSE frame that carries generated text),
its status (0 for a transport error) and the bytes received. The generator shares the machine with the system under
test, so it keeps per-request work small: pre-encoded bodies, one pooled session, no parsing of non-stream bodies
and no SSE parsing after the first content frame. `LoadGenPool` runs it in separate processes so that its CPU is
spent off the orchestrator's event loop (and, with several processes, on several cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson

_ERROR_SAMPLES = 5  # distinct transport error messages kept per run
_JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One kind of request, sent identically many times."""

    path: str
    body: bytes
    stream: bool = False
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What to send, where, and how fast. Exactly one of `concurrency` (closed loop) and `rate` (open loop).

    The run ends after `requests` requests, or earlier once `max_secs` have passed (no new request starts then).
    """

    base_urls: tuple[str, ...]  # requests rotate over these (several when hitting workers directly)
    request: RequestSpec
    requests: int
    concurrency: int | None = None
    rate: float | None = None
    max_secs: float | None = None
    timeout_secs: float = 60.0

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("a load plan needs at least one base URL")
        if self.requests < 0:
            raise ValueError("requests must be >= 0")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0")
        if self.max_secs is not None and not self.max_secs > 0:
            raise ValueError("max_secs must be > 0")

    def split(self, parts: int) -> list[LoadPlan]:
        """Divide the load between `parts` generators (fewer when there is not enough to go round)."""
        width = self.concurrency if self.concurrency is not None else self.requests
        parts = max(1, min(parts, self.requests or 1, width or 1))
        plans = []
        for i in range(parts):
            requests = _share(self.requests, parts, i)
            if self.concurrency is not None:
                plans.append(replace(self, requests=requests, concurrency=_share(self.concurrency, parts, i)))
            else:
                plans.append(replace(self, requests=requests, rate=self.rate / parts))  # type: ignore[operator]
        return plans


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


@dataclass(slots=True)
class LoadResult:
    """Per-request measurements of one run (index i of each list is request i), plus run totals."""

    latencies: list[float] = field(default_factory=list)  # seconds
    ttfts: list[float] = field(default_factory=list)  # seconds; NaN when no content frame arrived (or not a stream)
    statuses: list[int] = field(default_factory=list)  # 0: transport error or timeout
    sizes: list[int] = field(default_factory=list)  # response body bytes
    elapsed: float = 0.0  # wall time of the run, seconds
    client_cpu: float = 0.0  # CPU seconds the generator itself spent
    errors: list[str] = field(default_factory=list)  # a few transport error messages

    def record(self, latency: float, ttft: float, status: int, size: int) -> None:
        self.latencies.append(latency)
        self.ttfts.append(ttft)
        self.statuses.append(status)
        self.sizes.append(size)

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if 200 <= s < 300)

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency percentiles (milliseconds) of the successful requests."""
        good = [i for i, s in enumerate(self.statuses) if 200 <= s < 300]
        latencies = sorted(self.latencies[i] for i in good)
        ttfts = sorted(t for t in (self.ttfts[i] for i in good) if not math.isnan(t))
        out: dict[str, Any] = {
            "requests": self.count,
            "ok": len(good),
            "failed": self.count - len(good),
            "elapsed_s": self.elapsed,
            "rps": len(good) / self.elapsed if self.elapsed > 0 else 0.0,
            "bytes": sum(self.sizes),
            "client_cpu_us_per_req": 1e6 * self.client_cpu / self.count if self.count else 0.0,
            "latency_ms": _percentiles_ms(latencies),
        }
        if ttfts:
            out["ttft_ms"] = _percentiles_ms(ttfts)
        statuses: dict[str, int] = {}
        for s in self.statuses:
            if not 200 <= s < 300:
                statuses[str(s)] = statuses.get(str(s), 0) + 1
        if statuses:
            out["failed_statuses"] = statuses
        if self.errors:
            out["errors"] = self.errors
        return out

    @staticmethod
    def merge(results: Sequence[LoadResult]) -> LoadResult:
        """One result from runs that went on side by side (wall time: the longest; CPU: the sum)."""
        merged = LoadResult()
        for r in results:
            merged.latencies += r.latencies
            merged.ttfts += r.ttfts
            merged.statuses += r.statuses
            merged.sizes += r.sizes
            merged.elapsed = max(merged.elapsed, r.elapsed)
            merged.client_cpu += r.client_cpu
            merged.errors += [e for e in r.errors if e not in merged.errors][: _ERROR_SAMPLES - len(merged.errors)]
        return merged


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, interpolating linearly; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def _percentiles_ms(sorted_values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": 1e3 * percentile(sorted_values, 50),
        "p90": 1e3 * percentile(sorted_values, 90),
        "p99": 1e3 * percentile(sorted_values, 99),
        "mean": 1e3 * sum(sorted_values) / len(sorted_values) if sorted_values else math.nan,
    }


def frame_has_content(data: bytes) -> bool:
    """Whether one SSE `data:` payload carries generated text (OpenAI chat/completions or SGLang /generate)."""
    if data == b"[DONE]":
        return False
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(event, dict):
        return False
    choices = event.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and delta.get("content"):
                return True
            if choice.get("text"):
                return True
        return False
    return bool(event.get("text"))


class _FirstContentDetector:
    """Finds the first content-bearing SSE frame in a byte stream split at arbitrary points."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> bool:
        buffer = self._buffer + chunk
        frames = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = frames.pop()  # an incomplete frame waits for the next chunk
        for frame in frames:
            for line in frame.split(b"\n"):
                if line.startswith(b"data:") and frame_has_content(line[5:].strip()):
                    return True
        return False


async def _send(
    session: aiohttp.ClientSession, url: str, spec: RequestSpec, headers: dict[str, str], started: float
) -> tuple[float, float, int, int]:
    """One request: (latency, ttft, status, bytes) with times relative to `started`."""
    ttft = math.nan
    size = 0
    async with session.post(url, data=spec.body, headers=headers) as response:
        status = response.status
        if spec.stream:
            detector: _FirstContentDetector | None = _FirstContentDetector()
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if detector is not None and detector.feed(chunk):
                    ttft = time.perf_counter() - started
                    detector = None
        else:
            size = len(await response.read())
    return time.perf_counter() - started, ttft, status, size


async def run_plan(plan: LoadPlan) -> LoadResult:
    """Run one plan in the current event loop."""
    result = LoadResult()
    spec = plan.request
    headers = {**_JSON_HEADERS, **dict(spec.headers)}
    urls = [base.rstrip("/") + spec.path for base in plan.base_urls]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_secs)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:

        async def one(index: int, started: float) -> None:
            try:
                latency, ttft, status, size = await _send(session, urls[index % len(urls)], spec, headers, started)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                latency, ttft, status, size = time.perf_counter() - started, math.nan, 0, 0
                message = f"{type(exc).__name__}: {exc}"
                if len(result.errors) < _ERROR_SAMPLES and message not in result.errors:
                    result.errors.append(message)
            result.record(latency, ttft, status, size)

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + plan.max_secs if plan.max_secs is not None else math.inf
        if plan.concurrency is not None:
            next_index = 0

            async def client() -> None:
                nonlocal next_index
                while next_index < plan.requests and time.perf_counter() < deadline:
                    index = next_index
                    next_index += 1
                    await one(index, time.perf_counter())

            await asyncio.gather(*(client() for _ in range(min(plan.concurrency, plan.requests))))
        else:
            interval = 1.0 / plan.rate  # type: ignore[operator]
            tasks = []
            for index in range(plan.requests):
                scheduled = t0 + index * interval
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(index, scheduled)))
            await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - t0
        result.client_cpu = time.process_time() - cpu0
    return result


def _child_main(conn: Connection) -> None:
    """A generator process: runs each plan it receives and sends back the result, until told to stop (None)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        while True:
            plan = conn.recv()
            if plan is None:
                break
            try:
                conn.send(runner.run(run_plan(plan)))
            except Exception as exc:  # report instead of leaving the parent waiting forever
                conn.send(exc)
    conn.close()


class LoadGenPool:
    """Load generators in child processes (`processes=0`: in this process). Use as a context manager."""

    def __init__(self, processes: int = 1) -> None:
        self._size = processes
        self._children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def __enter__(self) -> LoadGenPool:
        context = multiprocessing.get_context("spawn")
        for _ in range(self._size):
            parent, child = context.Pipe()
            process = context.Process(target=_child_main, args=(child,), daemon=True, name="shepherd-loadgen")
            process.start()
            child.close()
            self._children.append((process, parent))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, plan: LoadPlan) -> LoadResult:
        """Run `plan`, split across the pool's processes, and merge what they measured."""
        if not self._children:
            import uvloop

            return uvloop.run(run_plan(plan))
        parts = plan.split(len(self._children))
        for (_, conn), part in zip(self._children, parts, strict=False):
            conn.send(part)
        results = []
        for process, conn in self._children[: len(parts)]:
            try:
                reply = conn.recv()
            except (EOFError, OSError) as exc:
                raise RuntimeError(f"load generator process {process.pid} died (exit code {process.exitcode})") from exc
            if isinstance(reply, Exception):
                raise reply
            results.append(reply)
        return LoadResult.merge(results)

    def close(self) -> None:
        for process, conn in self._children:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
            conn.close()
        self._children.clear()
