"""Prefill-decode disaggregation: one request goes to a (prefill, decode) pair at the same time.

Both workers get the same body plus the bootstrap fields that let the decode worker fetch the prefill's KV cache:
`bootstrap_host` (the prefill's host), `bootstrap_port` (its bootstrap port or null) and `bootstrap_room` (a random
63-bit id; one per item for batch requests). The client gets the decode worker's answer; the prefill's is drained,
and only read for `input_token_logprobs` when the client asked for logprobs. Either side failing aborts the other,
counts against that side's breaker and retries the pair, re-selected.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import orjson

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError, error_body
from shepherd.exchange import STREAM_STARTED, Request, Response, StreamResponse
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.attempt import AttemptFailure
from shepherd.routing.context import CHAT, COMPLETIONS, GENERATE, RequestContext
from shepherd.routing.dispatch import DispatchLoop, WorkerCall, record_verdict
from shepherd.routing.engine_tokens import TokenizerFor
from shepherd.routing.policies import Policy
from shepherd.routing.router import (
    GrpcDispatcherSource,
    choose_worker,
    match_by_tokens,
    relayed_head,
    routable,
    routing_headers,
    worker_response,
)
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.pool import UpstreamError, UpstreamResponse, UpstreamTimeout
from shepherd.upstream.relay import relay_sse
from shepherd.workers.load import Lease
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerType

_MAX_ROOM = 2**63 - 1
PD_ENDPOINTS = (GENERATE, CHAT, COMPLETIONS)
_SSE_DATA = b"data: "
_DECODE_STREAM_BROKEN = (
    _SSE_DATA
    + error_body(502, "decode_stream_interrupted", "The decode worker closed the stream before it finished")
    + b"\n\n"
)
_ERROR_KINDS = {500: "internal_error", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}
PrefillLogprobs = dict[int, list[Any]]  # batch item index (0 for a single request) -> input_token_logprobs


class PDRouter(DispatchLoop[tuple[Worker, Worker]]):
    """Each attempt goes to a (prefill, decode) pair; only the side that failed is avoided on the next one."""

    def __init__(
        self,
        registry: Registry,
        prefill_policy: Policy,
        decode_policy: Policy,
        call: WorkerCall,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        grpc: GrpcDispatcherSource | None = None,
        tokenizer_for: TokenizerFor | None = None,
    ) -> None:
        super().__init__(config, metrics)
        self.registry = registry
        self._grpc = grpc
        self._tokenizer_for = tokenizer_for
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self._call = call
        self._rng = random.Random()
        registry.subscribe(on_removed=prefill_policy.on_worker_removed)
        registry.subscribe(on_removed=decode_policy.on_worker_removed)

    async def prepare(self, ctx: RequestContext) -> None:
        """The prefill side decides where the prompt is cached: its engines' ids, when they work with ids."""
        policy = self.prefill_policy
        await match_by_tokens(ctx, self.registry, WorkerType.PREFILL, policy, self._grpc, self._tokenizer_for)

    def select(self, ctx: RequestContext, failures: Sequence[AttemptFailure] = ()) -> tuple[Worker, Worker]:
        """Pick a pair; workers that already failed this request are avoided while their role has others."""
        failed_prefills = [f.worker for f in failures if f.side == "prefill"]
        failed_decodes = [f.worker for f in failures if f.side == "decode"]
        prefill = choose_worker(self.registry, WorkerType.PREFILL, self.prefill_policy, ctx, failed_prefills)
        decode = choose_worker(self.registry, WorkerType.DECODE, self.decode_policy, ctx, failed_decodes)
        return prefill, decode

    def explain(self, ctx: RequestContext) -> dict[str, Any]:
        return {
            "prefill": self.prefill_policy.explain(routable(self.registry, WorkerType.PREFILL, ctx), ctx),
            "decode": self.decode_policy.explain(routable(self.registry, WorkerType.DECODE, ctx), ctx),
        }

    async def attempt(
        self, request: Request, ctx: RequestContext, pair: tuple[Worker, Worker], last: bool, started: float
    ) -> StreamResponse | AttemptFailure:
        if self._grpc is not None and any(is_grpc_url(w.base_url) for w in pair):
            return await self._grpc_attempt(request, ctx, *pair, last, started)
        return await self._attempt(request, ctx, *pair, started)

    def give_up(self, failure: AttemptFailure, ctx: RequestContext) -> Response:
        raise _pd_error(failure)

    async def _grpc_attempt(
        self, request: Request, ctx: RequestContext, prefill: Worker, decode: Worker, last: bool, started: float
    ) -> StreamResponse | AttemptFailure:
        if not (is_grpc_url(prefill.base_url) and is_grpc_url(decode.base_url)):
            raise GatewayError(
                500, "mixed_pd_protocols", "A PD pair must be both HTTP or both gRPC workers: register them alike"
            )
        assert self._grpc is not None
        first_token = partial(self.first_token, ctx, (prefill, decode))
        result = await self._grpc().pd_attempt(request, ctx, prefill, decode, last, started, first_token)
        ok = not isinstance(result, AttemptFailure)
        self.prefill_policy.on_request_done(prefill, ctx, ok)
        self.decode_policy.on_request_done(decode, ctx, ok and result.status < 400)
        if not ok:
            result.side = "prefill" if result.worker is prefill else "decode"
        return result

    def record(
        self, pair: tuple[Worker, Worker], result: Response | StreamResponse | AttemptFailure, seconds: float
    ) -> None:
        """Per-worker request counts and latency for both sides of one attempt."""
        metrics = self._metrics
        for worker in pair:
            if not isinstance(result, AttemptFailure):
                status = result.status
            elif result.worker is worker:
                status = result.status or (504 if result.timed_out else 502)
            else:
                status = 499  # aborted because the other side failed
            metrics.worker_cells(worker).record(status, seconds)

    async def _attempt(
        self, request: Request, ctx: RequestContext, prefill: Worker, decode: Worker, started: float
    ) -> StreamResponse | AttemptFailure:
        fields = self._bootstrap_fields(ctx, prefill)
        prefill_body, decode_body = (ctx.inject(_with_rank(fields, worker)) for worker in (prefill, decode))
        want_logprobs = ctx.payload.get("return_logprob") is True
        deadline = self._call.deadline()
        with Lease(decode) as decode_lease:  # the prefill's lease lives in its own task, as long as its call
            prefill_task = self._start_prefill(request, ctx, prefill, prefill_body, want_logprobs, deadline)
            decode_task = asyncio.ensure_future(self._open_decode(request, ctx, decode, decode_body))
            answered = False
            try:
                await asyncio.wait((prefill_task, decode_task), return_when=asyncio.FIRST_COMPLETED)
                if prefill_task.done() and isinstance(prefill_task.result(), AttemptFailure):
                    return self._record(prefill_task.result(), ctx)  # the finally clause aborts the decode
                opened = await decode_task
                if isinstance(opened, AttemptFailure):
                    return self._record(opened, ctx)  # the finally clause aborts the prefill
                upstream = opened
                decode_ok = True
                if ctx.stream and not want_logprobs:
                    # Relay decode tokens at once; the prefill's outcome is only recorded.
                    response, decode_ok = await self._relay(
                        request, ctx, (prefill, decode), upstream, None, started, deadline
                    )
                else:
                    prefill_result = await prefill_task
                    if isinstance(prefill_result, AttemptFailure):
                        return self._record(prefill_result, ctx)
                    if ctx.stream:
                        response, decode_ok = await self._relay(
                            request, ctx, (prefill, decode), upstream, prefill_result, started, deadline
                        )
                    else:
                        payload = await self._call.read_body(upstream, deadline)
                        response = self._merged_response(ctx, decode, upstream, payload, prefill_result)
                answered = True
            except UpstreamError as exc:
                failure = AttemptFailure(
                    decode, transport_error=str(exc), timed_out=isinstance(exc, UpstreamTimeout), side="decode"
                )
                return self._record(failure, ctx)
            finally:
                if not answered:
                    await _abort(prefill_task, decode_task)
            # From here on nothing awaits: a client that leaves once it has its answer cannot cut the bookkeeping.
            if prefill_task.done():
                self._settle_prefill(prefill, ctx, prefill_task.result())
            else:  # a stream finished before the prefill's own answer was drained: settle it when it is
                prefill_task.add_done_callback(
                    lambda task: None if task.cancelled() else self._settle_prefill(prefill, ctx, task.result())
                )
            if decode_ok:
                decode.breaker.record_success()
                decode_lease.ok = True
                self.decode_policy.on_request_done(decode, ctx, True)
            else:  # the stream broke after it started: counted against the decode, nothing left to retry
                self._record(AttemptFailure(decode, transport_error="stream interrupted", side="decode"), ctx)
            return response

    def _settle_prefill(
        self, prefill: Worker, ctx: RequestContext, result: PrefillLogprobs | AttemptFailure | None
    ) -> None:
        """Record the prefill side of an answered request (a failure there can no longer be retried)."""
        if isinstance(result, AttemptFailure):
            self._record(result, ctx)
        else:
            prefill.breaker.record_success()
            self.prefill_policy.on_request_done(prefill, ctx, True)

    async def _open_decode(
        self, request: Request, ctx: RequestContext, decode: Worker, body: bytes
    ) -> UpstreamResponse | AttemptFailure:
        """Send to the decode worker and wait for its response head (a failure is read whole)."""
        opened = await self._call.open(request, ctx, decode, body)
        if isinstance(opened, AttemptFailure):
            opened.side = "decode"
        return opened

    def _start_prefill(
        self, request: Request, ctx: RequestContext, prefill: Worker, body: bytes, want_logprobs: bool, deadline: float
    ) -> asyncio.Task[PrefillLogprobs | AttemptFailure | None]:
        """Start the prefill call. Its load counts from now (dispatch) until the call ends, which may be after the
        client already has its stream: the lease is released by the task's completion, however it completes."""
        lease = Lease(prefill)
        lease.__enter__()
        task = asyncio.ensure_future(self._call_prefill(request, ctx, prefill, body, want_logprobs, lease, deadline))
        task.add_done_callback(lambda _task: lease.__exit__(None, None, None))
        return task

    async def _call_prefill(
        self,
        request: Request,
        ctx: RequestContext,
        prefill: Worker,
        body: bytes,
        want_logprobs: bool,
        lease: Lease,
        deadline: float,
    ) -> PrefillLogprobs | AttemptFailure | None:
        """Send to the prefill worker and drain its answer; returns its input logprobs when asked for."""
        opened = await self._call.open(request, ctx, prefill, body)
        if isinstance(opened, AttemptFailure):
            opened.side = "prefill"
            return opened
        try:
            payload = await self._call.read_body(opened, deadline)
        except UpstreamError as exc:
            timed_out = isinstance(exc, UpstreamTimeout)
            return AttemptFailure(prefill, transport_error=str(exc), timed_out=timed_out, side="prefill")
        finally:
            opened.abort()  # a no-op once the body was read and the connection went back to the pool
        lease.ok = True
        return _input_logprobs(payload) if want_logprobs else None

    def _record(self, failure: AttemptFailure, ctx: RequestContext) -> AttemptFailure:
        """A side failed (after its call returned): the breaker's verdict and the policy's bookkeeping."""
        record_verdict(failure)
        policy = self.prefill_policy if failure.side == "prefill" else self.decode_policy
        policy.on_request_done(failure.worker, ctx, False)
        return failure

    def _bootstrap_fields(self, ctx: RequestContext, prefill: Worker) -> dict[str, Any]:
        host = urlsplit(prefill.base_url).hostname
        port = prefill.bootstrap_port
        batch = batch_size(ctx)
        if batch is None:
            return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": self._room()}
        return {
            "bootstrap_host": [host] * batch,
            "bootstrap_port": [port] * batch,
            "bootstrap_room": [self._room() for _ in range(batch)],
        }

    def _room(self) -> int:
        return self._rng.getrandbits(63) & _MAX_ROOM

    async def _relay(
        self,
        request: Request,
        ctx: RequestContext,
        pair: tuple[Worker, Worker],
        upstream: UpstreamResponse,
        prefill_logprobs: PrefillLogprobs | None,
        started: float,
        deadline: float,
    ) -> tuple[StreamResponse, bool]:
        """Relay the decode's stream; returns the response and whether the decode finished it."""
        decode = pair[1]
        out = StreamResponse(
            status=upstream.status, headers=routing_headers(decode, ctx), raw_headers=relayed_head(upstream.headers)
        )
        try:
            await out.prepare(request)
        except ConnectionResetError:  # the client left before the first byte
            upstream.abort()
            return out, True
        request[STREAM_STARTED] = out
        rewrite = (lambda line: _prepend_logprobs_to_frame(line, prefill_logprobs)) if prefill_logprobs else None
        outcome = await relay_sse(
            upstream, out, _DECODE_STREAM_BROKEN, deadline, rewrite, on_first_chunk=partial(self.first_token, ctx, pair)
        )
        self._metrics.record_relay(decode, ctx.endpoint, started, outcome)
        return out, not outcome.broken

    def first_token(self, ctx: RequestContext, pair: tuple[Worker, Worker]) -> None:
        """The decode side's first token: the pair's prefill is over on both sides."""
        self.prefill_policy.on_first_token(pair[0], ctx)
        self.decode_policy.on_first_token(pair[1], ctx)

    def _merged_response(
        self,
        ctx: RequestContext,
        decode: Worker,
        upstream: UpstreamResponse,
        payload: bytes,
        prefill_logprobs: PrefillLogprobs | None,
    ) -> Response:
        if prefill_logprobs:
            payload = _prepend_logprobs(payload, prefill_logprobs)
        return worker_response(decode, ctx, upstream.status, payload, upstream.headers)


