"""Kubernetes discovery against a real kube-apiserver and etcd (tests/support/kube_real.py).

The gateway runs the real `kubernetes` client with a kubeconfig holding a token of the service account that
deploy/kubernetes/rbac.yaml creates (applied with kubectl), so every list and watch is authorized by real RBAC.
There is no kubelet or scheduler: the test creates pods and writes their status itself (Running, Ready, a
127.0.0.x podIP), and a `shepherd sim` process listens on each of those addresses at the discovery port. The
gateway reaches the API server through a TCP proxy the test can cut. Faults a real server cannot produce on
demand stay with the stand-in API server (test_discovery_kubernetes.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.discovery import wait_workers_from, workers_from
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.kube_real import HostedSim, KubeCluster, TcpProxy, common_free_port

NS = "inference"  # the manifests' namespace
SA = "shepherd"  # the manifests' service account
MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
SOURCE = "kubernetes"
WORKER = {"app": "sglang-worker"}  # gateway.yaml's --selector
PREFILL = {"app": "sglang", "role": "prefill"}  # pd-workers.yaml's selectors
DECODE = {"app": "sglang", "role": "decode"}
BOOTSTRAP_ANNOTATION = "sglang.ai/bootstrap-port"
HOSTS = {"a": "127.0.0.11", "b": "127.0.0.12", "c": "127.0.0.13", "prefill": "127.0.0.21", "decode": "127.0.0.22"}
RBAC_HINT = "check the service account's RBAC"
QUIET_REFUSAL = "with credentials the API server accepted before"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[KubeCluster]:
    """The control plane, with the namespace and the manifests' RBAC applied by kubectl."""
    with KubeCluster(tmp_path_factory.mktemp("kube")).start() as kube:
        kube.kubectl("create", "namespace", NS)
        kube.kubectl("apply", "-f", str(MANIFESTS / "rbac.yaml"))
        yield kube


@pytest.fixture(scope="module")
def api(cluster: KubeCluster) -> Any:
    return cluster.core_api()


@pytest.fixture(scope="module")
def token(cluster: KubeCluster) -> str:
    return cluster.service_account_token(NS, SA)


@pytest.fixture(scope="module")
def proxy(cluster: KubeCluster) -> Iterator[TcpProxy]:
    with TcpProxy(cluster.port) as tcp:
        yield tcp


@pytest.fixture(scope="module")
def port() -> int:
    return common_free_port(list(HOSTS.values()))


@pytest.fixture(scope="module")
def sims(tmp_path_factory, port: int) -> Iterator[dict[str, HostedSim]]:
    log_dir = tmp_path_factory.mktemp("kube-sims")
    role_args = {"prefill": ("--role", "prefill", "--bootstrap-port", "0"), "decode": ("--role", "decode")}
    started = {name: HostedSim(log_dir, host, port, *role_args.get(name, ())) for name, host in HOSTS.items()}
    try:
        for sim in started.values():
            sim.start()
        for sim in started.values():
            sim.wait_ready()
        yield started
    finally:
        for sim in started.values():
            sim.stop()


def launch(tmp_path: Path, cluster: KubeCluster, proxy: TcpProxy, token: str, *args: str) -> GatewayProcess:
    """The gateway, authenticated as the service account, reaching the API server through the proxy."""
    kubeconfig = cluster.kubeconfig(tmp_path / "shepherd.kubeconfig", token, f"https://127.0.0.1:{proxy.port}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBECONFIG", str(kubeconfig))  # inherited by the gateway process
        return start_gateway(
            tmp_path, (), "--service-discovery", "--service-discovery-namespace", NS, "--policy", "round_robin", *args
        )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, cluster, proxy, token, port, sims) -> Iterator[GatewayProcess]:
    """Regular mode, configured as deploy/kubernetes/gateway.yaml configures it."""
    args = ("--selector", "app=sglang-worker", "--service-discovery-port", str(port))
    with launch(tmp_path_factory.mktemp("kube-gw"), cluster, proxy, token, *args) as gw:
        yield gw


