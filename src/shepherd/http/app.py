"""The main port's application: every route in one table, behind the request pipeline (access classes:
route_policy.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shepherd.http.admin import add_admin_routes
from shepherd.http.dashboard import add_dashboard_routes
from shepherd.http.inference import add_inference_routes
from shepherd.http.middleware import make_pipeline
from shepherd.http.route_policy import check_route_table
from shepherd.http.routes import RouteTable
from shepherd.http.server import App
from shepherd.http.tokenizers import add_tokenizer_routes

if TYPE_CHECKING:
    from shepherd.gateway import Gateway


def build_routes(gateway: Gateway) -> RouteTable:
    routes = RouteTable()
    add_inference_routes(routes, gateway)
    add_admin_routes(routes, gateway)
    add_tokenizer_routes(routes, gateway)
    add_dashboard_routes(routes, gateway)
    check_route_table(routes)
    return routes


def build_app(gateway: Gateway) -> App:
    return make_pipeline(gateway.config, build_routes(gateway), gateway.metrics)
