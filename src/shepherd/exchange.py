"""The request/response model every layer shares: what a handler (or a router) sees and returns.

Shaped like the aiohttp objects the handlers were first written against (so a handler reads naturally). The server
(http/server.py) is behind the `Connection` protocol, so routing depends on this module and not on the HTTP layer.
Headers stay raw bytes until a handler asks for the multidict, and a relayed worker response carries its header
block pre-serialized.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy


class Connection(Protocol):
    """What a request and a streamed response need from the connection they arrived on (http/server.py)."""

    peer: str | None
    closed: bool

    def send_continue(self) -> None: ...

    def want_body(self) -> None: ...

    def start_stream(self, request: Request, response: StreamResponse) -> None: ...

    async def write_stream(self, data: bytes) -> None: ...

    def end_stream(self, request: Request, data: bytes = b"") -> None: ...


REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# Set by the routers once a streamed response has started: after that, an error cannot become a new response.
STREAM_STARTED = "stream_started"


class BodyTooLarge(Exception):
    """The request body grew past --max-payload-size while it was read (a chunked body; a declared length is
    refused before any of it is read)."""


class Route:
    """A matched route: its template (`/workers/{worker_id}`), the label metrics and the audit log use, and its
    access class once looked up (http/route_policy.py)."""

    __slots__ = ("access", "handler", "method", "template")

    def __init__(self, method: str, template: str, handler: Any) -> None:
        self.method = method
        self.template = template
        self.handler = handler
        self.access: Any = None


UNMATCHED = Route("", "", None)


class Request:
    """One request on a connection. The body arrives in the background; `read()` waits for all of it."""

    __slots__ = (
        "_body",
        "_body_size",
        "_conn",
        "_error",
        "_headers",
        "_query",
        "_state",
        "_waiter",
        "body_complete",
        "body_read",
        "expect_continue",
        "extra_headers",
        "head",
        "keep_alive",
        "match_info",
        "method",
        "path",
        "query_string",
        "raw_headers",
        "request_id",
        "route",
        "version",
    )

    def __init__(self, conn: Connection, method: str, target: bytes, raw_headers: list[tuple[bytes, bytes]]):
        self._conn = conn
        self.method = method
        path, _, query = target.partition(b"?")
        self.path = path.decode("latin-1")
        self.query_string = query.decode("latin-1")
        self.raw_headers = raw_headers  # (lower-case name, value) pairs, as received
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.head = method == "HEAD"
        self.route: Route = UNMATCHED
        self.request_id = ""  # set by the pipeline
        self.match_info: dict[str, str] = {}
        self.extra_headers = b""  # appended to every response head of this request (CORS)
        self._headers: CIMultiDictProxy[str] | None = None
        self._query: MultiDictProxy[str] | None = None
        self._state: dict[Any, Any] | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self.body_complete = False
        self.body_read = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    # --- headers ---------------------------------------------------------------------------------------------
    def header(self, name: bytes) -> str | None:
        """The first value of a header, by lower-case name, without building the multidict (the hot path's way)."""
        for key, value in self.raw_headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers)
            )
        return self._headers

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))
        return self._query

    @property
    def remote(self) -> str | None:
        return self._conn.peer

    # --- body ------------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._body.append(data)
        self._body_size += len(data)

    @property
    def buffered(self) -> int:
        return self._body_size

    def finish(self) -> None:
        self.body_complete = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The body will not arrive whole (too large, client gone): `read()` raises `exc`."""
        self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def read(self) -> bytes:
        """The whole body. Sends `100 Continue` first when the client waits for it (admission has passed by now)."""
        self.body_read = True
        if self._error is not None:
            raise self._error
        if not self.body_complete:
            if self.expect_continue:
                self.expect_continue = False
                self._conn.send_continue()
            self._conn.want_body()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        body = self._body
        if len(body) == 1:
            return body[0]
        joined = b"".join(body)
        self._body = [joined]
        return joined

    async def json(self) -> Any:
        return orjson.loads(await self.read())

    # --- request-scoped values (aiohttp's request[key]) ------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if self._state is None:
            raise KeyError(key)
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._state is None:
            self._state = {}
        self._state[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return default if self._state is None else self._state.get(key, default)


class Response:
    """A complete response. `raw_headers` is a pre-serialized header block (`Name: value\\r\\n` lines): how a
    relayed worker response keeps its headers without a dict per request."""

    __slots__ = ("body", "headers", "raw_headers", "status")

    prepared = False

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes | None = None,
        text: str | None = None,
        headers: dict[str, str] | CIMultiDict[str] | None = None,
        content_type: str | None = None,
        raw_headers: bytes = b"",
    ) -> None:
        self.status = status
        if text is not None:
            body = text.encode()
            content_type = content_type or "text/plain"
            if "charset" not in content_type:
                content_type += "; charset=utf-8"
        self.body = body or b""
        self.headers: dict[str, str] = {k.lower(): v for k, v in headers.items()} if headers else {}
        if content_type is not None:
            self.headers["content-type"] = content_type
        self.raw_headers = raw_headers

    @property
    def text(self) -> str:
        return self.body.decode()


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


class StreamResponse:
    """A response written as it is produced (SSE). `prepare` sends the head; `write` waits while the client's
    socket is full, which is what stops the relay reading the worker (backpressure)."""

    __slots__ = ("_conn", "_request", "headers", "prepared", "raw_headers", "status")

    def __init__(self, *, status: int = 200, headers: dict[str, str] | None = None, raw_headers: bytes = b"") -> None:
        self.status = status
        self.headers: dict[str, str] = {k.lower(): v for k, v in headers.items()} if headers else {}
        self.raw_headers = raw_headers
        self.prepared = False
        self._conn: Connection | None = None
        self._request: Request | None = None

    async def prepare(self, request: Request) -> StreamResponse:
        if not self.prepared:
            self.prepared = True
            self._request = request
            self._conn = request._conn
            self._conn.start_stream(request, self)
        return self

    async def write(self, data: bytes) -> None:
        assert self._conn is not None, "prepare() first"
        await self._conn.write_stream(data)

    async def write_eof(self, data: bytes = b"") -> None:
        """End the response, `data` being its last bytes (sent with the end, in one write)."""
        assert self._conn is not None and self._request is not None, "prepare() first"
        self._conn.end_stream(self._request, data)