def url(name: str, port: int) -> str:
    return f"http://{HOSTS[name]}:{port}"


def create_pod(
    api: Any, name: str, labels: dict[str, str], host: str | None = None, ready: bool = True, **annotations: str
) -> dict[str, Any]:
    """A pod bound to a node that does not run it; with `host`, its status is written as a kubelet would."""
    body = {
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"nodeName": "node-1", "containers": [{"name": "sglang", "image": "lmsysorg/sglang:latest"}]},
    }
    pod = api.create_namespaced_pod(NS, body).to_dict()
    if host is not None:
        set_status(api, name, host, ready)
    return pod


def set_status(api: Any, name: str, host: str, ready: bool) -> None:
    status = {
        "phase": "Running",
        "podIP": host,
        "podIPs": [{"ip": host}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    api.patch_namespaced_pod_status(name, NS, {"status": status})


def delete_pods(api: Any, *names: str) -> None:
    """Delete at once (grace period 0), as the kubelet confirms a pod's end."""
    for name in names:
        api.delete_namespaced_pod(name, NS, grace_period_seconds=0)


def generate(gateway: GatewayProcess, count: int) -> None:
    for _ in range(count):
        status, body = gateway.post("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200, body


def log_count(gateway: GatewayProcess, text: str) -> int:
    return gateway.process.log_path.read_text(errors="replace").count(text)


def test_the_manifests_rbac_allows_reading_pods_in_its_namespace_only(cluster, token, tmp_path):
    kubeconfig = cluster.kubeconfig(tmp_path / "sa.kubeconfig", token)

    def can(*args: str) -> bool:
        result = cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        assert result.stdout.strip() in ("yes", "no"), result.stderr
        return result.stdout.strip() == "yes"

    assert all(can(verb, "pods", "-n", NS) for verb in ("get", "list", "watch"))
    assert not can("list", "pods", "-n", "default")
    assert not can("list", "pods", "--all-namespaces")
    assert not any(can(verb, "pods", "-n", NS) for verb in ("create", "patch", "delete"))
    assert not can("get", "secrets", "-n", NS)
    denied = cluster.kubectl("get", "pods", "-n", "default", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr


def test_the_other_manifests_pass_the_api_servers_validation(cluster):
    for name in ("gateway.yaml", "workers.yaml", "pd-workers.yaml", "rbac-cluster.yaml"):
        cluster.kubectl("apply", "--dry-run=server", "-f", str(MANIFESTS / name))


def test_scaling_up_and_down(gateway, api, sims, port):
    pods = [create_pod(api, f"scale-{name}", WORKER, HOSTS[name]) for name in ("a", "b", "c")]
    create_pod(api, "scale-other", {"app": "other"}, "127.0.0.14")  # not selected
    found = wait_workers_from(gateway, SOURCE, {url(name, port) for name in ("a", "b", "c")}, "scale-")
    for pod, name in zip(pods, ("a", "b", "c"), strict=True):
        labels = found[url(name, port)]["labels"]
        assert labels["smg.ai/pod-name"] == pod["metadata"]["name"]
        assert labels["smg.ai/pod-namespace"] == NS
        assert labels["smg.ai/pod-uid"] == pod["metadata"]["uid"]

    before = {name: sims[name].generate_requests() for name in ("a", "b", "c")}
    generate(gateway, 6)
    assert {name: sims[name].generate_requests() - before[name] for name in before} == {"a": 2, "b": 2, "c": 2}

    delete_pods(api, "scale-b", "scale-c")
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "scale-")
    delete_pods(api, "scale-a", "scale-other")
    wait_workers_from(gateway, SOURCE, set(), "scale-")


def test_readiness_gates_registration_and_a_not_ready_pod_leaves_routing(gateway, api, sims, port):
    create_pod(api, "flip-b", WORKER)  # Pending, no IP yet
    set_status(api, "flip-b", HOSTS["b"], ready=False)
    create_pod(api, "flip-a", WORKER, HOSTS["a"])  # once it is registered, flip-b was seen Running, not Ready
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "flip-")
    set_status(api, "flip-b", HOSTS["b"], ready=True)
    wait_workers_from(gateway, SOURCE, {url("a", port), url("b", port)}, "flip-")

    set_status(api, "flip-b", HOSTS["b"], ready=False)

    def skipped() -> bool:
        before = sims["b"].generate_requests()
        generate(gateway, 4)
        return sims["b"].generate_requests() == before

    gateway.process.wait_for(skipped, 5, "requests to skip the NotReady pod's worker")
    before = sims["b"].generate_requests()
    generate(gateway, 10)
    assert sims["b"].generate_requests() == before

    set_status(api, "flip-b", HOSTS["b"], ready=True)
    gateway.process.wait_for(lambda: not skipped(), 15, "requests to reach the pod again once Ready")
    delete_pods(api, "flip-a", "flip-b")
    wait_workers_from(gateway, SOURCE, set(), "flip-")


def test_a_pod_relabeled_out_of_the_selector_leaves_and_comes_back(gateway, api, port):
    create_pod(api, "relabel", WORKER, HOSTS["a"])
    first = wait_workers_from(gateway, SOURCE, {url("a", port)}, "relabel")
    api.patch_namespaced_pod("relabel", NS, {"metadata": {"labels": {"app": "sglang-worker-canary"}}})
    wait_workers_from(gateway, SOURCE, set(), "relabel")
    api.patch_namespaced_pod("relabel", NS, {"metadata": {"labels": WORKER}})
    again = wait_workers_from(gateway, SOURCE, {url("a", port)}, "relabel")
    assert again[url("a", port)]["id"] != first[url("a", port)]["id"]
    delete_pods(api, "relabel")
    wait_workers_from(gateway, SOURCE, set(), "relabel")


def test_a_deleted_pod_leaves_while_it_is_still_terminating(gateway, api, port):
    create_pod(api, "term", WORKER, HOSTS["a"])
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "term")
    api.delete_namespaced_pod("term", NS)  # graceful: no kubelet confirms, so the pod stays, terminating
    wait_workers_from(gateway, SOURCE, set(), "term")
    assert api.read_namespaced_pod("term", NS).metadata.deletion_timestamp is not None
    delete_pods(api, "term")


def test_pd_roles_from_selectors_and_the_bootstrap_annotation(tmp_path, cluster, proxy, token, api, sims, port):
    args = (
        "--pd-disaggregation",
        "--prefill-selector", "app=sglang", "role=prefill",
        "--decode-selector", "app=sglang", "role=decode",
        "--service-discovery-port", str(port),
    )  # fmt: skip
    bootstrap = str(sims["prefill"].bootstrap_port)
    with launch(tmp_path, cluster, proxy, token, *args) as gw:
        create_pod(api, "pd-prefill", PREFILL, HOSTS["prefill"], **{BOOTSTRAP_ANNOTATION: bootstrap})
        create_pod(api, "pd-decode", DECODE, HOSTS["decode"], **{BOOTSTRAP_ANNOTATION: "1"})  # ignored for decode
        create_pod(api, "pd-router", {"app": "sglang", "role": "router"}, "127.0.0.23")  # neither role
        found = wait_workers_from(gw, SOURCE, {url("prefill", port), url("decode", port)}, "pd-")
        roles = {w["labels"]["smg.ai/pod-name"]: (w["worker_type"], w.get("bootstrap_port")) for w in found.values()}
        assert roles == {"pd-prefill": ("prefill", int(bootstrap)), "pd-decode": ("decode", None)}

        verified = sims["decode"].log()["verified_rooms"]
        generate(gw, 1)  # the decode worker checks its room at the prefill pod's IP and annotated port
        assert sims["decode"].log()["verified_rooms"] == verified + 1
        delete_pods(api, "pd-prefill", "pd-decode", "pd-router")
        wait_workers_from(gw, SOURCE, set(), "pd-")


def test_a_410_after_etcd_compaction_relists_and_misses_no_deletion(gateway, cluster, api, proxy, port):
    create_pod(api, "gap-keep", WORKER, HOSTS["a"])
    create_pod(api, "gap-gone", WORKER, HOSTS["b"])
    wait_workers_from(gateway, SOURCE, {url("a", port), url("b", port)}, "gap-")
    expired, listed = log_count(gateway, "Pod watch expired"), log_count(gateway, "Listed ")

    proxy.cut()  # the gateway's watch drops and its reconnects are refused...
    refused = proxy.refused
    gateway.process.wait_for(lambda: proxy.refused > refused, 10, "a refused reconnect")
    delete_pods(api, "gap-gone")  # ...while a pod goes...
    cluster.compact()  # ...and etcd forgets the history that recorded it
    proxy.restore()

    wait_workers_from(gateway, SOURCE, {url("a", port)}, "gap-")
    assert log_count(gateway, "Pod watch expired") == expired + 1  # a real 410 from the API server
    assert log_count(gateway, "Listed ") == listed + 1
    delete_pods(api, "gap-keep")
    wait_workers_from(gateway, SOURCE, set(), "gap-")


def test_the_gateway_rides_out_an_apiserver_restart(gateway, cluster, api, port):
    create_pod(api, "restart-a", WORKER, HOSTS["a"])
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "restart-")
    hints = log_count(gateway, RBAC_HINT)

    cluster.stop_apiserver()
    generate(gateway, 2)  # discovered workers keep serving while the API server is away
    assert set(workers_from(gateway, SOURCE, "restart-")) == {url("a", port)}
    cluster.start_apiserver()

    create_pod(api, "restart-b", WORKER, HOSTS["b"])
    delete_pods(api, "restart-a")
    wait_workers_from(gateway, SOURCE, {url("b", port)}, "restart-", timeout=30)
    assert log_count(gateway, RBAC_HINT) == hints  # a 403 while RBAC loads is not blamed on the manifests
    delete_pods(api, "restart-b")
    wait_workers_from(gateway, SOURCE, set(), "restart-")


