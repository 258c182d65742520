"""The dispatch loop regular and PD routing share: select, attempt, record, retry with backoff, give up.

A router says what one attempt is (one worker, or a prefill-decode pair) by implementing `select`, `attempt` and
`give_up`; the loop, the retry budget, the backoff and the per-attempt metrics are here once. `WorkerCall` is the
other shared piece: one HTTP call to one worker through the keep-alive pool, with its lease, breaker verdict and
timeouts, used by both routers for every side of every attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shepherd.errors import GatewayError
from shepherd.routing.attempt import AttemptFailure
from shepherd.routing.context import INFERENCE_ENDPOINTS, RequestContext
from shepherd.upstream.headers import request_lines
from shepherd.upstream.pool import UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout
from shepherd.upstream.retry import Backoff, is_worker_fault
from shepherd.urls import display_url
from shepherd.workers.worker import Worker

if TYPE_CHECKING:
    from shepherd.config import GatewayConfig
    from shepherd.exchange import Request, Response, StreamResponse
    from shepherd.observability.metrics import GatewayMetrics
    from shepherd.workers.registry import Registry

Target = TypeVar("Target")  # what one attempt goes to: a Worker, or a (prefill, decode) pair
_TARGETS = {endpoint.upstream_path: endpoint.upstream_path.encode() for endpoint in INFERENCE_ENDPOINTS}


class DispatchLoop(Generic[Target]):
    """Retries an attempt on other targets while its failure is retryable and the budget lasts."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        self._max_attempts = config.retry.max_attempts
        self._backoff = Backoff(config.retry)

    async def dispatch(self, request: Request, ctx: RequestContext) -> Response | StreamResponse:
        try:
            return await self._dispatch(request, ctx)
        finally:
            ctx.release_pending()  # whatever ended it: an attempt that raised is charged to no worker any more

    async def _dispatch(self, request: Request, ctx: RequestContext) -> Response | StreamResponse:
        failures: list[AttemptFailure] = []
        started = time.perf_counter()
        await self.prepare(ctx)
        last_attempt = self._max_attempts - 1
        for attempt in range(self._max_attempts):
            if failures:
                self._metrics.record_retry(failures[-1].worker.worker_type, ctx.endpoint)
                await asyncio.sleep(self._backoff.delay_secs(attempt - 1))
            try:
                target = self.select(ctx, failures)
            except GatewayError:
                if not failures:
                    raise
                break  # every worker went away mid-retry: report what the last one did
            ctx.forget_routing_text()
            attempt_started = time.perf_counter()
            result = await self.attempt(request, ctx, target, attempt == last_attempt, started)
            self.record(target, result, time.perf_counter() - attempt_started)
            if not isinstance(result, AttemptFailure):
                return result
            failures.append(result)
            if not result.retryable:
                break
        return self.give_up(failures[-1], ctx)

    async def prepare(self, ctx: RequestContext) -> None:
        """Work done once per request before the first attempt (gRPC workers: tokenize for routing)."""

    def select(self, ctx: RequestContext, failures: Sequence[AttemptFailure]) -> Target:
        raise NotImplementedError

    def explain(self, ctx: RequestContext) -> dict[str, Any]:
        """What the first attempt's `select` would choose for `ctx` and why, per worker role; changes nothing."""
        raise NotImplementedError

    async def attempt(
        self, request: Request, ctx: RequestContext, target: Target, last: bool, started: float
    ) -> Response | StreamResponse | AttemptFailure:
        raise NotImplementedError

    def record(self, target: Target, result: Response | StreamResponse | AttemptFailure, seconds: float) -> None:
        raise NotImplementedError

    def give_up(self, failure: AttemptFailure, ctx: RequestContext) -> Response:
        raise NotImplementedError


def record_verdict(failure: AttemptFailure) -> None:
    """What a failed call tells the worker's breaker: transport failures and 5xx/408 count against it, 429 is
    neutral, other 4xx are the client's doing (the worker is fine)."""
    status = failure.status
    if status is None or is_worker_fault(status):
        failure.worker.breaker.record_failure()
    elif status != 429:
        failure.worker.breaker.record_success()


class WorkerCall:
    """One HTTP request to one worker through the pool: the worker's target, credentials and the timeouts.

    `open` returns the worker's response once its head arrived (2xx/3xx), or an AttemptFailure with the body of a
    4xx/5xx or the transport error (the caller records the breaker's verdict: `record_verdict`).
    """

    def __init__(self, pool: UpstreamPool, config: GatewayConfig, registry: Registry) -> None:
        self._pool = pool
        self._gateway_key = config.api_key
        self._request_timeout = config.request_timeout_secs
        http = config.http
        self._first_byte = min(http.upstream_first_byte_timeout_secs or self._request_timeout, self._request_timeout)
        self._stream_idle = http.stream_idle_timeout_secs
        self._registry = registry
        registry.subscribe(on_removed=self._forget)

    def deadline(self) -> float:
        """When an attempt started now must be over (time.monotonic): --request-timeout-secs."""
        return time.monotonic() + self._request_timeout

    async def open(
        self, request: Request, ctx: RequestContext, worker: Worker, body: bytes
    ) -> UpstreamResponse | AttemptFailure:
        origin = self._pool.origin(worker.base_url)
        target = _TARGETS[ctx.endpoint.upstream_path]
        key = None if worker.userinfo else (worker.api_key or self._gateway_key)
        lines = request_lines(request.raw_headers, ctx.request_id, key, forward_client_auth=not worker.userinfo)
        try:
            upstream = await self._pool.request(
                origin, b"POST", target, lines, body, first_byte_timeout=self._first_byte
            )
        except UpstreamTimeout as exc:
            return AttemptFailure(
                worker, transport_error=f"timed out ({exc.phase}) calling {self._shown(worker, ctx)}", timed_out=True
            )
        except UpstreamError as exc:
            return AttemptFailure(worker, transport_error=f"error sending request to {self._shown(worker, ctx)}: {exc}")
        upstream.idle_timeout = self._stream_idle
        status = upstream.status
        if status < 400:
            return upstream
        try:
            payload = await upstream.read()
        except UpstreamError as exc:
            upstream.abort()
            return AttemptFailure(worker, transport_error=f"error reading from {self._shown(worker, ctx)}: {exc}")
        upstream.release()
        return AttemptFailure(worker, status, payload, upstream.headers)

    async def read_body(self, upstream: UpstreamResponse, deadline: float) -> bytes:
        """A non-streamed answer, whole; the attempt's deadline is checked between chunks (each gap is bounded by
        the stream idle timeout)."""
        parts = []
        async for piece in upstream:
            parts.append(piece)
            if time.monotonic() > deadline:
                upstream.abort()
                raise UpstreamTimeout("idle", "the attempt ran past --request-timeout-secs")
        upstream.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _forget(self, worker: Worker) -> None:
        if not self._registry.at_base_url(worker.base_url):  # DP ranks share their engine's connections
            self._pool.discard(worker.base_url)

    @staticmethod
    def _shown(worker: Worker, ctx: RequestContext) -> str:
        return display_url(worker.base_url + ctx.endpoint.upstream_path)
