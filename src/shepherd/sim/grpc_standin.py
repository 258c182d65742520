"""`shepherd sim --grpc-metrics-sidecar`: a simulated worker seen as an SGLang gRPC engine.

Such an engine answers the standard `grpc.health.v1` service on its gRPC port and has its Prometheus
metrics served over HTTP by a sidecar on the derived port (observability/sidecar_address.py). Here the
worker's gRPC port serves only the health service (the gateway's gRPC data plane is a later step); the
worker's whole HTTP app, `/metrics`, `/__ctl` and `/__log` included, listens on the sidecar port, so tests
can see exactly what reached the sidecar. A `health_status` fault of 400 or more turns health NOT_SERVING.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shepherd.observability.sidecar_address import sidecar_port
from shepherd.sim.faults import FaultState

_BIND_ATTEMPTS = 20  # with OS-chosen gRPC ports, the derived sidecar port may be taken: pick again


class _FaultAwareHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, faults: FaultState) -> None:
        self._faults = faults

    async def Check(self, request: health_pb2.HealthCheckRequest, context: object) -> health_pb2.HealthCheckResponse:
        status = self._faults.health_status
        serving = status is None or status < 400
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )


async def start_grpc_standin(
    host: str, port: int, faults: FaultState, listen: Callable[[str, int], socket.socket]
) -> tuple[grpc.aio.Server, int, socket.socket]:
    """Start the health service on `port` (0: OS-chosen) and bind the sidecar socket with `listen(host, port)`.

    Returns (gRPC server, gRPC port, bound sidecar socket).
    """
    target_host = f"[{host}]" if ":" in host else host
    for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(_FaultAwareHealth(faults), server)
        grpc_port = server.add_insecure_port(f"{target_host}:{port}")
        if grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {port} on {host}")
        try:
            sock = listen(host, sidecar_port(grpc_port))
        except OSError:
            await server.stop(None)
            if port:
                raise
            continue
        await server.start()
        return server, grpc_port, sock
    raise OSError(f"no free gRPC port whose sidecar port is free on {host} after {_BIND_ATTEMPTS} attempts")
