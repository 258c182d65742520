"""Data-plane routes: admit, read the body, parse once, hand to the router."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response, StreamResponse
from shepherd.http.routes import RouteTable
from shepherd.routing.context import INFERENCE_ENDPOINTS, Endpoint, InvalidRequest, RequestContext

if TYPE_CHECKING:
    from shepherd.gateway import Gateway


def add_inference_routes(routes: RouteTable, gateway: Gateway) -> None:
    for endpoint in INFERENCE_ENDPOINTS:
        routes.add_post(endpoint.path, _handler(gateway, endpoint))


def _handler(gateway: Gateway, endpoint: Endpoint):
    admission = gateway.admission

    async def handle(request: Request) -> Response | StreamResponse:
        # Admission first: a queued request's body stays in the kernel (the server pauses reading it), so a flood
        # of large bodies cannot fill memory.
        if not admission.try_enter():  # the fast path takes a free permit without a coroutine
            await admission.wait_for_permit()
        try:
            body = await request.read()
            try:
                ctx = RequestContext(endpoint, body, request.request_id)
            except InvalidRequest as exc:
                raise GatewayError(400, exc.code, str(exc), param=exc.param) from None
            return await gateway.router_for(endpoint).dispatch(request, ctx)
        finally:
            admission.leave()

    return handle
