"""`--control-plane-audit-enabled`: one structured line per control-plane request, on the `shepherd.audit` logger.

Fields (separate JSON keys with `--log-json`): principal, principal_name, auth_method, role, method, route,
target, status, outcome, request_id. Never a key, a token, a request body or URL userinfo.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlsplit

import orjson

from shepherd.exchange import Request
from shepherd.http.route_policy import RouteClass
from shepherd.security.access import PRINCIPAL
from shepherd.security.principals import ANONYMOUS

log = logging.getLogger("shepherd.audit")

_MAX_FIELD = 256
_MAX_BODY = 64 * 1024  # registration bodies are small; larger ones are not parsed for a target


async def audit(request: Request, route_class: RouteClass, status: int, request_id: str) -> None:
    principal = request.get(PRINCIPAL, ANONYMOUS)
    target = _target(request) or await _body_target(request)
    outcome = "denied" if status in (401, 403) else "ok" if status < 400 else "failed"
    fields = {
        "audit": True,
        "principal": _clean(principal.id),
        "principal_name": _clean(principal.name),
        "auth_method": principal.method,
        "role": principal.role,
        "route_class": route_class.value,
        "method": request.method,
        "route": request.route.template or request.path,
        "target": target,
        "status": status,
        "outcome": outcome,
        "request_id": request_id,
    }
    log.info(
        "audit: %s (%s, %s) %s %s target=%s -> %d %s",
        fields["principal"],
        principal.method,
        principal.role or "no role",
        request.method,
        fields["route"],
        target or "-",
        status,
        outcome,
        extra=fields,
    )


def _target(request: Request) -> str | None:
    """The worker or tokenizer named in the path (`/workers/{id}`), or a legacy `?url=`."""
    for value in request.match_info.values():
        return _clean(unquote(value))
    url = request.query.get("url")
    return _clean(url) if url else None


async def _body_target(request: Request) -> str | None:
    """`url` or `name` of a JSON body, only if the handler already read it (a denied request's body is never read)."""
    if not request.body_read:
        return None
    raw = await request.read()  # the handler's cached copy, no I/O
    if len(raw) > _MAX_BODY:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    value = body.get("url") or body.get("name")
    return _clean(value) if isinstance(value, str) else None


def _clean(text: str) -> str:
    """Userinfo, query and fragment dropped from URLs; control characters escaped (no log injection); bounded."""
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = parts.netloc.rpartition("@")[2]
            text = f"{parts.scheme}://{host}{parts.path}"
        except ValueError:
            text = text.partition("://")[0] + "://<unparsable>"
    elif "@" in text:  # a bare user:password@host:port
        text = text.rpartition("@")[2]
    text = text[:_MAX_FIELD]
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
