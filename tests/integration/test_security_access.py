"""Control-plane keys and roles against a real gateway: every route class with every kind of caller, the audit
lines and the start-up SECURITY POSTURE summary.

The gateways run without workers: an allowed request gets whatever the route answers then (200, 202, 400, 404,
503), which is never 401 or 403, so the table tests access control only.
"""

from __future__ import annotations

import json

import pytest

from shepherd.http.admin import EXPLAIN_PREFIX
from shepherd.http.route_policy import ROUTE_CLASSES, RouteClass
from shepherd.routing.context import INFERENCE_ENDPOINTS
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import http_request, start_sim

API_KEY = "data-plane-key-0123"
ADMIN_KEY = "admin-key:with:colons-4567"
USER_KEY = "user-key-89ab"
KEYS = ("--control-plane-api-keys", f"ops:Ops Team:admin:{ADMIN_KEY}", f"dash:Dashboard:user:{USER_KEY}")

# One concrete request per entry of the route table (method, path, JSON body).
REQUESTS: dict[tuple[str, str], tuple[str, dict | None]] = {
    **{("GET", path): (path, None) for (method, path) in ROUTE_CLASSES if method == "GET" and "{" not in path},
    **{("POST", e.path): (e.path, {}) for e in INFERENCE_ENDPOINTS},
    **{("POST", EXPLAIN_PREFIX + e.path): (EXPLAIN_PREFIX + e.path, {}) for e in INFERENCE_ENDPOINTS},
    ("POST", "/v1/tokenize"): ("/v1/tokenize", {"prompt": "x"}),
    ("POST", "/v1/detokenize"): ("/v1/detokenize", {"tokens": [1]}),
    ("GET", "/workers/{worker_id}"): ("/workers/no-such-worker", None),
    ("GET", "/v1/tokenizers/{key}"): ("/v1/tokenizers/none", None),
    ("GET", "/v1/tokenizers/{key}/status"): ("/v1/tokenizers/none/status", None),
    ("POST", "/workers"): ("/workers", {"url": "http://127.0.0.1:9"}),
    ("PATCH", "/workers/{worker_id}"): ("/workers/no-such-worker", {"priority": 1}),
    ("DELETE", "/workers/{worker_id}"): ("/workers/no-such-worker", None),
    ("POST", "/add_worker"): ("/add_worker?url=", None),  # an empty url fails validation at once
    ("POST", "/remove_worker"): ("/remove_worker?url=http://127.0.0.1:9", None),
    ("POST", "/flush_cache"): ("/flush_cache", None),
    ("POST", "/v1/tokenizers"): ("/v1/tokenizers", {}),
    ("DELETE", "/v1/tokenizers/{key}"): ("/v1/tokenizers/none", None),
}

CALLERS = {
    "none": None,
    "wrong key": "not-a-key",
    "data-plane key": API_KEY,
    "user key": USER_KEY,
    "admin key": ADMIN_KEY,
}
ALLOWED = object()
# Expected outcome per (route class, caller) with --api-key and control-plane keys configured.
EXPECTED = {
    RouteClass.PUBLIC: dict.fromkeys(CALLERS, ALLOWED),
    RouteClass.DATA_PLANE: {**dict.fromkeys(CALLERS, 401), "data-plane key": ALLOWED},
    RouteClass.ADMIN_READ: {
        "none": 401,
        "wrong key": 401,
        "data-plane key": 403,
        "user key": ALLOWED,
        "admin key": ALLOWED,
    },
    RouteClass.ADMIN_WRITE: {
        "none": 401,
        "wrong key": 401,
        "data-plane key": 403,
        "user key": 403,
        "admin key": ALLOWED,
    },
}


def test_every_route_of_the_table_is_exercised():
    assert set(REQUESTS) == set(ROUTE_CLASSES)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayProcess:
    with start_gateway(tmp_path_factory.mktemp("gw-keys"), (), *KEYS, api_key=API_KEY) as gw:
        yield gw


def _call(gateway: GatewayProcess, route: tuple[str, str], key: str | None) -> tuple[int, object]:
    path, body = REQUESTS[route]
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http_request(route[0], gateway.url + path, body, headers=headers)


@pytest.mark.parametrize("route", sorted(ROUTE_CLASSES), ids=" ".join)
def test_role_route_table(gateway, route):
    route_class = ROUTE_CLASSES[route]
    for caller, key in CALLERS.items():
        status, body = _call(gateway, route, key)
        expected = EXPECTED[route_class][caller]
        if expected is ALLOWED:
            assert status not in (401, 403), (caller, status, body)
        else:
            assert status == expected, (caller, status, body)
            code = "invalid_api_key" if status == 401 else "insufficient_role"
            assert body["error"]["code"] == code, (caller, body)


