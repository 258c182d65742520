"""A lean HTTP/1.1 client for the gateway's hot path: `asyncio.Protocol` + httptools, one keep-alive pool per worker.

Why not aiohttp here: every proxied request paid for its request/response objects, multidicts, stream readers
and timeout machinery (~150 µs CPU); this client writes one pre-assembled byte string and parses the answer with
llhttp straight into a list of header tuples and a deque of body pieces.

Shape: `UpstreamPool` owns the idle connections of each `Origin` (a LIFO deque; the newest connection is the
least likely to have been closed by the worker). A `_Connection` is the protocol of one TCP (or TLS) connection
and carries the state of the one request in flight on it; `UpstreamResponse` is the caller's view of that state
until `release()` (back to the pool when the response ended cleanly) or `abort()` (closed).

Rules that keep the pool honest:
* a connection is pooled only at a message boundary (the response completely received, keep-alive, nothing
  pending), and never after an error, a timeout, a cancellation or unsolicited bytes;
* an idle connection is reused only while younger than `idle_timeout` (default 4 s, below uvicorn's 5 s idle
  close), so reuse does not race the worker's own close; older ones are closed by a sweep;
* a reused connection that dies before any response byte (the worker closed it as we wrote) is retried once
  on a fresh connection; nothing else is retried here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections import deque
from urllib.parse import unquote, urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

__all__ = [
    "Origin",
    "UpstreamClosed",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

# Buffered-but-unread body bytes above which the socket stops being read, and below which reading resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Request bodies up to this size are joined with the head into one bytes object; larger ones go to
# `writelines` (one writev on uvloop) to spare the copy.
_JOIN_LIMIT = 64 * 1024


class UpstreamError(Exception):
    """Base of every error of this client; `str()` is a short message naming the origin, never its credentials."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, DNS failure, TLS handshake or certificate failure)."""


class UpstreamTimeout(UpstreamError):
    """A deadline passed; `phase` is "connect", "first_byte" (no response head in time) or "idle" (body stalled)."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(message)
        self.phase = phase


class UpstreamClosed(UpstreamError):
    """The worker closed or reset the connection before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The worker's response is not valid HTTP/1.1 (as judged by llhttp in strict mode)."""


class _StaleConnection(UpstreamClosed):
    """A reused idle connection was dead before any response byte arrived: safe to retry on a fresh one."""


class _Unsolicited(Exception):
    """Raised inside the parser callback when a worker sends a second message nobody asked for."""


class Origin:
    """One worker endpoint, made (and cached) by `UpstreamPool.origin`; holds its idle connections.

    The request-line tail, `Host` and (from URL userinfo) `Authorization: Basic` lines are built once here.
    A path in the base URL (`http://h:8000/prefix`) is prepended to every request target, as `base_url + path`
    would be.
    """

    __slots__ = (
        "_discarded",
        "_idle",
        "_line_end",
        "_line_start",
        "host",
        "host_header",
        "name",
        "path",
        "port",
        "scheme",
        "tls",
    )

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError("upstream URL scheme must be http or https")
        if not parts.hostname:
            raise ValueError("upstream URL has no host")
        if parts.query or parts.fragment:
            raise ValueError("upstream base URL must not have a query or fragment")
        self.scheme = scheme
        self.tls = scheme == "https"
        self.host = parts.hostname
        default_port = 443 if self.tls else 80
        self.port = parts.port or default_port  # raises ValueError for a bad port
        ascii_host = self.host if self.host.isascii() else self.host.encode("idna").decode("ascii")
        shown_host = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
        authority = shown_host if self.port == default_port else f"{shown_host}:{self.port}"
        self.name = f"{scheme}://{shown_host}:{self.port}"  # for messages: never the userinfo
        self.host_header = b"Host: " + authority.encode("ascii") + b"\r\n"
        self.path = parts.path.rstrip("/").encode("ascii")
        auth = b""
        if parts.username is not None or parts.password is not None:
            userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            try:
                raw = userinfo.encode("latin-1")  # what aiohttp's BasicAuth sent
            except UnicodeEncodeError:
                raw = userinfo.encode("utf-8")
            auth = b"Authorization: Basic " + base64.b64encode(raw) + b"\r\n"
        self._line_start = b" " + self.path
        self._line_end = b" HTTP/1.1\r\n" + self.host_header + auth
        self._idle: deque[_Connection] = deque()
        self._discarded = False  # the pool forgot it (its worker left): connections are closed, not pooled

    def __repr__(self) -> str:
        return f"Origin({self.name})"


