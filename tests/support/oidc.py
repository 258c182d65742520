"""A minimal OIDC issuer for tests: discovery document and JWKS over HTTP on 127.0.0.1, and token signing.

The server runs in a thread of the test process (http.server), so a gateway process can fetch its keys while the
test changes them (key rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


class SigningKey:
    """A private key the test signs with, and its public JWK."""

    def __init__(self, kid: str, kind: str) -> None:
        self.kid = kid
        if kind == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public_jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            public_jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.alg = kind
        self.jwk = {**public_jwk, "kid": kid, "use": "sig", "alg": kind}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid})


def claims(issuer: str, audience: str, **overrides: Any) -> dict[str, Any]:
    """Valid claims for 5 minutes; an override of None removes that claim."""
    now = int(time.time())
    base = {"iss": issuer, "aud": audience, "sub": "alice@example.com", "iat": now, "nbf": now - 5, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None = None) -> str:
    """A token PyJWT refuses to make: `alg: none` (no secret), or HS256 keyed with `secret` (e.g. a public PEM)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcServer:
    """Serves `/.well-known/openid-configuration` and `/jwks.json`; `keys` may be replaced at any time."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": server.issuer, "jwks_uri": server.issuer + "/jwks.json"}
                elif self.path == "/jwks.json":
                    body = {"keys": [k.jwk for k in server.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oidc-server", daemon=True)

    def __enter__(self) -> OidcServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
