"""The main port's HTTP/1.1 server (`shepherd.http.server.HttpServer`) on its own: no gateway, no workers.

A tiny app defined here (echo, stream, raise, block) is served on a loopback port, and raw asyncio streams speak
HTTP/1.1 to it byte by byte, so framing is checked exactly: keep-alive, pipelining, chunked bodies and
`Expect: 100-continue`, limits, smuggling shapes, timeouts, bodiless and streamed responses, handler errors,
cancellation on disconnect, write backpressure and graceful shutdown. Every wait has a deadline; nothing sleeps
to synchronize.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shepherd.config import HttpConfig
from shepherd.exchange import BodyTooLarge, Request, Response, StreamResponse
from shepherd.http import server as server_module
from shepherd.http.server import HttpConnection, HttpServer
from tests.support.polling import until

READ_TIMEOUT = 3.0  # a bound on every read: far above every timeout configured below
MAX_BODY = 1000
BIG_CHUNK = 64 * 1024
BIG_WRITES = 1024  # 64 MiB streamed by /big


# -- the app ------------------------------------------------------------------------------------------------------
@dataclass
class App:
    """The handlers, and what they record: every path the server handed over, and the fate of blocked ones."""

    calls: list[str] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a /block handler is waiting
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets /block handlers answer
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # a /block handler got CancelledError
    big_writes: int = 0  # writes /big completed
    big_in_write: bool = False  # /big is suspended inside `write` (only a full socket suspends it)

    async def __call__(self, request: Request) -> Response | StreamResponse:
        self.calls.append(request.path)
        name = request.path.split("/")[1]
        return await getattr(self, "h_" + name.replace("-", "_"))(request)

    async def h_echo(self, request: Request) -> Response:
        """`METHOD /path body`; a body over the payload limit is answered 413 (the app maps BodyTooLarge)."""
        try:
            body = await request.read()
        except BodyTooLarge:
            return Response(status=413, body=b'{"mapped": true}', content_type="application/json")
        return Response(body=f"{request.method} {request.path} ".encode() + body)

    async def h_noread(self, request: Request) -> Response:
        return Response(body=b"not read")

    async def h_empty(self, request: Request) -> Response:
        return Response(status=204, body=b"dropped by the server")

    async def h_stream(self, request: Request) -> StreamResponse:
        response = StreamResponse(headers={"content-type": "text/plain"})
        await response.prepare(request)
        for part in (b"one ", b"two ", b"three "):
            await response.write(part)
        await response.write_eof(b"end")
        return response

    async def h_boom(self, request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def h_boom_stream(self, request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        raise RuntimeError("handler bug mid-stream")

    async def h_block(self, request: Request) -> Response:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(body=b"released")

    async def h_big(self, request: Request) -> StreamResponse:
        response = StreamResponse()
        await response.prepare(request)
        chunk = b"x" * BIG_CHUNK
        for _ in range(BIG_WRITES):
            self.big_in_write = True  # `write` returns without yielding unless it waits for the socket to drain
            await response.write(chunk)
            self.big_in_write = False
            self.big_writes += 1
        await response.write_eof()
        return response


# -- a strict raw client ------------------------------------------------------------------------------------------
@dataclass
class Reply:
    """One response as read off the wire; header names lower-cased, order and repeats kept."""

    status: int
    headers: list[tuple[str, str]]
    framing: str = "none"  # "length", "chunked", "close" or "none"
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)  # 1xx statuses before this one

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw connection: writes exactly the bytes it is given, parses responses strictly, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> Reply:
        async with asyncio.timeout(READ_TIMEOUT):
            head = (await self.reader.readuntil(b"\r\n\r\n"))[:-4].decode("latin-1")
        status_line, *lines = head.split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) [^\r\n]*", status_line)
        assert match, f"bad status line {status_line!r}"
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return Reply(int(match[1]), headers)

    async def read_response(self, method: str = "GET") -> Reply:
        """The next final response and its body, delimited as RFC 9112 section 6.3 says."""
        interim = []
        while 100 <= (reply := await self.read_head()).status < 200:
            interim.append(reply.status)
        reply.interim = interim
        te, cl = reply.header("transfer-encoding"), reply.header("content-length")
        assert not (te and cl), f"both Transfer-Encoding and Content-Length: {reply.headers}"
        if reply.status in (204, 304):
            assert te is None and cl is None, f"{reply.status} with framing headers: {reply.headers}"
        elif method == "HEAD":
            pass
        elif te is not None:
            assert te == "chunked", te
            reply.framing = "chunked"
            while chunk := await self.read_chunk():
                reply.chunks.append(chunk)
            reply.body = b"".join(reply.chunks)
        elif cl is not None:
            assert re.fullmatch(r"\d+", cl), cl
            reply.framing = "length"
            async with asyncio.timeout(READ_TIMEOUT):
                reply.body = await self.reader.readexactly(int(cl))
        else:
            reply.framing = "close"
            reply.body = await self.read_to_eof()
        return reply

    async def read_chunk(self) -> bytes:
        """One chunk; b"" after the last one (`0\\r\\n\\r\\n`, no trailers)."""
        async with asyncio.timeout(READ_TIMEOUT):
            size_line = (await self.reader.readuntil(b"\r\n"))[:-2]
            assert re.fullmatch(rb"[0-9a-f]+", size_line), f"bad chunk size line {size_line!r}"
            data = await self.reader.readexactly(int(size_line, 16) + 2)
        assert data.endswith(b"\r\n"), "chunk not followed by CRLF"
        return data[:-2]

    async def read_to_eof(self) -> bytes:
        """Everything until the server closes (a reset counts as a close); fails after READ_TIMEOUT."""
        parts = []
        async with asyncio.timeout(READ_TIMEOUT):
            try:
                while data := await self.reader.read(65536):
                    parts.append(data)
            except ConnectionResetError:
                pass
        return b"".join(parts)

    async def assert_closed(self) -> None:
        """The server closes the connection with nothing more sent."""
        assert await self.read_to_eof() == b""

    def close(self) -> None:
        self.writer.close()


@dataclass
class Served:
    """A running server, its app, and the clients opened to it (closed by the `serve` fixture)."""

    server: HttpServer
    app: App
    port: int  # kept: the listening socket is gone once shutdown starts
    clients: list[Client] = field(default_factory=list)

    async def connect(self, rcvbuf: int | None = None) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            client = Client(*await asyncio.open_connection(sock=sock))
        except BaseException:
            sock.close()
            raise
        self.clients.append(client)
        return client


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`await serve(**HttpConfig fields)` starts a server with a fresh App; all are closed after the test."""
    started: list[Served] = []

    async def start(*, max_body_size: int = MAX_BODY, **config: Any) -> Served:
        server = HttpServer(App(), HttpConfig(**config), max_body_size)
        await server.start("127.0.0.1", 0)
        served = Served(server, server.app, server.port)  # type: ignore[arg-type]
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.app.release.set()
            for client in served.clients:
                client.close()
            await served.server.shutdown(1.0)


