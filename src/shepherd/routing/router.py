"""Regular (non-PD) routing: pick a worker, send, retry on the worker's failures, relay the answer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError, all_workers_unavailable, error_body, no_workers_for_model
from shepherd.exchange import STREAM_STARTED, Request, Response, StreamResponse
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.attempt import AttemptFailure, attempt_status
from shepherd.routing.context import RequestContext
from shepherd.routing.dispatch import DispatchLoop, WorkerCall, record_verdict
from shepherd.routing.engine_tokens import TokenizerFor, route_by_engine_tokens
from shepherd.routing.policies import Policy
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.headers import response_lines
from shepherd.upstream.pool import UpstreamError, UpstreamResponse, UpstreamTimeout
from shepherd.upstream.relay import relay_sse, reported_cached_tokens
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


class Router(DispatchLoop[Worker]):
    """Regular routing: each attempt goes to one worker the policy picks, avoiding the ones that already failed."""

    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        call: WorkerCall,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        grpc: GrpcDispatcherSource | None = None,
        tokenizer_for: TokenizerFor | None = None,
    ) -> None:
        super().__init__(config, metrics)
        self.registry = registry
        self._grpc = grpc
        self._tokenizer_for = tokenizer_for  # HTTP engines publishing KV events: their requests are matched by ids
        self.policy = policy
        self._call = call
        registry.subscribe(on_removed=policy.on_worker_removed)

    async def prepare(self, ctx: RequestContext) -> None:
        await match_by_tokens(ctx, self.registry, WorkerType.REGULAR, self.policy, self._grpc, self._tokenizer_for)

    def select(self, ctx: RequestContext, failures: Sequence[AttemptFailure] = ()) -> Worker:
        """Pick a routable worker for `ctx`, preferring ones that have not failed it; 404/503 when there is none."""
        return choose_worker(self.registry, WorkerType.REGULAR, self.policy, ctx, [f.worker for f in failures])

    def explain(self, ctx: RequestContext) -> dict[str, Any]:
        return {"regular": self.policy.explain(routable(self.registry, WorkerType.REGULAR, ctx), ctx)}

    def record(self, worker: Worker, result: Response | StreamResponse | AttemptFailure, seconds: float) -> None:
        self._metrics.worker_cells(worker).record(attempt_status(result), seconds)

    async def attempt(
        self, request: Request, ctx: RequestContext, worker: Worker, last: bool, started: float
    ) -> Response | StreamResponse | AttemptFailure:
        """One try on `worker`; `started` is when dispatch began (time to first token counts from there)."""
        if self._grpc is not None and is_grpc_url(worker.base_url):
            return await self._grpc().attempt(request, ctx, worker, last, started, self.policy)
        body = ctx.body if worker.dp_rank is None else ctx.inject({"data_parallel_rank": worker.dp_rank})
        call = self._call
        with Lease(worker) as lease:
            deadline = call.deadline()
            upstream = await call.open(request, ctx, worker, body)
            if isinstance(upstream, AttemptFailure):
                record_verdict(upstream)
                self.policy.on_request_done(worker, ctx, False)
                return upstream
            if ctx.stream:  # its outcome is known only once the relay ends
                response, ok, cached = await self._relay_stream(request, ctx, worker, upstream, started, deadline)
            else:
                try:
                    payload = await call.read_body(upstream, deadline)
                except UpstreamError as exc:
                    worker.breaker.record_failure()
                    self.policy.on_request_done(worker, ctx, False)
                    return AttemptFailure(
                        worker, transport_error=f"{exc} ({worker.url})", timed_out=isinstance(exc, UpstreamTimeout)
                    )
                response, ok = worker_response(worker, ctx, upstream.status, payload, upstream.headers), True
                worker.breaker.record_success()
                cached = reported_cached_tokens(payload) if self.policy.reads_cached_tokens else None
            lease.ok = ok
            self.policy.on_request_done(worker, ctx, ok, cached)
            return response

    async def _relay_stream(
        self,
        request: Request,
        ctx: RequestContext,
        worker: Worker,
        upstream: UpstreamResponse,
        started: float,
        deadline: float,
    ) -> tuple[StreamResponse, bool, int | None]:
        """Relay SSE chunks as they arrive; returns the response, whether the worker finished its stream, and the
        `cached_tokens` it reported.

        After the first byte nothing can be retried. The breaker learns the outcome here: a worker that cuts its
        streams is failing, whatever status its headers said; a client that leaves is nobody's fault.
        """
        out = StreamResponse(
            status=upstream.status, headers=routing_headers(worker, ctx), raw_headers=relayed_head(upstream.headers)
        )
        try:
            await out.prepare(request)
        except ConnectionResetError:  # the client left before the first byte
            upstream.abort()
            return out, True, None
        request[STREAM_STARTED] = out
        policy = self.policy
        outcome = await relay_sse(
            upstream,
            out,
            _STREAM_INTERRUPTED,
            deadline,
            read_cached_tokens=policy.reads_cached_tokens,
            on_first_chunk=partial(policy.on_first_token, worker, ctx),
        )
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
        return out, not outcome.broken, outcome.cached_tokens

    def give_up(self, failure: AttemptFailure, ctx: RequestContext) -> Response:
        if failure.status is not None:
            return worker_response(failure.worker, ctx, failure.status, failure.body, failure.headers)
        if failure.timed_out:
            raise GatewayError(504, "call_upstream_timeout", f"Upstream worker {failure.transport_error}")
        raise GatewayError(502, "call_upstream_connection_failed", f"Upstream worker {failure.transport_error}")


def relayed_head(headers: object) -> bytes:
    """A worker's end-to-end headers, as lines for the client's response."""
    if isinstance(headers, list):
        return response_lines(headers)
    items = headers.items() if isinstance(headers, Mapping) else ()  # gRPC answers: a mapping the gateway built
    return "".join(f"{k}: {v}\r\n" for k, v in items).encode("latin-1")


def routing_headers(worker: Worker, ctx: RequestContext) -> dict[str, str]:
    return {"x-smg-routed-worker-id": worker.url, "x-request-id": ctx.request_id}


def worker_response(worker: Worker, ctx: RequestContext, status: int, payload: bytes, headers: object) -> Response:
    return Response(
        status=status, body=payload, headers=routing_headers(worker, ctx), raw_headers=relayed_head(headers)
    )


async def match_by_tokens(
    ctx: RequestContext,
    registry: Registry,
    role: WorkerType,
    policy: Policy,
    grpc: GrpcDispatcherSource | None,
    tokenizer_for: TokenizerFor | None,
) -> None:
    """Before `policy` picks a worker of `role`: let it match the prompt's token ids where the engines work with
    them (gRPC workers are tokenized anyway; HTTP ones whose engines publish KV events, for routing only)."""
    if grpc is not None and registry.has_grpc(ctx.model):
        await grpc().prepare_routing(ctx, registry.candidates(role, ctx.model))
    elif tokenizer_for is not None and policy.reads_kv_events and registry.publishes_kv_events(role, ctx.model):
        await route_by_engine_tokens(ctx, registry.candidates(role, ctx.model), tokenizer_for)


def choose_worker(
    registry: Registry, worker_type: WorkerType, policy: Policy, ctx: RequestContext, avoid: Sequence[Worker] = ()
) -> Worker:
    """The policy's pick among routable workers of a type for `ctx`, avoiding `avoid` while others remain."""
    candidates = routable(registry, worker_type, ctx)
    if avoid:
        fresh = [w for w in candidates if w not in avoid]
        if fresh:
            candidates = fresh
    return policy.pick(candidates, ctx)


def routable(registry: Registry, worker_type: WorkerType, ctx: RequestContext) -> Sequence[Worker]:
    """The workers of a type that can take `ctx` now.

    None at all: 404 when nothing of this type serves the model (or, for regular workers, nothing is registered and
    no registration is under way), 503 when workers exist but none is routable right now (unhealthy, draining,
    circuit open) or none is registered yet while registrations are under way (a gateway starting).
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
        if not registry.of_type(worker_type) and registry.registrations_pending:
            raise GatewayError(
                503,
                "no_available_workers",
                f"No worker is registered yet: {registry.registrations_pending} registration(s) under way",
                headers={"retry-after": "1"},
            )
        if not registry.of_type(worker_type) or (ctx.model is not None and not registry.serves(worker_type, ctx.model)):
            raise no_workers_for_model(ctx.model)
        raise all_workers_unavailable(worker_type)
    return candidates
