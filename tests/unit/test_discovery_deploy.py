"""The Kubernetes manifests in deploy/kubernetes fit together and fit the gateway's flags."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trustme
import yaml

from shepherd.cli import build_parser, config_from_args
from shepherd.config import GatewayConfig
from shepherd.discovery.kubernetes import PodSelection
from tests.support.components import require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents(name: str) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d}


def gateway_container() -> dict[str, Any]:
    deployment = documents("gateway.yaml")["Deployment/shepherd"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def generated_secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, as kustomization.yaml's secretGenerator builds them (one file per key)."""
    return {
        generator["name"]: {entry.split("=", 1)[0] for entry in generator["files"]}
        for generator in kustomization()["secretGenerator"]
    }


def gateway_config(tmp_path: Path) -> tuple[GatewayConfig, dict[str, str]]:
    """The gateway's configuration from its manifest arguments, with the Secret values the pod would get: each
    environment variable holds `value-of-<secret key>`, and a test certificate sits where the TLS Secret is mounted."""
    container = gateway_container()
    env = {e["name"]: f"value-of-{e['valueFrom']['secretKeyRef']['key']}" for e in container["env"]}
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls"]
    cert = trustme.CA().issue_cert("shepherd.inference.svc")
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    args = [
        re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg).replace(mount, str(tmp_path))
        for arg in container["args"]
    ]
    assert args[0] == "launch"
    return config_from_args(build_parser().parse_args(args)), env


def test_gateway_args_are_valid_flags_and_select_the_example_workers(tmp_path):
    config, _ = gateway_config(tmp_path)
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


def test_keys_and_certificate_come_from_the_generated_secrets(tmp_path):
    deployment = documents("gateway.yaml")["Deployment/shepherd"]
    container = gateway_container()
    secrets = generated_secrets()
    for entry in container["env"]:
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]], ref
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert secrets[volume["secret"]["secretName"]] == {"tls.crt", "tls.key"}
    (tls_generator,) = [g for g in kustomization()["secretGenerator"] if g["name"] == volume["secret"]["secretName"]]
    assert tls_generator["type"] == "kubernetes.io/tls"
    assert all(g["namespace"] == deployment["metadata"]["namespace"] for g in kustomization()["secretGenerator"])

    config, env = gateway_config(tmp_path)
    assert config.api_key == "value-of-api-key"
    roles = {key.role: key.key for key in config.auth.control_plane_api_keys}
    assert roles == {"admin": "value-of-admin-key", "user": "value-of-reader-key"}
    assert config.tls.cert_path == str(tmp_path / "tls.crt") and config.tls.key_path == str(tmp_path / "tls.key")
    assert not any(value in str(deployment) for value in env.values())  # no secret is written in the manifest


def test_probes_and_shutdown_timing_match_the_drain_window(tmp_path):
    config, _ = gateway_config(tmp_path)
    container = gateway_container()
    pod = documents("gateway.yaml")["Deployment/shepherd"]["spec"]["template"]["spec"]
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readiness" and liveness["httpGet"]["path"] == "/liveness"
    for probe in (readiness, liveness):  # the main port serves TLS
        assert probe["httpGet"]["scheme"] == "HTTPS" and probe["httpGet"]["port"] == container["ports"][0]["name"]
    window = config.drain_window_secs
    assert window == 5
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) <= window  # 503 noticed in the window
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and float(command[1]) == window
    needed = float(command[1]) + window + config.shutdown_grace_period_secs
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 30  # no SIGKILL before the drain is over


def test_kustomize_builds_the_secrets_and_points_the_gateway_at_them(tmp_path):
    kubectl = str(require("kubectl"))
    deploy = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, deploy)
    for key in ("api-key", "admin-key", "reader-key"):
        (deploy / "secrets" / key).write_text(f"value-of-{key}")
    cert = trustme.CA().issue_cert("shepherd.inference.svc")
    cert.private_key_pem.write_to_path(str(deploy / "secrets" / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(deploy / "secrets" / "tls.crt"))
    built = subprocess.run([kubectl, "kustomize", str(deploy)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in spec["containers"][0]["env"]}
    refs |= {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert refs == set(secrets) and all(name.startswith(("shepherd-keys-", "shepherd-tls-")) for name in refs)
