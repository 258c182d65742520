"""relay_sse tells a worker that broke its stream from a client that went away, and settles the worker's
connection accordingly: pooled after a finished stream, closed after anything else."""

from __future__ import annotations

import time

from shepherd.upstream.pool import UpstreamClosed, UpstreamTimeout
from shepherd.upstream.relay import relay_sse, reported_cached_tokens

FRAMES = [b'data: {"t": 1}\n\n', b'data: {"t": 2}\n\n', b"data: [DONE]\n\n"]
FOREVER = float("inf")


class Upstream:
    """The part of UpstreamResponse relay_sse uses: body pieces, then optionally a read error; how it was settled."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self._chunks, self._error = list(chunks), error
        self.settled: str | None = None

    async def next_data(self) -> bytes:
        if self._chunks:
            piece = self._chunks.pop(0)
            if not self._chunks and self._error is None:
                self.release()  # the pool hands back the connection with the last piece
            return piece
        if self._error is not None:
            raise self._error
        self.release()
        return b""

    @property
    def finished(self) -> bool:
        return self.settled == "released"

    def release(self) -> None:
        self.settled = self.settled or "released"

    def abort(self) -> None:
        self.settled = self.settled or "aborted"


class Client:
    """A prepared response whose connection closes after `accept` writes; `write_eof` writes its last data too."""

    def __init__(self, accept: int = 100) -> None:
        self.written: list[bytes] = []
        self.accept = accept
        self.ended = False

    async def write(self, data: bytes) -> None:
        if len(self.written) >= self.accept:
            raise ConnectionResetError("client disconnected")
        self.written.append(data)

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            await self.write(data)
        self.ended = True


async def test_a_finished_stream_counts_its_events_without_done_and_pools_the_connection():
    client, upstream = Client(), Upstream(FRAMES)
    outcome = await relay_sse(upstream, client, b"cut", FOREVER)
    assert client.written == FRAMES and client.ended
    assert (outcome.events, outcome.broken, outcome.client_gone) == (2, False, False)
    assert upstream.settled == "released"


async def test_a_worker_breaking_the_stream_is_marked_broken_and_the_client_told():
    client, upstream = Client(), Upstream(FRAMES[:1], UpstreamClosed("cut"))
    outcome = await relay_sse(upstream, client, b"cut", FOREVER)
    assert client.written == [FRAMES[0], b"cut"] and client.ended
    assert outcome.broken and not outcome.client_gone
    assert upstream.settled == "aborted"


async def test_a_stream_gap_past_the_idle_timeout_is_a_broken_stream():
    client, upstream = Client(), Upstream(FRAMES[:1], UpstreamTimeout("idle", "no chunk for 300 s"))
    outcome = await relay_sse(upstream, client, b"cut", FOREVER)
    assert client.written == [FRAMES[0], b"cut"] and outcome.broken and upstream.settled == "aborted"


async def test_a_stream_running_past_the_attempt_deadline_is_cut():
    client, upstream = Client(), Upstream(FRAMES)
    outcome = await relay_sse(upstream, client, b"cut", time.monotonic() - 1)
    assert client.written == [FRAMES[0], b"cut"] and client.ended
    assert outcome.broken and upstream.settled == "aborted"


async def test_a_client_going_away_is_not_the_workers_fault_and_closes_the_worker_connection():
    client, upstream = Client(accept=1), Upstream(FRAMES)
    outcome = await relay_sse(upstream, client, b"cut", FOREVER)
    assert client.written == [FRAMES[0]]
    assert outcome.client_gone and not outcome.broken
    assert upstream.settled == "aborted"


async def test_rewrite_sees_whole_lines_even_when_reads_split_them():
    pieces = [b'data: {"a"', b': 1}\n\ndata: {"b": 2}\n', b"\ndata: [DONE]\n\n"]
    seen: list[bytes] = []

    def rewrite(line: bytes) -> bytes:
        seen.append(line)
        return line.replace(b"2", b"22")

    client = Client()
    outcome = await relay_sse(Upstream(pieces), client, b"cut", FOREVER, rewrite)
    assert seen == [b'data: {"a": 1}\n', b"\n", b'data: {"b": 2}\n', b"\n", b"data: [DONE]\n", b"\n"]
    assert b"".join(client.written) == b"".join(pieces).replace(b"2", b"22")
    assert outcome.events == 2


async def test_the_workers_reported_cached_tokens_come_back_with_the_outcome():
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":900,"prompt_tokens_details":{"cached_tokens": 768}}}\n\n'
    frames = [FRAMES[0], usage, FRAMES[2]]
    outcome = await relay_sse(Upstream(frames), Client(), b"cut", FOREVER, read_cached_tokens=True)
    assert outcome.cached_tokens == 768
    assert (await relay_sse(Upstream(FRAMES), Client(), b"cut", FOREVER, read_cached_tokens=True)).cached_tokens is None
    assert (await relay_sse(Upstream(frames), Client(), b"cut", FOREVER)).cached_tokens is None  # not asked


def test_reported_cached_tokens_reads_sglang_and_openai_shapes():
    assert reported_cached_tokens(b'{"text":"x","meta_info":{"prompt_tokens":9,"cached_tokens":5}}') == 5
    assert reported_cached_tokens(b'{"usage":{"prompt_tokens_details":{"cached_tokens":12}}}') == 12
    assert reported_cached_tokens(b'{"usage":{"prompt_tokens":12}}') is None
    assert reported_cached_tokens(b'{"cached_tokens":null}') is None
