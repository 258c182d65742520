"""Header hygiene in both directions: what goes to a worker, and what of its answer goes back (pre-serialized
bytes on the hot path; a multidict for the admin routes that proxy a worker).

Only a short allow-list of client headers reaches a worker (cookies, user agents and the like stay here); of a
worker's answer every header goes back except hop-by-hop ones (also those its `Connection` header names), the
framing headers (the gateway frames its own response) and the routing headers the gateway sets itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

_FORWARDED = (b"traceparent", b"tracestate", b"x-smg-routing-key")
# Hop-by-hop and length headers are the proxy's own business: never relayed, in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
# Of a relayed answer, also the routing headers the gateway sets itself.
_DROPPED = frozenset(name.encode() for name in HOP_BY_HOP | {"x-request-id", "x-smg-routed-worker-id"})


def request_lines(
    client_headers: Iterable[tuple[bytes, bytes]], request_id: str, key: str | None, forward_client_auth: bool = True
) -> bytes:
    """The header lines for a worker request (Host, Content-Length and URL credentials are the pool's).

    Credentials: `key` (the worker's own key, else the gateway's `--api-key`, the key the README says authenticates
    the gateway to its workers); without one, whatever the client sent, unchanged, unless the worker's URL carries
    credentials of its own (`forward_client_auth=False`).
    """
    lines = [b"content-type: application/json\r\nx-request-id: ", request_id.encode("latin-1"), b"\r\n"]
    if key:
        lines.append(b"authorization: Bearer %s\r\n" % key.encode("latin-1"))
    client_auth = forward_client_auth and not key
    for name, value in client_headers:
        if name in _FORWARDED or (client_auth and name == b"authorization"):
            lines.append(b"%s: %s\r\n" % (name, value))
    return b"".join(lines)


def response_lines(worker_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A worker's response headers as lines for the client's response, minus hop-by-hop and framing ones."""
    dropped = _DROPPED
    lines = []
    for name, value in worker_headers:
        lower = name.lower()
        if lower == b"connection" and value.lower() not in (b"keep-alive", b"close"):
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
        lines.append((lower, name, value))
    return b"".join(b"%s: %s\r\n" % (name, value) for lower, name, value in lines if lower not in dropped)


def relay_response_headers(upstream: CIMultiDictProxy[str], extra: dict[str, str]) -> CIMultiDict[str]:
    """`response_lines` for an aiohttp answer (admin routes that proxy a worker): its headers minus hop-by-hop ones
    (also those its `Connection` header names), plus `extra`."""
    skip = HOP_BY_HOP
    connection = upstream.get("Connection")
    if connection is not None:
        skip = skip | {token.strip().lower() for token in connection.split(",")}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in skip:
            headers.add(name, value)
    headers.update(extra)
    return headers
