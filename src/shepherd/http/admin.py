"""Control routes on the main port: worker management, probes, fleet info, fan-out admin actions."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
import orjson

from shepherd import __version__
from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response, StreamResponse, json_response
from shepherd.http.routes import RouteTable
from shepherd.observability.engine_metrics import EngineMetrics
from shepherd.routing.context import INFERENCE_ENDPOINTS, Endpoint, InvalidRequest, RequestContext
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.upstream.headers import relay_response_headers
from shepherd.urls import display_url, has_userinfo
from shepherd.workers.manager import DuplicateWorker, Job, SpecError, WorkerSpec, is_secret_name, valid_cost
from shepherd.workers.registry import count_by_type
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType, worker_auth_headers

if TYPE_CHECKING:
    from shepherd.gateway import Gateway
    from shepherd.upstream.grpc_client import SglangClient

_FANOUT_TIMEOUT = aiohttp.ClientTimeout(total=10)
EXPLAIN_PREFIX = "/explain"  # POST /explain/v1/chat/completions: the decision that request would get


def add_admin_routes(app: RouteTable, gateway: Gateway) -> None:
    routes = AdminRoutes(gateway)
    r = app
    r.add_get("/health", routes.health)
    r.add_get("/liveness", routes.liveness)
    r.add_get("/readiness", routes.readiness)
    r.add_get("/health_generate", routes.health_generate)
    engine_metrics = EngineMetrics(gateway.registry, gateway.client, gateway.metrics, gateway.config)
    r.add_get("/engine_metrics", engine_metrics.handle)
    r.add_get("/config", routes.config)
    r.add_get("/v1/models", routes.models)
    r.add_get("/get_model_info", routes.proxy_info)
    r.add_get("/get_server_info", routes.proxy_info)
    r.add_get("/get_loads", routes.loads)
    for endpoint in INFERENCE_ENDPOINTS:
        r.add_post(EXPLAIN_PREFIX + endpoint.path, partial(routes.explain_route, endpoint))
    r.add_post("/flush_cache", routes.flush_cache)
    r.add_get("/workers", routes.list_workers)
    r.add_post("/workers", routes.add_worker)
    r.add_get("/workers/{worker_id:.+}", routes.get_worker)
    r.add_delete("/workers/{worker_id:.+}", routes.delete_worker)
    r.add_patch("/workers/{worker_id:.+}", routes.patch_worker)
    r.add_post("/add_worker", routes.legacy_add_worker)
    r.add_post("/remove_worker", routes.legacy_remove_worker)
    r.add_get("/list_workers", routes.legacy_list_workers)


def _not_found(worker_id: str) -> GatewayError:
    return GatewayError(404, "worker_not_found", f"Worker {display_url(unquote(worker_id))} not found")


class AdminRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.registry = gateway.registry
        self.manager = gateway.manager

    # --- probes --------------------------------------------------------------------------------------------
    async def liveness(self, _request: Request) -> Response:
        return Response(text="OK")

    async def health(self, _request: Request) -> Response:
        workers = self.registry.all()
        healthy = sum(1 for w in workers if w.is_ready and self.registry.can_serve(w))
        return json_response(
            {
                "status": "ok",
                "workers": {"total": len(workers), "healthy": healthy, "unhealthy": len(workers) - healthy},
                "models": self.registry.models(),
            }
        )

    async def readiness(self, _request: Request) -> Response:
        workers = self.registry.all()
        healthy = sum(1 for w in workers if w.is_ready)
        if self.gw.is_ready():
            return json_response({"status": "ready", "healthy_workers": healthy, "total_workers": len(workers)})
        reason = "shutting down" if self.gw.shutting_down else "insufficient healthy workers"
        return json_response({"status": "not ready", "reason": reason}, status=503)

    async def health_generate(self, request: Request) -> StreamResponse:
        roles = (WorkerType.PREFILL, WorkerType.DECODE) if self.gw.config.pd_disaggregation else (WorkerType.REGULAR,)
        last: Response | None = None
        for role in roles:
            worker = next(iter(self.registry.candidates(role, None)), None)
            if worker is None:
                raise GatewayError(503, "no_workers", "No workers are available")
            last = (
                await self._grpc_health(worker)
                if is_grpc_url(worker.base_url)
                else await self._proxy_get(request, worker, "/health_generate")
            )
            if last.status >= 400:
                return last
        assert last is not None
        return last

    # --- fleet info ----------------------------------------------------------------------------------------
    async def config(self, _request: Request) -> Response:
        return json_response(self.gw.config.redacted())

    async def models(self, _request: Request) -> Response:
        models = self.registry.models()
        if not models:
            raise GatewayError(503, "no_models_available", "No models available")
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "shepherd"} for m in models]
        return json_response({"object": "list", "data": data})

    async def proxy_info(self, request: Request) -> StreamResponse:
        worker = self._first_healthy()
        if worker is None:
            raise GatewayError(503, "no_workers", "No workers are available")
        if is_grpc_url(worker.base_url):
            return await self._grpc_info(worker, request.path)
        return await self._proxy_get(request, worker, request.path)

    async def loads(self, _request: Request) -> Response:
        workers = self.registry.all()
        engine = await self._fan_out("GET", "/get_load", _distinct_bases(workers))
        loads = [
            {
                "worker": w.url,
                "worker_type": w.worker_type.value,
                "load": w.load,
                "engine": w.engine_load if is_grpc_url(w.base_url) else engine.get(w.base_url, {}).get("body"),
            }
            for w in workers
        ]
        return json_response(
            {"timestamp": datetime.now(UTC).isoformat(), "version": f"shepherd-{__version__}", "loads": loads}
        )

    async def explain_route(self, endpoint: Endpoint, request: Request) -> Response:
        """The routing decision an inference request would get now, with its reasons; nothing is sent or recorded."""
        try:
            ctx = RequestContext(endpoint, await request.read(), request.request_id)
        except InvalidRequest as exc:
            raise GatewayError(400, exc.code, str(exc), param=exc.param) from None
        router = self.gw.router_for(endpoint)
        await router.prepare(ctx)
        return json_response({"endpoint": endpoint.path, "model": ctx.model, **router.explain(ctx)})

    async def flush_cache(self, _request: Request) -> Response:
        workers = self.registry.all()
        results = await self._fan_out("POST", "/flush_cache", _distinct_bases(workers))
        results.update(await self._grpc_flush(workers))
        failed = sorted(display_url(url) for url, r in results.items() if not r["ok"])
        body = {
            "status": "success" if not failed else "partial",
            "message": f"Successfully flushed cache on {len(results) - len(failed)} of {len(results)} workers",
            "workers_flushed": len(results) - len(failed),
            "total_workers": len(results),
            "failed_workers": failed,
        }
        return json_response(body, status=200 if not failed else 502)

    # --- /workers ------------------------------------------------------------------------------------------
    async def list_workers(self, request: Request) -> Response:
        model = request.query.get("model")
        workers = [w for w in self.registry.all() if model is None or w.model_id == model]
        return json_response(
            {
                "workers": [w.to_json() for w in workers],
                "total": len(workers),
                "healthy": sum(1 for w in workers if w.is_ready),
                "stats": count_by_type(workers),
            }
        )

    async def add_worker(self, request: Request) -> Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, "invalid_json", f"Failed to parse the request body as JSON: {exc}") from None
        try:
            spec = WorkerSpec.from_json(data)
        except SpecError as exc:
            raise GatewayError(400, "invalid_worker_spec", str(exc), param=exc.field) from None
        job = self._submit(spec)
        location = f"/workers/{job.worker_id}"
        return json_response(
            {
                "status": "accepted",
                "worker_id": job.worker_id,
                "url": display_url(spec.url),
                "location": location,
                "message": "Worker addition queued for background processing",
            },
            status=202,
            headers={"Location": location},
        )

    async def get_worker(self, request: Request) -> Response:
        key = request.match_info["worker_id"]
        health_only = key.endswith("/health") and self._lookup(key) is None
        if health_only:
            key = key[: -len("/health")]
        worker = self._lookup(key)
        if worker is None:
            job = self._job(key)
            if job is None:
                raise _not_found(key)
            return json_response(job.to_json())
        if health_only:
            return json_response(
                {
                    "id": worker.id,
                    "url": worker.url,
                    "status": worker.status.value,
                    "healthy": worker.is_ready,
                    "circuit_state": worker.breaker.state.value,
                    "consecutive_health_failures": worker.health_failures,
                    "consecutive_health_successes": worker.health_successes,
                }
            )
        return json_response(worker.to_json())

    async def delete_worker(self, request: Request) -> Response:
        key = request.match_info["worker_id"]
        worker = self._lookup(key)
        if worker is None:
            job = self._job(key)
            if job is None:
                raise _not_found(key)
            self.manager.cancel_job(job)
            worker_id = job.worker_id
        else:
            self.manager.submit_remove(worker)
            worker_id = worker.id
        return json_response(
            {
                "status": "accepted",
                "worker_id": worker_id,
                "message": "Worker removal queued for background processing",
            },
            status=202,
        )

    async def patch_worker(self, request: Request) -> Response:
        key = request.match_info["worker_id"]
        worker = self._lookup(key)
        if worker is None:
            raise _not_found(key)
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, "invalid_json", f"Failed to parse the request body as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise GatewayError(400, "invalid_worker_spec", "the request body must be a JSON object")
        _apply_update(worker, data)
        return json_response({"status": "accepted", "worker_id": worker.id, "worker": worker.to_json()}, status=202)

    # --- legacy SGLang router routes -----------------------------------------------------------------------
    async def legacy_add_worker(self, request: Request) -> Response:
        url = request.query.get("url", "")
        try:
            spec = WorkerSpec.from_json({"url": url})
        except SpecError as exc:
            return Response(status=400, text=str(exc))
        job = self._submit(spec)
        assert job.task is not None
        await asyncio.shield(job.task)
        shown = display_url(spec.url)
        if job.status == "failed":
            return Response(status=400, text=job.message or f"Failed to add worker: {shown}")
        return Response(text=f"Successfully added worker: {shown}")

    async def legacy_remove_worker(self, request: Request) -> Response:
        url = request.query.get("url", "")
        workers = self.manager.workers_at(url)
        if not workers:
            return Response(status=404, text=f"Worker {display_url(url)} not found")
        for worker in workers:
            self.manager.submit_remove(worker)
        return Response(text=f"Successfully removed worker: {display_url(url)}")

    async def legacy_list_workers(self, _request: Request) -> Response:
        return json_response({"urls": [w.url for w in self.registry.all()]})

    # --- helpers -------------------------------------------------------------------------------------------
    def _submit(self, spec: WorkerSpec) -> Job:
        try:
            return self.manager.submit_add(spec)
        except DuplicateWorker as exc:
            raise GatewayError(
                409, "worker_already_exists", str(exc), headers={"Location": f"/workers/{exc.worker_id}"}
            ) from None

    def _lookup(self, key: str) -> Worker | None:
        """A worker by UUID or by (URL-encoded) URL."""
        return self.registry.get(key) or self.registry.by_url(unquote(key).rstrip("/"))

    def _job(self, key: str) -> Job | None:
        return self.manager.job(unquote(key))

    def _first_healthy(self) -> Worker | None:
        """A routable worker, an HTTP one if there is any (its info is passed through as the engine wrote it)."""
        candidates = [w for role in (WorkerType.REGULAR, WorkerType.DECODE, WorkerType.PREFILL)
                      for w in self.registry.candidates(role, None)]  # fmt: skip
        return next((w for w in candidates if not is_grpc_url(w.base_url)), candidates[0] if candidates else None)

    # --- the same admin reads and actions for gRPC workers ---------------------------------------------------
    def _grpc_client(self, worker: Worker) -> SglangClient:
        return self.gw.grpc_clients.get(worker.base_url, worker.api_key or self.gw.config.api_key)

    async def _grpc_info(self, worker: Worker, path: str) -> Response:
        """`GetModelInfo` / `GetServerInfo` as SGLang's HTTP server shapes them (server args at the top level),
        secret-named fields left out as for labels."""
        import grpc

        client = self._grpc_client(worker)
        timeout = _FANOUT_TIMEOUT.total or 10.0
        try:
            if path.endswith("model_info"):
                info = await client.model_info(timeout)
            else:
                reply = await client.server_info(timeout)
                info = {**(reply.pop("server_args", None) or {}), **reply}
        except grpc.aio.AioRpcError as exc:
            raise GatewayError(
                502, "call_upstream_failed", f"{worker.url}: {exc.code().name}: {exc.details()}"
            ) from None
        public = {k: v for k, v in info.items() if not is_secret_name(k)}
        return json_response(public, headers={"x-smg-routed-worker-id": worker.url})

    async def _grpc_health(self, worker: Worker) -> Response:
        import grpc

        try:
            healthy, message = await self._grpc_client(worker).health_check(_FANOUT_TIMEOUT.total or 10.0)
        except grpc.aio.AioRpcError as exc:
            healthy, message = False, f"{exc.code().name}: {exc.details()}"
        extra = {"x-smg-routed-worker-id": worker.url}
        return Response(status=200 if healthy else 503, text=message, headers=extra)

    async def _grpc_flush(self, workers: Iterable[Worker]) -> dict[str, dict[str, Any]]:
        """`FlushCache` on each gRPC engine, concurrently; the same result shape as the HTTP fan-out."""
        import grpc

        engines = {w.base_url: w for w in workers if is_grpc_url(w.base_url) and w.status is not WorkerStatus.DRAINING}

        async def flush(worker: Worker) -> tuple[str, dict[str, Any]]:
            try:
                ok, message = await self._grpc_client(worker).flush_cache(_FANOUT_TIMEOUT.total or 10.0)
            except grpc.aio.AioRpcError as exc:
                return worker.base_url, {"ok": False, "status": None, "body": None, "error": exc.details()}
            return worker.base_url, {"ok": ok, "status": None, "body": message}

        return dict(await asyncio.gather(*(flush(w) for w in engines.values())))

    async def _proxy_get(self, request: Request, worker: Worker, path: str) -> Response:
        """A worker's info passed through. These routes are public, so the gateway's and the worker's own keys never
        go along (an engine's server info can include its arguments). The client's `Authorization` goes along only
        when it is the data-plane `--api-key`, which workers receive anyway: a control-plane key or a JWT must never
        reach a worker. A worker URL with credentials uses those instead."""
        client_auth = request.headers.get("Authorization")
        expected = f"Bearer {self.gw.config.api_key}" if self.gw.config.api_key else None
        forward = (
            client_auth is not None
            and expected is not None
            and hmac.compare_digest(client_auth.encode("utf-8", "surrogateescape"), expected.encode())
            and not has_userinfo(worker.base_url)
        )
        headers = {"Authorization": client_auth} if forward else {}
        try:
            async with self.gw.client.session.get(
                worker.base_url + path, headers=headers, timeout=_FANOUT_TIMEOUT
            ) as resp:
                body = await resp.read()
                extra = {"x-smg-routed-worker-id": worker.url}
                return Response(status=resp.status, body=body, headers=relay_response_headers(resp.headers, extra))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GatewayError(502, "call_upstream_connection_failed", f"{worker.url}{path}: {exc}") from None

    async def _fan_out(self, method: str, path: str, workers: Iterable[Worker]) -> dict[str, dict[str, Any]]:
        """Call `path` on each worker concurrently; {base_url: {"ok", "status", "body"}}."""

        async def call(worker: Worker) -> tuple[str, dict[str, Any]]:
            try:
                async with self.gw.client.session.request(
                    method,
                    worker.base_url + path,
                    headers=worker_auth_headers(worker.base_url, worker.api_key or self.gw.config.api_key),
                    timeout=_FANOUT_TIMEOUT,
                ) as resp:
                    raw = await resp.read()
                    try:
                        body: Any = orjson.loads(raw) if raw else None
                    except orjson.JSONDecodeError:
                        body = raw.decode(errors="replace")
                    return worker.base_url, {"ok": resp.status < 400, "status": resp.status, "body": body}
            except (TimeoutError, aiohttp.ClientError) as exc:
                return worker.base_url, {"ok": False, "status": None, "body": None, "error": str(exc)}

        results = await asyncio.gather(*(call(w) for w in workers))
        return dict(results)


def _distinct_bases(workers: Iterable[Worker]) -> list[Worker]:
    """One HTTP worker per base URL, so DP ranks of one engine are called once (gRPC workers have no HTTP API)."""
    seen: dict[str, Worker] = {}
    for worker in workers:
        if worker.status is not WorkerStatus.DRAINING and not is_grpc_url(worker.base_url):
            seen.setdefault(worker.base_url, worker)
    return list(seen.values())


def _apply_update(worker: Worker, data: dict[str, Any]) -> None:
    """PATCH /workers/{id}: priority, cost, labels (merged), api_key. Every field is checked before any is applied,
    so a rejected update changes nothing."""
    priority, cost, labels, api_key = worker.priority, worker.cost, worker.labels, worker.api_key
    if "priority" in data:
        priority = data["priority"]
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise GatewayError(400, "invalid_worker_spec", "field 'priority' must be an integer", param="priority")
    if "cost" in data:
        if not isinstance(data["cost"], (int, float)) or isinstance(data["cost"], bool):
            raise GatewayError(400, "invalid_worker_spec", "field 'cost' must be a number", param="cost")
        try:
            cost = valid_cost(data["cost"])
        except SpecError as exc:
            raise GatewayError(400, "invalid_worker_spec", str(exc), param="cost") from None
    if "labels" in data:
        if not isinstance(data["labels"], dict):
            raise GatewayError(400, "invalid_worker_spec", "field 'labels' must be an object", param="labels")
        labels = {**labels, **{str(k): str(v) for k, v in data["labels"].items()}}
    if "api_key" in data:
        api_key = data["api_key"]
        if api_key is not None and not isinstance(api_key, str):
            raise GatewayError(400, "invalid_worker_spec", "field 'api_key' must be a string", param="api_key")
        if api_key is not None and has_userinfo(worker.base_url):
            raise GatewayError(
                400, "invalid_worker_spec", "this worker's credentials are in its URL: no 'api_key'", param="api_key"
            )
    worker.priority, worker.cost, worker.labels, worker.api_key = priority, cost, labels, api_key
