"""JWT/OIDC bearer tokens for the control plane: RS256 and ES256 only, keys from the issuer's JWKS.

The signing keys are fetched with aiohttp (never blocking the event loop), cached, refreshed after
`KEYS_TTL_S`, and refetched when a token names an unknown `kid` (key rotation), at a bounded rate so random
`kid`s cannot turn the gateway into a JWKS-fetching loop. PyJWT verifies signatures and claims.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import jwt

from shepherd.config import AuthConfig
from shepherd.security.principals import ADMIN, USER, Principal, strongest_role

log = logging.getLogger(__name__)

KEYS_TTL_S = 300.0
LEEWAY_S = 30  # clock skew tolerated on exp and nbf
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Refetches for unknown kids: a burst of this many, then one per REFETCH_INTERVAL_S.
REFETCH_BURST = 3
REFETCH_INTERVAL_S = 10.0
# The only algorithms accepted, by key type: an HMAC or `none` token never reaches a key.
_ALG_BY_KTY = {"RSA": "RS256", "EC": "ES256"}
_REQUIRED_CLAIMS = ["exp", "aud", "iss"]  # nbf is optional (RFC 7519; most IdPs omit it), checked when present


class InvalidToken(Exception):
    """A token that fails verification; the message is safe to return (it never contains the token)."""


class KeysUnavailable(Exception):
    """The JWKS could not be fetched and no cached keys exist."""


class JwksCache:
    """The issuer's signature keys by `kid`, as `jwt.PyJWK` objects of the accepted algorithms only."""

    def __init__(self, issuer: str, jwks_uri: str | None) -> None:
        self.issuer = issuer
        self._jwks_uri = jwks_uri
        self._keys: dict[str, jwt.PyJWK] = {}
        self._next_refresh = 0.0  # monotonic time after which the next lookup refetches
        self._error: str | None = None  # why the last fetch failed
        self._generation = 0  # fetch attempts so far: waiters on the lock skip a fetch that just happened
        self._lock = asyncio.Lock()
        self._refetch_tokens = float(REFETCH_BURST)
        self._refetch_stamp = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if time.monotonic() >= self._next_refresh:
            await self._refresh(self._generation)
        if not self._keys and self._error is not None:
            raise KeysUnavailable(self._error)
        found = self._keys.get(kid)
        if found is None and self._take_refetch():
            await self._refresh(self._generation)
            found = self._keys.get(kid)
        return found

    def _take_refetch(self) -> bool:
        now = time.monotonic()
        refill = (now - self._refetch_stamp) / REFETCH_INTERVAL_S
        self._refetch_tokens = min(REFETCH_BURST, self._refetch_tokens + refill)
        self._refetch_stamp = now
        if self._refetch_tokens < 1:
            return False
        self._refetch_tokens -= 1
        return True

    async def _refresh(self, seen_generation: int) -> None:
        async with self._lock:
            if self._generation != seen_generation:
                return
            self._generation += 1
            try:
                async with aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session:
                    uri = self._jwks_uri or await self._discover(session)
                    keys = _signature_keys(await _get_json(session, uri))
            except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
                # keep the keys we have, and try again after a pause rather than on every request
                log.warning("JWKS fetch for issuer %s failed: %s", self.issuer, exc)
                self._error = f"cannot fetch the issuer's signing keys: {exc}"
                self._next_refresh = time.monotonic() + REFETCH_INTERVAL_S
                return
            self._jwks_uri, self._keys, self._error = uri, keys, None
            self._next_refresh = time.monotonic() + KEYS_TTL_S
            log.info("JWKS for issuer %s: %d signature keys (%s)", self.issuer, len(keys), ", ".join(keys))

    async def _discover(self, session: aiohttp.ClientSession) -> str:
        """The `jwks_uri` of the issuer's OpenID Connect discovery document, which must name the same issuer."""
        document = await _get_json(session, self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if document.get("issuer") != self.issuer:
            raise ValueError(f"the discovery document names issuer {document.get('issuer')!r}, not {self.issuer!r}")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise ValueError("the discovery document has no usable jwks_uri")
        return uri


class JwtVerifier:
    """Turns a bearer token into a principal, or raises InvalidToken / KeysUnavailable."""

    def __init__(self, auth: AuthConfig) -> None:
        assert auth.jwt_issuer is not None and auth.jwt_audience is not None
        self.issuer = auth.jwt_issuer
        self.audience = auth.jwt_audience
        self.role_mapping = dict(auth.jwt_role_mapping) or {ADMIN: ADMIN, USER: USER}
        self.keys = JwksCache(auth.jwt_issuer, auth.jwt_jwks_uri)

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"malformed token: {exc}") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in _ALG_BY_KTY.values():
            raise InvalidToken(f"algorithm {alg!r} is not accepted (RS256 or ES256 only)")
        if not isinstance(kid, str):
            raise InvalidToken("the token header has no kid")
        key = await self.keys.key(kid)
        if key is None:
            raise InvalidToken(f"unknown signing key {kid[:64]!r}")
        if _ALG_BY_KTY.get(key.key_type) != alg:
            raise InvalidToken(f"algorithm {alg} does not match the signing key's type {key.key_type}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(str(exc)) from None
        subject = claims.get("sub")
        subject = subject[:128] if isinstance(subject, str) and subject else "unknown"
        return Principal(subject, subject, self._role(claims.get("roles")), "jwt")

    def _role(self, roles: Any) -> str | None:
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list):
            return None
        return strongest_role(self.role_mapping[r] for r in roles if isinstance(r, str) and r in self.role_mapping)


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url, allow_redirects=False) as resp:
        if resp.status != 200:
            raise ValueError(f"GET {url} answered {resp.status}")
        document = await resp.json(content_type=None)
    if not isinstance(document, dict):
        raise ValueError(f"GET {url} did not return a JSON object")
    return document


def _signature_keys(document: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    """The usable signature keys of a JWKS: RSA (RS256) and EC P-256 (ES256) with a kid; the rest is skipped."""
    keys: dict[str, jwt.PyJWK] = {}
    for data in document.get("keys") or []:
        if not isinstance(data, dict) or not isinstance(data.get("kid"), str) or data.get("use", "sig") != "sig":
            continue
        alg = _ALG_BY_KTY.get(data.get("kty"))  # type: ignore[arg-type]
        if alg is None or data.get("alg", alg) != alg or (alg == "ES256" and data.get("crv") != "P-256"):
            continue
        try:
            keys[data["kid"]] = jwt.PyJWK(data, alg)
        except (jwt.PyJWTError, ValueError) as exc:
            log.warning("JWKS key %r skipped: %s", data["kid"], exc)
    return keys