def get(path: str, version: str = "1.1", headers: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: t\r\n{headers}\r\n".encode()


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def assert_json_error(reply: Reply, status: int, code: str) -> None:
    """An error the server writes itself: JSON body, error code header, and the connection closes."""
    assert reply.status == status
    assert reply.header("content-type") == "application/json"
    assert reply.header("x-smg-error-code") == code
    assert reply.json()["error"]["code"] == code
    assert reply.header("connection") == "close"


# -- 1. keep-alive ------------------------------------------------------------------------------------------------
async def test_two_requests_share_one_connection(serve: Serve) -> None:
    """HTTP/1.1 keeps the connection open between requests, without a `connection` header."""
    served = await serve()
    client = await served.connect()
    for path in ("/echo/1", "/echo/2"):
        await client.send(get(path))
        reply = await client.read_response()
        assert (reply.status, reply.body, reply.header("connection")) == (200, f"GET {path} ".encode(), None)
    assert len(served.server.connections) == 1


async def test_http10_without_keep_alive_closes(serve: Serve) -> None:
    """An HTTP/1.0 request without `Connection: keep-alive` is answered with `connection: close`, then EOF."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/echo", version="1.0"))
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"GET /echo ")
    assert reply.header("connection") == "close"
    await client.assert_closed()


async def test_http10_with_keep_alive_stays_open(serve: Serve) -> None:
    """HTTP/1.0 with `Connection: keep-alive` gets `connection: keep-alive` and a second request is answered."""
    served = await serve()
    client = await served.connect()
    for path in ("/echo/a", "/echo/b"):
        await client.send(get(path, version="1.0", headers="Connection: keep-alive\r\n"))
        reply = await client.read_response()
        assert (reply.status, reply.body) == (200, f"GET {path} ".encode())
        assert reply.header("connection") == "keep-alive"


# -- 2. pipelining ------------------------------------------------------------------------------------------------
async def test_pipelined_requests_answered_in_order(serve: Serve) -> None:
    """Ten requests in one write get ten responses in order."""
    served = await serve()
    client = await served.connect()
    await client.send(b"".join(get(f"/echo/{i}") for i in range(10)))
    for i in range(10):
        reply = await client.read_response()
        assert (reply.status, reply.body) == (200, f"GET /echo/{i} ".encode())
    assert served.app.calls == [f"/echo/{i}" for i in range(10)]


async def test_pipelining_past_the_bound_still_answers_in_order(serve: Serve) -> None:
    """With `max_pipelined_requests=2`, requests queued behind a blocked one are handled one at a time, in order,
    including those the server only reads once the queue shrinks."""
    served = await serve(max_pipelined_requests=2)
    client = await served.connect()
    await client.send(get("/block") + b"".join(get(f"/echo/{i}") for i in range(10)))
    async with asyncio.timeout(READ_TIMEOUT):
        await served.app.entered.wait()
    await client.send(b"".join(get(f"/echo/{i}") for i in range(10, 20)))
    assert served.app.calls == ["/block"]  # one handler at a time per connection
    served.app.release.set()
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"released")
    for i in range(20):
        reply = await client.read_response()
        assert (reply.status, reply.body) == (200, f"GET /echo/{i} ".encode())
    assert served.app.calls == ["/block"] + [f"/echo/{i}" for i in range(20)]


# -- 3. request bodies --------------------------------------------------------------------------------------------
async def test_chunked_request_body_is_reassembled(serve: Serve) -> None:
    """A chunked body sent in several writes reaches the handler whole."""
    served = await serve()
    client = await served.connect()
    await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in (b"5\r\nhello\r\n", b"1\r\n \r\n", b"5\r\nworld\r\n", b"0\r\n\r\n"):
        await client.send(part)
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"POST /echo hello world")
    await client.send(get("/echo/next"))  # the connection is still in step
    assert (await client.read_response()).body == b"GET /echo/next "


async def test_expect_continue_sent_when_the_handler_reads(serve: Serve) -> None:
    """`Expect: 100-continue`: the server sends `100 Continue` when the handler reads, then the final answer."""
    served = await serve()
    client = await served.connect()
    await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await client.read_head()
    assert (interim.status, interim.headers) == (100, [])
    await client.send(b"hello")
    reply = await client.read_response()
    assert (reply.status, reply.body, reply.interim) == (200, b"POST /echo hello", [])


async def test_expect_continue_not_sent_when_the_body_is_not_read(serve: Serve) -> None:
    """A handler that answers without reading: no `100 Continue`, and the connection closes after the answer
    (the unread body cannot be skipped)."""
    served = await serve()
    client = await served.connect()
    await client.send(b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    reply = await client.read_response()
    assert (reply.status, reply.body, reply.interim) == (200, b"not read", [])
    assert reply.header("connection") == "close"
    await client.assert_closed()


# -- 4. limits ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "head",
    [
        pytest.param(get("/echo", headers=f"X-Big: {'a' * 2000}\r\n"), id="whole-head"),
        pytest.param(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 2000, id="unfinished-head"),
        pytest.param(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", id="long-target"),
    ],
)
async def test_head_over_max_header_bytes_is_431(serve: Serve, head: bytes) -> None:
    """A head over `max_header_bytes` (complete or still arriving) is a 431 JSON error, then the close."""
    served = await serve(max_header_bytes=1024)
    client = await served.connect()
    await client.send(head)
    assert_json_error(await client.read_response(), 431, "request_header_fields_too_large")
    await client.assert_closed()
    assert served.app.calls == []


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every read the servers' connections get, so a test can send the next part of a message only
    once the previous part was parsed (two sends are otherwise free to arrive as one read)."""
    sizes: list[int] = []

    class CountingConnection(HttpConnection):
        def data_received(self, data: bytes) -> None:
            sizes.append(len(data))
            super().data_received(data)

    monkeypatch.setattr(server_module, "HttpConnection", CountingConnection)
    return sizes


async def test_head_under_the_limit_split_over_two_reads_is_accepted(serve: Serve, reads: list[int]) -> None:
    """A head under `max_header_bytes` is answered normally when it arrives in two reads (its bytes are counted
    once, not once per read and again per header)."""
    served = await serve(max_header_bytes=1024)
    client = await served.connect()
    head = get("/echo", headers="".join(f"X-H{i}: {'v' * 40}\r\n" for i in range(18)))
    assert 800 < len(head) < 1024
    await client.send(head[: len(head) // 2])
    await until(lambda: reads, "the server to read the first half", timeout=READ_TIMEOUT)
    await client.send(head[len(head) // 2 :])
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"GET /echo ")


async def test_small_head_after_pipelined_requests_is_accepted(serve: Serve) -> None:
    """A small head whose first part shares a read with many complete pipelined requests is not charged for
    their bytes: it is answered, not refused with 431."""
    served = await serve(max_header_bytes=1024)
    client = await served.connect()
    pipelined = b"".join(get(f"/echo/{i}") for i in range(40))
    assert len(pipelined) > 1024
    await client.send(pipelined + b"GET /echo/last HTTP/1.1\r\n")
    for i in range(40):  # answered: the server has parsed that whole read
        assert (await client.read_response()).body == f"GET /echo/{i} ".encode()
    await client.send(b"Host: t\r\n\r\n")
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"GET /echo/last ")


async def test_too_many_headers_is_431(serve: Serve) -> None:
    """One header over `max_header_count` is a 431; the request is not handed to the app."""
    served = await serve(max_header_count=10)
    client = await served.connect()
    await client.send(get("/echo", headers="".join(f"X-H{i}: v\r\n" for i in range(10))))  # Host makes 11
    assert_json_error(await client.read_response(), 431, "request_header_fields_too_large")
    await client.assert_closed()
    assert served.app.calls == []


async def test_declared_length_over_the_limit_is_413_before_the_body(serve: Serve) -> None:
    """A Content-Length over max_body_size is refused from the head alone: 413 JSON and close, no body sent."""
    served = await serve()
    client = await served.connect()
    await client.send(f"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    assert_json_error(await client.read_response(), 413, "request_body_too_large")
    await client.assert_closed()
    assert served.app.calls == []


async def test_chunked_body_growing_past_the_limit_is_413(serve: Serve) -> None:
    """A chunked body that grows past max_body_size fails the handler's read with BodyTooLarge; the app's 413
    goes out with `connection: close` and nothing after it is read."""
    served = await serve()
    client = await served.connect()
    await client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    await client.send(b"258\r\n" + b"a" * 600 + b"\r\n")
    await client.send(b"258\r\n" + b"a" * 600 + b"\r\n0\r\n\r\n" + get("/echo/after"))
    reply = await client.read_response()
    assert (reply.status, reply.json()) == (413, {"mapped": True})
    assert reply.header("connection") == "close"
    await client.assert_closed()
    assert served.app.calls == ["/echo"]


# -- 5. request smuggling -----------------------------------------------------------------------------------------
SMUGGLED = get("/smuggled")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="cl-then-te",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            id="te-then-cl",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd", id="duplicate-cl"
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", id="repeated-cl"
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4;\x01\r\nabcd\r\n0\r\n\r\n",
            id="bad-chunk-extension",
        ),
    ],
)
async def test_smuggling_shapes_are_400_and_close(serve: Serve, message: bytes) -> None:
    """An ambiguous or malformed message is a 400 JSON error and the close; a request behind it in the same
    write never reaches the app."""
    served = await serve()
    client = await served.connect()
    await client.send(message + SMUGGLED)
    assert_json_error(await client.read_response(), 400, "invalid_http_request")
    await client.assert_closed()
    assert "/smuggled" not in served.app.calls


# -- 6. timeouts --------------------------------------------------------------------------------------------------
async def test_half_a_head_times_out_with_408(serve: Serve) -> None:
    """A client that sends half a head is answered 408 after `header_timeout_secs`, then disconnected."""
    served = await serve(header_timeout_secs=0.2, keepalive_timeout_secs=30)
    client = await served.connect()
    started = time.monotonic()
    await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")
    assert_json_error(await client.read_response(), 408, "request_header_timeout")
    await client.assert_closed()
    assert time.monotonic() - started >= 0.15
    assert served.app.calls == []


async def test_idle_connection_closed_after_keepalive_timeout(serve: Serve) -> None:
    """After its response, a connection idle for `keepalive_timeout_secs` is closed without a word."""
    served = await serve(keepalive_timeout_secs=0.2, header_timeout_secs=30)
    client = await served.connect()
    await client.send(get("/echo"))
    assert (await client.read_response()).status == 200
    started = time.monotonic()
    await client.assert_closed()
    assert time.monotonic() - started >= 0.15
    await until(lambda: not served.server.connections, "the server to forget the connection", timeout=READ_TIMEOUT)


async def test_silent_connection_closed_after_keepalive_timeout(serve: Serve) -> None:
    """A connection that never sends a byte is closed after `keepalive_timeout_secs` too."""
    served = await serve(keepalive_timeout_secs=0.2, header_timeout_secs=30)
    client = await served.connect()
    await client.assert_closed()


# -- 7. responses -------------------------------------------------------------------------------------------------
async def test_head_gets_length_without_body(serve: Serve) -> None:
    """HEAD: the head says the Content-Length the body would have, no body follows, the next request parses."""
    served = await serve()
    client = await served.connect()
    await client.send(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n" + get("/echo/next"))
    reply = await client.read_response("HEAD")
    assert (reply.status, reply.header("content-length"), reply.body) == (200, str(len(b"HEAD /echo ")), b"")
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"GET /echo/next ")


async def test_204_has_no_length_and_no_body(serve: Serve) -> None:
    """A 204 goes out without framing headers or body (even if the handler gave one); the next request parses."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/empty") + get("/echo/next"))
    reply = await client.read_response()
    assert reply.status == 204
    assert reply.header("content-length") is None and reply.header("transfer-encoding") is None
    reply = await client.read_response()
    assert (reply.status, reply.body) == (200, b"GET /echo/next ")


async def test_stream_is_chunked_for_http11(serve: Serve) -> None:
    """A StreamResponse is chunked, one chunk per write, ends with `0\\r\\n\\r\\n`, and keeps the connection."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/stream") + get("/echo/next"))
    reply = await client.read_response()
    assert (reply.status, reply.framing) == (200, "chunked")
    assert reply.header("content-type") == "text/plain"
    assert reply.chunks == [b"one ", b"two ", b"three ", b"end"]
    assert reply.header("connection") is None
    assert (await client.read_response()).body == b"GET /echo/next "


