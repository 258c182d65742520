"""`sglang.grpc.scheduler.SglangScheduler` of a simulated worker, with the message patterns of SGLang's servicer.

* `Generate` needs `tokenized.input_ids` (`INVALID_ARGUMENT "Tokenized input must be provided"`) and runs them
  through the worker's engine (prefix cache, latency model, DP rank, PD handshake). `stream=true`: one `chunk` per
  engine step (one id: that step's new token, cumulative token counts), and on the finishing step a `complete`
  whose `output_ids` repeat only that step's ids; `stream=false`: one `complete` with every id. With `n > 1` each
  choice carries its `index` and gets its own `complete`. What the ids are: `shepherd.sim.grpc_output`.
* Errors are statuses: an `error_status` fault maps like SGLang's HTTP-like scheduler statuses (`grpc_code`), an
  `Abort` ends the stream with `INTERNAL "Request aborted"`, a `disconnect_after_chunks` fault ends a stream with
  `INTERNAL` after N messages (a non-streaming call before its first). A client cancelling its call aborts the
  engine sequences too.
* `SubscribeKvEvents` (with `--kv-events`) streams each DP rank's prefix-cache snapshot, then its live KV event
  batches (`shepherd.sim.kv_events`), until the client cancels; without the flag it answers `UNIMPLEMENTED`.
* Every call is recorded in the worker's request log (`shepherd.sim.request_log.GrpcLogEntry`).

RPCs not implemented here (profiling, LoRA) answer `UNIMPLEMENTED`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from shepherd.sim.bpe import SimTokenizer
from shepherd.sim.engine import Sequence, SequenceGroup
from shepherd.sim.grpc_output import OutputPlan, plan_output
from shepherd.sim.kv_events import Subscriber
from shepherd.sim.parsing import check_context
from shepherd.sim.request_log import GrpcLogEntry
from shepherd.sim.tokenizer import Completion, fake_logprob
from shepherd.sim.wire import RequestError
from shepherd.sim.worker import SGLANG_VERSION, SimWorker

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
TOKENIZER_CHUNK_BYTES = 64 * 1024
EMBEDDING_DIM = 16

_Response = TypeVar("_Response", bound=Message)
_Context = grpc.aio.ServicerContext[Any, Any]

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def grpc_code(http_status: int) -> grpc.StatusCode:
    """The status SGLang's servicer gives a request the scheduler aborted with this HTTP-like status."""
    return _CODES.get(http_status, grpc.StatusCode.INTERNAL)


class RpcError(Exception):
    """Ends the call with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Call:
    """An in-flight `Generate`, found by `Abort` under its request id or (n > 1) its choices' ids "{rid}-{i}"."""

    def __init__(self, rid: str, n: int) -> None:
        self.ids = {rid, *(f"{rid}-{i}" for i in range(n))} if n > 1 else {rid}
        self.group: SequenceGroup | None = None
        self.aborted = asyncio.Event()

    def abort(self) -> None:
        self.aborted.set()
        if self.group is not None:
            self.group.abort()


