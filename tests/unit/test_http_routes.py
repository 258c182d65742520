"""The main port's route table: static and templated paths, registration order, percent-decoded parameters,
404/405 (with `allow`), HEAD answered by GET, and the canonical template metrics and the audit log label with."""

from __future__ import annotations

import pytest
from yarl import URL

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response, json_response
from shepherd.gateway import Gateway
from shepherd.http.app import build_routes
from shepherd.http.middleware import make_pipeline
from shepherd.http.routes import Handler, RouteTable
from tests.support.app_server import serving


class _Connection:
    """All a `Request` asks of its connection when nothing reads the body."""

    peer = None
    closed = False


def request(method: str, target: str) -> Request:
    return Request(_Connection(), method, target.encode("latin-1"), [])  # type: ignore[arg-type]


def named(name: str) -> Handler:
    """A handler that answers its name and the path parameters it got."""

    async def handler(req: Request) -> Response:
        return json_response({"handler": name, "params": req.match_info})

    handler.__name__ = name
    return handler


def table(*routes: tuple[str, str]) -> RouteTable:
    """Routes (method, template) in registration order, each handled by `named("<method> <template>")`."""
    routes_table = RouteTable()
    for method, template in routes:
        routes_table.add(method, template, named(f"{method} {template}"))
    return routes_table


def resolved(routes: RouteTable, method: str, target: str) -> tuple[str, str, dict[str, str]]:
    """(handler name, template, path parameters) of the route `method target` resolves to."""
    req = request(method, target)
    route = routes.resolve(req)
    return route.handler.__name__, route.template, req.match_info


def refused(routes: RouteTable, method: str, target: str) -> GatewayError:
    with pytest.raises(GatewayError) as error:
        routes.resolve(request(method, target))
    return error.value


WORKERS = (
    ("GET", "/workers"),
    ("POST", "/workers"),
    ("GET", "/workers/{worker_id:.+}"),
    ("DELETE", "/workers/{worker_id:.+}"),
    ("PATCH", "/workers/{worker_id:.+}"),
    ("GET", "/liveness"),
    ("POST", "/generate"),
)
TOKENIZERS = (  # the order http/tokenizers.py registers them in: the longer template first
    ("GET", "/v1/tokenizers/{key:.+}/status"),
    ("GET", "/v1/tokenizers/{key:.+}"),
    ("DELETE", "/v1/tokenizers/{key:.+}"),
)


def test_static_paths_match_exactly_by_method():
    routes = table(*WORKERS)
    assert resolved(routes, "GET", "/workers") == ("GET /workers", "/workers", {})
    assert resolved(routes, "POST", "/workers") == ("POST /workers", "/workers", {})
    assert resolved(routes, "GET", "/liveness?verbose=1") == ("GET /liveness", "/liveness", {})  # query aside


def test_a_plain_parameter_is_exactly_one_segment():
    routes = table(("GET", "/items/{item_id}"), ("GET", "/items/{item_id}/parts/{part}"))
    assert resolved(routes, "GET", "/items/abc") == ("GET /items/{item_id}", "/items/{item_id}", {"item_id": "abc"})
    assert resolved(routes, "GET", "/items/abc/parts/7")[2] == {"item_id": "abc", "part": "7"}
    for target in ("/items/a/b", "/items", "/items/", "/items/abc/parts", "/items/abc/parts/7/8"):
        assert refused(routes, "GET", target).status == 404, target


def test_a_greedy_parameter_takes_one_or_more_segments():
    routes = table(*WORKERS)
    assert resolved(routes, "GET", "/workers/abc")[2] == {"worker_id": "abc"}
    assert resolved(routes, "GET", "/workers/a/b/c")[2] == {"worker_id": "a/b/c"}
    assert resolved(routes, "PATCH", "/workers/a/b") == (
        "PATCH /workers/{worker_id:.+}",
        "/workers/{worker_id}",
        {"worker_id": "a/b"},
    )
    assert refused(routes, "GET", "/workers/").status == 404  # one or more: an empty id is no id


def test_registration_order_decides_between_overlapping_templates():
    routes = table(*TOKENIZERS)
    assert resolved(routes, "GET", "/v1/tokenizers/org/name/status") == (
        "GET /v1/tokenizers/{key:.+}/status",
        "/v1/tokenizers/{key}/status",
        {"key": "org/name"},
    )
    assert resolved(routes, "GET", "/v1/tokenizers/org/name") == (
        "GET /v1/tokenizers/{key:.+}",
        "/v1/tokenizers/{key}",
        {"key": "org/name"},
    )
    assert resolved(routes, "GET", "/v1/tokenizers/name/status")[2] == {"key": "name"}
    assert resolved(routes, "DELETE", "/v1/tokenizers/org/name")[2] == {"key": "org/name"}

    # Registered the other way round, the greedy template swallows `/status`: the order is the contract.
    swallowed = table(*reversed(TOKENIZERS))
    assert resolved(swallowed, "GET", "/v1/tokenizers/org/name/status") == (
        "GET /v1/tokenizers/{key:.+}",
        "/v1/tokenizers/{key}",
        {"key": "org/name/status"},
    )


