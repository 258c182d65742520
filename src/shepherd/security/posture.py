"""The SECURITY POSTURE summary logged at start-up: what is protected, and every surface that is not."""

from __future__ import annotations

import logging
from collections import Counter
from urllib.parse import urlsplit

from shepherd.config import GatewayConfig

log = logging.getLogger("shepherd.security")

_ALL_INTERFACES = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def posture(config: GatewayConfig) -> list[tuple[int, str]]:
    """(log level, line) pairs: a summary, then one WARNING per exposure (INFO for the by-design public ones)."""
    auth = config.auth
    data_open = not config.api_key
    control_open = data_open and not auth.control_plane_protected
    main = f"{config.host}:{config.port}"
    metrics = f"{config.prometheus_host}:{config.prometheus_port}"
    lines = [(logging.INFO, _summary(config))]

    def add(level: int, text: str) -> None:
        lines.append((level, text))

    if data_open:
        add(
            logging.WARNING,
            f"data plane on {main} is unauthenticated (no --api-key): anyone who reaches it can run inference",
        )
    if control_open:
        add(
            logging.WARNING,
            f"admin and /workers routes on {main} are unauthenticated: anyone who reaches them can "
            "add, change and remove workers (set --control-plane-api-keys, --jwt-issuer or --api-key)",
        )
    if config.host in _ALL_INTERFACES and data_open:
        what = "data plane and control plane" if control_open else "data plane"
        add(logging.WARNING, f"main listener on all interfaces ({main}) with the {what} unauthenticated")
    if config.prometheus_host in _ALL_INTERFACES:
        add(logging.WARNING, f"metrics listener on all interfaces ({metrics}) is unauthenticated (/metrics)")
    else:
        add(logging.INFO, f"metrics listener {metrics} is unauthenticated (/metrics)")
    add(logging.INFO, "/engine_metrics is public (as in SMG): it shows every worker's engine metrics")
    sd = config.discovery
    if sd.provider == "kubernetes" and sd.namespace is None and not control_open:
        add(
            logging.WARNING,
            "Kubernetes discovery watches all namespaces while a key is configured: whoever can "
            "create a pod with the selector's labels in any namespace adds a worker without a key, and it receives "
            "traffic and the --api-key (set --service-discovery-namespace)",
        )
    jwks = auth.jwt_jwks_uri or auth.jwt_issuer
    if jwks and jwks.startswith("http://") and urlsplit(jwks).hostname not in _LOOPBACK:
        add(
            logging.WARNING,
            f"JWT signing keys are fetched over plain HTTP ({jwks}): whoever can alter that "
            "traffic can mint admin tokens",
        )
    return lines


def log_posture(config: GatewayConfig) -> None:
    for level, line in posture(config):
        log.log(level, "SECURITY POSTURE: %s", line)


def _summary(config: GatewayConfig) -> str:
    auth = config.auth
    data = "--api-key" if config.api_key else "open"
    methods = []
    if auth.control_plane_api_keys:
        roles = Counter(k.role for k in auth.control_plane_api_keys)
        methods.append(f"{len(auth.control_plane_api_keys)} control-plane keys ({_counts(roles)})")
    if auth.jwt_enabled:
        methods.append(f"JWT from {auth.jwt_issuer} for audience {auth.jwt_audience}")
    control = " + ".join(methods) or ("--api-key" if config.api_key else "open")
    audit = "on" if auth.audit_enabled else "off"
    return f"data plane: {data}; control plane: {control}; audit: {audit}"


def _counts(roles: Counter[str]) -> str:
    return ", ".join(f"{count} {role}" for role, count in sorted(roles.items()))
