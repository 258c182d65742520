"""Header hygiene on the hot path, as pre-serialized bytes: what goes to a worker, and what of its answer goes back.

Only a short allow-list of client headers reaches a worker (cookies, user agents and the like stay here); of a
worker's answer every header goes back except hop-by-hop ones (also those its `Connection` header names), the
framing headers (the gateway frames its own response) and the routing headers the gateway sets itself.
"""

from __future__ import annotations

from collections.abc import Iterable

_FORWARDED = (b"traceparent", b"tracestate", b"x-smg-routing-key")
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        b"x-request-id",
        b"x-smg-routed-worker-id",
    }
)


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
