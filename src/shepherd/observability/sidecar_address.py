"""Where a gRPC worker's metrics live: an HTTP sidecar on a port derived from the gRPC port.

An engine serving gRPC (SGLang's gRPC mode) has no HTTP `/metrics`; its processes write Prometheus
multiprocess files and a sidecar (`shepherd metrics-sidecar`) serves them over plain HTTP on
`grpc_port + 10000`, or `grpc_port - 10000` when that would pass 65535. The gateway, the sidecar and the
simulator all derive the address here, so they cannot disagree.

The mapping is not collision-free: gRPC ports 20000 apart across the wrap (40000 and 60000) share sidecar
port 50000, and a gRPC port may equal another worker's sidecar port. Deployments must avoid such layouts.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SIDECAR_PORT_OFFSET = 10000
MAX_PORT = 65535
_GRPC_SCHEMES = ("grpc", "grpcs")
_DP_RANK_SUFFIX = re.compile(r"@\d+$")


def sidecar_port(grpc_port: int) -> int:
    """The sidecar's port for a gRPC port (1..65535)."""
    if not 0 < grpc_port <= MAX_PORT:
        raise ValueError(f"not a TCP port: {grpc_port}")
    if grpc_port + SIDECAR_PORT_OFFSET <= MAX_PORT:
        return grpc_port + SIDECAR_PORT_OFFSET
    return grpc_port - SIDECAR_PORT_OFFSET


def canonical_address(worker_url: str) -> str:
    """A worker URL without a trailing slash or DP `@rank` suffix: the engine, not one of its ranks."""
    return _DP_RANK_SUFFIX.sub("", worker_url.rstrip("/"))


def sidecar_metrics_url(worker_url: str) -> str:
    """`http://host:sidecar_port/metrics` for a `grpc://` or `grpcs://` worker URL.

    `@rank` suffixes are ignored (all ranks of an engine share one sidecar), IPv6 hosts keep their
    brackets, and the sidecar is always plain HTTP: it serves unauthenticated metrics only.
    Raises ValueError for a URL that is not gRPC or has no port.
    """
    parts = urlsplit(canonical_address(worker_url))
    if parts.scheme not in _GRPC_SCHEMES or not parts.hostname:
        raise ValueError(f"not a gRPC worker URL: {worker_url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid port in gRPC worker URL: {worker_url!r}") from None
    if port is None:
        raise ValueError(f"gRPC worker URL has no port: {worker_url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{sidecar_port(port)}/metrics"
