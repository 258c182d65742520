"""The outcome of one attempt that did not answer the client, shared by the HTTP, PD and gRPC paths."""

from __future__ import annotations

from dataclasses import dataclass

from shepherd.exchange import Response, StreamResponse
from shepherd.upstream.retry import RETRYABLE_STATUSES
from shepherd.workers.worker import Worker


@dataclass(slots=True)
class AttemptFailure:
    """Why one attempt did not produce the client's response; the last one becomes the client's error."""

    worker: Worker
    status: int | None = None  # the worker's status when it answered
    body: bytes = b""
    headers: object = None  # the worker's headers: (name, value) byte pairs, or a mapping (gRPC)
    transport_error: str | None = None
    timed_out: bool = False
    side: str = ""  # PD: "prefill" or "decode"

    @property
    def retryable(self) -> bool:
        """Transport failures and 408/429/5xx may succeed elsewhere; other answers would be the same anywhere."""
        return self.status is None or self.status in RETRYABLE_STATUSES


def attempt_status(result: Response | StreamResponse | AttemptFailure) -> int:
    """The status an attempt ended with, transport failures as the gateway reports them (502/504)."""
    if isinstance(result, AttemptFailure):
        if result.status is not None:
            return result.status
        return 504 if result.timed_out else 502
    return result.status


def is_failure(result: Response | StreamResponse | AttemptFailure) -> bool:
    """Whether an attempt failed, whether or not its failure became the client's answer."""
    return isinstance(result, AttemptFailure) or result.status >= 400
