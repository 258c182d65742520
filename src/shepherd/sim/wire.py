"""HTTP plumbing shared by the simulator's routes: JSON bodies, errors, SSE streams and
deliberate connection cuts."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import orjson
from aiohttp import web

from shepherd.sim.faults import FaultState

JSON = "application/json"
SERVER_CUT = "sim_server_cut"  # request key: the sim itself dropped this connection


class RequestError(Exception):
    """Turned into an OpenAI-style JSON error response by the app middleware."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON)


def error_body(message: str, status: int, error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "code": status}}


def error_response(message: str, status: int, error_type: str = "invalid_request_error") -> web.Response:
    return json_response(error_body(message, status, error_type), status)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 :class:`RequestError`."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"Malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("Request body must be a JSON object")
    return body


async def cut_connection(request: web.Request) -> NoReturn:
    """Close the client's TCP connection without (finishing) a response.

    Buffered bytes are flushed first (``close``, not ``abort``), so a stream cut after N frames
    really delivers N frames.  The handler is then cancelled by aiohttp, like on a client
    disconnect; ``SERVER_CUT`` lets the middleware tell the two apart.
    """
    request[SERVER_CUT] = True
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection already closed")
    transport.close()
    await asyncio.get_running_loop().create_future()  # cancelled once the connection is lost
    raise AssertionError("unreachable")


async def apply_inference_faults(request: web.Request, faults: FaultState, stream: bool) -> web.Response | None:
    """Delay, hang, fail or cut an inference request as the worker's faults dictate.

    Returns an error response to send instead of processing, or ``None`` to proceed.
    """
    if not faults.affects_inference:
        return None
    status = await faults.before_inference()
    if status is not None:
        body = faults.error_body
        if body is None:
            body = error_body("Injected fault", status, "server_error")
        return json_response(body, status)
    if faults.disconnect_after_chunks is not None and not stream:
        await cut_connection(request)
    return None


class SseStream:
    """A ``text/event-stream`` response of ``data:`` frames ending with ``data: [DONE]``.

    ``cut_after`` (fault injection) drops the connection instead of sending frame N+1.
    """

    def __init__(self, request: web.Request, cut_after: int | None = None) -> None:
        self._request = request
        self._cut_after = cut_after
        self._response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.frames = 0

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def open(self) -> None:
        await self._response.prepare(self._request)

    async def send(self, payload: Any) -> None:
        await self._write(b"data: " + orjson.dumps(payload) + b"\n\n")

    async def close(self) -> None:
        await self._write(b"data: [DONE]\n\n")
        await self._response.write_eof()

    async def _write(self, frame: bytes) -> None:
        if self._cut_after is not None and self.frames >= self._cut_after:
            await cut_connection(self._request)
        await self._response.write(frame)
        self.frames += 1
