"""JWT/OIDC on the control plane against a real gateway and a local issuer (discovery + JWKS on 127.0.0.1).

Tokens are signed with keys the test generates. POST /flush_cache (admin-write; 200 without workers) and
GET /workers (admin-read) stand for their route classes.
"""

from __future__ import annotations

import time

import pytest

from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.oidc import OidcServer, SigningKey, claims, unsigned_token

AUDIENCE = "shepherd-gateway"
MAPPING = ("--jwt-role-mapping", "Gateway.Admin=admin", "Gateway.Reader=user")


@pytest.fixture(scope="module")
def issuer() -> OidcServer:
    with OidcServer() as server:
        server.keys = [SigningKey("rsa-1", "RS256"), SigningKey("ec-1", "ES256")]
        yield server


@pytest.fixture(scope="module")
def gateway(issuer, tmp_path_factory) -> GatewayProcess:
    """The JWKS URI is left to OIDC discovery."""
    args = ("--jwt-issuer", issuer.issuer, "--jwt-audience", AUDIENCE, *MAPPING)
    with start_gateway(tmp_path_factory.mktemp("gw-jwt"), (), *args) as gw:
        yield gw


def _flush(gateway: GatewayProcess, token: str) -> tuple[int, dict]:
    return gateway.post("/flush_cache", headers={"Authorization": f"Bearer {token}"})


def _admin_claims(issuer: OidcServer, **overrides) -> dict:
    return claims(issuer.issuer, AUDIENCE, **{"roles": ["Gateway.Admin"], **overrides})


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_valid_tokens_reach_admin_routes(gateway, issuer, kid):
    key = next(k for k in issuer.keys if k.kid == kid)
    status, body = _flush(gateway, key.sign(_admin_claims(issuer)))
    assert status == 200, body


def test_keys_come_from_oidc_discovery(gateway, issuer):
    _flush(gateway, issuer.keys[0].sign(_admin_claims(issuer)))
    assert "/.well-known/openid-configuration" in issuer.requests and "/jwks.json" in issuer.requests


def test_user_role_reads_but_cannot_write(gateway, issuer):
    token = issuer.keys[0].sign(claims(issuer.issuer, AUDIENCE, roles=["Gateway.Reader", "unrelated"]))
    assert gateway.get("/workers", headers={"Authorization": f"Bearer {token}"})[0] == 200
    status, body = _flush(gateway, token)
    assert status == 403 and body["error"]["code"] == "insufficient_role"


@pytest.mark.parametrize("roles", [None, [], ["admin"], "Gateway.Nothing"], ids=["missing", "empty", "unmapped", "str"])
def test_tokens_without_a_mapped_role_are_forbidden(gateway, issuer, roles):
    token = issuer.keys[0].sign(claims(issuer.issuer, AUDIENCE, roles=roles))
    headers = {"Authorization": f"Bearer {token}"}
    assert gateway.get("/workers", headers=headers)[0] == 403
    assert _flush(gateway, token)[0] == 403


def test_a_token_without_nbf_is_accepted(gateway, issuer):
    """nbf is optional (RFC 7519) and most identity providers leave it out: only exp, aud and iss are required."""
    assert _flush(gateway, issuer.keys[0].sign(_admin_claims(issuer, nbf=None)))[0] == 200


def test_a_string_roles_claim_counts_as_one_role(gateway, issuer):
    assert _flush(gateway, issuer.keys[1].sign(_admin_claims(issuer, roles="Gateway.Admin")))[0] == 200


def _reject_cases(issuer: OidcServer) -> dict[str, tuple[str, str]]:
    """case -> (token, what the 401 message says)."""
    rsa = issuer.keys[0]
    now = int(time.time())
    tampered = rsa.sign(_admin_claims(issuer))
    hs256 = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    return {
        "expired": (rsa.sign(_admin_claims(issuer, exp=now - 3600, nbf=now - 7200)), "expired"),
        "not yet valid": (rsa.sign(_admin_claims(issuer, nbf=now + 3600)), "not yet valid"),
        "wrong audience": (rsa.sign(_admin_claims(issuer, aud="someone-else")), "Audience"),
        "wrong issuer": (rsa.sign(_admin_claims(issuer, iss="https://evil.example.com")), "issuer"),
        "no exp": (rsa.sign(_admin_claims(issuer, exp=None)), '"exp"'),
        "alg none": (unsigned_token({"alg": "none", "kid": "rsa-1"}, _admin_claims(issuer)), "'none' is not accepted"),
        "HS256 keyed with the RSA public key": (
            unsigned_token(hs256, _admin_claims(issuer), secret=rsa.public_pem()),
            "'HS256' is not accepted",
        ),
        "RS256 header on the EC key": (
            unsigned_token({"alg": "RS256", "kid": "ec-1"}, _admin_claims(issuer), b"x"),
            "does not match the signing key",
        ),
        "bad signature": (tampered[:-4] + ("BBBB" if tampered.endswith("AAAA") else "AAAA"), "Signature verification"),
        "signed by a stranger": (SigningKey("rsa-1", "RS256").sign(_admin_claims(issuer)), "Signature verification"),
        "garbage": ("a.b.c", "malformed"),
    }


def test_invalid_tokens_are_refused_with_401(gateway, issuer):
    for case, (token, reason) in _reject_cases(issuer).items():
        status, body = _flush(gateway, token)
        assert status == 401, (case, status, body)
        assert body["error"]["code"] == "invalid_token" and reason in body["error"]["message"], (case, body)
        assert token not in str(body)


def test_unknown_kid_then_key_rotation_is_picked_up(gateway, issuer):
    rotated = SigningKey("rsa-2", "RS256")
    token = rotated.sign(_admin_claims(issuer))
    status, body = _flush(gateway, token)
    assert status == 401 and "unknown signing key" in body["error"]["message"]
    issuer.keys = [*issuer.keys, rotated]  # the issuer publishes its new key
    assert _flush(gateway, token)[0] == 200


def test_explicit_jwks_uri_skips_discovery(issuer, tmp_path):
    before = issuer.requests.count("/.well-known/openid-configuration")
    args = ("--jwt-issuer", issuer.issuer, "--jwt-audience", AUDIENCE, "--jwt-jwks-uri", issuer.issuer + "/jwks.json")
    with start_gateway(tmp_path, (), *args) as gw:
        token = issuer.keys[0].sign(claims(issuer.issuer, AUDIENCE, roles=["admin"]))  # default mapping
        assert _flush(gw, token)[0] == 200
    assert issuer.requests.count("/.well-known/openid-configuration") == before
