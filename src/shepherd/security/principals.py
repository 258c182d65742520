"""Who is calling: a principal with a role, from `--api-key`, a `--control-plane-api-keys` entry or a JWT.

Roles: `admin` (may change the fleet), `user` (may read the control plane) and `data-plane` (the shared
`--api-key`: inference, and the control plane only while no control-plane credential is configured).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shepherd.config import CONTROL_PLANE_ROLES, ConfigError, ControlPlaneKey

ADMIN = "admin"
USER = "user"
DATA_PLANE = "data-plane"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `id` and `name` are safe to log; no secret is kept here."""

    id: str
    name: str
    role: str | None  # admin, user, data-plane, or None (a token that maps to no gateway role)
    method: str  # control-plane-key, jwt, api-key, none


ANONYMOUS = Principal("anonymous", "anonymous", None, "none")
API_KEY_PRINCIPAL = Principal("api-key", "--api-key", DATA_PLANE, "api-key")


def parse_control_plane_keys(specs: Iterable[str]) -> tuple[ControlPlaneKey, ...]:
    """`id:name:role:key` entries; the key is everything after the third colon, so it may contain colons."""
    keys: list[ControlPlaneKey] = []
    for index, spec in enumerate(specs, 1):
        parts = spec.split(":", 3)
        where = f"--control-plane-api-keys entry {index}"  # never echo the entry: it holds the secret
        if len(parts) != 4:
            raise ConfigError(f"{where} must be id:name:role:key (4 colon-separated fields)")
        key_id, name, role, key = (p.strip() for p in parts)
        if not key_id or not name:
            raise ConfigError(f"{where}: id and name must not be empty")
        if role not in CONTROL_PLANE_ROLES:
            raise ConfigError(f"{where} ({key_id}): role must be one of {', '.join(CONTROL_PLANE_ROLES)}, got {role!r}")
        if not key:
            raise ConfigError(f"{where} ({key_id}): the key must not be empty")
        if any(k.id == key_id for k in keys):
            raise ConfigError(f"{where}: duplicate id {key_id!r}")
        if any(hmac.compare_digest(k.key.encode(), key.encode()) for k in keys):
            raise ConfigError(f"{where} ({key_id}): the same key is already configured under another id")
        keys.append(ControlPlaneKey(key_id, name, role, key))
    return tuple(keys)


def parse_role_mapping(pairs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`idp_role=gateway_role` pairs (gateway roles: admin, user)."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        idp_role, sep, role = pair.partition("=")
        idp_role, role = idp_role.strip(), role.strip()
        if not sep or not idp_role:
            raise ConfigError(f"--jwt-role-mapping {pair!r} must be idp_role=gateway_role")
        if role not in CONTROL_PLANE_ROLES:
            raise ConfigError(
                f"--jwt-role-mapping {pair!r}: gateway role must be one of {', '.join(CONTROL_PLANE_ROLES)}"
            )
        if mapping.get(idp_role, role) != role:
            raise ConfigError(f"--jwt-role-mapping maps {idp_role!r} to both {mapping[idp_role]!r} and {role!r}")
        mapping[idp_role] = role
    return tuple(mapping.items())


def strongest_role(roles: Iterable[str]) -> str | None:
    """admin over user; None when there is neither."""
    found = set(roles)
    return ADMIN if ADMIN in found else USER if USER in found else None


class KeyRing:
    """The control-plane keys, held as SHA-256 digests and compared in constant time.

    Every configured key is compared on every lookup (no early exit), so the time taken does not tell which
    key, or how much of one, matched.
    """

    def __init__(self, keys: Sequence[ControlPlaneKey]) -> None:
        self._entries = [(_digest(k.key), Principal(k.id, k.name, k.role, "control-plane-key")) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, token: str) -> Principal | None:
        digest = _digest(token)
        found = None
        for key_digest, principal in self._entries:
            if hmac.compare_digest(digest, key_digest):
                found = principal
        return found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
