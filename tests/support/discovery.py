"""Reading a running gateway's discovery state: discovered workers and the discovery metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import GatewayProcess
from tests.support.processes import http_request


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
    status, text = http_request("GET", f"http://127.0.0.1:{gateway.prometheus_port}/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
