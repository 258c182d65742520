"""Serve a gateway pipeline (`shepherd.http.server.App`) in process, on our own HTTP server, for a test.

`serving(app)` starts `HttpServer` on a loopback port the OS picks and yields an `AppClient`: the few methods of
aiohttp's TestClient the tests use (`get`, `post`, `patch`, `delete`, `request` with a path), backed by a real
`aiohttp.ClientSession`, so a test talks to the server over a socket exactly as a client would.
(tests/support/local_server.py is the other way round: a plain aiohttp app standing in for a worker or an IdP.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from shepherd.config import GatewayConfig, HttpConfig
from shepherd.http.app import build_app
from shepherd.http.server import App, HttpServer

if TYPE_CHECKING:
    from aiohttp.client import _RequestContextManager

    from shepherd.gateway import Gateway

DEFAULT_MAX_BODY_SIZE: int = next(f.default for f in dataclasses.fields(GatewayConfig) if f.name == "max_payload_size")
SHUTDOWN_GRACE_SECS = 5.0  # a bound only: the client closes its connections first, which ends their handlers


class AppClient:
    """Requests to one served app by path: `await client.get("/x")` or `async with client.get("/x") as resp`."""

    def __init__(self, session: aiohttp.ClientSession, url: str, server: HttpServer) -> None:
        self.session = session
        self.url = url  # http://127.0.0.1:<port>, no trailing slash
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    def make_url(self, path: str | URL) -> URL:
        """A str path is quoted the way aiohttp quotes any URL (as TestClient does: `%3A` goes out as `:`); a
        `URL(path, encoded=True)` goes out byte for byte."""
        assert str(path).startswith("/"), path
        if isinstance(path, URL):
            return URL(self.url + str(path), encoded=True)
        return URL(self.url + path)

    def request(self, method: str, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.session.request(method, self.make_url(path), **kwargs)

    def get(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("GET", path, **kwargs)

    def head(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("HEAD", path, **kwargs)

    def post(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("POST", path, **kwargs)

    def put(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str | URL, **kwargs: Any) -> _RequestContextManager:
        return self.request("DELETE", path, **kwargs)


@contextlib.asynccontextmanager
async def serving(
    app: App,
    config: HttpConfig | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    on_rejected: Callable[[int], None] | None = None,
) -> AsyncIterator[AppClient]:
    """Serve `app` on 127.0.0.1 for the duration of the block. On exit the client's connections close first, then
    the server shuts down (idle connections at once, a busy one after its response)."""
    server = HttpServer(app, config if config is not None else HttpConfig(), max_body_size, on_rejected)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield AppClient(session, f"http://127.0.0.1:{server.port}", server)
    finally:
        await server.shutdown(SHUTDOWN_GRACE_SECS)


def serving_gateway(gateway: Gateway) -> contextlib.AbstractAsyncContextManager[AppClient]:
    """The gateway's whole main-port app (every route behind the pipeline), with its HTTP limits and metrics."""
    config = gateway.config
    return serving(build_app(gateway), config.http, config.max_payload_size, gateway.metrics.record_rejected)
