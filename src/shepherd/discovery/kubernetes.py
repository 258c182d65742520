"""Kubernetes discovery: pods matching label selectors become workers at `<podIP>:<port>`, HTTP or gRPC as they answer.

`PodListWatch` keeps `self._pods` equal to the matching pods; every change schedules a reconciliation of the
workers those pods describe (see reconciler.py). Semantics follow SMG:

- regular mode includes a pod whose labels contain every `--selector` pair; PD mode includes a pod matching
  `--prefill-selector` (prefill, checked first) or `--decode-selector` (decode). The server-side selector of
  the watch is the pairs common to all role selectors; the rest is filtered here.
- an included pod with an IP reserves its url; it is registered once it is Running with condition Ready=True and
  no deletionTimestamp. A pod that later turns NotReady keeps its worker, out of routing until it is Ready again
  (Service semantics; the health checker keeps judging the worker itself, and with --remove-unhealthy-workers a
  failed worker is removed and re-added when the pod is Ready again); a pod that is deleted, terminating, finished
  or no longer matching is drained and removed.
- the worker's identity includes the pod uid: a new pod at the same IP replaces the old worker.
- prefill pods take their bootstrap port from the `--bootstrap-port-annotation` annotation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shepherd.config import DiscoveryConfig, GatewayConfig
from shepherd.discovery.kube_watch import PodListWatch, WatchTiming, load_core_api
from shepherd.discovery.reconciler import DesiredWorker, Reconciler, desired_worker
from shepherd.workers.manager import WorkerManager, WorkerSpec
from shepherd.workers.worker import WorkerType

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
POD_NAME_LABEL = "smg.ai/pod-name"
POD_NAMESPACE_LABEL = "smg.ai/pod-namespace"
POD_UID_LABEL = "smg.ai/pod-uid"
_FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The few facts about a pod that discovery needs (parsed in the watch thread)."""

    namespace: str
    name: str
    uid: str
    ip: str | None
    phase: str
    ready: bool
    terminating: bool
    labels: Mapping[str, str]
    bootstrap_port: int | None  # from the bootstrap port annotation
    created: str  # RFC 3339, sorts chronologically

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def addable(self) -> bool:
        return bool(self.ip and self.uid) and not self.terminating and self.phase == "Running" and self.ready

    @classmethod
    def from_json(cls, pod: Mapping[str, Any], bootstrap_annotation: str) -> PodInfo:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        annotation = (meta.get("annotations") or {}).get(bootstrap_annotation)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or () if c)
        return cls(
            namespace=meta.get("namespace") or "",
            name=meta.get("name") or "",
            uid=meta.get("uid") or "",
            ip=status.get("podIP") or None,
            phase=status.get("phase") or "Unknown",
            ready=ready,
            terminating=meta.get("deletionTimestamp") is not None,
            labels=meta.get("labels") or {},
            bootstrap_port=_port_number(annotation, f"pod {meta.get('name')}: annotation {bootstrap_annotation}"),
            created=meta.get("creationTimestamp") or "",
        )


class PodSelection:
    """Which pods are workers, and of which type."""

    def __init__(self, roles: Iterable[tuple[WorkerType, Mapping[str, str]]]) -> None:
        self.roles = [(role, dict(selector)) for role, selector in roles if selector]

    @classmethod
    def from_config(cls, discovery: DiscoveryConfig, pd_disaggregation: bool) -> PodSelection:
        if pd_disaggregation:
            return cls(
                [
                    (WorkerType.PREFILL, dict(discovery.prefill_selector)),
                    (WorkerType.DECODE, dict(discovery.decode_selector)),
                ]
            )
        return cls([(WorkerType.REGULAR, dict(discovery.selector))])

    def role_of(self, labels: Mapping[str, str]) -> WorkerType | None:
        for role, selector in self.roles:
            if all(labels.get(key) == value for key, value in selector.items()):
                return role
        return None

    def server_selector(self) -> str:
        """The label selector for the API server: the pairs every role selector requires."""
        if not self.roles:
            return ""
        common = set(self.roles[0][1].items())
        for _role, selector in self.roles[1:]:
            common &= set(selector.items())
        return ",".join(f"{key}={value}" for key, value in sorted(common))


