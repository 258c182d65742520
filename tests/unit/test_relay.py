"""relay_sse tells a worker that broke its stream from a client that went away."""

from __future__ import annotations

import aiohttp
from aiohttp.client_exceptions import ClientConnectionResetError

from shepherd.upstream.relay import relay_sse

FRAMES = [b'data: {"t": 1}\n\n', b'data: {"t": 2}\n\n', b"data: [DONE]\n\n"]


class Content:
    """The part of aiohttp's StreamReader that relay_sse reads: chunks, then optionally a read error."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self._chunks, self._error = chunks, error

    async def iter_any(self):
        for chunk in self._chunks:
            yield chunk
        if self._error is not None:
            raise self._error


class Upstream:
    def __init__(self, content: Content) -> None:
        self.content = content


class Client:
    """A prepared response whose transport may close after `accept` writes."""

    def __init__(self, accept: int = 100) -> None:
        self.written: list[bytes] = []
        self.accept = accept
        self.ended = False

    async def write(self, data: bytes) -> None:
        if len(self.written) >= self.accept:
            raise ClientConnectionResetError("Cannot write to closing transport")
        self.written.append(data)

    async def write_eof(self) -> None:
        self.ended = True


async def test_a_finished_stream_counts_its_events_without_done():
    client = Client()
    outcome = await relay_sse(Upstream(Content(FRAMES)), client, b"cut")
    assert client.written == FRAMES and client.ended
    assert (outcome.events, outcome.broken, outcome.client_gone) == (2, False, False)


async def test_a_worker_breaking_the_stream_is_marked_broken_and_the_client_told():
    client = Client()
    outcome = await relay_sse(Upstream(Content(FRAMES[:1], aiohttp.ClientPayloadError("cut"))), client, b"cut")
    assert client.written == [FRAMES[0], b"cut"] and client.ended
    assert outcome.broken and not outcome.client_gone


async def test_a_client_going_away_is_not_the_workers_fault():
    client = Client(accept=1)
    outcome = await relay_sse(Upstream(Content(FRAMES)), client, b"cut")
    assert client.written == [FRAMES[0]]
    assert outcome.client_gone and not outcome.broken
