"""Assembles the control plane and the data plane, runs them, and shuts down gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from shepherd.config import GatewayConfig
from shepherd.discovery import create_discovery
from shepherd.http.admission import Admission
from shepherd.http.app import build_app
from shepherd.observability.metrics import GatewayMetrics, MetricsListener
from shepherd.routing.context import Endpoint
from shepherd.routing.pd import PD_ENDPOINTS, PDRouter
from shepherd.routing.policies import create_policy
from shepherd.routing.router import Router
from shepherd.upstream.client import UpstreamClient
from shepherd.workers.health import HealthChecker
from shepherd.workers.manager import WorkerManager
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerType

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.client = UpstreamClient()
        self.manager = WorkerManager(self.registry, self.client, config)
        self.discovery = create_discovery(config, self.manager)
        self.admission = Admission(config.concurrency_limit, config.queue_size, config.queue_timeout_secs)
        self.metrics = GatewayMetrics(self.registry, self.admission, config.prometheus_duration_buckets)
        self._metrics_listener = MetricsListener.for_config(self.metrics, config)
        self.health = HealthChecker(
            self.registry,
            self.client,
            config.health_check,
            on_failed=self._on_failed,
            on_probe=self.metrics.on_health_probe,
            gateway_api_key=config.api_key,
        )
        self.router = Router(
            self.registry, create_policy(config.policy, config), self.client, config, metrics=self.metrics
        )
        self.pd_router = (
            PDRouter(
                self.registry,
                create_policy(config.prefill_policy or config.policy, config),
                create_policy(config.decode_policy or config.policy, config),
                self.client,
                config,
                metrics=self.metrics,
            )
            if config.pd_disaggregation
            else None
        )
        self.shutting_down = False
        self._runner: web.AppRunner | None = None

    def router_for(self, endpoint: Endpoint) -> Router | PDRouter:
        if self.pd_router is not None and endpoint in PD_ENDPOINTS:
            return self.pd_router
        return self.router

    def is_ready(self) -> bool:
        if self.shutting_down:
            return False
        if self.config.pd_disaggregation:
            return bool(
                self.registry.candidates(WorkerType.PREFILL, None) and self.registry.candidates(WorkerType.DECODE, None)
            )
        return bool(self.registry.candidates(WorkerType.REGULAR, None))

    def _on_failed(self, worker: Worker) -> None:
        if self.config.remove_unhealthy_workers:
            self.manager.submit_remove(worker)

    async def start(self) -> None:
        await self._metrics_listener.start()
        app = build_app(self)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self.config.shutdown_grace_period_secs,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=4096, reuse_address=True)
        await site.start()
        self.manager.add_static()
        if self.discovery is not None:
            self.discovery.start()
        self.health.start()
        _tune_gc()
        log.info(
            "shepherd listening on http://%s:%d (policy %s)", self.config.host, self.config.port, self.config.policy
        )

    async def stop(self) -> None:
        """Readiness goes 503, listeners close, in-flight requests get the grace period, then teardown."""
        self.shutting_down = True
        await self.health.close()
        if self.discovery is not None:
            await self.discovery.stop()
        await self.manager.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._metrics_listener.stop()
        await self.client.close()

    async def serve_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("shutting down: draining in-flight requests (grace %.0fs)", self.config.shutdown_grace_period_secs)
        await self.stop()


def _tune_gc() -> None:
    """Objects alive after startup live for the whole run: freeze them so young-generation collections skip them,
    and collect less often, since the request path allocates many short-lived objects that die young anyway.
    Measured in `shepherd bench overhead`: about 6-10% less CPU per request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)
