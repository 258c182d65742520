"""Health of a `grpc://` worker, asked with the standard `grpc.health.v1.Health/Check` RPC.

The worker is healthy when it answers SERVING for the overall server (service name ""). Each probe opens
its own channel: probes are seconds apart, and a fresh channel means a dead worker is really dialled
again rather than judged by a cached connection state. grpc is imported on first use, so gateways without
gRPC workers do not pay its import time.
"""

from __future__ import annotations

from urllib.parse import urlsplit

GRPC_SCHEMES = ("grpc://", "grpcs://")


class GrpcHealthError(Exception):
    """The worker is not SERVING; the message says what it answered or why it could not be asked."""


def is_grpc_url(url: str) -> bool:
    return url.startswith(GRPC_SCHEMES)


def grpc_target(url: str) -> str:
    """`host:port` (IPv6 hosts in brackets) from a `grpc://` or `grpcs://` URL."""
    return urlsplit(url).netloc


async def check_grpc_health(url: str, timeout_secs: float, api_key: str | None = None) -> None:
    """Raise GrpcHealthError unless the worker at `url` reports SERVING within `timeout_secs`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = grpc_target(url)
    channel = (
        grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
        if url.startswith("grpcs://")
        else grpc.aio.insecure_channel(target)
    )
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_secs, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise GrpcHealthError(f"{exc.code().name}: {exc.details()}") from None
    finally:
        await channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise GrpcHealthError(f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
