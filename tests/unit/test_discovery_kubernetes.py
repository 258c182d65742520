"""Which pods become which workers: selection, readiness, roles, bootstrap ports, identity."""

from __future__ import annotations

from typing import Any

from shepherd.config import DiscoveryConfig
from shepherd.discovery.kubernetes import (
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    PodInfo,
    PodSelection,
    desired_workers,
    worker_url,
)
from shepherd.discovery.reconciler import PROVIDER_LABEL, SPEC_HASH_LABEL
from shepherd.workers.worker import WorkerType

ANNOTATION = "sglang.ai/bootstrap-port"
REGULAR = PodSelection([(WorkerType.REGULAR, {"app": "sglang"})])


def pod_json(
    name: str = "w-0",
    *,
    labels: dict[str, str] | None = None,
    ip: str | None = "10.0.0.5",
    phase: str = "Running",
    ready: bool = True,
    uid: str = "uid-1",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    created: str = "2024-05-01T10:00:00Z",
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "inference",
        "uid": uid,
        "labels": {"app": "sglang"} if labels is None else labels,
        "annotations": annotations or {},
        "creationTimestamp": created,
    }
    if deleting:
        meta["deletionTimestamp"] = "2024-05-01T11:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": str(ready)}],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def pod(name: str = "w-0", **kwargs: Any) -> PodInfo:
    return PodInfo.from_json(pod_json(name, **kwargs), ANNOTATION)


def test_pod_info_reads_the_fields_discovery_needs():
    info = pod("w-0", annotations={ANNOTATION: "8998", "other": "x" * 1000})
    assert (info.namespace, info.name, info.uid, info.ip) == ("inference", "w-0", "uid-1", "10.0.0.5")
    assert info.phase == "Running"
    assert info.ready and not info.terminating and info.addable
    assert info.bootstrap_port == 8998
    assert info.key == "inference/w-0"


def test_only_running_ready_pods_with_an_ip_are_addable():
    assert not pod(ready=False).addable
    assert not pod(phase="Pending").addable
    assert not pod(ip=None).addable
    assert not pod(deleting=True).addable
    assert not pod(uid="").addable


