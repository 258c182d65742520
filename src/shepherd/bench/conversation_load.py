"""Load driver for conversation workloads: one streamed chat request per turn, the answer fed back into the next.

Conversations wait in a first-come-first-served queue; all start ready, and a conversation goes back to the end of
the queue once its turn was answered. Three shapes of load, like `loadgen` plus a schedule:

- closed loop: `concurrency` clients, each taking the next ready conversation as soon as its previous request ended;
- open loop: a request starts every 1/`rate` seconds. When no conversation is ready (every one is waiting for an
  answer), the schedule slips by the wait instead of bursting afterwards. Latency counts from the scheduled start;
- timed (a workload that carries its own schedule, `Workload.timed`): each conversation's first turn is due at its
  start time, and each next turn its think time after the previous one was sent, but never before that one's
  answer came back (the turn then slips to the answer). Latency counts from when the turn was due, or slipped to.

Several base URLs are replicas of one gateway behind the simplest honest splitter: the load generator itself sends
the i-th request it issues to replica i mod N. A separate proxy process would add its own hop and CPU to every
request, and it is round robin either way.

Every request records its latency, its TTFT (first frame with generated text), its status and the prompt and cached
tokens the worker reported in the stream's usage frame. A conversation whose turn failed ends there (its history
would otherwise be wrong); its remaining turns are not sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class Splitter:
    """Round robin over gateway replicas in issue order: the i-th call returns replica i mod N."""

    __slots__ = ("_issued", "urls")

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no gateway URL to send to")
        self.urls = tuple(urls)
        self._issued = 0

    def __call__(self) -> str:
        url = self.urls[self._issued % len(self.urls)]
        self._issued += 1
        return url


@dataclass(slots=True)
class Answer:
    status: int
    ttft: float = math.nan
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


def read_event(data: bytes, answer: Answer, parts: list[str], started: float) -> None:
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


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, started: float) -> Answer:
    async with session.post(url, data=body, headers=_HEADERS) as response:
        answer = Answer(response.status)
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


Send = Callable[[dict[str, Any], float], Awaitable[Answer]]  # (chat body, when it was due) -> its answer


async def run_workload(
    base_urls: Sequence[str],
    workload: Workload,
    model: str,
    concurrency: int | None = None,
    rate: float | None = None,
    timeout_secs: float = 60.0,
) -> WorkloadRun:
    """Send every turn of `workload` to the replicas at `base_urls` (`/v1/chat/completions`, split round robin);
    exactly one of concurrency and rate, or neither for a timed workload."""
    check_load(workload, concurrency, rate)
    split = Splitter([url.rstrip("/") + "/v1/chat/completions" for url in base_urls])
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_secs)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",), auto_decompress=False
    ) as session:

        async def send(body: dict[str, Any], started: float) -> Answer:
            try:
                return await _send(session, split(), orjson.dumps(body), started)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return Answer(0, error=f"{type(exc).__name__}: {exc}")

        return await drive(workload, model, send, concurrency, rate)


def check_load(workload: Workload, concurrency: int | None, rate: float | None) -> None:
    if workload.timed != (concurrency is None and rate is None) or (concurrency is not None and rate is not None):
        raise ValueError(
            "give exactly one of concurrency (closed loop) and rate (open loop), none for a timed workload"
        )


async def drive(
    workload: Workload,
    model: str,
    send: Send,
    concurrency: int | None = None,
    rate: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> WorkloadRun:
    """Issue every turn of `workload` through `send` on the workload's schedule (the module docstring); `clock` is
    the one `send` times answers with."""
    check_load(workload, concurrency, rate)
    run = WorkloadRun()
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

    async def one(index: int, started: float) -> bool:
        """Send the next turn of conversation `index`; whether it was answered (its later turns are skipped if
        not)."""
        conversation = conversations[index]
        turn = len(answers[index])
        body = chat_body(model, conversation, turn, answers[index], workload.answer_tokens(index))
        answer = await send(body, started)
        status = STREAM_ERROR if answer.error and answer.status == 200 else answer.status
        if answer.error and len(run.load.errors) < _ERROR_SAMPLES and answer.error not in run.load.errors:
            run.load.errors.append(answer.error)
        run.load.record(clock() - started, answer.ttft, status, len(answer.text))
        run.prompt_tokens += answer.prompt_tokens
        run.cached_tokens += answer.cached_tokens
        if status != 200:
            run.skipped += len(conversation.turns) - turn - 1
            return False
        answers[index].append(answer.text)
        return True

    async def queued(index: int, started: float) -> None:
        """`one` for a queued conversation: back to the queue if it goes on, its skipped turns accounted for."""
        left = len(conversations[index].turns) - len(answers[index]) - 1
        if await one(index, started):
            if left:
                ready.put_nowait(index)
        elif left:
            issued(left)

    cpu0 = time.process_time()
    t0 = clock()
    if workload.timed:

        async def timed(index: int) -> None:
            conversation = conversations[index]
            due = t0 + conversation.start
            for turn in range(len(conversation.turns)):
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                started = max(due, clock())
                if not await one(index, started):
                    return
                due = started + conversation.think_after(turn)

        await asyncio.gather(*(timed(index) for index in range(len(conversations))))
    elif concurrency is not None:

        async def client() -> None:
            while (index := await ready.get()) is not None:
                issued(1)
                await queued(index, clock())

        await asyncio.gather(*(client() for _ in range(concurrency)))
    else:
        interval = 1.0 / rate  # type: ignore[operator]
        tasks: list[asyncio.Task[None]] = []
        scheduled = t0
        while True:
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if ready.empty():  # every conversation awaits an answer: the schedule slips by the wait
                index = await ready.get()
                scheduled = max(scheduled, clock())
            else:
                index = ready.get_nowait()
            if index is None:
                break
            issued(1)
            tasks.append(asyncio.ensure_future(queued(index, scheduled)))
            scheduled += interval
        await asyncio.gather(*tasks)
    run.load.elapsed = clock() - t0
    run.load.client_cpu = time.process_time() - cpu0
    return run
