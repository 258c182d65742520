"""A health sweep probes every base URL once, spread evenly over the interval instead of all at once."""

from __future__ import annotations

import asyncio

import pytest

from shepherd.config import CircuitBreakerConfig, HealthCheckConfig
from shepherd.workers import health
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.health import HealthChecker
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus

SPREAD = 1000.0  # seconds; the sweep's waits are recorded, never slept


def add(registry: Registry, url: str, base_url: str | None = None) -> Worker:
    worker = Worker(url, CircuitBreaker(CircuitBreakerConfig()), model_id="m", base_url=base_url)
    worker.status = WorkerStatus.READY
    registry.add(worker)
    return worker


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sweep's sleeps, recorded and returned at once (one event-loop turn each)."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(health.asyncio, "sleep", fake_sleep)
    return recorded


async def test_each_base_url_is_probed_once_at_its_own_time(waits: list[float]) -> None:
    registry = Registry()
    ranks = [add(registry, f"http://dp@{rank}", base_url="http://dp") for rank in range(2)]
    plain = [add(registry, f"http://w{i}") for i in range(3)]
    add(registry, "http://leaving").status = WorkerStatus.DRAINING
    probed: list[tuple[str, list[Worker]]] = []
    checker = HealthChecker(registry, client=None, config=HealthCheckConfig())

    async def fake_probe(base_url: str, workers: list[Worker]) -> bool:
        probed.append((base_url, workers))
        return True

    checker.probe = fake_probe  # type: ignore[method-assign]
    await checker.sweep(SPREAD)
    while checker._in_flight:
        await asyncio.gather(*checker._in_flight.values())
    assert probed == [("http://dp", ranks)] + [(w.url, [w]) for w in plain]  # DP ranks share one probe
    # Four probes over the interval: at 0 (no wait), then a quarter of it apart.
    assert len(waits) == 3
    for i, wait in enumerate(waits, start=1):
        assert SPREAD * i / 4 - 1 < wait <= SPREAD * i / 4


async def test_a_worker_removed_during_the_sweep_is_not_probed(waits: list[float]) -> None:
    registry = Registry()
    first, second = add(registry, "http://a"), add(registry, "http://b")
    probed: list[str] = []
    checker = HealthChecker(registry, client=None, config=HealthCheckConfig())

    async def fake_probe(base_url: str, workers: list[Worker]) -> bool:
        probed.append(base_url)
        registry.remove(second)  # leaves while the sweep waits for its turn
        return True

    checker.probe = fake_probe  # type: ignore[method-assign]
    await checker.sweep(SPREAD)
    assert probed == [first.url]