def worker_url(ip: str, port: int) -> str:
    """`ip:port` without a scheme: registration probes a pod for HTTP and for SGLang gRPC (HTTP wins)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"


def desired_workers(
    pods: Iterable[PodInfo], selection: PodSelection, port: int, api_key: str | None
) -> dict[str, DesiredWorker]:
    """The workers the pods ask for, by url; when two pods claim one IP the ready, then newer, one wins."""
    chosen: dict[str, tuple[PodInfo, WorkerType]] = {}
    for pod in pods:
        role = selection.role_of(pod.labels)
        if role is None or not pod.ip or not pod.uid or pod.terminating or pod.phase in _FINISHED_PHASES:
            continue
        url = worker_url(pod.ip, port)
        rival = chosen.get(url)
        if rival is None or (pod.addable, pod.created) > (rival[0].addable, rival[0].created):
            chosen[url] = (pod, role)
    return {url: _desired(url, pod, role, port, api_key) for url, (pod, role) in chosen.items()}


def _desired(url: str, pod: PodInfo, role: WorkerType, port: int, api_key: str | None) -> DesiredWorker:
    spec = WorkerSpec(
        url,
        role,
        api_key=api_key,
        bootstrap_port=pod.bootstrap_port if role is WorkerType.PREFILL else None,
        labels={POD_NAME_LABEL: pod.name, POD_NAMESPACE_LABEL: pod.namespace, POD_UID_LABEL: pod.uid},
        source=SOURCE,
    )
    kind = "pod" if role is WorkerType.REGULAR else f"{role.value} pod"
    return desired_worker(spec, pod.key, addable=pod.addable, description=f"{kind}: {pod.name} ({pod.ip}:{port})")


def _port_number(value: Any, what: str) -> int | None:
    text = str(value).strip() if value is not None else ""
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    if text:
        log.warning("%s: ignoring %r (not a port number)", what, text)
    return None


class KubernetesDiscovery:
    """Watches pods and keeps the discovery-owned workers equal to what they describe."""

    def __init__(
        self,
        config: GatewayConfig,
        manager: WorkerManager,
        api_factory: Callable[[], Any] = load_core_api,
        timing: WatchTiming | None = None,
    ) -> None:
        sd = config.discovery
        self._namespace = sd.namespace
        self._port = sd.port
        self._api_key = config.api_key
        self._interval = sd.check_interval_secs
        self._selection = PodSelection.from_config(sd, config.pd_disaggregation)
        self._pods: dict[str, PodInfo] = {}
        self._synced = False
        self._reconciler = Reconciler(manager, SOURCE, self._desired)
        annotation = sd.bootstrap_port_annotation
        self._watch: PodListWatch[PodInfo] = PodListWatch(
            sd.namespace,
            self._selection.server_selector(),
            lambda obj: PodInfo.from_json(obj, annotation),
            self._on_snapshot,
            self._on_event,
            api_factory=api_factory,
            timing=timing,
        )
        self._periodic: asyncio.Task | None = None

    def start(self) -> None:
        where = f"namespace '{self._namespace}'" if self._namespace else "all namespaces"
        selectors = " | ".join(
            ("" if role is WorkerType.REGULAR else f"{role.value}: ") + ",".join(f"{k}={v}" for k, v in sel.items())
            for role, sel in self._selection.roles
        )
        log.info("Watching pods in %s with selector '%s' (worker port %d)", where, selectors, self._port)
        loop = asyncio.get_running_loop()
        self._watch.start(loop)
        self._periodic = loop.create_task(self._reconcile_periodically())

    async def stop(self) -> None:
        self._reconciler.close()
        if self._periodic is not None:
            self._periodic.cancel()
        await self._watch.stop()

    async def _reconcile_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self._synced:
                continue
            try:
                self._reconciler.reconcile()
            except Exception:  # a bug must not end the periodic passes for the life of the gateway
                log.exception("kubernetes discovery pass failed")

    def _on_snapshot(self, pods: list[PodInfo]) -> None:
        self._pods = {pod.key: pod for pod in pods}
        self._synced = True
        log.info("Listed %d pod(s)", len(pods))
        self._reconciler.schedule()

    def _on_event(self, kind: str, pod: PodInfo) -> None:
        log.debug(
            "pod %s %s: uid %s ip %s phase %s ready %s terminating %s",
            kind,
            pod.key,
            pod.uid,
            pod.ip,
            pod.phase,
            pod.ready,
            pod.terminating,
        )
        if kind == "DELETED":
            self._pods.pop(pod.key, None)
        else:
            self._pods[pod.key] = pod
        self._reconciler.schedule()

    def _desired(self) -> dict[str, DesiredWorker]:
        return desired_workers(self._pods.values(), self._selection, self._port, self._api_key)
