"""The HTTP/1.1 server of the main port: one `asyncio.Protocol` per connection, llhttp (httptools) parsing.

One connection is one small state machine:

    idle --(first byte)--> head --(headers complete)--> queued --(its turn)--> handled --(response written)--> idle

Requests are handled one at a time per connection, in arrival order (pipelined ones wait in a bounded queue;
past the bound the socket is not read). A handler is started as soon as its head is parsed, so admission decides
before the body is read; the body keeps arriving in the background, and reading the socket pauses while an unread
body exceeds a small buffer. The parser stays strict (no llhttp leniency): a malformed or ambiguous message (both
Content-Length and Transfer-Encoding, duplicate lengths, bad chunk sizes) is a 400 and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from shepherd.config import HttpConfig
from shepherd.errors import error_body
from shepherd.exchange import REASONS, BodyTooLarge, Request, Response, StreamResponse

log = logging.getLogger(__name__)

App = Callable[[Request], Awaitable[Response | StreamResponse]]

_BODY_BUFFER = 256 * 1024  # unread body bytes buffered per connection before the socket is paused
_NO_BODY_STATUSES = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _HttpError(Exception):
    """A request the connection cannot go on after: answered with `status`, then the connection closes."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HttpServer:
    """Listens, owns the open connections, and shuts down gracefully."""

    def __init__(
        self,
        app: App,
        config: HttpConfig,
        max_body_size: int,
        on_rejected: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.on_rejected = on_rejected  # told the status of every request refused before the app saw it
        self.config = config
        self.max_body_size = max_body_size
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=4096, reuse_address=True, ssl=ssl_context
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def forget(self, connection: HttpConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._idle.set()

    async def shutdown(self, grace_secs: float) -> None:
        """Stop accepting; idle connections close now, busy ones after their current response; after `grace_secs`
        whatever is left is cut."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.close_when_idle()
        if self.connections:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_secs)
            except TimeoutError:
                log.warning("shutdown grace period over: cutting %d connection(s)", len(self.connections))
                for connection in list(self.connections):
                    connection.abort()
        await self._server.wait_closed()
        self._server = None


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_closing",
        "_drain",
        "_fatal",
        "_head_bytes",
        "_head_reads",
        "_head_timer",
        "_headers",
        "_idle_since",
        "_idle_timer",
        "_last_message",
        "_loop",
        "_messages_done",
        "_parser",
        "_parsing",
        "_queue",
        "_read_paused",
        "_server",
        "_stream_chunked",
        "_stream_head",
        "_stream_open",
        "_task",
        "_transport",
        "_url",
        "_write_paused",
        "closed",
        "peer",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.closed = False
        self._parsing: Request | None = None  # the request whose message is being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_reads = 0
        self._messages_done = 0
        self._queue: deque[Request] = deque()  # parsed heads waiting for their turn
        self._active: Request | None = None  # the request being answered
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_message = False  # a message without keep-alive was parsed: nothing after it is read
        self._fatal: _HttpError | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._stream_open = False
        self._stream_chunked = False
        self._stream_head = b""  # a streamed response's head, until its first data goes out
        # Two timers, neither re-armed per request: the idle timer stays armed for the connection's life and, when
        # it fires, closes the connection only if it has been idle long enough (else it re-arms for the rest); the
        # head timer exists only while a head is unfinished after a read.
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._head_timer: asyncio.TimerHandle | None = None

    # --- transport events --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self._server.connections.add(self)
        self._idle_since = self._loop.time()
        self._idle_timer = self._loop.call_later(self._server.config.keepalive_timeout_secs, self._on_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timers()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))
        for request in (self._parsing, self._active):
            if request is not None:
                request.fail(ConnectionResetError("client disconnected"))
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: the handler's cleanup (leases, upstream connection) runs now
        self._server.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._fatal is not None or self._last_message:
            return  # bytes after a message that ends the connection are never parsed (nor answered)
        done_before = self._messages_done
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HttpError):
                self._fail(cause)
            else:
                log.exception("HTTP parser callback failed", exc_info=cause)
                self._fail(_HttpError(500, "internal_error", "Internal gateway error"))
            return
        except httptools.HttpParserUpgrade:
            # No protocol upgrades: the request is answered in HTTP/1.1, then the connection closes.
            self._closing = True
            if self._parsing is not None and self._parsing is not _HEAD_IN_PROGRESS:
                self._parsing.finish()
        except httptools.HttpParserError as exc:
            if self._last_message:  # "data after Connection: close": the finished request is answered, no more
                self._update_reading()
                return
            self._fail(_HttpError(400, "invalid_http_request", f"Malformed HTTP request: {exc}"))
            return
        if self._parsing is _HEAD_IN_PROGRESS:
            # llhttp buffers an unfinished header line without calling back, so the reads bound the head too: a
            # read in which no earlier message ended holds nothing but (part of) this head, and counts whole.
            if self._messages_done == done_before:
                self._head_reads += len(data)
            if self._head_reads > self._server.config.max_header_bytes:
                self._fail(_too_large_head())
            elif self._head_timer is None:
                self._head_timer = self._loop.call_later(
                    self._server.config.header_timeout_secs, self._on_header_timeout
                )
        self._update_reading()

    # --- parser callbacks --------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0  # exact: the target and the complete headers so far
        self._head_reads = 0
        self._parsing = _HEAD_IN_PROGRESS

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._server.config.max_header_bytes:
            raise _too_large_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name.lower(), value))
        config = self._server.config
        if len(headers) > config.max_header_count:
            raise _HttpError(431, "request_header_fields_too_large", "Too many request headers")
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > config.max_header_bytes:
            raise _too_large_head()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self._parser
        request = Request(self, parser.get_method().decode("latin-1"), self._url, self._headers)
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == "100-continue":
            request.expect_continue = True
        length = request.header(b"content-length")
        if length is not None and int(length) > self._server.max_body_size:
            raise _HttpError(413, "request_body_too_large", _BODY_TOO_LARGE)
        self._parsing = request
        self._queue.append(request)
        if self._active is None:
            self._next()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None and request is not _HEAD_IN_PROGRESS
        request.feed(body)
        if request.buffered > self._server.max_body_size:
            raise _HttpError(413, "request_body_too_large", _BODY_TOO_LARGE)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        self._messages_done += 1
        if request is not None and request is not _HEAD_IN_PROGRESS:
            request.finish()
            if not request.keep_alive:
                self._last_message = True

    # --- handling ----------------------------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the next queued request, or arm the keep-alive timer when there is none."""
        if self._queue:
            request = self._queue.popleft()
            self._active = request
            self._task = self._loop.create_task(self._handle(request))
        elif self._fatal is not None and self._fatal is not _STOP_READING:
            self._write_fatal()
        elif self._closing:
            self._close()
        elif self._parsing is None:
            self._idle_since = self._loop.time()
        self._update_reading()

    async def _handle(self, request: Request) -> None:
        try:
            response = await self._server.app(request)
        except asyncio.CancelledError:
            return  # the client left (connection_lost): nothing to answer
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            if self._stream_open:
                self._closing = True
                self.end_stream(request)
            else:
                body = error_body(500, "internal_error", "Internal error")
                headers = {"content-type": "application/json", "x-smg-error-code": "internal_error"}
                self._write(request, Response(status=500, body=body, headers=headers))
        else:
            if isinstance(response, StreamResponse) and response.prepared:
                if self._stream_open:
                    self.end_stream(request)
            else:
                self._write(request, response)  # type: ignore[arg-type]
        if self.closed:
            return
        if not request.keep_alive or not request.body_complete:
            self._closing = True  # an unread body cannot be skipped safely
        self._active = None
        self._task = None
        if self._closing:
            self._queue.clear()
            self._close()
        else:
            self._next()

    def _head(self, request: Request, status: int, headers: dict[str, str], raw: bytes, framing: bytes) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown")), raw]
        for name, value in headers.items():
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(request.extra_headers)
        parts.append(framing)
        if not request.keep_alive or self._closing:
            parts.append(b"connection: close\r\n\r\n")
        elif request.version == "1.0":
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _write(self, request: Request, response: Response) -> None:
        status = response.status
        body = response.body
        if status in _NO_BODY_STATUSES or status < 200:
            framing, body = b"", b""
        else:
            framing = b"content-length: %d\r\n" % len(body)
        if not request.body_complete:
            self._closing = True
        head = self._head(request, status, response.headers, response.raw_headers, framing)
        if self._transport is not None and not self.closed:
            self._transport.write(head if request.head or not body else head + body)

    # --- streamed responses (StreamResponse) -------------------------------------------------------------------
    def start_stream(self, request: Request, response: StreamResponse) -> None:
        """Begin a streamed response. Its head is held back and goes out with the first data (or the end), so a
        stream costs as few writes as the worker's reads allow."""
        if self.closed:
            raise ConnectionResetError("client disconnected")
        chunked = request.version != "1.0" and not request.head
        if not chunked:
            self._closing = True  # an HTTP/1.0 stream is delimited by closing the connection
        self._stream_open = True
        self._stream_chunked = chunked
        framing = b"transfer-encoding: chunked\r\n" if chunked else b""
        self._stream_head = self._head(request, response.status, response.headers, response.raw_headers, framing)

    async def write_stream(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("client disconnected")
        if not data or not self._stream_open:
            return
        self._send_stream(data, end=False)
        if self._write_paused:
            self._drain = self._loop.create_future()
            await self._drain

    def end_stream(self, request: Request, data: bytes = b"") -> None:
        """The last data (if any) and the end of the response, in one write."""
        if not self._stream_open:
            return
        self._stream_open = False
        if not self.closed:
            self._send_stream(data, end=True)

    def _send_stream(self, data: bytes, end: bool) -> None:
        parts = []
        if self._stream_head:
            parts.append(self._stream_head)
            self._stream_head = b""
        active = self._active
        if data and not (active is not None and active.head):
            if self._stream_chunked:
                parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts.append(data)
        if end and self._stream_chunked:
            parts.append(b"0\r\n\r\n")
        if parts and self._transport is not None:
            self._transport.writelines(parts)

    # --- body flow ---------------------------------------------------------------------------------------------
    def send_continue(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(_CONTINUE)

    def want_body(self) -> None:
        self._update_reading()

    def _update_reading(self) -> None:
        if self.closed or self._transport is None:
            return
        parsing = self._parsing
        pause = (
            self._fatal is not None
            or len(self._queue) >= self._server.config.max_pipelined_requests
            or (  # a body nobody reads yet (admission, or its turn, still pending) is not buffered without bound
                parsing is not None
                and parsing is not _HEAD_IN_PROGRESS
                and not parsing.body_read
                and parsing.buffered > _BODY_BUFFER
            )
        )
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    # --- errors, timers, closing ------------------------------------------------------------------------------
    def _fail(self, error: _HttpError) -> None:
        """A message the connection cannot continue after: answer it once the earlier requests are answered."""
        parsing = self._parsing
        self._parsing = None
        if parsing is not None and parsing is not _HEAD_IN_PROGRESS:
            if parsing is self._active and error.status == 413:  # its handler answers, then the connection closes
                parsing.fail(BodyTooLarge())
                self._closing = True
                self._fatal = _STOP_READING
                self._update_reading()
                return
            if parsing is self._active:  # its handler waits for a body that cannot come: answer the error now
                if self._task is not None:
                    self._task.cancel()
                self._active = self._task = None
            elif parsing in self._queue:
                self._queue.remove(parsing)
        self._fatal = error
        if self._active is None:
            self._queue.clear()  # only heads after the broken one could be here; none was started
            self._write_fatal()
        self._update_reading()

    def _write_fatal(self) -> None:
        error = self._fatal
        assert error is not None
        if self._server.on_rejected is not None:
            self._server.on_rejected(error.status)
        if self._transport is not None and not self.closed:
            body = error_body(error.status, error.code, str(error))
            self._transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nx-smg-error-code: %s\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (error.status, REASONS.get(error.status, b"Error"), error.code.encode(), len(body), body)
            )
        self._close()

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._head_timer = None

    def _on_header_timeout(self) -> None:
        self._head_timer = None
        if self._parsing is _HEAD_IN_PROGRESS:
            self._fail(_HttpError(408, "request_header_timeout", "The request head did not arrive in time"))

    def _on_idle_timeout(self) -> None:
        timeout = self._server.config.keepalive_timeout_secs
        if self._active is None and not self._queue and self._parsing is None:
            idle = self._loop.time() - self._idle_since
            if idle >= timeout:
                self._idle_timer = None
                self._close()
                return
            timeout -= idle
        self._idle_timer = self._loop.call_later(timeout, self._on_idle_timeout)

    def close_when_idle(self) -> None:
        """Graceful shutdown: close now when nothing is being answered, else after the current response."""
        self._closing = True
        if self._active is None and not self._queue:
            self._close()

    def _close(self) -> None:
        self._cancel_timers()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


_HEAD_IN_PROGRESS: Request = object.__new__(Request)  # `_parsing` while a head is parsed, before its Request exists
_STOP_READING = _HttpError(413, "request_body_too_large", "")  # `_fatal` when the handler answers the error itself
_BODY_TOO_LARGE = "Request body exceeded the payload limit (max_payload_size)"


def _too_large_head() -> _HttpError:
    return _HttpError(431, "request_header_fields_too_large", "Request head exceeded the header size limit")