class SchedulerServicer(pb_grpc.SglangSchedulerServicer):
    def __init__(self, worker: SimWorker, tokenizer: SimTokenizer, tokenizer_dir: Path) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self._calls: set[_Call] = set()

    @property
    def reported_tokenizer_path(self) -> str:
        return str(self.tokenizer_dir) if self.worker.config.tokenizer_path_in_info else ""

    # --- bookkeeping --------------------------------------------------------------------------------------------------

    def _record(self, method: str, request: Message, context: _Context) -> GrpcLogEntry:
        return self.worker.log.record_grpc(f"/{SERVICE}/{method}", context.invocation_metadata() or (), request)

    def _cancelled(self, entry: GrpcLogEntry) -> None:
        """The call ended without a status of ours: the client cancelled (or `refuse` stopped the server)."""
        if entry.status is None:
            entry.status = grpc.StatusCode.CANCELLED.name
            if not self.worker.faults.refuse:
                self.worker.log.mark_disconnected(entry)

    async def _unary(
        self,
        method: str,
        request: Message,
        context: _Context,
        handler: Callable[[], Awaitable[_Response]],
    ) -> _Response:
        entry = self._record(method, request, context)
        context.add_done_callback(lambda _: self._cancelled(entry))
        try:
            response = await handler()
        except RpcError as exc:
            entry.status = exc.code.name
            await context.abort(exc.code, exc.message)
        entry.status = grpc.StatusCode.OK.name
        return response

    async def _apply_faults(self, stream: bool) -> None:
        """Delay, hang or fail an inference call as the worker's faults dictate (as the HTTP routes do)."""
        faults = self.worker.faults
        if not faults.affects_inference:
            return
        status = await faults.before_inference()
        if status is not None:
            raise RpcError(grpc_code(status), f"Injected fault (status {status})")
        if faults.disconnect_after_chunks is not None and not stream:
            raise RpcError(grpc.StatusCode.INTERNAL, "Injected disconnect")

    # --- Generate -----------------------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: _Context) -> AsyncIterator[pb.GenerateResponse]:
        entry = self._record("Generate", request, context)
        call = _Call(request.request_id, max(1, request.sampling_params.n))
        self._calls.add(call)

        def done(_: object) -> None:
            self._calls.discard(call)
            call.abort()  # no-op once finished
            self._cancelled(entry)

        context.add_done_callback(done)
        try:
            async for response in self._generate(request, call, entry):
                yield response
        except RequestError as exc:
            entry.status = grpc_code(exc.status).name
            await context.abort(grpc_code(exc.status), exc.message)
        except RpcError as exc:
            entry.status = exc.code.name
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            done(None)
            raise
        else:
            entry.status = grpc.StatusCode.OK.name
        finally:
            call.abort()

    async def _generate(
        self, request: pb.GenerateRequest, call: _Call, entry: GrpcLogEntry
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not request.HasField("tokenized") or not request.tokenized.input_ids:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Tokenized input must be provided")
        worker, cfg = self.worker, self.worker.config
        prompt = list(request.tokenized.input_ids)
        params = request.sampling_params
        n = max(1, params.n)
        new_tokens = params.max_new_tokens if params.HasField("max_new_tokens") else cfg.max_new_tokens_default
        check_context([prompt], [new_tokens], cfg.context_length)
        stream = request.stream
        faults = worker.faults
        rooms = await self._unless_aborted(call, self._admit(request, stream))
        plans = [
            plan_output(self.tokenizer, prompt, params, cfg.max_new_tokens_default, cfg.seed, i, faults.output_text)
            for i in range(n)
        ]
        dp_rank = request.data_parallel_rank if request.HasField("data_parallel_rank") else None
        group = call.group = worker.start([(prompt, Completion.ids_only(plan.ids)) for plan in plans], dp_rank)
        messages = _Messages(request, plans)
        cut_after = faults.disconnect_after_chunks if stream else None
        sent = 0
        responses = self._stream(group, messages) if stream else self._complete(group, messages)
        async for response in responses:
            if cut_after is not None and sent >= cut_after:
                raise RpcError(grpc.StatusCode.INTERNAL, f"Injected disconnect after {sent} messages")
            yield response
            sent += 1
        if group.aborted:
            raise RpcError(grpc.StatusCode.INTERNAL, "Request aborted")
        worker.handshake.after(rooms)
        entry.choices = [
            {
                "index": seq.index,
                "output_ids": seq.output_ids,
                "finish_reason": plans[seq.index].finish(seq.generated)[0],
            }
            for seq in group.seqs
        ]

    async def _admit(self, request: pb.GenerateRequest, stream: bool) -> list[int]:
        """Faults, then the PD handshake; returns the request's bootstrap rooms."""
        await self._apply_faults(stream)
        body: dict[str, Any] = {}
        if request.HasField("disaggregated_params"):
            pd = request.disaggregated_params
            body = {
                "bootstrap_host": pd.bootstrap_host or None,
                "bootstrap_port": pd.bootstrap_port or None,
                "bootstrap_room": pd.bootstrap_room,
            }
        return await self.worker.handshake.before(body, None)

    async def _unless_aborted(self, call: _Call, work: Awaitable[list[int]]) -> list[int]:
        """Await `work` unless an `Abort` comes first (only raced when it can take a while: faults or PD)."""
        if not self.worker.faults.affects_inference and self.worker.config.role == "regular":
            return await work
        task = asyncio.ensure_future(work)
        aborted = asyncio.ensure_future(call.aborted.wait())
        try:
            await asyncio.wait((task, aborted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
            aborted.cancel()
        if call.aborted.is_set():
            if task.done() and not task.cancelled():
                task.exception()  # the abort wins over whatever the work ended with
            raise RpcError(grpc.StatusCode.INTERNAL, "Request aborted")
        return task.result()

    @staticmethod
    async def _stream(group: SequenceGroup, messages: _Messages) -> AsyncIterator[pb.GenerateResponse]:
        sent = [0] * len(group.seqs)
        async for seq in group.updates():
            ids = seq.output_ids
            for step in range(sent[seq.index], len(ids)):
                yield messages.chunk(seq, ids[step : step + 1], step + 1)
            sent[seq.index] = len(ids)
            if seq.finished:
                if not ids:  # max_new_tokens=0: the finishing step produced nothing
                    yield messages.chunk(seq, [], 0)
                yield messages.complete(seq, ids[-1:])

    @staticmethod
    async def _complete(group: SequenceGroup, messages: _Messages) -> AsyncIterator[pb.GenerateResponse]:
        await group.wait()
        if not group.aborted:
            for seq in group.seqs:
                yield messages.complete(seq, seq.output_ids)

    # --- Abort --------------------------------------------------------------------------------------------------------

    async def Abort(self, request: pb.AbortRequest, context: _Context) -> pb.AbortResponse:
        async def abort() -> pb.AbortResponse:
            rid = request.request_id
            matched = [call for call in self._calls if rid in call.ids]
            for call in matched:
                call.abort()
            if not matched:
                return pb.AbortResponse(success=False, message=f"Request {rid} not found")
            return pb.AbortResponse(success=True, message=f"Abort requested for {rid}")

        return await self._unary("Abort", request, context, abort)

    # --- Embed --------------------------------------------------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest, context: _Context) -> pb.EmbedResponse:
        async def embed() -> pb.EmbedResponse:
            if not request.HasField("tokenized") or not request.tokenized.input_ids:
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Tokenized input must be provided")
            await self._apply_faults(stream=False)
            ids = list(request.tokenized.input_ids)
            return pb.EmbedResponse(embedding_dim=EMBEDDING_DIM, embedding=embedding(ids), prompt_tokens=len(ids))

        return await self._unary("Embed", request, context, embed)

    # --- health, info, load, cache ------------------------------------------------------------------------------------

    async def HealthCheck(self, request: pb.HealthCheckRequest, context: _Context) -> pb.HealthCheckResponse:
        async def check() -> pb.HealthCheckResponse:
            status = self.worker.faults.health_status
            if status is not None and status >= 400:
                return pb.HealthCheckResponse(healthy=False, message=f"Injected health status {status}")
            return pb.HealthCheckResponse(healthy=True, message="OK")

        return await self._unary("HealthCheck", request, context, check)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: _Context) -> pb.GetModelInfoResponse:
        async def info() -> pb.GetModelInfoResponse:
            cfg, tok = self.worker.config, self.tokenizer
            return pb.GetModelInfoResponse(
                model_path=cfg.model,
                tokenizer_path=self.reported_tokenizer_path,
                is_generation=True,
                weight_version="default",
                served_model_name=cfg.model,
                max_context_length=cfg.context_length,
                vocab_size=tok.vocab_size,
                model_type="llama",
                eos_token_ids=list(tok.eos_ids),
                pad_token_id=tok.eos_id,
                bos_token_id=tok.eos_id,
                max_req_input_len=min(cfg.context_length, cfg.kv_tokens) - 1,
                architectures=["LlamaForCausalLM"],
                default_sampling_params_json=json.dumps(_DEFAULT_SAMPLING),
            )

        return await self._unary("GetModelInfo", request, context, info)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: _Context) -> pb.GetServerInfoResponse:
        async def info() -> pb.GetServerInfoResponse:
            worker = self.worker
            response = pb.GetServerInfoResponse(
                active_requests=sum(len(e.running) + len(e.waiting) for e in worker.engines),
                uptime_seconds=time.time() - worker.started_at,
                sglang_version=SGLANG_VERSION,
                server_type="grpc",
                start_time=_timestamp(worker.started_at),
                max_total_num_tokens=worker.config.kv_tokens,
            )
            response.server_args.update({**worker.server_info(), "tokenizer_path": self.reported_tokenizer_path})
            return response

        return await self._unary("GetServerInfo", request, context, info)

    async def GetLoads(self, request: pb.GetLoadsRequest, context: _Context) -> pb.GetLoadsResponse:
        async def loads() -> pb.GetLoadsResponse:
            return self._loads(request.dp_rank if request.HasField("dp_rank") else None)

        return await self._unary("GetLoads", request, context, loads)

    def _loads(self, only_rank: int | None) -> pb.GetLoadsResponse:
        worker, cfg = self.worker, self.worker.config
        stats = worker.stats
        loads = [
            pb.SchedulerLoad(
                dp_rank=rank,
                num_running_reqs=len(engine.running),
                num_waiting_reqs=len(engine.waiting),
                num_total_reqs=len(engine.running) + len(engine.waiting),
                num_used_tokens=engine.num_tokens,
                max_total_num_tokens=cfg.kv_tokens,
                token_usage=engine.token_usage,
                gen_throughput=stats.gen_throughput() / cfg.dp_size,  # the worker keeps one figure for all ranks
                cache_hit_rate=stats.cache_hit_rate,
                utilization=len(engine.running) / cfg.max_running_requests,
                max_running_requests=cfg.max_running_requests,
            )
            for rank, engine in enumerate(worker.engines)
            if only_rank is None or rank == only_rank
        ]
        count = max(1, len(loads))
        aggregate = pb.AggregateMetrics(
            total_running_reqs=sum(load.num_running_reqs for load in loads),
            total_waiting_reqs=sum(load.num_waiting_reqs for load in loads),
            total_reqs=sum(load.num_total_reqs for load in loads),
            avg_token_usage=sum(load.token_usage for load in loads) / count,
            avg_throughput=sum(load.gen_throughput for load in loads) / count,
            avg_utilization=sum(load.utilization for load in loads) / count,
        )
        return pb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version=SGLANG_VERSION,
            dp_rank_count=cfg.dp_size,
            loads=loads,
            aggregate=aggregate,
        )

    async def FlushCache(
        self, request: common_pb2.FlushCacheRequest, context: _Context
    ) -> common_pb2.FlushCacheResponse:
        async def flush() -> common_pb2.FlushCacheResponse:
            self.worker.flush_cache()
            return common_pb2.FlushCacheResponse(success=True, message="Cache flushed.")

        return await self._unary("FlushCache", request, context, flush)

    # --- tokenizer, KV events -----------------------------------------------------------------------------------------

    @cached_property
    def _tokenizer_bundle(self) -> bytes:
        return zip_directory(self.tokenizer_dir)

    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: _Context
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        entry = self._record("GetTokenizer", request, context)
        context.add_done_callback(lambda _: self._cancelled(entry))
        for chunk in tokenizer_chunks(self._tokenizer_bundle):
            yield chunk
        entry.status = grpc.StatusCode.OK.name

    async def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: _Context
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """With `--kv-events`: every DP rank's snapshot, then its live batches (`shepherd.sim.kv_events`), until the
        client cancels or the server stops. `start_sequence_number` is not replayed (no history is kept: the
        snapshot resyncs instead) and no `load` records are sent."""
        entry = self._record("SubscribeKvEvents", request, context)
        publishers = self.worker.kv_events
        if not publishers:
            entry.status = grpc.StatusCode.UNIMPLEMENTED.name
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV events are not published by this worker")
        context.add_done_callback(lambda _: self._cancelled(entry))
        queue: Subscriber = asyncio.Queue()
        for publisher in publishers:  # one synchronous step: no rank publishes in between
            publisher.subscribe(queue)
        try:
            while (batch := await queue.get()) is not None:
                yield batch
        finally:
            for publisher in publishers:
                publisher.unsubscribe(queue)
        entry.status = grpc.StatusCode.RESOURCE_EXHAUSTED.name
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV event subscriber fell too far behind")


