"""A hand-written HTTP/1.1 stand-in worker for the upstream faults a real worker cannot produce on demand.

`RawWorker` serves on a loopback port from its own event loop in a background thread. It answers the gateway's
registration and health probes (`/health`, `/get_server_info`, `/get_model_info`, `/v1/models`, ...) like an SGLang
worker serving `raw-model`, and answers inference POSTs (`/generate`, `/v1/chat/completions`, `/v1/completions`) the
way its `behavior` says; a test switches the behavior while the worker runs. Every connection and request is
recorded (which connection a request came on, bytes written, who closed the connection first), so tests can assert
on the gateway's upstream side: pooling, expiry, closing a stalled worker.

Behaviors:
    ok              200, JSON with Content-Length, or (`"stream": true`) a chunked SSE stream ending `data: [DONE]`
    early_hints     `103 Early Hints` first, then as `ok`
    close_delimited as `ok`, but neither Content-Length nor chunked: the body ends when the worker closes
    odd_chunks      as `ok`, chunked (also the JSON answer), written in small pieces that split chunk-size lines
                    and CRLFs across TCP writes; hex sizes in upper case, a chunk extension on the first chunk
    no_content      204 and no body
    hop_headers     as `ok`, plus hop-by-hop headers a proxy must not relay and one end-to-end `X-Worker-Thing: 1`
    never           reads the request and never answers (until the gateway closes or the test resets)
    stall_stream    SSE head and one frame, then nothing more (until the gateway closes or the test resets)
    flood           an SSE stream of 16 KiB frames written as fast as the gateway takes them, up to `flood_cap` bytes

`drop_reused_once`: the next inference request that arrives on a connection which already served a request is read
and the connection closed without a byte of answer, once (a pooled keep-alive connection that died under the
gateway). `idle_close_secs`: a connection waiting that long for its next request is closed (uvicorn's keep-alive
timeout). `pause_accepting()`: stop accepting, so with a listen backlog of 1 new connects hang once two are queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self

MODEL = "raw-model"
INFERENCE_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
BEHAVIORS = frozenset(
    {
        "ok",
        "early_hints",
        "close_delimited",
        "odd_chunks",
        "no_content",
        "hop_headers",
        "never",
        "stall_stream",
        "flood",
    }
)
STREAM_FRAMES = 5  # token frames of an `ok` stream, [DONE] excluded
FLOOD_FRAME_BYTES = 16 * 1024
ANSWER_TEXT = "raw worker answer"

_REASONS = {100: "Continue", 103: "Early Hints", 200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found"}


@dataclass
class RawRequest:
    """One request as the worker read it; header names lower-cased (the last of repeated ones wins)."""

    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    connection: int  # id of the RawConnection it arrived on

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def stream(self) -> bool:
        try:
            payload = self.json()
        except ValueError:
            return False
        return isinstance(payload, dict) and payload.get("stream") is True


@dataclass
class RawConnection:
    """One accepted TCP connection and what happened on it."""

    id: int
    opened_at: float
    requests: list[RawRequest] = field(default_factory=list)
    bytes_sent: int = 0
    closed_at: float | None = None
    closed_by: str | None = None  # "peer": the gateway closed (EOF or reset) first; "worker": this side did

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def inference(self) -> bool:
        return any(r.method == "POST" and r.path in INFERENCE_PATHS for r in self.requests)


class _PeerClosed(Exception):
    """The gateway closed the connection (EOF or reset) while the worker read or wrote."""


class RawWorker:
    """`with RawWorker() as worker:` serving on `worker.url` (http://127.0.0.1:<port>) until the block ends."""

    def __init__(self, behavior: str = "ok", idle_close_secs: float | None = None, backlog: int = 128) -> None:
        self.behavior = behavior
        self.idle_close_secs = idle_close_secs
        self.drop_reused_once = False
        self.dropped = 0  # connections closed by `drop_reused_once`
        self.flood_cap = 256 * 1024 * 1024
        self._backlog = backlog
        self._lock = threading.Lock()
        self._connections: list[RawConnection] = []
        self._ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self._release: asyncio.Event | None = None  # set by reset(): held requests give up
        self.port = 0

    # -- life cycle ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(self._backlog)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(started.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"raw-worker-{self.port}", daemon=True)
        self._thread.start()
        started.wait(5)
        self._call(self._setup)
        return self

    async def _setup(self) -> None:
        self._release = asyncio.Event()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown, timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = None
        if self._listener is not None:
            self._listener.close()

    async def _shutdown(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, make: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run the coroutine `make()` on the worker's loop and wait for its result."""
        assert self._loop is not None, "worker not started"
        future: Future = asyncio.run_coroutine_threadsafe(make(), self._loop)
        return future.result(timeout)

    # -- test controls ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to `ok`: held requests are let go (their connections closed), flags cleared, records kept."""
        self.behavior = "ok"
        self.drop_reused_once = False
        self._call(self._reset)

    async def _reset(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()
        if self._accept_task is None or self._accept_task.done():
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    def clear(self) -> None:
        """Forget closed connections and every request so far; open connections stay listed, their records emptied."""
        with self._lock:
            self._connections = [c for c in self._connections if c.open]
            for conn in self._connections:
                conn.requests = []
                conn.bytes_sent = 0

    def pause_accepting(self) -> None:
        self._call(self._pause)

    async def _pause(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None

    def resume_accepting(self) -> None:
        self._call(self._reset_accept)

    async def _reset_accept(self) -> None:
        if self._accept_task is None:
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    # -- records ------------------------------------------------------------------------------------------------
    def connections(self) -> list[RawConnection]:
        with self._lock:
            return list(self._connections)

    def inference_connections(self) -> list[RawConnection]:
        return [c for c in self.connections() if c.inference]

    def inference_requests(self) -> list[RawRequest]:
        return [r for c in self.connections() for r in c.requests if r.method == "POST" and r.path in INFERENCE_PATHS]

    def open_connections(self) -> list[RawConnection]:
        return [c for c in self.connections() if c.open]

    def connection_of(self, request_id: str) -> RawConnection | None:
        """The connection the request with this `x-request-id` arrived on."""
        for conn in self.connections():
            if any(r.request_id == request_id for r in conn.requests):
                return conn
        return None

    # -- serving ------------------------------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            with self._lock:
                self._ids += 1
                conn = RawConnection(id=self._ids, opened_at=time.monotonic())
                self._connections.append(conn)
            task = loop.create_task(self._serve(sock, conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, sock: socket.socket, conn: RawConnection) -> None:
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        closed_by = "worker"
        try:
            while True:
                request = await self._read_request(reader, conn)
                if request is None:
                    closed_by = "peer" if reader.at_eof() else "worker"
                    return
                conn.requests.append(request)
                if not await self._answer(request, conn, reader, writer):
                    return
        except (_PeerClosed, ConnectionError, asyncio.IncompleteReadError):
            closed_by = "peer"
        except asyncio.CancelledError:
            pass
        finally:
            conn.closed_at = time.monotonic()
            conn.closed_by = closed_by
            if closed_by == "peer":
                writer.transport.abort()
            else:  # a FIN after everything written (a close-delimited body ends here)
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read_request(self, reader: asyncio.StreamReader, conn: RawConnection) -> RawRequest | None:
        """The next request, or None when the gateway closed or the connection idled past `idle_close_secs`."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close_secs)
        except TimeoutError:
            return None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return RawRequest(method, path, version, headers, body, conn.id)

    async def _answer(
        self, request: RawRequest, conn: RawConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Write the answer; False when the connection must close afterwards."""
        keep_alive = request.headers.get("connection", "").lower() != "close" and request.version == "HTTP/1.1"
        if request.method != "POST" or request.path not in INFERENCE_PATHS:
            await self._write(conn, writer, _probe_answer(request))
            return keep_alive
        if self.drop_reused_once and len(conn.requests) > 1:
            self.drop_reused_once = False
            self.dropped += 1
            return False
        behavior = self.behavior
        stream = request.stream
        if behavior == "early_hints":
            await self._write(conn, writer, _head(103, [("Link", "</hint.css>; rel=preload")]))
        if behavior == "no_content":
            await self._write(conn, writer, _head(204, [("X-Worker-Thing", "1")]))
            return keep_alive
        if behavior in ("never", "stall_stream"):
            if behavior == "stall_stream":
                await self._write(conn, writer, _head(200, _SSE_HEADERS) + _chunk(stream_frames(request)[0]))
            await self._hold(reader)
            return False
        if behavior == "flood":
            await self._flood(request, conn, writer)
            return keep_alive
        if stream:
            content_type, parts = "text/event-stream", stream_frames(request)
        else:
            content_type, parts = "application/json", [answer_body(request)]
        extra = _HOP_HEADERS if behavior == "hop_headers" else []
        if behavior == "close_delimited":
            await self._write(conn, writer, _head(200, [("Content-Type", content_type), ("Connection", "close")]))
            for part in parts:
                await self._write(conn, writer, part)
            return False
        if behavior == "odd_chunks":
            data = _head(200, [("Content-Type", content_type), ("Transfer-Encoding", "chunked")])
            data += b"".join(_chunk(part, upper=True, extension=i == 0) for i, part in enumerate(parts)) + b"0\r\n\r\n"
            sizes = (1, 2, 3, 5, 7, 11, 13)
            offset = step = 0
            while offset < len(data):
                piece = data[offset : offset + sizes[step % len(sizes)]]
                offset, step = offset + len(piece), step + 1
                await self._write(conn, writer, piece)
                await asyncio.sleep(0.001)  # separate TCP segments (asyncio sets TCP_NODELAY)
            return keep_alive
        if stream:
            data = _head(200, [("Content-Type", content_type), ("Transfer-Encoding", "chunked"), *extra])
            await self._write(conn, writer, data + b"".join(_chunk(p) for p in parts) + b"0\r\n\r\n")
        else:
            headers = [("Content-Type", content_type), ("Content-Length", str(len(parts[0]))), *extra]
            await self._write(conn, writer, _head(200, headers) + parts[0])
        return keep_alive

    async def _write(self, conn: RawConnection, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.is_closing():
            raise _PeerClosed
        writer.write(data)
        conn.bytes_sent += len(data)
        await writer.drain()

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Wait until the gateway closes the connection (raises _PeerClosed) or the test resets the worker."""
        assert self._release is not None
        release = asyncio.ensure_future(self._release.wait())
        eof = asyncio.ensure_future(reader.read())  # anything more the gateway sends is ignored, until its EOF
        try:
            await asyncio.wait({release, eof}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
            eof.cancel()
        if eof.done() and not eof.cancelled():
            raise _PeerClosed

    async def _flood(self, request: RawRequest, conn: RawConnection, writer: asyncio.StreamWriter) -> None:
        content = "x" * (FLOOD_FRAME_BYTES - 100)
        event = json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}).encode()
        frame = _chunk(b"data: " + event + b"\n\n")
        await self._write(conn, writer, _head(200, _SSE_HEADERS))
        while conn.bytes_sent < self.flood_cap:
            await self._write(conn, writer, frame)
        await self._write(conn, writer, _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


# -- wire helpers -----------------------------------------------------------------------------------------------
_SSE_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")]
_HOP_HEADERS = [
    ("Connection", "keep-alive, X-Secret-Hop"),
    ("Keep-Alive", "timeout=5"),
    ("X-Secret-Hop", "1"),
    ("Proxy-Authenticate", 'Basic realm="worker"'),
    ("Upgrade", "h2c"),
    ("X-Worker-Thing", "1"),
]
HOP_BY_HOP_NAMES = ("connection", "keep-alive", "x-secret-hop", "proxy-authenticate", "upgrade")


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes, upper: bool = False, extension: bool = False) -> bytes:
    size = f"{len(data):X}" if upper else f"{len(data):x}"
    return (size + (";raw=1" if extension else "")).encode() + b"\r\n" + data + b"\r\n"


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _json_response(status: int, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return _head(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]) + body


def _probe_answer(request: RawRequest) -> bytes:
    """Registration, health and info probes, answered like an SGLang worker serving MODEL."""
    path = request.path.split("?", 1)[0]
    if path in ("/health", "/health_generate"):
        return _head(200, [("Content-Length", "0")])
    if path in ("/get_server_info", "/server_info"):
        return _json_response(200, {"served_model_name": MODEL, "model_path": MODEL, "dp_size": 1})
    if path in ("/get_model_info", "/model_info"):
        return _json_response(200, {"model_path": MODEL, "tokenizer_path": MODEL, "is_generation": True})
    if path == "/v1/models":
        return _json_response(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "raw"}]})
    if path == "/get_load":
        return _json_response(200, {"load": 0})
    return _json_response(404, {"error": {"message": f"no route {path}", "code": "not_found"}})


def answer_body(request: RawRequest) -> bytes:
    """The non-streamed JSON answer for an inference route."""
    usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    if request.path == "/generate":
        meta = {"id": request.request_id, "prompt_tokens": 1, "completion_tokens": 3, "finish_reason": {"type": "stop"}}
        return json.dumps({"text": ANSWER_TEXT, "meta_info": meta}).encode()
    if request.path == "/v1/completions":
        choice = {"index": 0, "text": ANSWER_TEXT, "finish_reason": "stop"}
        return json.dumps(
            {"id": "cmpl-raw", "object": "text_completion", "model": MODEL, "choices": [choice], "usage": usage}
        ).encode()
    message = {"role": "assistant", "content": ANSWER_TEXT}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return json.dumps(
        {"id": "chatcmpl-raw", "object": "chat.completion", "model": MODEL, "choices": [choice], "usage": usage}
    ).encode()


def stream_frames(request: RawRequest) -> list[bytes]:
    """The SSE events (each `data: ...\\n\\n`) of a streamed answer, `data: [DONE]` last."""
    frames = []
    for i in range(STREAM_FRAMES):
        if request.path == "/generate":
            event: dict[str, Any] = {
                "text": f"tok{i} ",
                "meta_info": {"id": request.request_id, "completion_tokens": i + 1},
            }
        elif request.path == "/v1/completions":
            event = {"id": "cmpl-raw", "object": "text_completion", "choices": [{"index": 0, "text": f"tok{i} "}]}
        else:
            delta = {"content": f"tok{i} "}
            event = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        frames.append(b"data: " + json.dumps(event).encode() + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return frames