def test_ready_condition_must_be_true_not_merely_present():
    raw = pod_json()
    raw["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    assert not PodInfo.from_json(raw, ANNOTATION).ready


def test_regular_selector_requires_every_pair():
    selection = PodSelection([(WorkerType.REGULAR, {"app": "sglang", "env": "prod"})])
    assert selection.role_of({"app": "sglang", "env": "prod", "extra": "1"}) is WorkerType.REGULAR
    assert selection.role_of({"app": "sglang"}) is None
    assert selection.role_of({"app": "sglang", "env": "dev"}) is None


def test_pd_roles_prefill_first_and_server_selector_is_the_common_pairs():
    config = DiscoveryConfig(
        provider="kubernetes",
        prefill_selector=(("app", "sglang"), ("role", "prefill")),
        decode_selector=(("app", "sglang"), ("role", "decode")),
    )
    selection = PodSelection.from_config(config, pd_disaggregation=True)
    assert selection.role_of({"app": "sglang", "role": "prefill"}) is WorkerType.PREFILL
    assert selection.role_of({"app": "sglang", "role": "decode"}) is WorkerType.DECODE
    assert selection.role_of({"app": "sglang", "role": "router"}) is None
    assert selection.server_selector() == "app=sglang"
    overlapping = PodSelection([(WorkerType.PREFILL, {"tier": "gpu"}), (WorkerType.DECODE, {"tier": "gpu"})])
    assert overlapping.role_of({"tier": "gpu"}) is WorkerType.PREFILL


def test_pd_without_common_pairs_watches_every_pod_and_filters_locally():
    selection = PodSelection([(WorkerType.PREFILL, {"app": "p"}), (WorkerType.DECODE, {"app": "d"})])
    assert selection.server_selector() == ""
    assert REGULAR.server_selector() == "app=sglang"


def test_desired_workers_reserve_not_ready_pods_and_skip_leaving_ones():
    pods = [
        pod("ready", ip="10.0.0.1", uid="u1"),
        pod("starting", ip="10.0.0.2", uid="u2", ready=False),
        pod("no-ip", ip=None, uid="u3", phase="Pending", ready=False),
        pod("terminating", ip="10.0.0.4", uid="u4", deleting=True),
        pod("done", ip="10.0.0.5", uid="u5", phase="Succeeded", ready=False),
        pod("other-app", ip="10.0.0.6", uid="u6", labels={"app": "web"}),
    ]
    desired = desired_workers(pods, REGULAR, 8000, api_key="k")
    assert set(desired) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert desired["10.0.0.1:8000"].addable
    assert not desired["10.0.0.2:8000"].addable
    spec = desired["10.0.0.1:8000"].spec
    assert spec.source == "kubernetes" and spec.api_key == "k" and spec.worker_type is WorkerType.REGULAR
    assert spec.labels[POD_NAME_LABEL] == "ready"
    assert spec.labels[POD_NAMESPACE_LABEL] == "inference"
    assert spec.labels[POD_UID_LABEL] == "u1"
    assert spec.labels[PROVIDER_LABEL] == "kubernetes"
    assert desired["10.0.0.1:8000"].description == "pod: ready (10.0.0.1:8000)"


def test_a_new_uid_at_the_same_ip_is_a_different_worker_identity():
    old = desired_workers([pod(uid="uid-old")], REGULAR, 80, None)["10.0.0.5:80"]
    new = desired_workers([pod(uid="uid-new")], REGULAR, 80, None)["10.0.0.5:80"]
    again = desired_workers([pod(uid="uid-old", ready=False)], REGULAR, 80, None)["10.0.0.5:80"]
    assert old.spec_hash != new.spec_hash
    assert old.spec_hash == again.spec_hash  # readiness is not identity: a NotReady pod keeps its worker
    assert old.spec.labels[SPEC_HASH_LABEL] == old.spec_hash


def test_two_pods_claiming_one_ip_prefer_the_ready_then_the_newer_one():
    finished_old = pod("old", uid="u-old", ready=False, created="2024-05-01T09:00:00Z")
    fresh = pod("new", uid="u-new", created="2024-05-01T10:00:00Z")
    newest_not_ready = pod("newest", uid="u-newest", ready=False, created="2024-05-01T11:00:00Z")
    desired = desired_workers([fresh, finished_old, newest_not_ready], REGULAR, 80, None)
    assert desired["10.0.0.5:80"].spec.labels[POD_UID_LABEL] == "u-new"
    both_ready = desired_workers([fresh, pod("newer", uid="u-2", created="2024-05-01T12:00:00Z")], REGULAR, 80, None)
    assert both_ready["10.0.0.5:80"].spec.labels[POD_UID_LABEL] == "u-2"


def test_prefill_pods_take_the_bootstrap_port_annotation_and_decode_pods_ignore_it():
    selection = PodSelection([(WorkerType.PREFILL, {"role": "prefill"}), (WorkerType.DECODE, {"role": "decode"})])
    pods = [
        pod("p", ip="10.0.1.1", uid="p", labels={"role": "prefill"}, annotations={ANNOTATION: "8998"}),
        pod("p-bad", ip="10.0.1.2", uid="pb", labels={"role": "prefill"}, annotations={ANNOTATION: "http"}),
        pod("p-none", ip="10.0.1.3", uid="pn", labels={"role": "prefill"}),
        pod("d", ip="10.0.1.4", uid="d", labels={"role": "decode"}, annotations={ANNOTATION: "8998"}),
    ]
    desired = {w.spec.labels[POD_NAME_LABEL]: w for w in desired_workers(pods, selection, 30000, None).values()}
    assert desired["p"].spec.worker_type is WorkerType.PREFILL and desired["p"].spec.bootstrap_port == 8998
    assert desired["p-bad"].spec.bootstrap_port is None
    assert desired["p-none"].spec.bootstrap_port is None
    assert desired["d"].spec.worker_type is WorkerType.DECODE and desired["d"].spec.bootstrap_port is None
    assert desired["p"].description == "prefill pod: p (10.0.1.1:30000)"


def test_role_change_changes_identity():
    selection = PodSelection([(WorkerType.PREFILL, {"role": "prefill"}), (WorkerType.DECODE, {"role": "decode"})])
    as_prefill = desired_workers([pod(labels={"role": "prefill"})], selection, 80, None)["10.0.0.5:80"]
    as_decode = desired_workers([pod(labels={"role": "decode"})], selection, 80, None)["10.0.0.5:80"]
    assert as_prefill.spec_hash != as_decode.spec_hash


def test_ipv6_pod_ips_are_bracketed():
    assert worker_url("fd00::5", 8000) == "[fd00::5]:8000"  # no scheme: registration probes HTTP and gRPC
    assert worker_url("10.0.0.5", 80) == "10.0.0.5:80"
