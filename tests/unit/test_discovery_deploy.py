"""The Kubernetes manifests in deploy/kubernetes fit together and fit the gateway's flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shepherd.cli import build_parser, config_from_args
from shepherd.discovery.kubernetes import PodSelection

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents(name: str) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d}


def gateway_container() -> dict[str, Any]:
    deployment = documents("gateway.yaml")["Deployment/shepherd"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_gateway_args_are_valid_flags_and_select_the_example_workers():
    args = gateway_container()["args"]
    assert args[0] == "launch"
    config = config_from_args(build_parser().parse_args(args))
    sd = config.discovery
    assert sd.provider == "kubernetes" and config.remove_unhealthy_workers

    statefulset = documents("workers.yaml")["StatefulSet/sglang-worker"]
    pod = statefulset["spec"]["template"]
    assert statefulset["metadata"]["namespace"] == sd.namespace
    assert PodSelection.from_config(sd, pd_disaggregation=False).role_of(pod["metadata"]["labels"]) is not None
    (worker,) = pod["spec"]["containers"]
    assert sd.port in [p["containerPort"] for p in worker["ports"]]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"  # readiness is what gates registration


def test_the_service_account_may_list_and_watch_pods_in_the_watched_namespace():
    deployment = documents("gateway.yaml")["Deployment/shepherd"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    for name, role_kind, binding_kind in (
        ("rbac.yaml", "Role", "RoleBinding"),
        ("rbac-cluster.yaml", "ClusterRole", "ClusterRoleBinding"),
    ):
        docs = documents(name)
        assert f"ServiceAccount/{account}" in docs
        (binding,) = (d for d in docs.values() if d["kind"] == binding_kind)
        assert {"kind": "ServiceAccount", "name": account, "namespace": namespace} in binding["subjects"]
        role = docs[f"{role_kind}/{binding['roleRef']['name']}"]
        (rule,) = role["rules"]
        assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
        if role_kind == "Role":
            assert role["metadata"]["namespace"] == namespace


def test_pd_example_pods_match_the_documented_selectors():
    selection = PodSelection.from_config(
        config_from_args(
            build_parser().parse_args(
                ["launch", "--pd-disaggregation", "--service-discovery",
                 "--prefill-selector", "app=sglang", "role=prefill", "--decode-selector", "app=sglang", "role=decode"]
            )
        ).discovery,
        pd_disaggregation=True,
    )  # fmt: skip
    docs = documents("pd-workers.yaml")
    prefill = docs["StatefulSet/sglang-prefill"]["spec"]["template"]["metadata"]
    decode = docs["StatefulSet/sglang-decode"]["spec"]["template"]["metadata"]
    assert selection.role_of(prefill["labels"]).value == "prefill"
    assert selection.role_of(decode["labels"]).value == "decode"
    assert prefill["annotations"]["sglang.ai/bootstrap-port"].isdigit()