def test_a_refusal_after_access_worked_is_explained_and_retried_quietly(gateway, cluster, api, proxy, port):
    create_pod(api, "access-a", WORKER, HOSTS["a"])
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "access-")  # access worked: the gateway listed and watched
    delete_pods(api, "access-a")
    wait_workers_from(gateway, SOURCE, set(), "access-")
    hints, quiet = log_count(gateway, RBAC_HINT), log_count(gateway, QUIET_REFUSAL)
    cluster.kubectl("delete", "rolebinding", "shepherd-discovery", "-n", NS)
    proxy.cut()  # the open watch was authorized when it started: make the gateway ask again
    refused = proxy.refused
    gateway.process.wait_for(lambda: proxy.refused > refused, 10, "a refused reconnect")
    proxy.restore()
    gateway.process.wait_for(lambda: log_count(gateway, QUIET_REFUSAL) > quiet, 15, "the refusal explained")

    cluster.kubectl("apply", "-f", str(MANIFESTS / "rbac.yaml"))
    create_pod(api, "regrant", WORKER, HOSTS["a"])
    wait_workers_from(gateway, SOURCE, {url("a", port)}, "regrant", timeout=30)
    assert log_count(gateway, QUIET_REFUSAL) == quiet + 1  # said once, however many retries were refused
    assert log_count(gateway, RBAC_HINT) == hints
    assert log_count(gateway, "accepts the credentials again") >= 1
    delete_pods(api, "regrant")
    wait_workers_from(gateway, SOURCE, set(), "regrant")
