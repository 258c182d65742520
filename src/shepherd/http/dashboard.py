"""The live fleet page: `GET /dashboard` (one self-contained HTML file) and `GET /dashboard/data` (its JSON).

Where each figure comes from:
- status, health, breaker state, load: the registry, as `GET /workers` shows them.
- requests/s: the delta of each worker's `requests_total` (attempts sent to it, retries included) over ~5 s.
- TTFT p50/p99 and cache hit rate: the engine's own Prometheus metrics (`*:time_to_first_token_seconds` buckets,
  `*:cached_tokens_total` or `*:prompt_tokens_cached_total` over `*:prompt_tokens_total`), over the last minute. The
  gateway's TTFT histogram is per model, not per worker, and the HTTP relay passes `usage` through unread, so the
  engine is the one per-worker source that costs the request path nothing. DP ranks of one engine show that
  engine's figures.

Nothing is collected while nobody looks: engines are scraped when the page polls, at most once per
`_MIN_REFRESH_SECS` however many pages are open, and the snapshots kept for the deltas cover one window.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import orjson

from shepherd.exchange import Request, Response
from shepherd.http.routes import RouteTable
from shepherd.observability.engine_metrics import scrape, scrape_targets
from shepherd.observability.sidecar_address import canonical_address
from shepherd.workers.breaker import CircuitState
from shepherd.workers.worker import Worker

if TYPE_CHECKING:
    from shepherd.gateway import Gateway

_WINDOW_SECS = 60.0  # TTFT and cache hit rate
_RATE_WINDOW_SECS = 5.0  # requests/s
_MIN_REFRESH_SECS = 0.5
_SCRAPE_TIMEOUT_SECS = 1.0  # a slow engine loses its figures for one refresh instead of stalling the page
# SGLang names the cache counter `cached_tokens_total`; vLLM and llama.cpp `prompt_tokens_cached_total`.
_SAMPLE = re.compile(
    r"^[A-Za-z_][\w]*:(time_to_first_token_seconds_bucket|prompt_tokens_total|cached_tokens_total"
    r"|prompt_tokens_cached_total)\b"
)
_LE = re.compile(r'le="([^"]*)"')


@dataclass(slots=True)
class EngineSample:
    """The cumulative counters of one engine's exposition that the page needs (summed over its series)."""

    ttft: dict[float, float]  # bucket upper bound -> cumulative count
    prompt_tokens: float | None
    cached_tokens: float | None


@dataclass(slots=True)
class Snapshot:
    at: float  # monotonic
    requests: dict[str, int]  # worker id -> requests_total
    engines: dict[str, EngineSample]  # canonical engine address -> sample
    errors: dict[str, str]  # canonical engine address -> why its scrape failed


def parse_engine_sample(text: str) -> EngineSample:
    """The TTFT buckets and prompt/cached token counters of a Prometheus text exposition, any engine prefix."""
    sample = EngineSample({}, None, None)
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found is None:
            continue
        labels, _, rest = line.rpartition("}")  # rest: " value [timestamp]", or the whole line without labels
        fields = rest.split()
        try:
            value = float(fields[0] if labels else fields[1])
        except (IndexError, ValueError):
            continue
        kind = found.group(1)
        if kind == "prompt_tokens_total":
            sample.prompt_tokens = (sample.prompt_tokens or 0.0) + value
        elif kind in ("cached_tokens_total", "prompt_tokens_cached_total"):
            sample.cached_tokens = (sample.cached_tokens or 0.0) + value
        else:
            le = _LE.search(labels)
            if le is not None:
                bound = float(le.group(1))
                sample.ttft[bound] = sample.ttft.get(bound, 0.0) + value
    return sample


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative buckets: linear within the bucket; None without data."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


def _delta(now: float | None, then: float | None) -> float | None:
    """A counter's increase; an engine restart (the counter went down) counts from zero."""
    if now is None:
        return None
    if then is None or now < then:
        return now
    return now - then


def engine_figures(current: EngineSample | None, baseline: EngineSample | None) -> dict[str, float | None]:
    """TTFT p50/p99 (ms) and the cache hit rate between two samples of one engine."""
    figures: dict[str, float | None] = {"ttft_p50_ms": None, "ttft_p99_ms": None, "cache_hit_rate": None}
    if current is None or baseline is None:  # no answer now, or first sight of this engine: nothing to compare
        return figures
    reset = any(count < baseline.ttft.get(bound, 0.0) for bound, count in current.ttft.items())
    window = {b: c - (0.0 if reset else baseline.ttft.get(b, 0.0)) for b, c in current.ttft.items()}
    for key, q in (("ttft_p50_ms", 0.5), ("ttft_p99_ms", 0.99)):
        seconds = histogram_quantile(q, window)
        figures[key] = None if seconds is None else round(seconds * 1000, 1)
    prompt = _delta(current.prompt_tokens, baseline.prompt_tokens)
    cached = _delta(current.cached_tokens, baseline.cached_tokens)
    if prompt and cached is not None:
        figures["cache_hit_rate"] = round(min(cached / prompt, 1.0), 4)
    return figures


