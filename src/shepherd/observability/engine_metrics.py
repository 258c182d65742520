"""`GET /engine_metrics`: every engine's own Prometheus metrics, scraped now and merged into one exposition.

One scrape per engine, not per routing target: DP ranks share their engine's base URL, and all ranks of a
gRPC engine share its metrics sidecar (see sidecar_address.py). Scrapes run concurrently, each bounded by
the health-check timeout, so a slow engine delays the answer by at most that long; engines that fail are
left out, named in a comment at the top and counted in `smg_engine_metrics_scrapes_total{result}`.

The merged answer (or the error) is reused for `--engine-metrics-cache-secs` (at most 5) while the set of engines
stays the same, and concurrent callers wait for one scrape in flight: a burst of calls, or several Prometheus
servers, scrape each engine once per period instead of once per call.

Credentials: an HTTP engine gets its own API key (else the gateway's `--api-key`, as for inference), and
only on its own scrape. A gRPC engine's sidecar is unauthenticated plain HTTP and never gets a key. An engine
URL with credentials (`http://user:password@host`) uses them instead, and is shown with the password masked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from shepherd.config import GatewayConfig
from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response
from shepherd.observability.exposition import TEXT_CONTENT_TYPE, merge_expositions
from shepherd.observability.metrics import GatewayMetrics
from shepherd.observability.sidecar_address import canonical_address, sidecar_metrics_url
from shepherd.upstream.client import UpstreamClient, auth_headers
from shepherd.upstream.grpc_pool import is_grpc_url
from shepherd.urls import display_url, has_userinfo
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    url: str  # the /metrics URL fetched (it may carry credentials: never shown)
    address: str  # the canonical worker address as shown (`display_url`), the `worker_addr` label of its samples
    api_key: str | None  # sent as a Bearer token to this URL only


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    target: ScrapeTarget
    body: str | None
    error: str | None = None


def scrape_targets(workers: Iterable[Worker], gateway_api_key: str | None) -> list[ScrapeTarget]:
    """One target per distinct metrics URL, in registration order."""
    targets: dict[str, ScrapeTarget] = {}
    for worker in workers:
        address = canonical_address(worker.base_url)
        if is_grpc_url(address):
            target = ScrapeTarget(sidecar_metrics_url(address), address, None)
        else:
            key = None if has_userinfo(address) else worker.api_key or gateway_api_key
            target = ScrapeTarget(address + "/metrics", display_url(address), key)
        targets.setdefault(target.url, target)
    return list(targets.values())


async def scrape(session: aiohttp.ClientSession, target: ScrapeTarget, timeout: float) -> ScrapeResult:
    """GET one target's exposition; never raises for the target's faults."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(target.url, headers=auth_headers(target.api_key)) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    return ScrapeResult(target, None, f"HTTP {resp.status}")
                return ScrapeResult(target, raw.decode("utf-8", "replace"))
    except TimeoutError:
        return ScrapeResult(target, None, f"no answer within {timeout:g}s")
    except aiohttp.ClientError as exc:
        return ScrapeResult(target, None, " ".join(str(exc).split()) or type(exc).__name__)


@dataclass(frozen=True, slots=True)
class _Answer:
    """One merged scrape: the exposition, or the error every scrape ended in."""

    body: bytes | None
    error: str | None = None


class EngineMetrics:
    def __init__(
        self,
        registry: Registry,
        client: UpstreamClient,
        metrics: GatewayMetrics,
        config: GatewayConfig,
    ) -> None:
        self._registry = registry
        self._client = client
        self._metrics = metrics
        self._timeout = config.health_check.timeout_secs
        self._api_key = config.api_key
        self._cache_secs = config.engine_metrics_cache_secs
        # (targets, expiry on the loop clock, the scrape: done when cached, pending while in flight)
        self._last: tuple[tuple[ScrapeTarget, ...], float, asyncio.Task[_Answer]] | None = None

    async def handle(self, _request: Request) -> Response:
        workers = self._registry.all()
        if not workers:
            raise GatewayError(503, "no_workers", "No available workers: no worker is registered to scrape")
        targets = tuple(scrape_targets(workers, self._api_key))
        now = asyncio.get_running_loop().time()
        last = self._last
        if last is not None and last[0] == targets and (not last[2].done() or now < last[1]):
            task = last[2]
        else:
            task = asyncio.ensure_future(self._scrape_all(targets))
            self._last = (targets, now + self._cache_secs, task)
            task.add_done_callback(self._scraped)
        answer = await asyncio.shield(task)  # a caller that leaves does not cancel the others' scrape
        if answer.body is None:
            raise GatewayError(502, "engine_metrics_unavailable", f"Every worker scrape failed ({answer.error})")
        return Response(body=answer.body, headers={"Content-Type": TEXT_CONTENT_TYPE})

    def _scraped(self, task: asyncio.Task[_Answer]) -> None:
        """The cache period counts from the end of the scrape."""
        last = self._last
        if last is not None and last[2] is task:
            self._last = (last[0], asyncio.get_running_loop().time() + self._cache_secs, task)

    async def _scrape_all(self, targets: tuple[ScrapeTarget, ...]) -> _Answer:
        session = self._client.session
        results = await asyncio.gather(*(scrape(session, t, self._timeout) for t in targets))
        scraped = [(r.target.address, r.body) for r in results if r.body is not None]
        failed = [r for r in results if r.body is None]
        for result in results:
            self._metrics.record_engine_scrape(result.body is not None)
        if not scraped:
            return _Answer(None, "; ".join(f"{r.target.address}: {r.error}" for r in failed))
        header = [f"shepherd engine_metrics: scraped {len(scraped)} of {len(targets)} workers"]
        header += [
            f"shepherd engine_metrics: failed {r.target.address} ({display_url(r.target.url)}): {r.error}"
            for r in failed
        ]
        # Parsing a fleet's expositions is CPU work the event loop should not wait on.
        merged = await asyncio.to_thread(merge_expositions, scraped, header)
        return _Answer(merged.text.encode())
