"""The conversation load driver of `shepherd bench routing` against a small in-process streaming chat server."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from shepherd.bench.conversation_load import STREAM_ERROR, Splitter, SseFrames, run_workload
from shepherd.bench.workloads import Conversation, Workload
from tests.support.local_server import serving

FIRST_TOKEN_DELAY = 0.03


class ChatServer:
    """Answers `answer-<n>` (n counts requests), streamed in two content frames, with a usage frame at the end.

    A request whose last user message is ` fail` gets a 500; ` broken` gets an error event inside a 200 stream.
    """

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[float] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.starts.append(time.perf_counter())
        last = body["messages"][-1]["content"]
        if last == " fail":
            return web.Response(status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            if last == " broken":
                await response.write(b'data: {"error": {"message": "upstream went away"}}\n\n')
                await response.write_eof()
                return response
            await response.write(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
            await asyncio.sleep(FIRST_TOKEN_DELAY)
            answer = f" answer-{len(self.bodies)}"
            for part in (answer[:4], answer[4:]):
                await response.write(b"data: " + orjson.dumps({"choices": [{"delta": {"content": part}}]}) + b"\n\n")
            usage = {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}
            await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1


@pytest.fixture
async def server() -> AsyncIterator[tuple[ChatServer, str]]:
    chat = ChatServer()
    async with serving(chat.app) as url:
        yield chat, url


def workload(*conversations: Conversation) -> Workload:
    return Workload("test", tuple(conversations), max_tokens=3, description="test")


def test_sse_frames_are_reassembled_across_chunks() -> None:
    frames = SseFrames()
    assert frames.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'{"a": 1}']
    assert frames.feed(b": 2}\r\n\r\n: comment\n\n") == [b'{"b": 2}']


async def test_each_turn_carries_the_answers_the_server_gave(server) -> None:
    chat, url = server
    work = workload(Conversation(" sys", (" q1", " q2", " q3")))
    run = await run_workload([url], work, "m", concurrency=1)
    assert run.load.ok == 3 and run.skipped == 0
    last = chat.bodies[-1]
    assert last["messages"] == [
        {"role": "system", "content": " sys"},
        {"role": "user", "content": " q1"},
        {"role": "assistant", "content": " answer-1"},
        {"role": "user", "content": " q2"},
        {"role": "assistant", "content": " answer-2"},
        {"role": "user", "content": " q3"},
    ]
    assert last["stream"] is True and last["max_tokens"] == 3 and last["model"] == "m"
    assert run.prompt_tokens == 30 and run.cached_tokens == 12  # summed from the usage frames
    timings = zip(run.load.ttfts, run.load.latencies, strict=True)
    assert all(FIRST_TOKEN_DELAY <= ttft < latency for ttft, latency in timings)


async def test_conversations_are_served_round_by_round(server) -> None:
    chat, url = server
    work = workload(*(Conversation("", (f" c{i}t0", f" c{i}t1")) for i in range(3)))
    await run_workload([url], work, "m", concurrency=1)
    assert [b["messages"][-1]["content"] for b in chat.bodies] == [" c0t0", " c1t0", " c2t0", " c0t1", " c1t1", " c2t1"]


async def test_closed_loop_keeps_at_most_concurrency_requests_in_flight(server) -> None:
    chat, url = server
    work = workload(*(Conversation("", (" a", " b")) for _ in range(10)))
    run = await run_workload([url], work, "m", concurrency=3)
    assert run.load.ok == 20 and chat.max_in_flight == 3


async def test_open_loop_starts_requests_on_schedule(server) -> None:
    chat, url = server
    work = workload(*(Conversation("", (" q",)) for _ in range(10)))
    run = await run_workload([url], work, "m", rate=100.0)
    assert run.load.ok == 10
    span = chat.starts[-1] - chat.starts[0]
    assert 0.08 <= span < 0.5  # nine intervals of 10 ms, with room for a busy machine
    assert chat.max_in_flight > 1  # requests overlap: nobody waited for an answer


async def test_open_loop_slips_while_every_conversation_awaits_its_answer(server) -> None:
    chat, url = server
    run = await run_workload([url], workload(Conversation("", (" a", " b", " c"))), "m", rate=1000.0)
    assert run.load.ok == 3 and chat.max_in_flight == 1
    # Latency counts from the (slipped) scheduled start: each turn is charged about its own time, not the run's.
    assert max(run.load.latencies) < 0.6 * run.load.elapsed


async def test_a_failed_turn_ends_its_conversation(server) -> None:
    chat, url = server
    work = workload(
        Conversation("", (" ok", " fail", " never", " sent")),
        Conversation("", (" broken", " never")),
        Conversation("", (" fine",)),
    )
    run = await run_workload([url], work, "m", concurrency=2)
    assert run.load.count == 4 and run.load.ok == 2 and run.skipped == 3
    assert sorted(run.load.statuses) == [STREAM_ERROR, 200, 200, 500]
    assert not any(b["messages"][-1]["content"] == " never" for b in chat.bodies)
    assert any("upstream went away" in e for e in run.load.errors)
    assert math.isnan(run.load.ttfts[run.load.statuses.index(500)])


def test_exactly_one_load_shape_is_required() -> None:
    with pytest.raises(ValueError):
        asyncio.run(run_workload(["http://127.0.0.1:1"], workload(Conversation("", (" q",))), "m"))
    timed = Workload("t", (Conversation("", (" q",)),), 3, "timed", timed=True)
    with pytest.raises(ValueError):  # a timed workload brings its own schedule
        asyncio.run(run_workload(["http://127.0.0.1:1"], timed, "m", rate=10.0))


def test_splitter_sends_request_i_to_replica_i_mod_n() -> None:
    split = Splitter(["a", "b", "c"])
    assert [split() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    one = Splitter(["only"])
    assert {one() for _ in range(3)} == {"only"}
    with pytest.raises(ValueError):
        Splitter([])


async def test_replicas_share_the_requests_round_robin() -> None:
    first, second = ChatServer(), ChatServer()
    async with serving(first.app) as url1, serving(second.app) as url2:
        work = workload(*(Conversation("", (f" c{i}t0", f" c{i}t1")) for i in range(3)))
        run = await run_workload([url1, url2], work, "m", concurrency=1)
    assert run.load.ok == 6 and len(first.bodies) == len(second.bodies) == 3
    sent = [b["messages"][-1]["content"] for b in first.bodies]
    assert sent == [" c0t0", " c2t0", " c1t1"]  # requests 0, 2, 4 in issue order
    # A conversation's turns land on either replica, with its whole history each time.
    assert second.bodies[-1]["messages"][-2:] == [{"role": "assistant", "content": " answer-2"},
                                                  {"role": "user", "content": " c2t1"}]  # fmt: skip


async def test_a_timed_workload_follows_its_schedule_and_answer_lengths(server) -> None:
    chat, url = server
    work = Workload(
        "t",
        (
            Conversation("", (" late",), start=0.3, max_tokens=7),
            Conversation("", (" a0", " a1"), start=0.0, think=(0.6,)),
            Conversation("", (" b0", " b1"), start=0.1, think=(0.0,)),
        ),
        max_tokens=3,
        description="timed",
        timed=True,
    )
    assert list(work.nominal_order()) == [(1, 0), (2, 0), (2, 1), (0, 0), (1, 1)]
    run = await run_workload([url], work, "m")
    assert run.load.ok == 5 and run.skipped == 0
    sent = [b["messages"][-1]["content"] for b in chat.bodies]
    # Starts and think times order the turns; a zero think time still waits for the answer before the next turn.
    assert sent.index(" a0") < sent.index(" b0") < sent.index(" b1") and sent[-1] == " a1"
    assert sent.index(" b0") < sent.index(" late")
    assert {b["messages"][-1]["content"]: b["max_tokens"] for b in chat.bodies}[" late"] == 7
    assert chat.bodies[sent.index(" b1")]["messages"][1] == {
        "role": "assistant",
        "content": f" answer-{sent.index(' b0') + 1}",
    }