class Dashboard:
    """The two routes and the few snapshots the deltas are taken from."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._page = files("shepherd.http").joinpath("dashboard.html").read_bytes()
        self._snapshots: deque[Snapshot] = deque()
        self._body = b""
        self._lock = asyncio.Lock()

    async def page(self, _request: Request) -> Response:
        """`GET /dashboard`: the page, read from the package once."""
        return Response(body=self._page, content_type="text/html; charset=utf-8")

    async def data(self, _request: Request) -> Response:
        """`GET /dashboard/data`: every worker's row; fresh at most every `_MIN_REFRESH_SECS`."""
        async with self._lock:  # one scrape serves every page polling meanwhile
            if not self._snapshots or time.monotonic() - self._snapshots[-1].at >= _MIN_REFRESH_SECS:
                self._body = orjson.dumps(await self._refresh())
        return Response(body=self._body, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _refresh(self) -> dict[str, Any]:
        workers = self._gw.registry.all()
        engines, errors = await self._scrape(workers)
        now = time.monotonic()
        current = Snapshot(now, {w.id: w.requests_total for w in workers}, engines, errors)
        self._snapshots.append(current)
        while len(self._snapshots) > 1 and self._snapshots[1].at <= now - _WINDOW_SECS:
            self._snapshots.popleft()
        history = list(self._snapshots)[:-1]  # oldest first; the first one is the window's start
        rate_base = next((s for s in reversed(history) if s.at <= now - _RATE_WINDOW_SECS), None)
        rows = [_worker_row(w, current, history, rate_base) for w in workers]
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "window_secs": round(now - history[0].at, 1) if history else 0.0,
            "workers": rows,
            "total": len(rows),
            "ready": sum(1 for r in rows if r["status"] == "ready"),
            "requests_per_sec": round(sum(r["requests_per_sec"] or 0.0 for r in rows), 2),
        }

    async def _scrape(self, workers: list[Worker]) -> tuple[dict[str, EngineSample], dict[str, str]]:
        targets = scrape_targets(workers, self._gw.config.api_key)
        session = self._gw.client.session
        results = await asyncio.gather(*(scrape(session, t, _SCRAPE_TIMEOUT_SECS) for t in targets))
        bodies = {r.target.address: r.body for r in results if r.body is not None}
        errors = {r.target.address: r.error or "no answer" for r in results if r.body is None}
        if not bodies:
            return {}, errors
        parsed = await asyncio.to_thread(lambda: {a: parse_engine_sample(b) for a, b in bodies.items()})
        return parsed, errors


def _worker_row(
    worker: Worker, current: Snapshot, history: list[Snapshot], rate_base: Snapshot | None
) -> dict[str, Any]:
    """One worker's line of `/dashboard/data`; a worker or engine first seen within a window counts from then."""
    if rate_base is None or worker.id not in rate_base.requests:
        rate_base = next((s for s in history if worker.id in s.requests), None)
    rate = None
    if rate_base is not None:
        done = max(worker.requests_total - rate_base.requests[worker.id], 0)
        rate = round(done / (current.at - rate_base.at), 2)
    address = canonical_address(worker.base_url)
    engine_base = next((s.engines[address] for s in history if address in s.engines), None)
    return {
        "id": worker.id,
        "url": worker.url,
        "model": worker.model_id,
        "worker_type": worker.worker_type.value,
        "connection_mode": "grpc" if worker.url.startswith("grpc") else "http",
        "status": worker.status.value,
        "healthy": worker.is_ready,
        "health_failures": worker.health_failures,
        "circuit_state": worker.breaker.state.value,
        "circuit_open": worker.breaker.state is CircuitState.OPEN,
        "load": worker.load,
        "requests_total": worker.requests_total,
        "requests_per_sec": rate,
        **engine_figures(current.engines.get(address), engine_base),
        "engine_metrics_error": current.errors.get(address),
    }


def add_dashboard_routes(app: RouteTable, gateway: Gateway) -> None:
    """`GET /dashboard` and `GET /dashboard/data` (admin-read under auth: http/route_policy.py)."""
    dashboard = Dashboard(gateway)
    app.add_get("/dashboard", dashboard.page)
    app.add_get("/dashboard/data", dashboard.data)