def test_bearer_scheme_is_case_insensitive_and_other_schemes_are_refused(gateway):
    assert gateway.post("/flush_cache", headers={"Authorization": f"bearer {ADMIN_KEY}"})[0] == 200
    status, body = gateway.post("/flush_cache", headers={"Authorization": f"Basic {ADMIN_KEY}"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert gateway.post("/flush_cache", headers={"Authorization": ADMIN_KEY})[0] == 401


def test_forbidden_answer_names_the_role_not_the_key(gateway):
    status, body = gateway.post("/flush_cache", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert status == 403 and body["error"]["type"] == "invalid_request_error"
    assert "user" in body["error"]["message"] and USER_KEY not in json.dumps(body)


def test_config_redacts_every_key(gateway):
    status, config = gateway.get("/config", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert status == 200
    text = json.dumps(config)
    assert API_KEY not in text and ADMIN_KEY not in text and USER_KEY not in text
    assert [(k["id"], k["role"], k["key"]) for k in config["auth"]["control_plane_api_keys"]] == [
        ("ops", "admin", "<redacted>"),
        ("dash", "user", "<redacted>"),
    ]


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> GatewayProcess:
    """Control-plane keys only (no --api-key), audit on, JSON logs."""
    with start_gateway(
        tmp_path_factory.mktemp("gw-audit"), (), *KEYS, "--control-plane-audit-enabled", "--log-json"
    ) as gw:
        yield gw


def _log_records(gateway: GatewayProcess) -> list[dict]:
    records = []
    for line in gateway.process.log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _audit_lines(gateway: GatewayProcess, request_id: str) -> list[dict]:
    return [r for r in _log_records(gateway) if r.get("audit") and r["request_id"] == request_id]


def test_control_plane_keys_alone_leave_the_data_plane_open(audited):
    status, body = audited.post("/generate", {"text": "x"})
    assert status not in (401, 403), body  # no workers to answer, but not refused
    assert audited.get("/workers")[0] == 401


def test_audit_line_for_an_allowed_write(audited):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "x-request-id": "audit-add-1"}
    status, _ = audited.post("/workers", {"url": "http://127.0.0.1:9/", "api_key": "worker-secret-1"}, headers=headers)
    assert status == 202
    [line] = _audit_lines(audited, "audit-add-1")
    assert line["logger"] == "shepherd.audit"
    assert {k: line[k] for k in ("principal", "principal_name", "auth_method", "role", "method", "route")} == {
        "principal": "ops",
        "principal_name": "Ops Team",
        "auth_method": "control-plane-key",
        "role": "admin",
        "method": "POST",
        "route": "/workers",
    }
    assert line["target"] == "http://127.0.0.1:9/"
    assert (line["status"], line["outcome"], line["route_class"]) == (202, "ok", "admin-write")


def test_audit_lines_for_denied_and_read_requests(audited):
    audited.post("/flush_cache", headers={"Authorization": f"Bearer {USER_KEY}", "x-request-id": "audit-deny-1"})
    audited.post("/flush_cache", headers={"Authorization": "Bearer guessed-key", "x-request-id": "audit-deny-2"})
    audited.get("/workers/some-id", headers={"Authorization": f"Bearer {USER_KEY}", "x-request-id": "audit-read-1"})
    [denied] = _audit_lines(audited, "audit-deny-1")
    assert (denied["principal"], denied["role"], denied["status"], denied["outcome"]) == ("dash", "user", 403, "denied")
    [anonymous] = _audit_lines(audited, "audit-deny-2")
    assert (anonymous["principal"], anonymous["role"], anonymous["status"]) == ("anonymous", None, 401)
    [read] = _audit_lines(audited, "audit-read-1")
    assert (read["route"], read["target"], read["status"], read["outcome"]) == (
        "/workers/{worker_id}",
        "some-id",
        404,
        "failed",
    )


def test_no_secret_in_the_log(audited):
    audited.post("/flush_cache", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    text = audited.process.log_path.read_text()
    for secret in (ADMIN_KEY, USER_KEY, "guessed-key", "worker-secret-1"):
        assert secret not in text, secret
    assert not [
        r for r in _log_records(audited) if r.get("audit") and r["method"] == "GET" and r["route"] == "/liveness"
    ]


def _posture(gateway: GatewayProcess) -> list[dict]:
    return [r for r in _log_records(gateway) if r["message"].startswith("SECURITY POSTURE: ")]


def test_posture_with_keys(audited):
    lines = _posture(audited)
    assert lines[0]["message"] == (
        "SECURITY POSTURE: data plane: open; control plane: 2 control-plane keys (1 admin, 1 user); audit: on"
    )
    warnings = [r["message"] for r in lines if r["level"] == "warning"]
    assert any("data plane on 127.0.0.1:" in w and "unauthenticated" in w for w in warnings)
    assert not any("/workers routes" in w for w in warnings)  # the control plane is protected
    assert not any("main listener on all interfaces" in w for w in warnings)
    assert any("/engine_metrics is public" in r["message"] for r in lines)


def test_posture_of_an_open_gateway(tmp_path):
    with start_gateway(tmp_path, (), "--log-json") as gw:
        lines = _posture(gw)
    messages = [r["message"] for r in lines]
    assert messages[0] == "SECURITY POSTURE: data plane: open; control plane: open; audit: off"
    warnings = [r["message"] for r in lines if r["level"] == "warning"]
    assert any("admin and /workers routes on 127.0.0.1:" in w for w in warnings)
    assert any("metrics listener on all interfaces (0.0.0.0:" in w for w in warnings)  # --prometheus-host default
    assert not any("main listener on all interfaces" in w for w in warnings)  # bound to 127.0.0.1


def test_api_key_alone_guards_the_whole_control_plane(tmp_path):
    """SMG's meaning of --api-key when no control-plane credential is configured: it opens every protected route."""
    with start_gateway(tmp_path, (), "--log-json", api_key=API_KEY) as gw:
        assert gw.post("/flush_cache")[0] == 401
        assert gw.post("/flush_cache", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
        assert gw.get("/workers", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
        summary = _posture(gw)[0]["message"]
    assert summary == "SECURITY POSTURE: data plane: --api-key; control plane: --api-key; audit: off"


def test_public_info_routes_never_pass_a_control_plane_credential_to_a_worker(tmp_path):
    """The caller's Authorization reaches the worker only when it is the data-plane key, which workers get anyway."""
    sims = start_sim(tmp_path, 1)
    try:
        args = ("--api-key", API_KEY, *KEYS)
        with start_gateway(tmp_path, sims.urls, *args, ready_workers=0) as gw:
            gw._auth = {"Authorization": f"Bearer {USER_KEY}"}
            gw.wait_ready_workers(1)
            for caller in ("admin key", "user key", "wrong key", "data-plane key"):
                sims.clear_log(0)
                status, _ = gw.get("/get_server_info", headers={"Authorization": f"Bearer {CALLERS[caller]}"})
                assert status == 200, caller
                (seen,) = [r for r in sims.log(0)["requests"] if r["path"] == "/get_server_info"]
                forwarded = seen["headers"].get("authorization")
                assert forwarded == (f"Bearer {API_KEY}" if caller == "data-plane key" else None), caller
    finally:
        sims.stop()


def test_a_header_that_is_not_utf8_is_a_401_not_a_crash(tmp_path):
    import socket

    with start_gateway(tmp_path, (), "--api-key", API_KEY, *KEYS, ready_workers=0) as gw:
        for method, path in (("GET", "/workers"), ("POST", "/generate")):  # control plane and data plane
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nAuthorization: Bearer "
                sock.sendall(head.encode() + b"\xff\r\n\r\n")
                status_line = sock.recv(4096).split(b"\r\n", 1)[0]
            assert status_line.split()[1] == b"401", (path, status_line)
        assert "Traceback" not in gw.process.log_path.read_text()


def test_the_data_plane_key_cannot_double_as_an_admin_key(tmp_path):
    from shepherd.cli import build_parser, config_from_args
    from shepherd.config import ConfigError

    args = build_parser().parse_args(["launch", "--api-key", ADMIN_KEY, *KEYS])
    with pytest.raises(ConfigError, match="--api-key must differ"):
        config_from_args(args)


def test_another_sites_page_cannot_change_an_open_gateways_fleet(tmp_path):
    """Browsers mark a request a foreign page makes `Sec-Fetch-Site: cross-site`: a write is refused, a read is not."""
    with start_gateway(tmp_path, (), ready_workers=0) as gw:
        cross_site = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
        status, body = gw.post("/workers", {"url": "http://127.0.0.1:9"}, headers=cross_site)
        assert status == 403 and body["error"]["code"] == "cross_site_request"
        assert gw.post("/add_worker?url=http://127.0.0.1:9", headers=cross_site)[0] == 403
        assert gw.get("/workers", headers=cross_site)[0] == 200
        assert gw.post("/workers", {"url": "http://127.0.0.1:9"}, headers={"Sec-Fetch-Site": "same-origin"})[0] == 202
