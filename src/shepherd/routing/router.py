"""Regular (non-PD) routing: pick a worker, send, retry on the worker's failures, relay the answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from shepherd.config import GatewayConfig
from shepherd.http.errors import GatewayError, all_workers_unavailable, error_body, no_workers_for_model
from shepherd.http.middleware import STREAM_STARTED
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.attempt import AttemptFailure, attempt_status
from shepherd.routing.context import RequestContext
from shepherd.routing.policies import Policy
from shepherd.upstream.client import UpstreamClient, forward_request_headers, relay_response_headers
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.relay import relay_sse
from shepherd.upstream.retry import RETRYABLE_STATUSES, Backoff, is_worker_fault
from shepherd.urls import display_url
from shepherd.workers.load import Lease
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerType

if TYPE_CHECKING:
    from shepherd.routing.grpc_dispatch import GrpcDispatcher

GrpcDispatcherSource = Callable[[], "GrpcDispatcher"]  # created on first use: grpc is imported only then

log = logging.getLogger(__name__)

_STREAM_INTERRUPTED = (
    b"data: "
    + error_body(502, "upstream_stream_interrupted", "The worker closed the stream before it finished")
    + b"\n\n"
)


class Router:
    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        client: UpstreamClient,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        grpc: GrpcDispatcherSource | None = None,
    ) -> None:
        self.registry = registry
        self._grpc = grpc
        self._metrics = metrics
        self.policy = policy
        self._client = client
        self._config = config
        self._max_attempts = config.retry.max_attempts
        self._backoff = Backoff(config.retry)
        self._timeout = aiohttp.ClientTimeout(total=config.request_timeout_secs)
        registry.subscribe(on_removed=policy.on_worker_removed)

    def select(self, ctx: RequestContext, tried: Sequence[Worker] = ()) -> Worker:
        """Pick a routable worker for `ctx`, preferring ones not tried yet; 404/503 when there is none."""
        return choose_worker(self.registry, WorkerType.REGULAR, self.policy, ctx, tried)

    async def dispatch(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        tried: list[Worker] = []
        failure: AttemptFailure | None = None
        metrics = self._metrics
        started = time.perf_counter()
        if self._grpc is not None and self.registry.has_grpc(ctx.model):
            await self._grpc().prepare_routing(ctx, self.registry.candidates(WorkerType.REGULAR, ctx.model))
        for attempt in range(self._max_attempts):
            if attempt:
                metrics.record_retry(WorkerType.REGULAR, ctx.endpoint)
                await asyncio.sleep(self._backoff.delay_secs(attempt - 1))
            try:
                worker = self.select(ctx, tried)
            except GatewayError:
                if failure is None:
                    raise
                break  # every worker went away mid-retry: report what the last one did
            tried.append(worker)
            attempt_started = time.perf_counter()
            result = await self._attempt(request, ctx, worker, attempt == self._max_attempts - 1, started)
            metrics.worker_cells(worker).record(attempt_status(result), time.perf_counter() - attempt_started)
            if not isinstance(result, AttemptFailure):
                return result
            failure = result
        assert failure is not None
        return self._failure_response(failure, ctx)

    async def _attempt(
        self, request: web.Request, ctx: RequestContext, worker: Worker, last: bool, started: float
    ) -> web.StreamResponse | AttemptFailure:
        """One try on `worker`; `started` is when dispatch began (time to first token counts from there)."""
        if self._grpc is not None and is_grpc_url(worker.base_url):
            return await self._grpc().attempt(request, ctx, worker, last, started, self.policy)
        headers = worker_request_headers(request, ctx, worker, self._config.api_key)
        body = ctx.body if worker.dp_rank is None else ctx.inject({"data_parallel_rank": worker.dp_rank})
        url = worker.upstream_url(ctx.endpoint.upstream_path)
        breaker = worker.breaker
        with Lease(worker) as lease:
            try:
                async with self._client.session.post(
                    url, data=body, headers=headers, timeout=self._timeout
                ) as upstream:
                    status = upstream.status
                    if status >= 400:
                        payload = await upstream.read()
                        if is_worker_fault(status):
                            breaker.record_failure()
                        elif status != 429:
                            breaker.record_success()
                        self.policy.on_request_done(worker, ctx, False)
                        if status in RETRYABLE_STATUSES and not last:
                            return AttemptFailure(worker, status, payload, upstream.headers)
                        return self._worker_response(worker, ctx, status, payload, upstream.headers)
                    if ctx.stream:  # its outcome is known only once the relay ends
                        response, ok = await self._relay_stream(request, ctx, worker, upstream, started)
                    else:
                        payload = await upstream.read()
                        response, ok = self._worker_response(worker, ctx, status, payload, upstream.headers), True
                        breaker.record_success()
                    lease.ok = ok
                    self.policy.on_request_done(worker, ctx, ok)
                    return response
            except TimeoutError:
                breaker.record_failure()
                self.policy.on_request_done(worker, ctx, False)
                shown = display_url(str(url))
                return AttemptFailure(worker, transport_error=f"timed out calling {shown}", timed_out=True)
            except aiohttp.ClientError as exc:
                breaker.record_failure()
                self.policy.on_request_done(worker, ctx, False)
                shown = display_url(str(url))
                return AttemptFailure(worker, transport_error=f"error sending request to {shown}: {exc}")

    async def _relay_stream(
        self,
        request: web.Request,
        ctx: RequestContext,
        worker: Worker,
        upstream: aiohttp.ClientResponse,
        started: float,
    ) -> tuple[web.StreamResponse, bool]:
        """Relay SSE chunks as they arrive; returns the response and whether the worker finished its stream.

        After the first byte nothing can be retried. The breaker learns the outcome here: a worker that cuts its
        streams is failing, whatever status its headers said; a client that leaves is nobody's fault.
        """
        out = web.StreamResponse(
            status=upstream.status,
            headers=relay_response_headers(upstream.headers, self._routing_headers(worker, ctx)),
        )
        try:
            await out.prepare(request)
        except ConnectionResetError:  # the client left before the first byte
            return out, True
        request[STREAM_STARTED] = out
        outcome = await relay_sse(upstream, out, _STREAM_INTERRUPTED)
        if outcome.broken:
            worker.breaker.record_failure()
            log.warning(
                "worker %s broke stream %s",
                worker.url,
                ctx.request_id,
                extra={"request_id": ctx.request_id, "worker": worker.url, "status": upstream.status},
            )
        elif not outcome.client_gone:
            worker.breaker.record_success()
        self._metrics.record_relay(worker, ctx.endpoint, started, outcome)
        return out, not outcome.broken

    def _worker_response(
        self, worker: Worker, ctx: RequestContext, status: int, payload: bytes, headers: object
    ) -> web.Response:
        return web.Response(
            status=status,
            body=payload,
            headers=relay_response_headers(headers, self._routing_headers(worker, ctx)),  # type: ignore[arg-type]
        )

    @staticmethod
    def _routing_headers(worker: Worker, ctx: RequestContext) -> dict[str, str]:
        return {"x-smg-routed-worker-id": worker.url, "x-request-id": ctx.request_id}

    def _failure_response(self, failure: AttemptFailure, ctx: RequestContext) -> web.Response:
        if failure.status is not None:
            return self._worker_response(failure.worker, ctx, failure.status, failure.body, failure.headers)
        if failure.timed_out:
            raise GatewayError(504, "call_upstream_timeout", f"Upstream worker {failure.transport_error}")
        raise GatewayError(502, "call_upstream_connection_failed", f"Upstream worker {failure.transport_error}")


def worker_request_headers(
    request: web.Request, ctx: RequestContext, worker: Worker, gateway_api_key: str | None
) -> dict[str, str]:
    """`forward_request_headers` for `worker`, without any Authorization when the worker's URL carries credentials
    of its own (aiohttp sends those as Basic auth, and refuses a second Authorization header)."""
    headers = forward_request_headers(request.headers, ctx.request_id, worker.api_key, gateway_api_key)
    if worker.userinfo:
        headers.pop("Authorization", None)
    return headers


def choose_worker(
    registry: Registry, worker_type: WorkerType, policy: Policy, ctx: RequestContext, avoid: Sequence[Worker] = ()
) -> Worker:
    """The policy's pick among routable workers of a type for `ctx`, avoiding `avoid` while others remain.

    No candidate at all: 404 when nothing of this type serves the model (or, for regular workers, nothing is
    registered), 503 when workers exist but none is routable right now (unhealthy, draining, circuit open).
    """
    candidates = registry.candidates(worker_type, ctx.model)
    if not candidates:
        if not registry.of_type(worker_type) and worker_type is not WorkerType.REGULAR:
            raise GatewayError(
                503,
                "no_available_workers",
                f"No {worker_type.value} workers available: PD mode needs at least one prefill and one decode worker",
                headers={"retry-after": "1"},
            )
        if registry.awaiting_tokenizer(ctx.model):
            raise GatewayError(
                503,
                "tokenizer_not_ready",
                f"gRPC workers serve model '{ctx.model or 'unknown'}', but its tokenizer is not loaded (yet): "
                "see GET /v1/tokenizers",
                headers={"retry-after": "1"},
            )
        if not registry.of_type(worker_type) or (ctx.model is not None and not registry.serves(worker_type, ctx.model)):
            raise no_workers_for_model(ctx.model)
        raise all_workers_unavailable(worker_type)
    if avoid:
        fresh = [w for w in candidates if w not in avoid]
        if fresh:
            candidates = fresh
    return policy.pick(candidates, ctx)
