"""Load driver for conversation workloads: one streamed chat request per turn, the answer fed back into the next.

Conversations wait in a first-come-first-served queue; all start ready, and a conversation goes back to the end of
the queue once its turn was answered. Two shapes of load, like `loadgen`:

- closed loop: `concurrency` clients, each taking the next ready conversation as soon as its previous request ended;
- open loop: a request starts every 1/`rate` seconds. When no conversation is ready (every one is waiting for an
  answer), the schedule slips by the wait instead of bursting afterwards. Latency counts from the scheduled start.

Every request records its latency, its TTFT (first frame with generated text), its status and the prompt and cached
tokens the worker reported in the stream's usage frame. A conversation whose turn failed ends there (its history
would otherwise be wrong); its remaining turns are not sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from shepherd.bench.loadgen import LoadResult
from shepherd.bench.workloads import Workload, chat_body

_ERROR_SAMPLES = 5
_HEADERS = {"Content-Type": "application/json"}
STREAM_ERROR = 0  # status recorded for a stream that carried an error event (as for transport errors)


@dataclass(slots=True)
class WorkloadRun:
    """What one run of a workload measured. `load` holds latency/TTFT/status per request, in completion order."""

    load: LoadResult = field(default_factory=LoadResult)
    prompt_tokens: int = 0  # summed over the usage frames received
    cached_tokens: int = 0
    skipped: int = 0  # turns not sent because an earlier turn of their conversation failed


class SseFrames:
    """Splits a byte stream, cut at arbitrary points, into the payloads of its `data:` lines."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        frames = (self._buffer + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = frames.pop()  # an incomplete frame waits for the next chunk
        return [line[5:].strip() for frame in frames for line in frame.split(b"\n") if line.startswith(b"data:")]


@dataclass(slots=True)
class _Answer:
    status: int
    ttft: float = math.nan
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


def read_event(data: bytes, answer: _Answer, parts: list[str], started: float) -> None:
    """Apply one SSE payload to `answer`: generated text (and TTFT on the first), usage, or an error event."""
    if data == b"[DONE]":
        return
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if not isinstance(event, dict):
        return
    if "error" in event:
        answer.error = f"error event in stream: {str(event['error'])[:200]}"
        return
    for choice in event.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if content:
            if not parts:
                answer.ttft = time.perf_counter() - started
            parts.append(content)
    usage = event.get("usage")
    if isinstance(usage, dict):
        answer.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        answer.cached_tokens = int((details or {}).get("cached_tokens") or 0) if isinstance(details, dict) else 0


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, started: float) -> _Answer:
    async with session.post(url, data=body, headers=_HEADERS) as response:
        answer = _Answer(response.status)
        if response.status != 200:
            await response.read()
            return answer
        frames = SseFrames()
        parts: list[str] = []
        async for chunk in response.content.iter_any():
            for data in frames.feed(chunk):
                read_event(data, answer, parts, started)
        answer.text = "".join(parts)
        return answer


async def run_workload(
    base_url: str,
    workload: Workload,
    model: str,
    concurrency: int | None = None,
    rate: float | None = None,
    timeout_secs: float = 60.0,
) -> WorkloadRun:
    """Send every turn of `workload` to `base_url` (`/v1/chat/completions`); exactly one of concurrency and rate."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
    run = WorkloadRun()
    url = base_url.rstrip("/") + "/v1/chat/completions"
    conversations = workload.conversations
    answers: list[list[str]] = [[] for _ in conversations]
    ready: asyncio.Queue[int | None] = asyncio.Queue()
    for index in range(len(conversations)):
        ready.put_nowait(index)
    unissued = workload.requests
    drivers = concurrency if concurrency is not None else 1  # tasks that take from `ready`

    def issued(turns: int) -> None:
        """`turns` turns left the pool of turns to send; once none is left, tell every driver to stop."""
        nonlocal unissued
        unissued -= turns
        if unissued == 0:
            for _ in range(drivers):
                ready.put_nowait(None)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_secs)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:

        async def one(index: int, started: float) -> None:
            conversation = conversations[index]
            turn = len(answers[index])
            body = orjson.dumps(chat_body(model, conversation, turn, answers[index], workload.max_tokens))
            try:
                answer = await _send(session, url, body, started)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                answer = _Answer(0, error=f"{type(exc).__name__}: {exc}")
            status = STREAM_ERROR if answer.error and answer.status == 200 else answer.status
            if answer.error and len(run.load.errors) < _ERROR_SAMPLES and answer.error not in run.load.errors:
                run.load.errors.append(answer.error)
            run.load.record(time.perf_counter() - started, answer.ttft, status, len(answer.text))
            run.prompt_tokens += answer.prompt_tokens
            run.cached_tokens += answer.cached_tokens
            left = len(conversation.turns) - turn - 1
            if status == 200:
                answers[index].append(answer.text)
                if left:
                    ready.put_nowait(index)
            elif left:
                run.skipped += left
                issued(left)

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if concurrency is not None:

            async def client() -> None:
                while (index := await ready.get()) is not None:
                    issued(1)
                    await one(index, time.perf_counter())

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            interval = 1.0 / rate  # type: ignore[operator]
            tasks: list[asyncio.Task[None]] = []
            scheduled = t0
            while True:
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if ready.empty():  # every conversation awaits an answer: the schedule slips by the wait
                    index = await ready.get()
                    scheduled = max(scheduled, time.perf_counter())
                else:
                    index = ready.get_nowait()
                if index is None:
                    break
                issued(1)
                tasks.append(asyncio.ensure_future(one(index, scheduled)))
                scheduled += interval
            await asyncio.gather(*tasks)
        run.load.elapsed = time.perf_counter() - t0
        run.load.client_cpu = time.process_time() - cpu0
    return run
