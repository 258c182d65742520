"""The Protocol-level upstream client (`shepherd.upstream.pool`): keep-alive pooling, framing, faults, TLS.

Most tests talk to raw `asyncio.start_server` stand-ins written here, because the faults they need (a reused
connection closed under a request, a stalled body, bad chunk sizes, a handshake that never finishes) are not
something a real worker does on demand; one test runs against a real `shepherd sim` process.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from shepherd.upstream.pool import (
    HIGH_WATER,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tests.support.polling import until
from tests.support.processes import free_port, start_sim

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Peer:
    """The server side of one accepted connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        self.reader = reader
        self.writer = writer
        self.index = index  # 0 for the server's first accepted connection

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body (by Content-Length), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def eof(self) -> None:
        """Wait until the client closes its side (a reset counts too)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """A raw HTTP stand-in on 127.0.0.1: runs `handler` per accepted connection, then closes it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepts = 0
        self.peers: list[Peer] = []
        self.finished = 0  # handlers that returned (the connection then closed)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Server:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer, self.accepts)
        self.accepts += 1
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.finished += 1

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for peer in self.peers:
                # A closing transport is on its way out; aborting one whose close flushed its buffer meanwhile
                # fails in CPython 3.11 (its loop is gone, but the loss was never counted).
                if not peer.writer.transport.is_closing():
                    peer.writer.transport.abort()
            await self._server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Start stand-in servers for a test; all are stopped when it ends."""
    servers: list[Server] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> Server:
        server = await Server(handler).start(ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(idle_timeout=5.0)
    yield pool
    await pool.close()


async def keep_alive(peer: Peer) -> None:
    """Answer every request `ok` until the client closes."""
    while await peer.request() is not None:
        await peer.send(OK)


async def assert_clean(pool: UpstreamPool, origin, server: Server | None = None) -> None:
    """The invariant after a failed request: nothing pooled, nothing left open, the server saw the close."""
    assert pool.idle_count(origin) == 0
    await until(lambda: pool.open_count == 0, "the failed connection to close")
    if server is not None:
        await until(lambda: server.finished == server.accepts, "the server to see every connection close")


async def get(pool: UpstreamPool, origin, **kwargs) -> bytes:
    async with await pool.request(origin, b"POST", b"/x", b"", b"{}", **kwargs) as resp:
        return await resp.read()


# --- origins -------------------------------------------------------------------------------------------------


def test_origin_prebuilds_host_and_basic_auth_and_is_cached():
    pool = UpstreamPool()
    origin = pool.origin("http://user:p%40ss@127.0.0.1:8000/base/")
    assert pool.origin("http://user:p%40ss@127.0.0.1:8000/base/") is origin
    assert (origin.scheme, origin.host, origin.port, origin.path) == ("http", "127.0.0.1", 8000, b"/base")
    assert origin.host_header == b"Host: 127.0.0.1:8000\r\n"
    assert b"Authorization: Basic dXNlcjpwQHNz\r\n" in origin._line_end  # user:p@ss
    assert "p%40ss" not in origin.name and "user" not in origin.name and "ss" not in repr(origin)
    assert pool.origin("https://h.example").host_header == b"Host: h.example\r\n"  # default port omitted
    assert pool.origin("https://h.example").port == 443
    assert pool.origin("http://[::1]:81").host_header == b"Host: [::1]:81\r\n"
    with pytest.raises(ValueError):
        pool.origin("ftp://h:1")


async def test_request_line_host_auth_headers_and_content_length_go_out_in_one_piece(serve, pool):
    seen: list[tuple[bytes, bytes]] = []

    async def record(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            seen.append(request)
            await peer.send(OK)

    server = await serve(record)
    origin = pool.origin(f"http://u:pw@127.0.0.1:{server.port}/pre")
    resp = await pool.request(origin, b"POST", b"/generate?a=1", b"Content-Type: application/json\r\n", b'{"a":1}')
    assert (resp.status, await resp.read()) == (200, b"ok")
    assert seen == [
        (
            b"POST /pre/generate?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Basic dTpwdw==\r\n"
            b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n" % server.port,
            b'{"a":1}',
        )
    ]


# --- 1. keep-alive reuse -------------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_keep_alive_connection(serve, pool):
    server = await serve(keep_alive)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    assert pool.idle_count(origin) == 1
    assert await get(pool, origin) == b"ok"
    assert server.accepts == 1 and pool.idle_count(origin) == 1 and pool.open_count == 1


async def test_concurrent_requests_each_get_a_connection_and_all_are_pooled(serve, pool):
    server = await serve(keep_alive)
    origin = pool.origin(server.url)
    assert await asyncio.gather(*(get(pool, origin) for _ in range(5))) == [b"ok"] * 5
    assert server.accepts == 5 and pool.idle_count(origin) == 5
    assert await asyncio.gather(*(get(pool, origin) for _ in range(5))) == [b"ok"] * 5
    assert server.accepts == 5


async def test_idle_connections_beyond_the_cap_are_closed(serve):
    server = await serve(keep_alive)
    pool = UpstreamPool(max_idle_per_origin=2)
    try:
        origin = pool.origin(server.url)
        await asyncio.gather(*(get(pool, origin) for _ in range(4)))
        assert pool.idle_count(origin) == 2
        await until(lambda: server.finished == 2, "the two surplus connections to close")
    finally:
        await pool.close()


# --- 2. idle expiry ------------------------------------------------------------------------------------------


async def test_a_connection_idle_longer_than_idle_timeout_is_closed_not_reused(serve):
    server = await serve(keep_alive)
    pool = UpstreamPool(idle_timeout=0.2)
    try:
        origin = pool.origin(server.url)
        assert await get(pool, origin) == b"ok"
        assert pool.idle_count(origin) == 1
        await until(lambda: pool.idle_count(origin) == 0, "the idle connection to expire", timeout=5)
        await until(lambda: server.finished == 1, "the server to see the expired connection close")
        assert await get(pool, origin) == b"ok"
        assert server.accepts == 2
    finally:
        await pool.close()


async def test_an_expired_connection_is_not_taken_even_before_the_sweep_closes_it(serve):
    server = await serve(keep_alive)
    pool = UpstreamPool(idle_timeout=0.2)
    try:
        origin = pool.origin(server.url)
        assert await get(pool, origin) == b"ok"
        pool._sweep_handle.cancel()  # no sweep: only the age check on take stands between us and the race
        pool._sweep_handle = None
        conn = origin._idle[0]
        conn._idle_since -= 1.0  # as if it had sat idle for a second
        assert await get(pool, origin) == b"ok"
        assert server.accepts == 2 and conn._closed
    finally:
        await pool.close()


# --- 3. stale reused connection ------------------------------------------------------------------------------


async def test_a_reused_connection_closed_before_any_byte_is_retried_once_on_a_fresh_one(serve, pool):
    async def one_then_drop(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(OK)
        await peer.request()  # the next request on this connection: drop it unanswered

    server = await serve(one_then_drop)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    assert await get(pool, origin) == b"ok"  # transparently on a second connection
    assert server.accepts == 2 and pool.idle_count(origin) == 1


async def test_the_stale_retry_happens_once_only(serve, pool):
    async def first_only(peer: Peer) -> None:
        if peer.index == 0:
            assert await peer.request() is not None
            await peer.send(OK)
        await peer.request()  # anything else: dropped unanswered

    server = await serve(first_only)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    with pytest.raises(UpstreamClosed):
        await get(pool, origin)
    assert server.accepts == 2  # the reused one, then exactly one fresh one
    await assert_clean(pool, origin, server)


async def test_a_fresh_connection_closed_without_a_response_is_not_retried(serve, pool):
    async def drop(peer: Peer) -> None:
        await peer.request()

    server = await serve(drop)
    origin = pool.origin(server.url)
    with pytest.raises(UpstreamClosed) as caught:
        await get(pool, origin)
    assert "without a response" in str(caught.value)
    assert server.accepts == 1
    await assert_clean(pool, origin, server)


async def test_a_reused_connection_closed_after_a_response_byte_is_not_retried(serve, pool):
    async def partial_second(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(OK)
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200")  # part of an answer, then gone

    server = await serve(partial_second)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    with pytest.raises(UpstreamClosed) as caught:
        await get(pool, origin)
    assert "mid-response" in str(caught.value)
    assert server.accepts == 1
    await assert_clean(pool, origin, server)


# --- 4. connections the server closes ------------------------------------------------------------------------


async def test_a_pooled_connection_the_server_closes_leaves_the_pool(serve, pool):
    async def answer_then_close(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(OK)  # keep-alive by the headers, then closed anyway (an idle close)

    server = await serve(answer_then_close)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    await until(lambda: pool.idle_count(origin) == 0 and pool.open_count == 0, "connection_lost to unpool it")
    assert await get(pool, origin) == b"ok"
    assert server.accepts == 2


@pytest.mark.parametrize(
    ("answer", "pooled"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    ],
    ids=["connection-close", "http1.0", "http1.0-keep-alive"],
)
async def test_connection_close_and_http10_answers_are_not_pooled(serve, pool, answer, pooled):
    async def respond(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer)

    server = await serve(respond)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"GET", b"/", b"", b"")
    assert resp.keep_alive is pooled
    assert await resp.read() == b"ok"
    assert pool.idle_count(origin) == (1 if pooled else 0)
    if not pooled:
        await until(lambda: server.finished == 1, "the server to see the close")


# --- 5. framing ----------------------------------------------------------------------------------------------


async def test_a_chunked_body_is_dechunked_piece_by_piece(serve, pool):
    async def chunked(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                await peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            await peer.send(b"0\r\n\r\n")

    server = await serve(chunked)
    origin = pool.origin(server.url)
    async with await pool.request(origin, b"POST", b"/s", b"", b"{}") as resp:
        pieces = [piece async for piece in resp]
    assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert pool.idle_count(origin) == 1
    assert await get(pool, origin) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"  # read() on the same connection
    assert server.accepts == 1


async def test_next_data_hands_out_all_buffered_chunks_as_one_piece_and_the_last_one_finishes(serve, pool):
    async def whole_stream_in_one_send(peer: Peer) -> None:
        while await peer.request() is not None:
            pieces = (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n")
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    server = await serve(whole_stream_in_one_send)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/s", b"", b"{}")
    assert await resp.next_data() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert resp.finished and pool.idle_count(origin) == 1  # released with its last piece
    assert await resp.next_data() == b""


async def test_a_content_length_body_split_across_packets_is_read_whole(serve, pool):
    body = bytes(range(256)) * 4096  # 1 MiB

    async def sized(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 100_000):
                await peer.send(body[i : i + 100_000])

    server = await serve(sized)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == body
    assert await get(pool, origin) == body
    assert server.accepts == 1 and pool.idle_count(origin) == 1


async def test_a_close_delimited_body_ends_at_eof_and_is_not_pooled(serve, pool):
    async def until_eof(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst,")
        await peer.send(b"second")  # then the handler returns and the connection closes

    server = await serve(until_eof)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"GET", b"/", b"", b"")
    assert not resp.keep_alive
    assert await resp.read() == b"first,second"
    assert pool.idle_count(origin) == 0 and pool.open_count == 0


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_complete_at_the_head_and_pool(serve, pool, status):
    async def empty(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 %d Nothing\r\nETag: x\r\n\r\n" % status)

    server = await serve(empty)
    origin = pool.origin(server.url)
    for _ in range(2):
        resp = await pool.request(origin, b"GET", b"/", b"", b"")
        assert resp.status == status and await resp.read() == b""
    assert server.accepts == 1 and pool.idle_count(origin) == 1


async def test_interim_1xx_responses_are_skipped(serve, pool):
    async def hints(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            await peer.send(b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone")

    server = await serve(hints)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"x")
    assert resp.status == 201
    assert resp.headers == [(b"X-Final", b"yes"), (b"Content-Length", b"4")]
    assert resp.get_header(b"x-final") == b"yes" and resp.get_header(b"link") is None
    assert await resp.read() == b"done"
    assert pool.idle_count(origin) == 1
    assert await get(pool, origin) == b"done"


async def test_a_head_request_gets_its_head_and_the_connection_is_not_pooled(serve, pool):
    async def head(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await peer.eof()

    server = await serve(head)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"HEAD", b"/", b"", b"")
    assert resp.status == 200 and await resp.read() == b""
    await assert_clean(pool, origin, server)


# --- 6. backpressure -----------------------------------------------------------------------------------------


async def test_an_unread_body_stays_bounded_and_reading_resumes_when_consumed(serve, pool):
    total = 64 * 1024 * 1024  # far beyond what loopback socket buffers can hold
    block = b"x" * (1024 * 1024)
    sent = 0
    writers: list[asyncio.WriteTransport] = []

    async def firehose(peer: Peer) -> None:
        nonlocal sent
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        writers.append(peer.writer.transport)
        while sent < total:
            peer.writer.write(block)
            sent += len(block)
            await peer.writer.drain()

    server = await serve(firehose)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"GET", b"/big", b"", b"")
    await until(lambda: resp.buffered_bytes > HIGH_WATER, "the body to fill the buffer past the high-water mark")
    # Wait for the server to be stuck: bytes it cannot hand to the kernel, and no progress over several polls.
    history: list[int] = []

    def server_stuck() -> bool:
        history.append(sent)
        return bool(writers) and writers[0].get_write_buffer_size() > 0 and history[-5:] == [sent] * 5

    await until(server_stuck, "the server to block on the unread socket")
    bound = HIGH_WATER + 512 * 1024  # at most one more socket read lands after the pause
    assert resp.buffered_bytes <= bound
    assert sent < total
    received = 0
    async for piece in resp:
        received += len(piece)
        assert resp.buffered_bytes <= bound
    assert received == total and sent == total
    assert pool.idle_count(origin) == 1 and server.accepts == 1


async def test_a_large_request_body_is_written_completely(serve, pool):
    body = b"y" * (16 * 1024 * 1024)

    async def count(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            assert request[1] == body
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n%08d" % len(request[1]))

    server = await serve(count)
    origin = pool.origin(server.url)
    for _ in range(2):
        resp = await pool.request(origin, b"POST", b"/", b"", body, first_byte_timeout=30)
        assert int(await resp.read()) == len(body)
    assert server.accepts == 1


# --- 7. timeouts and connect errors --------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error_without_credentials(pool):
    origin = pool.origin(f"http://admin:hunter2@127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamConnectError) as caught:
        await get(pool, origin)
    assert "hunter2" not in str(caught.value) and "admin" not in str(caught.value)
    assert f"127.0.0.1:{origin.port}" in str(caught.value)
    await assert_clean(pool, origin)


async def test_a_tls_handshake_that_never_completes_is_a_connect_timeout(serve):
    server = await serve(Peer.eof)  # plain TCP: accepts, never answers the ClientHello
    pool = UpstreamPool(connect_timeout=0.2)
    try:
        origin = pool.origin(f"https://127.0.0.1:{server.port}")
        with pytest.raises(UpstreamTimeout) as caught:
            await get(pool, origin)
        assert caught.value.phase == "connect"
        await assert_clean(pool, origin, server)
    finally:
        await pool.close()


async def test_no_response_head_in_time_is_a_first_byte_timeout_and_closes(serve, pool):
    async def silent(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.eof()

    server = await serve(silent)
    origin = pool.origin(server.url)
    with pytest.raises(UpstreamTimeout) as caught:
        await get(pool, origin, first_byte_timeout=0.2)
    assert caught.value.phase == "first_byte"
    await assert_clean(pool, origin, server)


@pytest.mark.parametrize("how", ["iterate", "read"])
async def test_a_body_stalled_longer_than_idle_timeout_is_an_idle_timeout(serve, pool, how):
    async def stall(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await peer.eof()

    server = await serve(stall)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    resp.idle_timeout = 0.2
    with pytest.raises(UpstreamTimeout) as caught:
        if how == "iterate":
            assert await anext(resp) == b"hello"
            await anext(resp)
        else:
            await resp.read()
    assert caught.value.phase == "idle"
    await assert_clean(pool, origin, server)
    with pytest.raises(UpstreamClosed):  # the response is over
        await resp.read()


async def test_a_cancelled_request_closes_its_connection(serve, pool):
    got_request = asyncio.Event()

    async def silent(peer: Peer) -> None:
        assert await peer.request() is not None
        got_request.set()
        await peer.eof()

    server = await serve(silent)
    origin = pool.origin(server.url)
    task = asyncio.create_task(get(pool, origin))
    await asyncio.wait_for(got_request.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_clean(pool, origin, server)


# --- 8. abort and early release ------------------------------------------------------------------------------


async def streaming_then_wait(peer: Peer) -> None:
    assert await peer.request() is not None
    await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
    await peer.eof()


async def test_abort_mid_body_closes_the_connection(serve, pool):
    server = await serve(streaming_then_wait)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    assert await anext(resp) == b"first\n"
    resp.abort()
    resp.abort()  # idempotent
    resp.release()  # and a no-op after abort
    await assert_clean(pool, origin, server)


async def test_release_before_the_body_ends_closes_rather_than_pools(serve, pool):
    server = await serve(streaming_then_wait)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    assert await anext(resp) == b"first\n"
    resp.release()
    resp.release()
    await assert_clean(pool, origin, server)


async def test_async_with_aborts_on_an_exception(serve, pool):
    server = await serve(streaming_then_wait)
    origin = pool.origin(server.url)
    with pytest.raises(RuntimeError):
        async with await pool.request(origin, b"POST", b"/", b"", b"{}") as resp:
            await anext(resp)
            raise RuntimeError("client went away")
    await assert_clean(pool, origin, server)


async def test_a_completely_received_body_pools_even_if_not_read(serve, pool):
    server = await serve(keep_alive)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    await until(lambda: resp.buffered_bytes == 2, "the body to arrive")
    resp.release()
    assert pool.idle_count(origin) == 1
    assert await get(pool, origin) == b"ok"  # no leftover bytes from the unread body
    assert server.accepts == 1


# --- 9/10. malformed answers and unsolicited bytes -----------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
    ids=["length-and-chunked", "bad-status", "two-lengths", "not-http"],
)
async def test_a_malformed_head_is_a_protocol_error_and_closes(serve, pool, answer):
    async def bad(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer)
        await peer.eof()

    server = await serve(bad)
    origin = pool.origin(server.url)
    with pytest.raises(UpstreamProtocolError):
        await get(pool, origin)
    await assert_clean(pool, origin, server)


async def test_a_bad_chunk_size_is_a_protocol_error_and_closes(serve, pool):
    async def bad_chunk(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await peer.send(b"zz\r\nnope\r\n0\r\n\r\n")
        await peer.eof()

    server = await serve(bad_chunk)
    origin = pool.origin(server.url)
    with pytest.raises(UpstreamProtocolError):  # from request() or read(): the packets may arrive together
        resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
        await resp.read()
    await assert_clean(pool, origin, server)


async def test_bytes_beyond_the_response_spoil_the_connection_but_not_the_answer(serve, pool):
    async def double(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(OK + OK)  # a second, unsolicited response
        await peer.eof()

    server = await serve(double)
    origin = pool.origin(server.url)
    assert await get(pool, origin) == b"ok"
    await assert_clean(pool, origin, server)


async def test_after_failures_the_pool_still_serves(serve, pool):
    async def flaky(peer: Peer) -> None:
        request = await peer.request()
        if peer.index == 0:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc")  # cut short
            return
        while request is not None:
            await peer.send(OK)
            request = await peer.request()

    server = await serve(flaky)
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    with pytest.raises(UpstreamClosed):
        await resp.read()
    assert pool.idle_count(origin) == 0
    assert await get(pool, origin) == b"ok"
    assert await get(pool, origin) == b"ok"
    assert server.accepts == 2 and pool.idle_count(origin) == 1


async def test_close_fails_responses_in_progress_and_refuses_new_requests(serve):
    server = await serve(streaming_then_wait)
    pool = UpstreamPool()
    origin = pool.origin(server.url)
    resp = await pool.request(origin, b"POST", b"/", b"", b"{}")
    await pool.close()
    assert pool.open_count == 0
    with pytest.raises(UpstreamClosed):
        await resp.read()
    with pytest.raises(UpstreamError):
        await get(pool, origin)
    await until(lambda: server.finished == 1, "the server to see the close")


# --- 11. TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_https_origins_use_the_ssl_context_and_keep_alive(serve, ca):
    server = await serve(keep_alive, tls_server_context(ca))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    pool = UpstreamPool(ssl_context=client_context)
    try:
        origin = pool.origin(f"https://127.0.0.1:{server.port}")
        assert await get(pool, origin) == b"ok"
        assert await get(pool, origin) == b"ok"
        assert server.accepts == 1 and pool.idle_count(origin) == 1
    finally:
        await pool.close()


async def test_an_untrusted_worker_certificate_is_a_connect_error(serve, ca):
    server = await serve(keep_alive, tls_server_context(ca))
    pool = UpstreamPool(ssl_context=ssl.create_default_context())  # system roots only
    try:
        origin = pool.origin(f"https://127.0.0.1:{server.port}")
        with pytest.raises(UpstreamConnectError) as caught:
            await get(pool, origin)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        await assert_clean(pool, origin)
    finally:
        await pool.close()


# --- a real worker -------------------------------------------------------------------------------------------


async def test_against_a_real_sim_worker_plain_and_streamed(tmp_path):
    with start_sim(tmp_path, 1, "--latency-model", "none") as sims:
        pool = UpstreamPool()
        try:
            origin = pool.origin(sims.urls[0])
            headers = b"Content-Type: application/json\r\n"
            body = json.dumps({"text": "hello there", "sampling_params": {"max_new_tokens": 4}}).encode()
            async with await pool.request(origin, b"POST", b"/generate", headers, body, first_byte_timeout=10) as resp:
                assert resp.status == 200 and resp.keep_alive
                answer = json.loads(await resp.read())
            assert isinstance(answer["text"], str) and answer["meta_info"]["completion_tokens"] == 4

            streamed = json.dumps({"text": "hello there", "sampling_params": {"max_new_tokens": 4}, "stream": True})
            resp = await pool.request(origin, b"POST", b"/generate", headers, streamed.encode())
            resp.idle_timeout = 10
            async with resp:
                assert resp.status == 200 and resp.get_header(b"content-type").startswith(b"text/event-stream")
                sse = b"".join([piece async for piece in resp])
            frames = [line[6:] for line in sse.split(b"\n\n") if line.startswith(b"data: ")]
            assert frames[-1] == b"[DONE]"
            assert json.loads(frames[-2])["meta_info"]["completion_tokens"] == 4
            assert pool.open_count == 1 and pool.idle_count(origin) == 1  # both on one keep-alive connection
        finally:
            await pool.close()


async def test_a_discarded_origin_closes_its_idle_connections_and_pools_no_more(serve, pool):
    """A worker that left the fleet: its idle connections close at once, and one still busy is closed when its
    response ends instead of going back to a pool nobody sweeps."""
    server = await serve(keep_alive)
    origin = pool.origin(server.url)
    busy = await pool.request(origin, b"POST", b"/x", b"", b"{}")  # its body not read yet: not pooled
    body = await get(pool, origin)  # a second connection, pooled when done
    assert pool.idle_count(origin) == 1 and pool.open_count == 2
    pool.discard(server.url)
    assert pool.idle_count(origin) == 0
    await until(lambda: server.finished == 1, "the idle connection to close")
    assert await busy.read() == body
    assert pool.idle_count(origin) == 0
    await until(lambda: pool.open_count == 0, "both connections to close")
    assert pool.origin(server.url) is not origin  # a worker that comes back gets a fresh origin