async def test_the_gateway_registers_the_status_route_first():
    gateway = Gateway(GatewayConfig())
    try:
        routes = build_routes(gateway)
        status = routes.resolve(request("GET", "/v1/tokenizers/org/name/status"))
        get = routes.resolve(request("GET", "/v1/tokenizers/org/name"))
        assert (status.template, get.template) == ("/v1/tokenizers/{key}/status", "/v1/tokenizers/{key}")
        assert status.handler != get.handler
    finally:
        await gateway.client.close()


def test_parameters_are_percent_decoded_once():
    routes = table(*WORKERS, ("GET", "/items/{item_id}"))
    assert resolved(routes, "GET", "/workers/http%3A%2F%2Fh%3A1")[2] == {"worker_id": "http://h:1"}
    assert resolved(routes, "GET", "/items/http%3A%2F%2Fh%3A1")[2] == {"item_id": "http://h:1"}  # %2F: one segment
    assert resolved(routes, "GET", "/items/a%20b+c")[2] == {"item_id": "a b+c"}  # a path, not a form: + stays
    assert resolved(routes, "GET", "/items/100%2525")[2] == {"item_id": "100%25"}  # decoded once, not twice


def test_an_unknown_path_is_404_unknown_url():
    routes = table(*WORKERS, *TOKENIZERS)
    for method, target in (("GET", "/nowhere"), ("POST", "/nowhere/1"), ("GET", "/v1/tokenizers/"), ("GET", "/")):
        error = refused(routes, method, target)
        assert (error.status, error.code) == (404, "unknown_url"), target
        assert error.message == f"Invalid URL ({method} {target.partition('?')[0]})"


def test_a_known_path_with_another_method_is_405_with_allow():
    routes = table(*WORKERS)
    for method, target, allow in (
        ("POST", "/liveness", "GET,HEAD"),
        ("DELETE", "/workers", "GET,HEAD,POST"),
        ("PUT", "/workers/a/b", "DELETE,GET,HEAD,PATCH"),
        ("GET", "/generate", "POST"),  # no GET, so no HEAD either
        ("HEAD", "/generate", "POST"),
    ):
        error = refused(routes, method, target)
        assert (error.status, error.code, error.headers) == (405, "method_not_allowed", {"allow": allow}), target


def test_head_is_served_by_the_get_handler():
    routes = table(*WORKERS)
    assert resolved(routes, "HEAD", "/liveness") == ("GET /liveness", "/liveness", {})
    assert resolved(routes, "HEAD", "/workers/a/b") == (
        "GET /workers/{worker_id:.+}",
        "/workers/{worker_id}",
        {"worker_id": "a/b"},
    )


def test_templates_are_canonical_and_listed_once_per_method():
    routes = table(*WORKERS, *TOKENIZERS)
    listed = sorted((route.method, route.template) for route in routes.routes())
    assert listed == sorted(
        [
            ("GET", "/workers"),
            ("POST", "/workers"),
            ("GET", "/workers/{worker_id}"),
            ("DELETE", "/workers/{worker_id}"),
            ("PATCH", "/workers/{worker_id}"),
            ("GET", "/liveness"),
            ("POST", "/generate"),
            ("GET", "/v1/tokenizers/{key}/status"),
            ("GET", "/v1/tokenizers/{key}"),
            ("DELETE", "/v1/tokenizers/{key}"),
        ]
    )


async def test_over_the_wire_404_405_head_and_an_encoded_parameter():
    """The same decisions through the server and the pipeline: the error envelope, `allow`, a bodiless HEAD."""
    async with serving(make_pipeline(GatewayConfig(), table(*WORKERS))) as client:
        resp = await client.get("/nowhere")
        body = await resp.json()
        assert resp.status == 404 and body["error"]["code"] == "unknown_url"
        assert resp.headers["x-smg-error-code"] == "unknown_url"

        resp = await client.post("/liveness")
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
        assert resp.headers["Allow"] == "GET,HEAD"

        get = await client.get("/liveness")
        get_body = await get.read()
        head = await client.head("/liveness")
        assert head.status == 200 and await head.read() == b""
        assert head.headers["Content-Length"] == str(len(get_body)) and get_body

        resp = await client.get(URL("/workers/http%3A%2F%2Fh%3A1", encoded=True))  # sent byte for byte
        assert resp.status == 200
        assert await resp.json() == {"handler": "GET /workers/{worker_id:.+}", "params": {"worker_id": "http://h:1"}}
