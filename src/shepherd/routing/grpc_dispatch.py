"""One attempt of an inference request on SGLang gRPC workers: tokenize once, call `Generate`, answer the client.

The router keeps the loop (selection, retries, breaker, metrics); this module does what differs from an HTTP
worker. Before the first message of a call nothing has reached the client, so a failure there is an
`AttemptFailure` the router may retry elsewhere (429/503-class; 400 never). A non-streaming call is read whole
before answering, so the same holds for it throughout. Once an SSE stream has begun, a failure ends it with an
error frame and `[DONE]`.

A call the client abandons is both cancelled (RST_STREAM) and aborted with `Abort{request_id}`: the engine stops
either way, whichever path the servicer notices first.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc
import orjson

from shepherd.errors import GatewayError, error_body
from shepherd.exchange import STREAM_STARTED, Request, Response, StreamResponse
from shepherd.routing.attempt import AttemptFailure, is_failure
from shepherd.routing.context import CHAT, COMPLETIONS, EMBEDDINGS, GENERATE, InvalidRequest, RequestContext
from shepherd.upstream.grpc_client import SglangClient, http_status
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.relay import RelayOutcome
from shepherd.upstream.retry import RETRYABLE_STATUSES, is_worker_fault
from shepherd.workers.load import Lease
from shepherd.workers.worker import Worker

if TYPE_CHECKING:
    from smg_grpc_proto import sglang_scheduler_pb2 as pb

    from shepherd.config import GatewayConfig
    from shepherd.generation import GenerationPlan, ResponseBuilder
    from shepherd.observability.metrics import GatewayMetrics
    from shepherd.routing.policies import Policy
    from shepherd.tokenizer.loader import LoadedTokenizer
    from shepherd.upstream.grpc_pool import GrpcClients

log = logging.getLogger(__name__)

_KINDS = {GENERATE: "generate", CHAT: "chat", COMPLETIONS: "completions"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_JSON = "application/json"
_DEFAULT_BOOTSTRAP_PORT = 8998
_START_FAILED = "start_generation_failed"
_MAX_ROOM = 2**31 - 1


class GrpcDispatcher:
    def __init__(
        self,
        tokenizer_for: Callable[[str | None], LoadedTokenizer | None],
        clients: GrpcClients,
        config: GatewayConfig,
        metrics: GatewayMetrics,
    ) -> None:
        self._tokenizer_for = tokenizer_for
        self._clients = clients
        self._config = config
        self._metrics = metrics
        self._timeout = config.request_timeout_secs
        self._aborts: set[asyncio.Task] = set()
        self._rng = random.Random()

    # --- planning ------------------------------------------------------------------------------------------
    async def plan(self, ctx: RequestContext, worker: Worker) -> GenerationPlan:
        """The request's GenerateRequest for `worker`'s model, built (tokenized) once however many attempts it takes."""
        cached = ctx.generation
        if cached is not None and cached[0] == worker.model_id:
            return cached[1]
        from shepherd.generation import build_plan
        from shepherd.tokenizer.loader import OFF_LOOP_BYTES

        kind = _KINDS.get(ctx.endpoint)
        if kind is None:
            raise GatewayError(501, "not_implemented", f"{ctx.endpoint.path} is not served by gRPC workers")
        tokenizer = self._tokenizer(worker)
        args = (kind, ctx.payload, tokenizer, self.request_id(ctx), _defaults(worker))
        try:
            plan = await asyncio.to_thread(build_plan, *args) if len(ctx.body) > OFF_LOOP_BYTES else build_plan(*args)
        except InvalidRequest as exc:  # chat template failures included
            raise GatewayError(400, exc.code, str(exc), param=exc.param) from None
        ctx.generation = (worker.model_id, plan)
        return plan

    async def prepare_routing(self, ctx: RequestContext, candidates: Sequence[Worker]) -> None:
        """Before a policy picks among gRPC workers: tokenize now, and let cache-aware routing match token ids."""
        if ctx.endpoint not in _KINDS:
            return
        grpc_workers = [w for w in candidates if is_grpc_url(w.base_url)]
        if not grpc_workers or len({w.model_id for w in grpc_workers}) > 1:
            return  # no model named and several served: each has its own tokenizer, so match on the text
        worker = grpc_workers[0]
        try:
            plan = await self.plan(ctx, worker)
        except GatewayError:
            return  # the request's error is the gRPC attempt's to report, if a gRPC worker is picked
        ctx.route_by_tokens(plan.prompt_ids)

    def _tokenizer(self, worker: Worker) -> LoadedTokenizer:
        tokenizer = self._tokenizer_for(worker.model_id)
        if tokenizer is None:
            raise GatewayError(
                503,
                "tokenizer_not_found",
                f"No tokenizer is loaded for model '{worker.model_id}'",
                headers={"retry-after": "1"},
            )
        return tokenizer

    @staticmethod
    def request_id(ctx: RequestContext) -> str:
        """The id the engine knows the request by (and `Abort` names): the client's id plus a unique suffix."""
        return f"{ctx.request_id}-{uuid.uuid4().hex}"

    # --- regular workers -----------------------------------------------------------------------------------
    async def attempt(
        self, request: Request, ctx: RequestContext, worker: Worker, last: bool, started: float, policy: Policy
    ) -> StreamResponse | AttemptFailure:
        if ctx.endpoint is EMBEDDINGS:
            return await self._embed(ctx, worker, last)
        plan = await self.plan(ctx, worker)
        generate = _copy(plan.request)
        generate.request_id = self.request_id(ctx)  # a fresh id per attempt: a late Abort of the last one misses it
        if worker.dp_rank is not None:
            generate.data_parallel_rank = worker.dp_rank
        client = self._client(worker)
        builder = plan.new_response(ctx.model or worker.model_id, int(time.time()))
        with Lease(worker) as lease:
            first_token = partial(policy.on_first_token, worker, ctx)
            result = await self._run(request, ctx, worker, client, generate, builder, last, started, first_token)
            lease.ok = not is_failure(result)
            cached = builder.cached_tokens if lease.ok and policy.reads_cached_tokens else None
            policy.on_request_done(worker, ctx, lease.ok, cached)
            return result

    # --- PD pairs ------------------------------------------------------------------------------------------
    async def pd_attempt(
        self,
        request: Request,
        ctx: RequestContext,
        prefill: Worker,
        decode: Worker,
        last: bool,
        started: float,
        first_token: Callable[[], None],
    ) -> StreamResponse | AttemptFailure:
        """The same request, with the prefill's bootstrap address, to both workers at once; the decode side
        answers the client, and `first_token` is called when its first answer arrives. The prefill's stream is
        drained in the background and only recorded."""
        plan = await self.plan(ctx, decode)
        base = _copy(plan.request)
        base.request_id = self.request_id(ctx)
        params = base.disaggregated_params
        params.bootstrap_host = _host(prefill.base_url)
        params.bootstrap_port = prefill.bootstrap_port or _DEFAULT_BOOTSTRAP_PORT
        params.bootstrap_room = self._rng.randint(0, _MAX_ROOM)
        prefill_req, decode_req = _copy(base), _copy(base)
        for req, worker in ((prefill_req, prefill), (decode_req, decode)):
            if worker.dp_rank is not None:
                req.data_parallel_rank = worker.dp_rank
        prefill_client, decode_client = self._client(prefill), self._client(decode)
        with Lease(prefill) as prefill_lease, Lease(decode) as decode_lease:
            prefill_call = prefill_client.generate(prefill_req, self._timeout)
            drained = asyncio.ensure_future(_drain(prefill_call))
            try:
                builder = plan.new_response(ctx.model or decode.model_id, int(time.time()))
                result = await self._run(
                    request, ctx, decode, decode_client, decode_req, builder, last, started, first_token
                )
                prefill_error = await drained if not is_failure(result) else None
            finally:
                if not drained.done():
                    prefill_call.cancel()
                    self._abort(prefill_client, prefill_req.request_id)
            if prefill_error is not None:
                prefill.breaker.record_failure()
                log.warning("prefill %s failed request %s: %s", prefill.url, ctx.request_id, prefill_error)
            elif not is_failure(result):
                prefill.breaker.record_success()
            prefill_lease.ok = prefill_error is None and not is_failure(result)
            decode_lease.ok = not is_failure(result)
            return result

    # --- one call ------------------------------------------------------------------------------------------
    async def _run(
        self,
        request: Request,
        ctx: RequestContext,
        worker: Worker,
        client: SglangClient,
        generate: pb.GenerateRequest,
        builder: ResponseBuilder,
        last: bool,
        started: float,
        first_token: Callable[[], None],
    ) -> StreamResponse | AttemptFailure:
        """One Generate call; `first_token` is called when its first answer arrives (the prompt's prefill is over)."""
        call = client.generate(generate, self._timeout)
        finished = False
        try:
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                finished = True
                return self._start_failure(worker, ctx, exc, last)
            first_token()
            if builder.plan.stream:
                response = await self._stream(request, ctx, worker, call, builder, first, started)
            else:
                response = await self._collect(worker, ctx, call, builder, first, last)
            finished = True
            return response
        finally:
            if not finished:  # the client left (or something failed) with the call still open
                call.cancel()
                self._abort(client, generate.request_id)

    async def _collect(
        self,
        worker: Worker,
        ctx: RequestContext,
        call: grpc.aio.UnaryStreamCall,
        builder: ResponseBuilder,
        first: pb.GenerateResponse,
        last: bool,
    ) -> StreamResponse | AttemptFailure:
        message = first
        try:
            while message is not grpc.aio.EOF:
                builder.feed(message)
                message = await call.read()
        except grpc.aio.AioRpcError as exc:
            return self._start_failure(worker, ctx, exc, last)
        worker.breaker.record_success()
        return Response(body=builder.finish(), content_type=_JSON, headers=_routing_headers(worker, ctx))

    async def _stream(
        self,
        request: Request,
        ctx: RequestContext,
        worker: Worker,
        call: grpc.aio.UnaryStreamCall,
        builder: ResponseBuilder,
        first: pb.GenerateResponse,
        started: float,
    ) -> StreamResponse:
        out = StreamResponse(headers={**_SSE_HEADERS, **_routing_headers(worker, ctx)})
        await out.prepare(request)
        request[STREAM_STARTED] = out
        first_chunk_at = time.perf_counter()
        events = 0
        broken = False
        message = first
        try:
            while message is not grpc.aio.EOF:
                data = builder.feed(message)
                if data:
                    await out.write(data)
                    events += 1
                message = await call.read()
            await out.write(builder.finish())
        except grpc.aio.AioRpcError as exc:
            broken = True
            worker.breaker.record_failure()
            log.warning("worker %s broke stream %s: %s", worker.url, ctx.request_id, exc.details())
            await out.write(builder.error_frame(exc.details() or exc.code().name))
        except ConnectionResetError:  # the client left: nobody's fault on the worker's side
            self._metrics.record_relay(worker, ctx.endpoint, started, RelayOutcome(first_chunk_at, events, False, True))
            raise
        if not broken:
            worker.breaker.record_success()
        self._metrics.record_relay(worker, ctx.endpoint, started, RelayOutcome(first_chunk_at, events, broken))
        await out.write_eof()
        return out

    def _start_failure(
        self, worker: Worker, ctx: RequestContext, exc: grpc.aio.AioRpcError, last: bool
    ) -> Response | AttemptFailure:
        """A call that failed before the client saw anything: a retryable AttemptFailure or the client's error."""
        status = http_status(exc.code())
        if exc.code() is grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
            worker.breaker.record_failure()
            return AttemptFailure(worker, transport_error=f"error connecting to {worker.url}: {exc.details()}")
        if is_worker_fault(status):
            worker.breaker.record_failure()
        elif status != 429:
            worker.breaker.record_success()
        body = error_body(status, _START_FAILED, f"Failed to start generation: {exc.details()}")
        headers = {"Content-Type": _JSON, "x-smg-error-code": _START_FAILED}
        if status in RETRYABLE_STATUSES and not last:
            return AttemptFailure(worker, status, body, headers)
        return Response(status=status, body=body, headers={**headers, **_routing_headers(worker, ctx)})

    # --- embeddings ----------------------------------------------------------------------------------------
    async def _embed(self, ctx: RequestContext, worker: Worker, last: bool) -> Response | AttemptFailure:
        from shepherd.generation import build_embed_request, embedding_body

        tokenizer = self._tokenizer(worker)
        try:
            embed = build_embed_request(ctx.payload, tokenizer, self.request_id(ctx))
        except InvalidRequest as exc:
            raise GatewayError(400, exc.code, str(exc), param=exc.param) from None
        if worker.dp_rank is not None:
            embed.data_parallel_rank = worker.dp_rank
        with Lease(worker) as lease:
            try:
                reply = await self._client(worker).embed(embed, self._timeout)
            except grpc.aio.AioRpcError as exc:
                return self._start_failure(worker, ctx, exc, last)
            worker.breaker.record_success()
            lease.ok = True
        fmt = ctx.payload.get("encoding_format") or "float"
        body = embedding_body(reply, ctx.model or worker.model_id, fmt)
        return Response(body=body, content_type=_JSON, headers=_routing_headers(worker, ctx))

    # --- helpers -------------------------------------------------------------------------------------------
    def _client(self, worker: Worker) -> SglangClient:
        return self._clients.get(worker.base_url, worker.api_key or self._config.api_key)

    def _abort(self, client: SglangClient, request_id: str) -> None:
        """Fire-and-forget `Abort`, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(client.abort(request_id, "Stream dropped"))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)


async def _drain(call: grpc.aio.UnaryStreamCall) -> str | None:
    """Read a call to its end; the error text if it failed."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return None


def _copy(message: pb.GenerateRequest) -> pb.GenerateRequest:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _defaults(worker: Worker) -> dict | None:
    """The worker's `default_sampling_params_json` (from GetModelInfo), which fills fields a request omits."""
    raw = worker.labels.get("default_sampling_params_json")
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _routing_headers(worker: Worker, ctx: RequestContext) -> dict[str, str]:
    return {"x-smg-routed-worker-id": worker.url, "x-request-id": ctx.request_id}
