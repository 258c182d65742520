"""The pipeline every request passes: request id, CORS, routing, access control, audit, error envelope."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError, error_response
from shepherd.exchange import STREAM_STARTED, BodyTooLarge, Request, Response, StreamResponse
from shepherd.http.route_policy import RouteClass, route_class
from shepherd.http.routes import RouteTable
from shepherd.http.server import App
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.context import INFERENCE_ENDPOINTS
from shepherd.security.access import AccessControl
from shepherd.security.audit import audit

log = logging.getLogger(__name__)

_ID_PREFIX = {endpoint.path: endpoint.id_prefix for endpoint in INFERENCE_ENDPOINTS}
_CORS_PREFLIGHT = {
    "access-control-allow-methods": "GET,POST,PUT,PATCH,DELETE,OPTIONS",
    "access-control-allow-headers": "content-type,authorization,traceparent,tracestate,x-request-id",
    "access-control-max-age": "3600",
    "vary": "origin",
}
_CORS_EXPOSE = "x-request-id,x-smg-routed-worker-id,traceparent,tracestate"


def new_request_id(path: str) -> str:
    """A route prefix plus 24 random hex characters (a subset of SMG's base62 alphabet, far cheaper to make).

    Request ids need uniqueness, not secrecy, so the process PRNG does (no getrandom syscall per request).
    """
    return f"{_ID_PREFIX.get(path, 'req-')}{random.getrandbits(96):024x}"


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value


def make_pipeline(config: GatewayConfig, routes: RouteTable, metrics: GatewayMetrics | None = None) -> App:
    """The function the server calls for every request: request id, CORS, route, access control, the handler,
    the error envelope, metrics, audit. One function instead of a chain keeps the per-request cost to one frame."""
    id_headers = tuple(name.lower().encode("latin-1") for name in config.request_id_headers)
    id_names = frozenset(id_headers)
    log_requests = log.isEnabledFor(logging.DEBUG)  # decided once: the check is not free per request
    access = AccessControl.for_config(config)  # None: no credential and no audit, nothing to check per request
    audit_enabled = config.auth.audit_enabled
    origins = frozenset(config.cors_allowed_origins)
    any_origin = "*" in origins
    resolve = routes.resolve

    def request_id_of(request: Request) -> str:
        for name, _ in request.raw_headers:  # one pass for the common case: the client sent none
            if name in id_names:
                break
        else:
            return new_request_id(request.path)
        for name in id_headers:
            value = request.header(name)
            if value is not None:
                return value if _valid_id(value) else new_request_id(request.path)
        return new_request_id(request.path)

    async def handle(request: Request) -> Response | StreamResponse:
        started = time.perf_counter()
        request_id = request.request_id = request_id_of(request)
        control: RouteClass | None = None  # set on control-plane routes, for the audit line
        if origins:
            origin = request.header(b"origin")
            if origin is not None and (any_origin or origin in origins):
                request.extra_headers = (
                    f"access-control-allow-origin: {origin}\r\naccess-control-expose-headers: {_CORS_EXPOSE}\r\n"
                ).encode("latin-1")
        try:
            if origins and request.method == "OPTIONS":
                response: Response | StreamResponse = Response(status=200, headers=_CORS_PREFLIGHT)
            else:
                route = resolve(request)
                request.route = route
                access_class = route_class(route)
                if request.header(b"sec-fetch-site") == "cross-site":
                    _refuse_cross_site_writes(request, access_class, origins)
                if access is not None:
                    if access_class is RouteClass.DATA_PLANE:
                        if access.data_plane_protected:
                            access.check_data_plane(request)
                    elif access_class is not RouteClass.PUBLIC:
                        control = access_class
                        await access.check_control_plane(request, access_class)
                response = await route.handler(request)
        except GatewayError as exc:
            response = request.get(STREAM_STARTED) or error_response(exc)
        except BodyTooLarge:
            response = error_response(payload_too_large())
        except asyncio.CancelledError:  # the client went away
            if metrics is not None:
                metrics.record_http(request, 499, time.perf_counter() - started)
            if control is not None and audit_enabled:  # e.g. /add_worker goes on after its caller left
                await audit(request, control, 499, request_id)
            raise
        except Exception:
            log.exception(
                "unhandled error on %s %s (request %s)",
                request.method,
                request.path,
                request_id,
                extra={"request_id": request_id, "status": 500},
            )
            response = request.get(STREAM_STARTED) or error_response(
                GatewayError(500, "internal_error", "Internal gateway error")
            )
        if metrics is not None:
            metrics.record_http(request, response.status, time.perf_counter() - started)
        if control is not None and audit_enabled:
            await audit(request, control, response.status, request_id)
        if log_requests:
            _log_request(request, request_id, response, time.perf_counter() - started)
        if not response.prepared:
            response.headers["x-request-id"] = request_id
        return response

    return handle


def _refuse_cross_site_writes(request: Request, route_class: RouteClass, origins: frozenset[str]) -> None:
    """A web page the operator visits must not change the fleet of a gateway the browser can reach (an open one
    above all): browsers mark such requests `Sec-Fetch-Site: cross-site`. Origins allowed by CORS are trusted."""
    if route_class is not RouteClass.ADMIN_WRITE or "*" in origins or request.headers.get("Origin") in origins:
        return
    raise GatewayError(403, "cross_site_request", "Control-plane changes are not accepted from another site's page")


def _log_request(request: Request, request_id: str, response: Response | StreamResponse, seconds: float) -> None:
    """The per-request debug line; with --log-json its fields are separate JSON keys."""
    worker = response.headers.get("x-smg-routed-worker-id")
    latency_ms = round(seconds * 1000, 3)
    log.debug(
        "request %s: %s %s -> %d in %.3f ms (worker %s)",
        request_id,
        request.method,
        request.path,
        response.status,
        latency_ms,
        worker,
        extra={
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "latency_ms": latency_ms,
            "worker": worker,
        },
    )


def payload_too_large() -> GatewayError:
    return GatewayError(413, "request_body_too_large", "Request body exceeded the payload limit (max_payload_size)")