async def test_stream_is_close_delimited_for_http10(serve: Serve) -> None:
    """For an HTTP/1.0 client a StreamResponse has no chunk framing: the body ends when the connection does."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/stream", version="1.0", headers="Connection: keep-alive\r\n"))
    reply = await client.read_response()
    assert (reply.status, reply.framing, reply.body) == (200, "close", b"one two three end")
    assert reply.header("connection") == "close"


async def test_handler_raising_before_any_byte_is_500(serve: Serve) -> None:
    """A handler that raises before answering becomes a 500 JSON error; the connection goes on."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/boom") + get("/echo/next"))
    reply = await client.read_response()
    assert reply.status == 500
    assert reply.json()["error"]["code"] == "internal_error"
    assert reply.header("content-type") == "application/json"
    assert (await client.read_response()).body == b"GET /echo/next "


async def test_handler_raising_mid_stream_ends_the_stream_and_closes(serve: Serve) -> None:
    """A handler that raises after its stream started: the chunked body is terminated properly (the data sent
    so far, then `0\\r\\n\\r\\n`) and the connection closes; a pipelined request behind it is not handled."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/boom-stream") + get("/echo/next"))
    reply = await client.read_response()
    assert (reply.status, reply.framing, reply.chunks) == (200, "chunked", [b"partial"])
    await client.assert_closed()
    assert served.app.calls == ["/boom-stream"]


# -- 8. client disconnect -----------------------------------------------------------------------------------------
async def test_client_disconnect_cancels_the_handler(serve: Serve) -> None:
    """The client leaving while its handler waits cancels the handler, and the server forgets the connection."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/block"))
    async with asyncio.timeout(READ_TIMEOUT):
        await served.app.entered.wait()
    client.close()
    async with asyncio.timeout(READ_TIMEOUT):
        await served.app.cancelled.wait()
    await until(lambda: not served.server.connections, "the server to forget the connection", timeout=READ_TIMEOUT)