def _with_rank(fields: dict[str, Any], worker: Worker) -> dict[str, Any]:
    """DP-aware ranks are addressed through the body, separately for each side of the pair."""
    return fields if worker.dp_rank is None else {**fields, "data_parallel_rank": worker.dp_rank}


async def _abort(prefill_task: asyncio.Future, decode_task: asyncio.Future) -> None:
    """Cancel whatever side is still running and release the decode response."""
    for task in (prefill_task, decode_task):
        if not task.done():
            task.cancel()
    await asyncio.gather(prefill_task, decode_task, return_exceptions=True)
    if not decode_task.cancelled() and isinstance(decode_task.result(), UpstreamResponse):
        decode_task.result().abort()


def batch_size(ctx: RequestContext) -> int | None:
    """Items in a batch request, or None for a single request."""
    payload = ctx.payload
    if ctx.endpoint is GENERATE:
        ids = payload.get("input_ids")
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return len(ids)
        text = payload.get("text")
        return len(text) if isinstance(text, list) else None
    if ctx.endpoint is COMPLETIONS:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return len(prompt)
        return None
    n = payload.get("n")
    return n if isinstance(n, int) and n > 1 else None


def _input_logprobs(payload: bytes) -> PrefillLogprobs:
    """The prefill's `meta_info.input_token_logprobs` per batch item (of the last SSE frame with them, for streams).

    The body's shape decides, not the request's `stream` flag: a prefill may answer a streamed request with one JSON
    body (an object, or an array for a batch) instead of SSE frames.
    """
    found: PrefillLogprobs = {}
    if payload.lstrip()[:1] in (b"{", b"["):
        data = _loads(payload)
        for index, item in enumerate(data if isinstance(data, list) else [data]):
            logprobs = _logprobs_of(item)
            if logprobs is not None:
                found[index] = logprobs
        return found
    for line in payload.split(b"\n"):
        if line.startswith(_SSE_DATA) and b"input_token_logprobs" in line:
            item = _loads(line[len(_SSE_DATA) :])
            logprobs = _logprobs_of(item)
            if logprobs is not None:
                found[_item_index(item)] = logprobs
    return found


