"""A minimal SGLang gRPC engine for tests that need one in-process: `HealthCheck`, `GetModelInfo`, `GetServerInfo`
of `SglangScheduler`, and the standard grpc.health.v1 service, on a loopback port; nothing generates."""

from __future__ import annotations

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Scheduler(pb_grpc.SglangSchedulerServicer):
    def __init__(self, model: str) -> None:
        self.model = model
        self.healthy = True

    async def HealthCheck(self, request: pb.HealthCheckRequest, context: object) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(healthy=self.healthy, message="ok" if self.healthy else "unhealthy")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: object) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model_path=self.model, served_model_name=self.model, is_generation=True)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: object) -> pb.GetServerInfoResponse:
        args = struct_pb2.Struct()
        args.update({"model_path": self.model, "served_model_name": self.model, "dp_size": 1})
        return pb.GetServerInfoResponse(server_args=args, server_type="grpc")


class GrpcHealthWorker:
    """`async with GrpcHealthWorker() as w`: serving on `w.url`; `await w.set(NOT_SERVING)` to fail probes."""

    def __init__(self, port: int = 0, model: str = "test-model") -> None:
        self._server = grpc.aio.server()
        self._health = health.aio.HealthServicer()
        self._scheduler = _Scheduler(model)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        pb_grpc.add_SglangSchedulerServicer_to_server(self._scheduler, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.url = f"grpc://127.0.0.1:{self.port}"

    async def set(self, status: int) -> None:
        self._scheduler.healthy = status == SERVING
        await self._health.set("", status)

    async def __aenter__(self) -> GrpcHealthWorker:
        await self._server.start()
        await self.set(SERVING)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
