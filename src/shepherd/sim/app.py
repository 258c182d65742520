"""The aiohttp application of one simulated worker: routes plus the request-recording,
auth and error-mapping middleware."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from shepherd.sim.control import ControlApi, Fleet
from shepherd.sim.openai_api import OpenAiApi
from shepherd.sim.sglang_api import SglangApi
from shepherd.sim.wire import SERVER_CUT, RequestError, error_response
from shepherd.sim.worker import SimWorker

# Routes that need the API key when one is configured; health, info, load and metrics stay
# open (a gateway probes them), as do the test-control routes.
PROTECTED_PATHS = frozenset(
    {"/generate", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/flush_cache"}
)
_UNRECORDED_PATHS = frozenset({"/__ctl", "/__log"})


def build_app(worker: SimWorker, fleet: Fleet) -> web.Application:
    app = web.Application(middlewares=[_middleware(worker)], client_max_size=64 * 1024 * 1024)
    app.add_routes(SglangApi(worker).routes())
    app.add_routes(OpenAiApi(worker).routes())
    app.add_routes(ControlApi(worker, fleet).routes())
    return app


def _middleware(worker: SimWorker) -> Middleware:
    expected_auth = f"Bearer {worker.config.api_key}" if worker.config.api_key else None
    log = worker.log

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in _UNRECORDED_PATHS:
            return await _map_errors(request, handler)
        entry = log.record(request.method, path, request.headers, await request.read())
        if expected_auth and path in PROTECTED_PATHS and request.headers.get("Authorization") != expected_auth:
            entry.status = 401
            return error_response("Unauthorized", 401, "authentication_error")
        try:
            response = await _map_errors(request, handler)
        except web.HTTPException as exc:
            entry.status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            # Connections the sim drops itself (cut streams, refuse) are not client disconnects.
            if not request.get(SERVER_CUT) and not worker.faults.refuse:
                log.mark_disconnected(entry)
            raise
        entry.status = response.status
        return response

    return middleware


async def _map_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(exc.message, exc.status, exc.error_type)
