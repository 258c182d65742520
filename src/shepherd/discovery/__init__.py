"""Service discovery: sources that keep a set of workers registered through the WorkerManager.

`kubernetes` watches pods, `file` reads a manifest; both hand a desired state to the shared `Reconciler`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shepherd.config import GatewayConfig
    from shepherd.workers.manager import WorkerManager


class Discovery(Protocol):
    def start(self) -> None: ...

    async def stop(self) -> None: ...


def create_discovery(config: GatewayConfig, manager: WorkerManager) -> Discovery | None:
    """The configured provider, or None when discovery is off (imports only what that provider needs)."""
    provider = config.discovery.provider
    if provider == "kubernetes":
        from shepherd.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(config, manager)
    if provider == "file":
        from shepherd.discovery.file import FileDiscovery

        return FileDiscovery(config, manager)
    return None
