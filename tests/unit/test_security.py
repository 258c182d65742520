"""Control-plane security pieces without a server: flag parsing, key lookup, the route table, audit fields, posture."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from shepherd.cli import build_parser, config_from_args
from shepherd.config import AuthConfig, ConfigError, DiscoveryConfig, GatewayConfig
from shepherd.exchange import Request, Response
from shepherd.gateway import Gateway
from shepherd.http.app import build_routes
from shepherd.http.route_policy import check_route_table
from shepherd.http.routes import RouteTable
from shepherd.security import jwt_auth
from shepherd.security.audit import _clean
from shepherd.security.posture import posture
from shepherd.security.principals import KeyRing, parse_control_plane_keys, parse_role_mapping


def _config(*flags: str) -> GatewayConfig:
    return config_from_args(build_parser().parse_args(["launch", *flags]))


def test_control_plane_keys_parse_and_keep_colons_in_the_key():
    keys = parse_control_plane_keys(["ci:CI Pipeline:admin:sk-a:b:c", "grafana:Grafana:user:sk-user"])
    assert [(k.id, k.name, k.role, k.key) for k in keys] == [
        ("ci", "CI Pipeline", "admin", "sk-a:b:c"),
        ("grafana", "Grafana", "user", "sk-user"),
    ]
    assert "sk-a" not in repr(keys)


@pytest.mark.parametrize(
    "specs,message",
    [
        (["ci:CI:admin"], "entry 1 must be id:name:role:key"),
        (["ci:CI:root:sk-secret"], "entry 1 (ci): role must be one of admin, user, got 'root'"),
        (["ci:CI:admin:"], "entry 1 (ci): the key must not be empty"),
        ([":CI:admin:sk-secret"], "entry 1: id and name must not be empty"),
        (["a:A:admin:sk-secret", "a:B:user:sk-other"], "entry 2: duplicate id 'a'"),
        (["a:A:admin:sk-secret", "b:B:user:sk-secret"], "entry 2 (b): the same key is already configured"),
    ],
)
def test_control_plane_key_errors_are_clear_and_never_echo_the_key(specs, message):
    with pytest.raises(ConfigError) as error:
        parse_control_plane_keys(specs)
    assert message in str(error.value) and "sk-secret" not in str(error.value)


def test_role_mapping_parses():
    assert parse_role_mapping(["Gateway.Admin=admin", "Readers = user", "Gateway.Admin=admin"]) == (
        ("Gateway.Admin", "admin"),
        ("Readers", "user"),
    )


@pytest.mark.parametrize(
    "pairs,message",
    [
        (["Gateway.Admin"], "must be idp_role=gateway_role"),
        (["=admin"], "must be idp_role=gateway_role"),
        (["Gateway.Admin=root"], "gateway role must be one of admin, user"),
        (["X=admin", "X=user"], "maps 'X' to both 'admin' and 'user'"),
    ],
)
def test_role_mapping_errors(pairs, message):
    with pytest.raises(ConfigError, match=message):
        parse_role_mapping(pairs)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--jwt-issuer", "https://idp.example.com"], "--jwt-issuer needs --jwt-audience"),
        (["--jwt-audience", "gw"], "need --jwt-issuer"),
        (["--jwt-role-mapping", "a=admin"], "need --jwt-issuer"),
        (["--jwt-issuer", "idp.example.com", "--jwt-audience", "gw"], "--jwt-issuer must be an http:// or https://"),
        (["--control-plane-api-keys", "k:K:boss:secret"], "role must be one of admin, user"),
    ],
)
def test_flag_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        _config(*flags)


def test_flags_build_the_auth_config_and_config_redacts_keys():
    config = _config(
        "--control-plane-api-keys", "a:A:admin:sk-1", "--control-plane-api-keys", "b:B:user:sk-2",
        "--jwt-issuer", "https://idp.example.com", "--jwt-audience", "gw", "--jwt-role-mapping", "Ops=admin",
        "--control-plane-audit-enabled",
    )  # fmt: skip
    auth = config.auth
    assert [k.id for k in auth.control_plane_api_keys] == ["a", "b"]
    assert auth.jwt_enabled and auth.control_plane_protected and auth.audit_enabled
    assert auth.jwt_role_mapping == (("Ops", "admin"),)
    redacted = str(config.redacted())
    assert "sk-1" not in redacted and "sk-2" not in redacted


def test_key_ring_finds_the_principal_of_a_key():
    ring = KeyRing(parse_control_plane_keys(["a:Alice:admin:sk-alice", "b:Bob:user:sk-bob"]))
    assert ring.lookup("sk-bob").id == "b" and ring.lookup("sk-bob").role == "user"
    assert ring.lookup("sk-alice").method == "control-plane-key"
    assert ring.lookup("sk-ali") is None and ring.lookup("") is None
    assert not KeyRing(())


def test_every_route_of_the_app_has_an_access_class():
    check_route_table(build_routes(Gateway(GatewayConfig())))  # raises on a route missing from the table


def test_an_unclassified_route_stops_the_start():
    async def handler(_request: Request) -> Response:
        return Response()

    routes = RouteTable()
    routes.add("PUT", "/workers/{worker_id}", handler)
    with pytest.raises(RuntimeError, match=re.escape("PUT /workers/{worker_id}")):
        check_route_table(routes)


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("http://user:pa55@10.0.0.1:8000/v1?token=abc#frag", "http://10.0.0.1:8000/v1"),
        ("http%3A%2F%2Fu%3Ap%4010.0.0.1", "http%3A%2F%2Fu%3Ap%4010.0.0.1"),  # not decoded here: no scheme
        ("name\nINFO forged line", "name\\nINFO forged line"),
        ("x" * 1000, "x" * 256),
    ],
)
def test_audit_fields_drop_userinfo_and_escape_control_characters(raw, clean):
    assert _clean(raw) == clean


def test_refetches_for_unknown_kids_are_rate_limited(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(jwt_auth.time, "monotonic", lambda: now[0])
    cache = jwt_auth.JwksCache("https://idp.example.com", None)
    assert [cache._take_refetch() for _ in range(jwt_auth.REFETCH_BURST + 1)] == [True] * 3 + [False]
    now[0] += jwt_auth.REFETCH_INTERVAL_S
    assert cache._take_refetch() and not cache._take_refetch()


def _warnings(config: GatewayConfig) -> list[str]:
    return [line for level, line in posture(config) if level == logging.WARNING]


def test_posture_flags_open_surfaces_on_all_interfaces():
    warnings = _warnings(GatewayConfig())
    assert any(w.startswith("data plane on 0.0.0.0:30000 is unauthenticated") for w in warnings)
    assert any(w.startswith("admin and /workers routes on 0.0.0.0:30000") for w in warnings)
    assert "main listener on all interfaces (0.0.0.0:30000) with the data plane and control plane unauthenticated" in (
        warnings
    )
    assert "metrics listener on all interfaces (0.0.0.0:29000) is unauthenticated (/metrics)" in warnings


def test_posture_with_every_key_set_keeps_only_the_by_design_surfaces():
    config = GatewayConfig(
        host="10.0.0.5",
        prometheus_host="127.0.0.1",
        api_key="k",
        auth=AuthConfig(control_plane_api_keys=parse_control_plane_keys(["a:A:admin:sk-a"])),
    )
    assert _warnings(config) == []
    assert posture(config)[0][1] == "data plane: --api-key; control plane: 1 control-plane keys (1 admin); audit: off"


def test_posture_flags_discovery_across_all_namespaces_with_a_key():
    discovery = DiscoveryConfig(provider="kubernetes", selector=(("app", "sglang"),))
    all_namespaces = GatewayConfig(api_key="k", discovery=discovery)
    assert any("Kubernetes discovery watches all namespaces" in w for w in _warnings(all_namespaces))
    one_namespace = GatewayConfig(api_key="k", discovery=dataclasses.replace(discovery, namespace="ml"))
    assert not any("Kubernetes" in w for w in _warnings(one_namespace))


def test_posture_flags_jwks_over_plain_http_off_the_host():
    remote = AuthConfig(jwt_issuer="http://idp.internal", jwt_audience="gw")
    assert any("plain HTTP (http://idp.internal)" in w for w in _warnings(GatewayConfig(auth=remote)))
    local = AuthConfig(jwt_issuer="http://127.0.0.1:8080", jwt_audience="gw")
    assert not any("plain HTTP" in w for w in _warnings(GatewayConfig(auth=local)))