class _Messages:
    """The `GenerateResponse`s of one request."""

    def __init__(self, request: pb.GenerateRequest, plans: list[OutputPlan]) -> None:
        self.rid = request.request_id
        self.logprobs = request.return_logprob
        self.plans = plans

    def chunk(self, seq: Sequence, ids: list[int], completion_tokens: int) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=self.rid,
            chunk=pb.GenerateStreamChunk(
                token_ids=ids,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=completion_tokens,
                cached_tokens=seq.cached_tokens,
                output_logprobs=self._logprobs(ids),
                index=seq.index,
            ),
        )

    def complete(self, seq: Sequence, ids: list[int]) -> pb.GenerateResponse:
        finish_reason, matched = self.plans[seq.index].finish(seq.generated)
        return pb.GenerateResponse(
            request_id=self.rid,
            complete=pb.GenerateComplete(
                output_ids=ids,
                finish_reason=finish_reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=seq.generated,
                cached_tokens=seq.cached_tokens,
                output_logprobs=self._logprobs(seq.output_ids),
                matched_token_id=matched,
                index=seq.index,
            ),
        )

    def _logprobs(self, ids: list[int]) -> pb.OutputLogProbs | None:
        if not self.logprobs:
            return None
        return pb.OutputLogProbs(token_logprobs=[fake_logprob(t) for t in ids], token_ids=ids)


def embedding(ids: list[int]) -> list[float]:
    """A deterministic unit vector of `EMBEDDING_DIM` floats derived from the token ids."""
    digest = hashlib.shake_128(struct.pack(f"<{len(ids)}I", *ids)).digest(2 * EMBEDDING_DIM)
    raw = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{EMBEDDING_DIM}H", digest)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


def zip_directory(directory: Path) -> bytes:
    """The files of `directory` as a zip (names at the root, fixed timestamps: the same bytes every time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            bundle.writestr(info, path.read_bytes())
    return buffer.getvalue()


def tokenizer_chunks(bundle: bytes) -> list[common_pb2.GetTokenizerChunk]:
    """`GetTokenizer`'s messages: 64 KiB pieces, the last one carrying the SHA-256 (hex) of the whole zip."""
    digest = hashlib.sha256(bundle).hexdigest()
    offsets = range(0, len(bundle), TOKENIZER_CHUNK_BYTES)
    return [
        common_pb2.GetTokenizerChunk(
            data=bundle[offset : offset + TOKENIZER_CHUNK_BYTES],
            sha256=digest if offset + TOKENIZER_CHUNK_BYTES >= len(bundle) else "",
        )
        for offset in offsets
    ]


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