class _Connection(asyncio.Protocol):
    """One connection to an origin, and the parse state of the (single) request in flight on it."""

    __slots__ = (
        "_active",
        "_buffered",
        "_chunks",
        "_closed",
        "_complete",
        "_deadline",
        "_error",
        "_fb_timer",
        "_fb_when",
        "_framed",
        "_got_bytes",
        "_headers",
        "_headers_done",
        "_idle_since",
        "_in_pool",
        "_interim",
        "_keep_alive",
        "_loop",
        "_origin",
        "_parser",
        "_pool",
        "_read_paused",
        "_reused",
        "_skip_body",
        "_status",
        "_until_eof",
        "_waiter",
        "_write_paused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._origin = origin
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = HttpResponseParser(self)
        self._closed = False
        self._reused = False  # has completed a response before: a failure with no byte read may be staleness
        self._in_pool = False
        self._idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None  # the one thing the request's task is waiting on
        self._write_paused = False
        self._read_paused = False
        self._chunks: deque[bytes] = deque()
        self._deadline = 0.0  # the in-flight request's first-byte deadline (loop time)
        self._fb_timer: asyncio.TimerHandle | None = None
        self._fb_when = 0.0
        self._reset(False)

    def _reset(self, skip_body: bool) -> None:
        self._active = False  # a request is in flight and its response not yet complete
        self._got_bytes = False
        self._headers_done = False
        self._complete = False
        self._error: UpstreamError | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep_alive = False
        self._framed = False  # Content-Length or chunked seen: the body does not end at EOF
        self._interim = False
        self._until_eof = False
        self._skip_body = skip_body
        self._buffered = 0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._active:  # bytes while idle or after the response ended: the stream is out of step
            self._shut(abort=True)
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._protocol_error("the worker switched protocols")
        except HttpParserError as exc:  # also a second, unsolicited message (see `on_message_begin`)
            self._protocol_error(str(exc) or type(exc).__name__)

    def eof_received(self) -> bool | None:
        return None  # close; `connection_lost` decides what EOF means for the response

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_first_byte()
        self._pool._forget(self)
        if not self._active:
            return
        if self._headers_done and self._until_eof and exc is None:
            self._active = False  # a close-delimited body ends at a clean EOF
            self._complete = True
            self._keep_alive = False
            self._wake()
        else:
            self._fail(self._closed_error())

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if not self._active:
            raise _Unsolicited

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        n = len(name)
        if n == 14:
            if name.lower() == b"content-length":
                self._framed = True
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._framed = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx interim response (100 Continue, 103 Early Hints): no body, skip it
            self._interim = True
            self._headers = []
            self._framed = False
            return
        self._status = status
        self._headers_done = True
        if self._skip_body:  # HEAD: llhttp cannot be told, so the parser is out of step: never pool
            self._keep_alive = False
            self._active = False
            self._complete = True
        else:
            self._keep_alive = self._parser.should_keep_alive()
            self._until_eof = not self._framed and status != 204 and status != 304
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not self._active:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._active:
            self._active = False
            self._complete = True
            self._wake()

    # --- internals ---

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _closed_error(self) -> UpstreamClosed:
        if self._got_bytes:
            return UpstreamClosed(f"{self._origin.name} closed the connection mid-response")
        if self._reused:  # no byte of an answer: the worker closed it while idle, as we wrote
            return _StaleConnection(f"{self._origin.name} closed the reused connection")
        return UpstreamClosed(f"{self._origin.name} closed the connection without a response")

    def _fail(self, error: UpstreamError) -> None:
        """End the in-flight response with `error` (no-op once it ended); the waiting task raises it."""
        if self._active:
            self._active = False
            self._error = error
            self._wake()

    def _protocol_error(self, detail: str) -> None:
        self._fail(UpstreamProtocolError(f"invalid HTTP response from {self._origin.name}: {detail}"))
        self._shut(abort=True)

    def _shut(self, abort: bool) -> None:
        """Close the transport: `abort` drops it at once, otherwise buffered writes (and TLS close_notify) go out."""
        self._closed = True
        self._cancel_first_byte()
        t = self.transport
        if t is not None:
            if abort:
                t.abort()
            elif not t.is_closing():
                t.close()

    def _resume_reading(self) -> None:
        self._read_paused = False
        if not self._closed:
            self.transport.resume_reading()

    def _arm_first_byte(self, timeout: float) -> None:
        """Make sure the first-byte timer fires by this request's deadline. The timer is not cancelled when a head
        arrives: a timer that fires early re-arms for the current deadline, so a keep-alive connection arms about
        once per timeout rather than once per request (each arm and cancel costs a visible microsecond)."""
        loop = self._loop
        deadline = self._deadline = loop.time() + timeout
        if self._fb_timer is None or self._fb_when > deadline:
            if self._fb_timer is not None:
                self._fb_timer.cancel()
            self._fb_when = deadline
            self._fb_timer = loop.call_at(deadline, self._first_byte_expired)

    def _first_byte_expired(self) -> None:
        self._fb_timer = None
        if not self._active or self._headers_done or self._closed:
            return
        if self._loop.time() >= self._deadline:
            self._fail(UpstreamTimeout("first_byte", f"no response from {self._origin.name} in time"))
            self._shut(abort=True)
        else:
            self._fb_when = self._deadline
            self._fb_timer = self._loop.call_at(self._deadline, self._first_byte_expired)

    def _cancel_first_byte(self) -> None:
        if self._fb_timer is not None:
            self._fb_timer.cancel()
            self._fb_timer = None

    def _idle_expired(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done() and self._active:
            self._fail(UpstreamTimeout("idle", f"{self._origin.name} stalled mid-response"))
            self._shut(abort=True)

    async def _send(self, data: bytes, body: bytes | None, skip_body: bool, timeout: float | None) -> None:
        """Write the request and wait for the final response head; raises (and closes) on any failure."""
        self._reset(skip_body)
        self._active = True
        loop = self._loop
        if timeout is not None:
            self._arm_first_byte(timeout)
        else:
            self._deadline = float("inf")
        try:
            t = self.transport
            if self._closed or t.is_closing():
                self._fail(self._closed_error())
            else:
                try:
                    if body is None:
                        t.write(data)
                    else:
                        t.writelines((data, body))
                except (OSError, RuntimeError):  # uvloop raises on a transport closed under us
                    self._fail(self._closed_error())
            # Waits for the head; a paused write (large body) also parks here until `resume_writing`.
            while self._active and not self._headers_done:
                w = self._waiter = loop.create_future()
                await w
        except BaseException:  # cancelled: the request's fate is unknown, so the connection cannot be reused
            self._fail(UpstreamClosed("request cancelled"))
            self._shut(abort=True)
            raise
        finally:
            self._waiter = None
        if self._error is not None:
            self._shut(abort=True)
            raise self._error


class UpstreamResponse:
    """A worker's response: status and headers are read; the body is read with `read()` or `async for`.

    The connection goes back to the pool by `release()` (or automatically once the body has been read to its end
    by `read()` or iteration), or is closed by `abort()`. As an `async with` block: release on normal exit,
    abort on an exception. A cancelled body read aborts too: the stream position is then unknown.
    """

    __slots__ = ("_conn", "_state", "headers", "idle_timeout", "keep_alive", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self._state = 0  # 0 open, 1 released, 2 aborted
        self.status: int = conn._status
        self.headers: list[tuple[bytes, bytes]] = conn._headers  # as received: names in their original case
        self.keep_alive: bool = conn._keep_alive
        self.idle_timeout: float | None = None  # bound on each wait for the next body piece

    def get_header(self, name: bytes) -> bytes | None:
        """The first header named `name` (case-insensitive, `name` given in lower case), or None."""
        for key, value in self.headers:
            if len(key) == len(name) and key.lower() == name:
                return value
        return None

    @property
    def buffered_bytes(self) -> int:
        """Body bytes received and not yet handed to the caller (bounded by backpressure)."""
        conn = self._conn
        return 0 if conn is None else conn._buffered

    def _after_end(self) -> None:
        if self._state == 2:
            raise UpstreamClosed("the response was aborted")

    async def _wait(self, conn: _Connection) -> None:
        loop = conn._loop
        w = conn._waiter = loop.create_future()
        timeout = self.idle_timeout
        handle = None if timeout is None else loop.call_later(timeout, conn._idle_expired, w)
        try:
            await w
        finally:
            conn._waiter = None
            if handle is not None:
                handle.cancel()

    async def read(self) -> bytes:
        """The rest of the body (de-chunked); the connection is released once it has been read."""
        conn = self._conn
        if conn is None:
            self._after_end()
            return b""
        chunks = conn._chunks
        if conn._complete:  # the common case: the whole answer came with the head
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.release()
            return body
        parts: list[bytes] = []
        try:
            while True:
                if chunks:
                    parts.extend(chunks)
                    chunks.clear()
                    conn._buffered = 0
                    if conn._read_paused:
                        conn._resume_reading()
                if conn._complete:
                    break
                if conn._error is not None:
                    raise conn._error
                await self._wait(conn)
        except BaseException:
            self.abort()
            raise
        self.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """The next body piece as it arrived (de-chunked); waits at most `idle_timeout` for one."""
        conn = self._conn
        if conn is None:
            self._after_end()
            raise StopAsyncIteration
        if not await self._until_data(conn):
            raise StopAsyncIteration
        piece = conn._chunks.popleft()
        conn._buffered -= len(piece)
        if conn._read_paused and conn._buffered <= LOW_WATER:
            conn._resume_reading()
        return piece

    async def next_data(self) -> bytes:
        """Everything of the body that has arrived and was not handed out yet, as one piece (so a relay makes one
        client write per upstream read, however many chunks it held); waits at most `idle_timeout` for some.
        b"" once the body has ended. The connection is released as soon as the last bytes are handed out, so
        `finished` tells a caller that this piece was the last one."""
        conn = self._conn
        if conn is None:
            self._after_end()
            return b""
        if not await self._until_data(conn):
            return b""
        chunks = conn._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        conn._buffered = 0
        if conn._complete:
            self.release()
        elif conn._read_paused:
            conn._resume_reading()
        return data

    async def _until_data(self, conn: _Connection) -> bool:
        """Wait until body bytes are buffered (True), or the body ended with none left (False; the connection is
        released). A failure or a cancellation aborts the connection: its position in the stream is unknown."""
        while not conn._chunks:
            if conn._complete:
                self.release()
                return False
            if conn._error is not None:
                error = conn._error
                self.abort()
                raise error
            try:
                await self._wait(conn)
            except BaseException:
                self.abort()
                raise
        return True

    @property
    def finished(self) -> bool:
        """The whole body was received and handed out (the connection went back to the pool)."""
        return self._state == 1

    def release(self) -> None:
        """Done with the response: pool the connection if the response was completely received (keep-alive),
        close it otherwise (e.g. the body was not read to its end). Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._state = 1
            conn._pool._release(conn)

    def abort(self) -> None:
        """Close the connection now (e.g. the client went away mid-stream); it is never pooled. Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._state = 2
            conn._fail(UpstreamClosed("the response was aborted"))
            conn._shut(abort=True)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()


class UpstreamPool:
    """Keep-alive connections to workers, for one event loop (create and use it inside the running loop).

    `ssl_context` verifies `https://` workers (None: the system default context); `connect_timeout` bounds the TCP
    connect plus TLS handshake; `idle_timeout` is how long a pooled connection may sit unused before it is closed
    rather than reused; `max_idle_per_origin` caps the idle connections kept per origin (the oldest go first).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
        max_idle_per_origin: int = 256,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._sweep_interval = max(idle_timeout / 4, 0.01)
        self._ssl_context = ssl_context
        self._max_idle = max_idle_per_origin
        self._origins: dict[str, Origin] = {}
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._drained: asyncio.Future[None] | None = None

    def origin(self, base_url: str) -> Origin:
        """The `Origin` of a worker base URL (`http://127.0.0.1:8000`, `https://user:pw@h`), cached by URL."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
        return origin

    def discard(self, base_url: str) -> None:
        """Forget a worker that left: its idle connections close now, its busy ones when their response ends."""
        origin = self._origins.pop(base_url, None)
        if origin is None:
            return
        origin._discarded = True
        while origin._idle:
            conn = origin._idle.pop()
            conn._in_pool = False
            conn._shut(abort=False)

    def idle_count(self, origin: Origin) -> int:
        """Idle pooled connections to `origin`."""
        return len(origin._idle)

    @property
    def open_count(self) -> int:
        """Open connections, idle and in use."""
        return len(self._conns)

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: bytes,
        body: bytes,
        *,
        first_byte_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head is parsed (1xx responses are skipped).

        `headers` is the caller's header block, each line ending in CRLF, without Host or Content-Length (and
        without Authorization when the origin URL carries userinfo); method, target and headers are written as
        given, so they must not come unchecked from a client. `first_byte_timeout` bounds the time from sending
        to the response head. Raises `UpstreamError` subclasses; on any failure the connection is closed.
        """
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        joined = len(body) <= _JOIN_LIMIT  # a small body goes out in the head's write, a large one after it
        data = b"%s%s%s%s%sContent-Length: %d\r\n\r\n%s" % (
            method,
            origin._line_start,
            target,
            origin._line_end,
            headers,
            len(body),
            body if joined else b"",
        )
        tail = None if joined else body
        skip_body = method == b"HEAD"
        conn = self._take_idle(origin, loop)
        if conn is not None:
            try:
                await conn._send(data, tail, skip_body, first_byte_timeout)
                return UpstreamResponse(conn)
            except _StaleConnection:
                pass  # the worker had closed it: once more on a fresh connection
        conn = await self._connect(origin, loop)
        try:
            await conn._send(data, tail, skip_body, first_byte_timeout)
        except _StaleConnection as exc:  # cannot happen on a fresh connection; keep the public type anyway
            raise UpstreamClosed(str(exc)) from None
        return UpstreamResponse(conn)

    def _take_idle(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = origin._idle
        if not idle:
            return None
        oldest_ok = loop.time() - self._idle_timeout
        while idle:
            conn = idle.pop()
            conn._in_pool = False
            if conn._closed:  # being closed (its connection_lost has not run yet)
                continue
            if conn._idle_since > oldest_ok:
                return conn
            # Too old, and so is everything before it: close rather than race the worker's own idle close.
            conn._shut(abort=False)
            while idle:
                old = idle.pop()
                old._in_pool = False
                old._shut(abort=False)
        return None

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = _Connection(self, origin, loop)
        context = None
        if origin.tls:
            context = self._ssl_context
            if context is None:
                context = self._ssl_context = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connect", f"timed out connecting to {origin.name}") from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError, certificate errors)
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to {origin.name}: {reason}") from exc
        if self._closed:
            conn._shut(abort=True)
            raise UpstreamError("the upstream pool is closed")
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        origin = conn._origin
        if not (conn._complete and conn._keep_alive) or conn._closed or self._closed or origin._discarded:
            conn._shut(abort=not conn._complete)
            return
        if conn._chunks:
            conn._chunks.clear()
        if conn._read_paused:
            conn._resume_reading()
        conn._reused = True
        conn._in_pool = True
        conn._idle_since = conn._loop.time()
        idle = origin._idle
        if len(idle) >= self._max_idle:
            old = idle.popleft()
            old._in_pool = False
            old._shut(abort=False)
        idle.append(conn)
        if self._sweep_handle is None:
            self._sweep_handle = conn._loop.call_later(self._sweep_interval, self._sweep)

    def _sweep(self) -> None:
        """Close pooled connections idle for longer than `idle_timeout`; runs only while some are pooled."""
        self._sweep_handle = None
        loop = self._loop
        oldest_ok = loop.time() - self._idle_timeout
        remaining = False
        for origin in self._origins.values():
            idle = origin._idle
            while idle and idle[0]._idle_since <= oldest_ok:
                conn = idle.popleft()
                conn._in_pool = False
                conn._shut(abort=False)
            remaining = remaining or bool(idle)
        if remaining and not self._closed:
            self._sweep_handle = loop.call_later(self._sweep_interval, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """`connection_lost`: drop a connection from the open set and, if it was idle, from its pool."""
        self._conns.discard(conn)
        if conn._in_pool:
            conn._in_pool = False
            with contextlib.suppress(ValueError):
                conn._origin._idle.remove(conn)
        if self._drained is not None and not self._conns and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Close every connection, idle and in use (responses in progress fail with `UpstreamClosed`)."""
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for origin in self._origins.values():
            for conn in origin._idle:
                conn._in_pool = False
            origin._idle.clear()
        if not self._conns:
            return
        self._drained = asyncio.get_running_loop().create_future()
        for conn in list(self._conns):
            conn._fail(UpstreamClosed("the upstream pool was closed"))
            conn._shut(abort=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # connection_lost callbacks run on the next loop iterations
                await self._drained
