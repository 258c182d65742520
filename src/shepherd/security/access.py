"""Access control: which credential each route class takes, and the 401/403 answers (docs/security.md).

- No credential configured: everything is open (as SMG).
- `--api-key` only: the data plane and the control plane both need it (SMG's meaning).
- Control-plane credentials configured (`--control-plane-api-keys` and/or JWT): the control plane takes only
  those (reads: role user or admin; writes: role admin); `--api-key` then gets 403 there. The data plane keeps
  needing `--api-key` if it is set, and stays open if it is not: control-plane credentials are not inference
  credentials.
"""

from __future__ import annotations

import hmac

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError
from shepherd.exchange import Request
from shepherd.http.route_policy import RouteClass
from shepherd.security.jwt_auth import InvalidToken, JwtVerifier, KeysUnavailable
from shepherd.security.principals import ADMIN, ANONYMOUS, API_KEY_PRINCIPAL, USER, KeyRing, Principal

PRINCIPAL = "principal"
_CHALLENGE = {"www-authenticate": 'Bearer realm="shepherd"'}
_ALLOWED_ROLES = {RouteClass.ADMIN_READ: (ADMIN, USER), RouteClass.ADMIN_WRITE: (ADMIN,)}


def _missing(what: str = "API key", example: str = "key") -> GatewayError:
    message = f"Missing {what}: send it as `Authorization: Bearer <{example}>`"
    return GatewayError(401, "invalid_api_key", message, headers=_CHALLENGE)


def _bearer(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


class AccessControl:
    def __init__(self, config: GatewayConfig) -> None:
        auth = config.auth
        self._api_key = config.api_key.encode() if config.api_key else None
        self._expected_header = b"bearer " + self._api_key if self._api_key else None
        self._keys = KeyRing(auth.control_plane_api_keys)
        self._jwt = JwtVerifier(auth) if auth.jwt_enabled else None
        self._control_plane_protected = auth.control_plane_protected
        self.data_plane_protected = self._api_key is not None

    @classmethod
    def for_config(cls, config: GatewayConfig) -> AccessControl | None:
        """None when there is nothing to check nor to audit: the middleware then skips this entirely."""
        auth = config.auth
        if config.api_key or auth.control_plane_protected or auth.audit_enabled:
            return cls(config)
        return None

    def check_data_plane(self, request: Request) -> None:
        """The `--api-key` check, kept synchronous and allocation-light for the inference hot path."""
        supplied = request.headers.get("Authorization")
        if supplied is None:
            raise _missing()
        scheme, _, token = supplied.partition(" ")
        # surrogateescape: a header that is not UTF-8 is just a wrong key, never an error
        candidate = f"{scheme.lower()} {token.strip()}".encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(candidate, self._expected_header):  # type: ignore[arg-type]
            raise GatewayError(401, "invalid_api_key", "Invalid API key")

    async def check_control_plane(self, request: Request, route_class: RouteClass) -> None:
        """Authenticate, then authorize for `route_class`; the principal is left on the request for the audit."""
        principal = await self._authenticate(request)
        request[PRINCIPAL] = principal
        if self._control_plane_protected and principal.role not in _ALLOWED_ROLES[route_class]:
            needed = " or ".join(_ALLOWED_ROLES[route_class])
            if principal is API_KEY_PRINCIPAL:
                message = "The data-plane API key cannot use control-plane routes; use a control-plane credential"
            else:
                message = f"Role {principal.role or 'none'} may not {request.method} {request.path} (needs {needed})"
            raise GatewayError(403, "insufficient_role", message)

    async def _authenticate(self, request: Request) -> Principal:
        if not self._control_plane_protected:
            if self._expected_header is None:
                return ANONYMOUS  # nothing configured but the audit
            self.check_data_plane(request)  # --api-key alone guards the control plane too, as in SMG
            return API_KEY_PRINCIPAL
        token = _bearer(request)
        if token is None:
            raise _missing("control-plane credential", "key or token")
        principal = self._keys.lookup(token)
        if principal is not None:
            return principal
        if self._api_key is not None and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._api_key):
            return API_KEY_PRINCIPAL
        if self._jwt is not None and token.count(".") == 2:
            try:
                return await self._jwt.verify(token)
            except InvalidToken as exc:
                raise GatewayError(
                    401,
                    "invalid_token",
                    f"Invalid token: {exc}",
                    headers={"www-authenticate": 'Bearer realm="shepherd", error="invalid_token"'},
                ) from None
            except KeysUnavailable as exc:
                raise GatewayError(503, "jwks_unavailable", str(exc), headers={"retry-after": "10"}) from None
        raise GatewayError(401, "invalid_api_key", "Invalid API key")
