"""Data-plane routes: parse once, admit, hand to the router."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from shepherd.http.errors import GatewayError
from shepherd.http.middleware import REQUEST_ID
from shepherd.routing.context import INFERENCE_ENDPOINTS, Endpoint, InvalidRequest, RequestContext

if TYPE_CHECKING:
    from shepherd.gateway import Gateway


def add_inference_routes(app: web.Application, gateway: Gateway) -> None:
    for endpoint in INFERENCE_ENDPOINTS:
        app.router.add_post(endpoint.path, _handler(gateway, endpoint))


def _handler(gateway: Gateway, endpoint: Endpoint):
    admission = gateway.admission

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            ctx = RequestContext(endpoint, body, request[REQUEST_ID])
        except InvalidRequest as exc:
            raise GatewayError(400, exc.code, str(exc), param=exc.param) from None
        if not admission.try_enter():  # the fast path takes a free permit without a coroutine
            await admission.wait_for_permit()
        try:
            return await gateway.router_for(endpoint).dispatch(request, ctx)
        finally:
            admission.leave()

    return handle
