"""Discovery metrics (SMG names and labels), registered in prometheus_client's default registry.

`source` is the provider: `kubernetes` or `file`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WORKERS_DISCOVERED = Gauge(
    "smg_discovery_workers_discovered",
    "Workers the discovery source currently wants registered (including not-yet-ready pods)",
    ["source"],
)
REGISTRATIONS = Counter(
    "smg_discovery_registrations_total",
    "Registrations of discovered workers, by outcome",
    ["source", "result"],
)
DEREGISTRATIONS = Counter(
    "smg_discovery_deregistrations_total",
    "Discovered workers drained and removed because the source no longer wants them",
    ["source", "reason"],
)
SYNC_DURATION = Histogram(
    "smg_discovery_sync_duration_seconds",
    "Duration of one reconciliation of the desired workers against the registry",
    ["source"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SNAPSHOT_ERRORS = Counter(
    "smg_discovery_snapshot_errors_total",
    "Failures to read the source's state (Kubernetes list/watch errors, unreadable or malformed manifests)",
    ["source"],
)


def preregister(source: str) -> None:
    """Export zero-valued series for a source as soon as it starts, as SMG does."""
    WORKERS_DISCOVERED.labels(source)
    REGISTRATIONS.labels(source, "success")
    REGISTRATIONS.labels(source, "failed")
    DEREGISTRATIONS.labels(source, "reconciled")
    SYNC_DURATION.labels(source)
    SNAPSHOT_ERRORS.labels(source)
