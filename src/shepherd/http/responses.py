"""Small response helpers shared by the route handlers."""

from __future__ import annotations

import orjson

from shepherd.exchange import Response


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)
