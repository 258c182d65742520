"""The one table that puts every route of the main port in an access class (docs/security.md).

A route missing from the table stops the gateway at start-up (`check_route_table`), so a new route cannot be
served without someone deciding who may call it.
"""

from __future__ import annotations

import enum
import logging

from shepherd.exchange import Route
from shepherd.http.admin import EXPLAIN_PREFIX
from shepherd.http.routes import RouteTable
from shepherd.routing.context import INFERENCE_ENDPOINTS

log = logging.getLogger(__name__)


class RouteClass(enum.Enum):
    PUBLIC = "public"  # probes, model listing, engine metrics: open under every configuration (as SMG)
    DATA_PLANE = "data-plane"  # inference and tokenization: `--api-key`
    ADMIN_READ = "admin-read"  # fleet and configuration reads: role user or admin
    ADMIN_WRITE = "admin-write"  # anything that changes the fleet or the tokenizers: role admin


_PUBLIC, _DATA, _READ, _WRITE = RouteClass.PUBLIC, RouteClass.DATA_PLANE, RouteClass.ADMIN_READ, RouteClass.ADMIN_WRITE

# (method, canonical path) -> class. HEAD is classed as GET.
ROUTE_CLASSES: dict[tuple[str, str], RouteClass] = {
    ("GET", "/health"): _PUBLIC,
    ("GET", "/liveness"): _PUBLIC,
    ("GET", "/readiness"): _PUBLIC,
    ("GET", "/health_generate"): _PUBLIC,
    ("GET", "/engine_metrics"): _PUBLIC,
    ("GET", "/v1/models"): _PUBLIC,
    ("GET", "/get_model_info"): _PUBLIC,
    ("GET", "/get_server_info"): _PUBLIC,
    **{("POST", endpoint.path): _DATA for endpoint in INFERENCE_ENDPOINTS},
    ("POST", "/v1/tokenize"): _DATA,
    ("POST", "/v1/detokenize"): _DATA,
    ("GET", "/config"): _READ,
    ("GET", "/get_loads"): _READ,
    **{("POST", EXPLAIN_PREFIX + endpoint.path): _READ for endpoint in INFERENCE_ENDPOINTS},
    ("GET", "/workers"): _READ,
    ("GET", "/workers/{worker_id}"): _READ,
    ("GET", "/list_workers"): _READ,
    ("GET", "/v1/tokenizers"): _READ,
    ("GET", "/v1/tokenizers/{key}"): _READ,
    ("GET", "/v1/tokenizers/{key}/status"): _READ,
    ("GET", "/dashboard"): _READ,
    ("GET", "/dashboard/data"): _READ,
    ("POST", "/workers"): _WRITE,
    ("PATCH", "/workers/{worker_id}"): _WRITE,
    ("DELETE", "/workers/{worker_id}"): _WRITE,
    ("POST", "/add_worker"): _WRITE,
    ("POST", "/remove_worker"): _WRITE,
    ("POST", "/flush_cache"): _WRITE,
    ("POST", "/v1/tokenizers"): _WRITE,
    ("DELETE", "/v1/tokenizers/{key}"): _WRITE,
}


def _key(route: Route) -> tuple[str, str]:
    return route.method, route.template


def check_route_table(routes: RouteTable) -> None:
    """Refuse to start with a route the table does not class."""
    missing = sorted({" ".join(_key(r)) for r in routes.routes() if _key(r) not in ROUTE_CLASSES})
    if missing:
        raise RuntimeError(f"routes without an access class in http/route_policy.py: {', '.join(missing)}")


def route_class(route: Route) -> RouteClass:
    """The class of a matched route (looked up once, then kept on the route); fails closed (admin-write) for one
    missing from the table."""
    found = route.access
    if found is None:
        found = ROUTE_CLASSES.get(_key(route))
        if found is None:  # unreachable after check_route_table
            log.error("route %s %s has no access class; treating it as admin-write", *_key(route))
            found = _WRITE
        route.access = found
    return found
