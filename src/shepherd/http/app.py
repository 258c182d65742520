"""The aiohttp application: the routes and the middleware, nothing else (access classes: route_policy.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from shepherd.http.admin import add_admin_routes
from shepherd.http.dashboard import add_dashboard_routes
from shepherd.http.inference import add_inference_routes
from shepherd.http.middleware import add_cors, make_middleware
from shepherd.http.route_policy import check_route_table
from shepherd.http.tokenizers import add_tokenizer_routes

if TYPE_CHECKING:
    from shepherd.gateway import Gateway


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        middlewares=[make_middleware(gateway.config, gateway.metrics)],
        client_max_size=gateway.config.max_payload_size,
        handler_args={"max_field_size": 65536},
    )
    add_cors(app, gateway.config)
    add_inference_routes(app, gateway)
    add_admin_routes(app, gateway)
    add_tokenizer_routes(app, gateway)
    add_dashboard_routes(app, gateway)
    check_route_table(app.router)
    return app
