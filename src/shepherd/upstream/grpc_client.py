"""SGLang's `SglangScheduler` gRPC service, as the gateway calls it: one channel per worker, reused.

Imported only when a gRPC worker appears (`GrpcClients.get`), so an HTTP-only gateway never loads grpc.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from shepherd.upstream.grpc_pool import GrpcTls, grpc_target

_MiB = 1024 * 1024
# Keepalive the real servicer accepts: it permits pings without calls and at most one per 10 s.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 256 * _MiB),
    ("grpc.max_receive_message_length", 256 * _MiB),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
)
LOAD_SECTIONS = ("core", "disagg", "queues", "memory")
MAX_TOKENIZER_BUNDLE = 512 * _MiB  # a GetTokenizer zip larger than this is refused while it streams

# gRPC status -> HTTP status, as SMG maps them.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode | None) -> int:
    return _HTTP_STATUS.get(code, 500) if code is not None else 500


class TokenizerBundleError(Exception):
    """A worker's GetTokenizer stream was empty, unchecked or corrupt."""


class SglangClient:
    """The stub of one worker, on a channel created once and kept for the worker's lifetime."""

    def __init__(self, url: str, api_key: str | None = None, tls: GrpcTls | None = None) -> None:
        self.url = url
        target = grpc_target(url)
        if url.startswith("grpcs://"):
            tls = tls or GrpcTls()
            credentials = grpc.ssl_channel_credentials(tls.root_certificates, tls.private_key, tls.certificate_chain)
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.SglangSchedulerStub(self._channel)
        self.api_key: str | None = None
        self.metadata: tuple[tuple[str, str], ...] | None = None
        self.set_api_key(api_key)

    def set_api_key(self, api_key: str | None) -> None:
        """Send `Authorization: Bearer api_key` on every later call (PATCH /workers can change the key)."""
        self.api_key = api_key
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def health_check(self, timeout: float) -> tuple[bool, str]:
        """(healthy, message). Raises grpc.aio.AioRpcError when the RPC itself fails."""
        reply = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
        return reply.healthy, reply.message

    async def model_info(self, timeout: float) -> dict[str, Any]:
        reply = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def server_info(self, timeout: float) -> dict[str, Any]:
        reply = await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=self.metadata)
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def loads(self, timeout: float) -> dict[str, Any]:
        request = pb.GetLoadsRequest(include=LOAD_SECTIONS)
        reply = await self.stub.GetLoads(request, timeout=timeout, metadata=self.metadata)
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def tokenizer_bundle(self, timeout: float) -> tuple[bytes, str]:
        """The worker's zipped tokenizer directory and its SHA-256, verified (the last chunk carries the digest)."""
        parts: list[bytes] = []
        digest = ""
        call = self.stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=timeout, metadata=self.metadata)
        size = 0
        async for chunk in call:
            size += len(chunk.data)
            if size > MAX_TOKENIZER_BUNDLE:
                call.cancel()
                raise TokenizerBundleError(f"{self.url} sent a tokenizer bundle over {MAX_TOKENIZER_BUNDLE} bytes")
            parts.append(chunk.data)
            digest = chunk.sha256 or digest
        data = b"".join(parts)
        if not data or not digest:
            raise TokenizerBundleError(f"{self.url} sent no tokenizer bundle (or no SHA-256 for it)")
        if hashlib.sha256(data).hexdigest() != digest.lower():
            raise TokenizerBundleError(f"{self.url} sent a tokenizer bundle whose SHA-256 does not match")
        return data, digest

    def generate(self, request: pb.GenerateRequest, timeout: float) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def embed(self, request: pb.EmbedRequest, timeout: float) -> pb.EmbedResponse:
        return await self.stub.Embed(request, timeout=timeout, metadata=self.metadata)

    async def abort(self, request_id: str, reason: str, timeout: float = 5.0) -> None:
        """Best effort: the worker may already have finished (or forgotten) the request."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):  # UsageError: channel already closed
            await self.stub.Abort(
                pb.AbortRequest(request_id=request_id, reason=reason), timeout=timeout, metadata=self.metadata
            )

    async def flush_cache(self, timeout: float) -> tuple[bool, str]:
        reply = await self.stub.FlushCache(common_pb2.FlushCacheRequest(), timeout=timeout, metadata=self.metadata)
        return reply.success, reply.message

    async def close(self) -> None:
        await self._channel.close()