# -- 9. backpressure ----------------------------------------------------------------------------------------------
async def test_stream_write_blocks_until_the_client_reads(serve: Serve) -> None:
    """A client that does not read stops a streaming handler inside `write` far short of its total; once the
    client reads, the handler resumes and every byte arrives."""
    served = await serve()
    app = served.app
    client = await served.connect(rcvbuf=64 * 1024)
    await client.send(get("/big"))
    await until(lambda: app.big_in_write, "the handler to wait inside write", timeout=READ_TIMEOUT, interval=0.005)
    stalled_at = app.big_writes
    assert stalled_at < BIG_WRITES // 4, f"{stalled_at} of {BIG_WRITES} writes went through without a reader"
    for _ in range(20):
        await asyncio.sleep(0.005)  # not a synchronization: give the handler every chance to advance
    assert (app.big_writes, app.big_in_write) == (stalled_at, True)
    reply = await client.read_response()
    assert (reply.status, len(reply.body)) == (200, BIG_CHUNK * BIG_WRITES)
    assert app.big_writes == BIG_WRITES


# -- 10. graceful shutdown ----------------------------------------------------------------------------------------
async def test_shutdown_closes_idle_connections_and_finishes_in_flight_ones(serve: Serve) -> None:
    """`shutdown`: idle connections close at once, new ones are refused, the in-flight handler's response goes
    out with `connection: close`, and only then does shutdown return."""
    served = await serve()
    server, app = served.server, served.app
    idle = await served.connect()
    await idle.send(get("/echo"))
    assert (await idle.read_response()).status == 200
    busy = await served.connect()
    await busy.send(get("/block"))
    async with asyncio.timeout(READ_TIMEOUT):
        await app.entered.wait()

    shutdown = asyncio.create_task(server.shutdown(30.0))
    try:
        await idle.assert_closed()
        with pytest.raises(OSError):
            await served.connect()
        assert not shutdown.done()
        app.release.set()
        reply = await busy.read_response()
        assert (reply.status, reply.body, reply.header("connection")) == (200, b"released", "close")
        await busy.assert_closed()
        async with asyncio.timeout(READ_TIMEOUT):
            await shutdown
    finally:
        if not shutdown.done():
            shutdown.cancel()
    assert not server.connections and not app.cancelled.is_set()


async def test_shutdown_cuts_a_handler_that_never_finishes(serve: Serve) -> None:
    """A handler still running at the end of the grace period: shutdown returns then, the connection is cut
    without a response, and the handler is cancelled."""
    served = await serve()
    client = await served.connect()
    await client.send(get("/block"))
    async with asyncio.timeout(READ_TIMEOUT):
        await served.app.entered.wait()
    started = time.monotonic()
    async with asyncio.timeout(READ_TIMEOUT):
        await served.server.shutdown(0.3)
    assert time.monotonic() - started >= 0.25
    await client.assert_closed()
    assert served.app.cancelled.is_set()
    assert not served.server.connections
