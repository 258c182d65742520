"""A gRPC worker stand-in for tests: the standard grpc.health.v1 service on a loopback port, nothing else."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcHealthWorker:
    """`async with GrpcHealthWorker() as w`: serving on `w.url`; `await w.set(NOT_SERVING)` to fail probes."""

    def __init__(self, port: int = 0) -> None:
        self._server = grpc.aio.server()
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.url = f"grpc://127.0.0.1:{self.port}"

    async def set(self, status: int) -> None:
        await self._health.set("", status)

    async def __aenter__(self) -> GrpcHealthWorker:
        await self._server.start()
        await self.set(SERVING)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