def _logprobs_of(item: Any) -> list[Any] | None:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("input_token_logprobs"), list):
        return meta["input_token_logprobs"]
    return None


def _item_index(item: Any) -> int:
    """A stream frame's batch item (SGLang sets `index` in batch streams)."""
    index = item.get("index") if isinstance(item, dict) else None
    return index if isinstance(index, int) else 0


def _prepend_logprobs(payload: bytes, prefill_logprobs: PrefillLogprobs) -> bytes:
    data = _loads(payload)
    if data is None:
        return payload
    for index, item in enumerate(data if isinstance(data, list) else [data]):
        _merge_into(item, prefill_logprobs.get(index))
    return orjson.dumps(data)


def _merge_into(item: Any, prefill: list[Any] | None) -> None:
    decode = _logprobs_of(item)
    if prefill is not None and decode is not None:
        item["meta_info"]["input_token_logprobs"] = prefill + decode


def _prepend_logprobs_to_frame(line: bytes, prefill_logprobs: PrefillLogprobs) -> bytes:
    if not line.startswith(_SSE_DATA) or b"input_token_logprobs" not in line:
        return line
    item = _loads(line[len(_SSE_DATA) :])
    if item is None:
        return line
    _merge_into(item, prefill_logprobs.get(_item_index(item)))
    return _SSE_DATA + orjson.dumps(item) + b"\n"


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _pd_error(failure: AttemptFailure) -> GatewayError:
    """The client's one error: which side failed, which worker, and how (code `<side>_<kind>`)."""
    side, url = failure.side, failure.worker.url
    if failure.status is not None:
        kind = _ERROR_KINDS.get(failure.status, "error")
        message = f"{side} worker {url} answered {failure.status}: {_worker_message(failure.body)}"
        return GatewayError(failure.status, f"{side}_{kind}", message)
    if failure.timed_out:
        return GatewayError(504, f"{side}_timeout", f"{side} worker {url} timed out")
    return GatewayError(502, f"{side}_unreachable", f"{side} worker {url} is unreachable: {failure.transport_error}")


def _worker_message(body: bytes) -> str:
    """The worker's own error message (`error.message` of an OpenAI-style body), else its body as text."""
    data = _loads(body)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return body.decode("utf-8", "replace")
