"""An unexpected error after a stream has started ends that stream; it never becomes a second response."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shepherd.config import GatewayConfig
from shepherd.http.middleware import STREAM_STARTED, make_middleware


async def broken_stream(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    request[STREAM_STARTED] = out
    await out.write(b'data: {"t": 1}\n\n')
    raise RuntimeError("bug after the first byte")


async def test_error_after_the_first_byte_ends_the_stream_cleanly():
    app = web.Application(middlewares=[make_middleware(GatewayConfig())])
    app.router.add_post("/generate", broken_stream)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/generate", json={"text": "x"})
        assert resp.status == 200
        assert await resp.read() == b'data: {"t": 1}\n\n'  # the chunked body ends properly, no 500 glued on
