"""Reading a running gateway's discovery state: discovered workers and the discovery metrics."""

from __future__ import annotations

from typing import Any

from tests.support.gateway import GatewayProcess


def workers_from(gateway: GatewayProcess, source: str, pod_prefix: str | None = None) -> dict[str, dict[str, Any]]:
    """url -> worker record of the workers `source` registered (optionally only pods named `pod_prefix*`)."""
    return {
        w["url"]: w
        for w in gateway.workers()
        if w["source"] == source
        and (pod_prefix is None or w["labels"].get("smg.ai/pod-name", "").startswith(pod_prefix))
    }


def wait_workers_from(
    gateway: GatewayProcess, source: str, urls: set[str], pod_prefix: str | None = None, timeout: float = 15.0
) -> dict[str, dict[str, Any]]:
    """Wait until exactly `urls` are registered by `source` (among pods named `pod_prefix*`), all ready."""
    found: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        nonlocal found
        found = workers_from(gateway, source, pod_prefix)
        return set(found) == urls and all(w["status"] == "ready" for w in found.values())

    gateway.process.wait_for(check, timeout, f"{source} workers {sorted(urls)[:5]}... ({len(urls)})")
    return found


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float:
    """One sample from the gateway's Prometheus listener (0 when absent)."""
    return gateway.metrics().value(name, **labels) or 0.0
