"""The gRPC listener of a `shepherd sim --grpc` worker.

The worker port serves `sglang.grpc.scheduler.SglangScheduler` (`shepherd.sim.grpc_scheduler`) and the standard
`grpc.health.v1` service, with the options SGLang's gRPC server sets. As with a real SGLang gRPC engine, its
Prometheus metrics are served over HTTP on the derived sidecar port (observability/sidecar_address.py): the worker's
whole HTTP app, `/metrics`, `/__ctl` and `/__log` included, listens there, so tests can see what reached it.

The `refuse` fault stops the gRPC server (in-flight calls are cancelled, new connections refused) and clearing it
starts a new one on the same port; the sidecar keeps listening, so the fault can be cleared through it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2_grpc

from shepherd.observability.sidecar_address import sidecar_port
from shepherd.sim.faults import FaultState
from shepherd.sim.grpc_scheduler import SERVICE, SchedulerServicer

_BIND_ATTEMPTS = 20  # with OS-chosen gRPC ports, the derived sidecar port may be taken: pick again
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),  # not SGLang's: a port still held by another process must fail to bind
)


class _FaultAwareHealth(health_pb2_grpc.HealthServicer):
    """`grpc.health.v1`: service "" (liveness) and the scheduler service (readiness), NOT_SERVING while a
    `health_status` fault >= 400 is set; other services are NOT_FOUND."""

    def __init__(self, faults: FaultState) -> None:
        self._faults = faults

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        status = self._faults.health_status
        serving = status is None or status < 400
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )


def server_credentials(cert_path: str, key_path: str, client_ca_path: str | None) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with `client_ca_path`, clients must present a certificate that CA signed (mTLS)."""
    key, chain = Path(key_path).read_bytes(), Path(cert_path).read_bytes()
    client_ca = Path(client_ca_path).read_bytes() if client_ca_path else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class GrpcListener:
    """One worker's gRPC server on a fixed port, which can be stopped and started again (`refuse`)."""

    def __init__(
        self, host: str, servicer: SchedulerServicer, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self._host = host
        self._credentials = credentials  # None: plaintext
        self._target_host = f"[{host}]" if ":" in host else host
        self._servicer = servicer
        self._health = _FaultAwareHealth(servicer.worker.faults)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def _bind(self, port: int) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self._target_host}:{port}"
        if self._credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self._credentials)
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {port} on {self._target_host}")
        self.port = bound
        return server

    async def start(self) -> None:
        """Serve again on the port of the last start (no-op while serving)."""
        if self._server is None:
            self._server = self._bind(self.port)
            await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(None)

    async def start_with_sidecar(self, port: int, listen: Callable[[str, int], socket.socket]) -> socket.socket:
        """Start on `port` (0: OS-chosen) and bind the sidecar socket with `listen(host, sidecar port)`."""
        for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
            server = self._bind(port)
            try:
                sock = listen(self._host, sidecar_port(self.port))
            except OSError:
                await server.stop(None)
                if port:
                    raise
                continue
            await server.start()
            self._server = server
            return sock
        raise OSError(f"no free gRPC port whose sidecar port is free on {self._host} after {_BIND_ATTEMPTS} attempts")
