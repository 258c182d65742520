"""The one JSON error envelope: {"error": {"message", "type", "code", "param"}}.

Gateway errors also carry `x-smg-error-code`, as SMG does, so clients and dashboards can tell them from
errors a worker returned.
"""

from __future__ import annotations

import orjson

from shepherd.exchange import Response
from shepherd.workers.worker import WorkerType

_TYPE_BY_STATUS = {429: "rate_limit_error"}


class GatewayError(Exception):
    """Raised anywhere in request handling; rendered by the error middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type(status), "code": code, "param": param}})


def error_response(error: GatewayError) -> Response:
    headers = {"x-smg-error-code": error.code}
    if error.headers:
        headers.update(error.headers)
    return Response(
        status=error.status,
        body=error_body(error.status, error.code, error.message, error.param),
        content_type="application/json",
        headers=headers,
    )


def no_workers_for_model(model: str | None) -> GatewayError:
    return GatewayError(404, "model_not_found", f"No worker available for model '{model or 'unknown'}'")


def all_workers_unavailable(worker_type: WorkerType = WorkerType.REGULAR) -> GatewayError:
    role = "" if worker_type is WorkerType.REGULAR else f"{worker_type.value} "
    return GatewayError(
        503,
        "no_available_workers",
        f"All {role}workers are unavailable (circuit breaker open or unhealthy)",
        headers={"retry-after": "1"},
    )
