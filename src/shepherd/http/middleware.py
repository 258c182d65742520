"""The one middleware every request passes: request id, CORS, payload limit, access control, audit, error envelope.

One middleware instead of a chain keeps the per-request cost to a single coroutine frame.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shepherd.config import GatewayConfig
from shepherd.http.errors import GatewayError, error_body, error_response
from shepherd.http.route_policy import RouteClass, RouteClasses
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.context import INFERENCE_ENDPOINTS
from shepherd.security.access import AccessControl
from shepherd.security.audit import audit

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
# Set by the routers once a streamed response has started: after that, an error cannot become a new response.
STREAM_STARTED = web.RequestKey("stream_started", web.StreamResponse)

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


def make_middleware(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> Callable:
    id_headers = config.request_id_headers
    log_requests = log.isEnabledFor(logging.DEBUG)  # decided once: the check is not free per request
    max_payload = config.max_payload_size
    access = AccessControl.for_config(config)  # None: no credential and no audit, nothing to check per request
    route_classes = RouteClasses()
    audit_enabled = config.auth.audit_enabled
    origins = frozenset(config.cors_allowed_origins)

    def request_id_of(request: web.Request) -> str:
        headers = request.headers
        for name in id_headers:
            value = headers.get(name)
            if value is not None:
                return value if _valid_id(value) else new_request_id(request.path)
        return new_request_id(request.path)

    @web.middleware
    async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request_id_of(request)
        request[REQUEST_ID] = request_id
        control: RouteClass | None = None  # set on control-plane routes, for the audit line
        try:
            if origins and request.method == "OPTIONS":
                response: web.StreamResponse = web.Response(status=200, headers=_CORS_PREFLIGHT)
            else:
                length = request.content_length
                if length is not None and length > max_payload:
                    raise _payload_too_large()
                match = request.match_info
                if request.headers.get("Sec-Fetch-Site") == "cross-site" and match.http_exception is None:
                    _refuse_cross_site_writes(request, route_classes.of(match), origins)
                if access is not None and match.http_exception is None:
                    route_class = route_classes.of(match)
                    if route_class is RouteClass.DATA_PLANE:
                        if access.data_plane_protected:
                            access.check_data_plane(request)
                    elif route_class is not RouteClass.PUBLIC:
                        control = route_class
                        await access.check_control_plane(request, route_class)
                response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(_payload_too_large())
        except web.HTTPMethodNotAllowed as exc:
            response = error_response(
                GatewayError(
                    405,
                    "method_not_allowed",
                    f"Invalid URL ({request.method} {request.path})",
                    headers={"allow": ",".join(sorted(exc.allowed_methods))},
                )
            )
        except web.HTTPNotFound:
            response = error_response(
                GatewayError(404, "unknown_url", f"Invalid URL ({request.method} {request.path})")
            )
        except web.HTTPException as exc:
            response = web.Response(
                status=exc.status,
                body=error_body(exc.status, "http_error", exc.reason),
                content_type="application/json",
            )
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

    return gateway_middleware


def _refuse_cross_site_writes(request: web.Request, route_class: RouteClass, origins: frozenset[str]) -> None:
    """A web page the operator visits must not change the fleet of a gateway the browser can reach (an open one
    above all): browsers mark such requests `Sec-Fetch-Site: cross-site`. Origins allowed by CORS are trusted."""
    if route_class is not RouteClass.ADMIN_WRITE or "*" in origins or request.headers.get("Origin") in origins:
        return
    raise GatewayError(403, "cross_site_request", "Control-plane changes are not accepted from another site's page")


def add_cors(app: web.Application, config: GatewayConfig) -> None:
    """With --cors-allowed-origins, every response to an allowed origin (streams included) carries CORS headers.

    A response-prepare signal rather than the middleware, because streamed responses are prepared inside the router.
    """
    origins = frozenset(config.cors_allowed_origins)
    if not origins:
        return
    any_origin = "*" in origins

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and (any_origin or origin in origins):
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-expose-headers"] = _CORS_EXPOSE

    app.on_response_prepare.append(on_prepare)


def _log_request(request: web.Request, request_id: str, response: web.StreamResponse, seconds: float) -> None:
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


def _payload_too_large() -> GatewayError:
    return GatewayError(413, "request_body_too_large", "Request body exceeded the payload limit (max_payload_size)")
