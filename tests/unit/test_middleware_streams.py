"""An unexpected error after a stream has started ends that stream; it never becomes a second response."""

from __future__ import annotations

from shepherd.config import GatewayConfig
from shepherd.exchange import Request, StreamResponse
from shepherd.http.middleware import STREAM_STARTED, make_pipeline
from shepherd.http.routes import RouteTable
from tests.support.app_server import serving


async def broken_stream(request: Request) -> StreamResponse:
    out = StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    request[STREAM_STARTED] = out
    await out.write(b'data: {"t": 1}\n\n')
    raise RuntimeError("bug after the first byte")


async def test_error_after_the_first_byte_ends_the_stream_cleanly():
    routes = RouteTable()
    routes.add_post("/generate", broken_stream)
    async with serving(make_pipeline(GatewayConfig(), routes)) as client:
        resp = await client.post("/generate", json={"text": "x"})
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        # aiohttp raises on a chunked body cut short, so this also checks the terminating chunk was sent
        assert await resp.read() == b'data: {"t": 1}\n\n'  # the chunked body ends properly, no 500 glued on
        # the next request (on the kept-alive connection) finds nothing of a second response ahead of its own
        again = await client.post("/generate", json={"text": "x"})
        assert again.status == 200 and await again.read() == b'data: {"t": 1}\n\n'
