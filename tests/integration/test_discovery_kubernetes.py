"""Kubernetes discovery end to end: the real gateway process, with the real `kubernetes` client configured by a
kubeconfig, watches the stand-in API server; pods point at simulated workers.

One simulated worker listens on 0.0.0.0:P, so every pod IP 127.0.x.y (all of 127.0.0.0/8 is loopback) is a
distinct worker URL `http://127.0.x.y:P` that answers. Each test uses its own pod names and IP range.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.discovery import metric, wait_workers_from, workers_from
from tests.support.fake_kube import FakeKubeThread
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import SimFleet, http_request, start_sim

NS = "inference"
LABELS = {"app": "sglang-worker", "tier": "gpu"}
SOURCE = "kubernetes"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Iterator[SimFleet]:
    with start_sim(tmp_path_factory.mktemp("k8s-sim"), 1, "--host", "0.0.0.0") as fleet:
        yield fleet


@pytest.fixture(scope="module")
def port(sim: SimFleet) -> int:
    return urlsplit(sim.urls[0]).port


@pytest.fixture(scope="module")
def kube(tmp_path_factory) -> Iterator[FakeKubeThread]:
    with FakeKubeThread(bookmark_interval=0.5) as server:
        yield server


def launch(tmp_path, kube: FakeKubeThread, *args: str, worker_urls: tuple[str, ...] = ()) -> GatewayProcess:
    kubeconfig = kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBECONFIG", kubeconfig)  # inherited by the gateway process
        return start_gateway(tmp_path, worker_urls, "--discovery-check-interval-secs", "1", *args)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, kube, sim, port) -> Iterator[GatewayProcess]:
    """Regular mode, all namespaces, plus a static worker at the simulated worker's own URL."""
    args = ("--service-discovery", "--selector", "app=sglang-worker", "tier=gpu", "--service-discovery-port", str(port))
    with launch(tmp_path_factory.mktemp("k8s-gw"), kube, *args, worker_urls=(sim.urls[0],)) as gw:
        yield gw


def url(ip: str, port: int) -> str:
    return f"http://{ip}:{port}"


def create_ready(kube: FakeKubeThread, name: str, ip: str, namespace: str = NS, **kwargs) -> dict:
    return kube.create_pod(name, namespace, labels=kwargs.pop("labels", LABELS), ip=ip, **kwargs)


def test_pods_scaling_up_and_down_register_and_remove_workers(gateway, kube, port, sim):
    ips = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    pods = [create_ready(kube, f"scale-{i}", ip) for i, ip in enumerate(ips)]
    create_ready(kube, "scale-x", "127.0.1.9", labels={"app": "sglang-worker"})  # lacks tier=gpu
    create_ready(kube, "scale-y", "127.0.1.8", namespace="batch")  # another namespace: all are watched
    expected = {url(ip, port) for ip in [*ips, "127.0.1.8"]}
    found = wait_workers_from(gateway, SOURCE, expected, "scale-")
    for pod, ip in zip(pods, ips, strict=True):
        labels = found[url(ip, port)]["labels"]
        assert labels["smg.ai/pod-name"] == pod["metadata"]["name"]
        assert labels["smg.ai/pod-namespace"] == NS
        assert labels["smg.ai/pod-uid"] == pod["metadata"]["uid"]
        assert labels["smg.ai/discovery-provider"] == SOURCE
    assert found[url("127.0.1.8", port)]["labels"]["smg.ai/pod-namespace"] == "batch"

    status, body = http_request(
        "POST", gateway.url + "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    )
    assert status == 200, body  # discovered workers serve traffic

    kube.delete_pod("scale-1", NS)
    kube.delete_pod("scale-2", NS)
    kube.delete_pod("scale-y", "batch")
    wait_workers_from(gateway, SOURCE, {url(ips[0], port)}, "scale-")
    assert sim.urls[0] in {w["url"] for w in gateway.workers()}  # the static worker stayed
    kube.delete_pod("scale-0", NS)
    kube.delete_pod("scale-x", NS)
    wait_workers_from(gateway, SOURCE, set(), "scale-")


def test_readiness_gates_registration_and_terminating_pods_leave(gateway, kube, port):
    kube.create_pod("flip", NS, labels=LABELS, ip=None, phase="Pending", ready=False)
    kube.update_pod("flip", NS, ip="127.0.2.1", phase="Running", ready=False)
    # A later ready pod: once it is registered, the reconciler has seen `flip` running but not ready.
    create_ready(kube, "flip-witness", "127.0.2.9")
    wait_workers_from(gateway, SOURCE, {url("127.0.2.9", port)}, "flip")

    kube.update_pod("flip", NS, ready=True)
    wait_workers_from(gateway, SOURCE, {url("127.0.2.1", port), url("127.0.2.9", port)}, "flip")
    worker_id = workers_from(gateway, SOURCE, "flip")[url("127.0.2.1", port)]["id"]

    kube.update_pod("flip", NS, ready=False)  # NotReady keeps the worker, out of routing (see the next test)
    kube.delete_pod("flip-witness", NS)
    wait_workers_from(gateway, SOURCE, {url("127.0.2.1", port)}, "flip")
    assert workers_from(gateway, SOURCE, "flip")[url("127.0.2.1", port)]["id"] == worker_id

    kube.update_pod("flip", NS, terminating=True)  # deletionTimestamp set: drained and removed at once
    wait_workers_from(gateway, SOURCE, set(), "flip")
    kube.delete_pod("flip", NS)


def test_a_not_ready_pod_leaves_routing_at_once_and_comes_back_when_ready(tmp_path, kube, port):
    args = ("--service-discovery", "--selector", "app=hold-test", "--service-discovery-namespace", "hold",
            "--service-discovery-port", str(port), "--disable-retries")  # fmt: skip
    with launch(tmp_path, kube, *args) as gw:
        kube.create_pod("hold-0", "hold", labels={"app": "hold-test"}, ip="127.0.9.1")
        worker_url = url("127.0.9.1", port)
        worker = wait_workers_from(gw, SOURCE, {worker_url})[worker_url]
        assert worker["routing_hold"] is None
        assert gw.post("/generate", {"text": "x"})[0] == 200

        kube.update_pod("hold-0", "hold", ready=False)  # Service semantics: out of routing, still registered
        gw.process.wait_for(lambda: gw.get("/readiness")[0] == 503, 5, "readiness 503: no routable worker")
        status, body = gw.post("/generate", {"text": "x"})
        assert status == 503 and body["error"]["code"] == "no_available_workers", body
        held = workers_from(gw, SOURCE)[worker_url]
        assert held["id"] == worker["id"] and held["status"] == "ready" and "not ready" in held["routing_hold"]

        kube.update_pod("hold-0", "hold", ready=True)
        gw.process.wait_for(lambda: gw.get("/readiness")[0] == 200, 5, "the worker back in routing")
        back = workers_from(gw, SOURCE)[worker_url]
        assert back["id"] == worker["id"] and back["routing_hold"] is None
        assert gw.post("/generate", {"text": "x"})[0] == 200
        kube.delete_pod("hold-0", "hold")
        wait_workers_from(gw, SOURCE, set())


def test_a_pod_relabeled_out_of_the_selector_is_removed_and_back_in_is_added(gateway, kube, port):
    create_ready(kube, "relabel", "127.0.3.1")
    first = wait_workers_from(gateway, SOURCE, {url("127.0.3.1", port)}, "relabel")
    kube.update_pod("relabel", NS, labels={"app": "sglang-worker", "tier": "cpu"})
    wait_workers_from(gateway, SOURCE, set(), "relabel")
    kube.update_pod("relabel", NS, labels=LABELS)
    again = wait_workers_from(gateway, SOURCE, {url("127.0.3.1", port)}, "relabel")
    assert again[url("127.0.3.1", port)]["id"] != first[url("127.0.3.1", port)]["id"]
    kube.delete_pod("relabel", NS)
    wait_workers_from(gateway, SOURCE, set(), "relabel")


def test_a_new_pod_uid_at_the_same_ip_replaces_the_worker(gateway, kube, port):
    worker_url = url("127.0.4.1", port)
    old = create_ready(kube, "sts-0", "127.0.4.1")
    old_id = wait_workers_from(gateway, SOURCE, {worker_url}, "sts-")[worker_url]["id"]

    kube.delete_pod("sts-0", NS)  # a StatefulSet recreates its pod with the same name and (here) the same IP
    new = create_ready(kube, "sts-0", "127.0.4.1")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    gateway.process.wait_for(
        lambda: (
            workers_from(gateway, SOURCE, "sts-").get(worker_url, {}).get("labels", {}).get("smg.ai/pod-uid")
            == new["metadata"]["uid"]
        ),
        15,
        "the worker of the new pod",
    )
    replaced = wait_workers_from(gateway, SOURCE, {worker_url}, "sts-")[worker_url]
    assert replaced["id"] != old_id

    # A replacement that is not Ready yet: the old worker leaves, the new one comes when Ready.
    kube.delete_pod("sts-0", NS)
    newest = create_ready(kube, "sts-0", "127.0.4.1", ready=False)
    wait_workers_from(gateway, SOURCE, set(), "sts-")
    kube.update_pod("sts-0", NS, ready=True)
    final = wait_workers_from(gateway, SOURCE, {worker_url}, "sts-")[worker_url]
    assert final["labels"]["smg.ai/pod-uid"] == newest["metadata"]["uid"]
    kube.delete_pod("sts-0", NS)
    wait_workers_from(gateway, SOURCE, set(), "sts-")


def test_workers_added_by_hand_are_never_touched(gateway, kube, port, sim):
    api_url = url("127.0.5.1", port)
    status, body = gateway.post("/workers", {"url": api_url})
    assert status == 202, body
    gateway.wait_workers(lambda ws: any(w["url"] == api_url and w["status"] == "ready" for w in ws), "api worker")
    before = {w["url"]: w["id"] for w in gateway.workers() if w["source"] in ("api", "static")}
    assert set(before) == {api_url, sim.urls[0]}

    create_ready(kube, "hand-static", "127.0.0.1")  # claims the static worker's URL
    create_ready(kube, "hand-api", "127.0.5.1")  # claims the API-added worker's URL
    create_ready(kube, "hand-witness", "127.0.5.9")
    wait_workers_from(gateway, SOURCE, {url("127.0.5.9", port)}, "hand-")
    assert {w["url"]: w["id"] for w in gateway.workers() if w["source"] in ("api", "static")} == before

    for name in ("hand-static", "hand-api", "hand-witness"):
        kube.delete_pod(name, NS)
    wait_workers_from(gateway, SOURCE, set(), "hand-")
    assert {w["url"]: w["id"] for w in gateway.workers() if w["source"] in ("api", "static")} == before
    status, _ = http_request("DELETE", f"{gateway.url}/workers/{before[api_url]}")
    assert status == 202


def test_a_dropped_watch_connection_resumes_without_a_relist(gateway, kube, port):
    gateway.process.wait_for(lambda: kube.open_watches >= 1, 10, "an open watch")
    lists = kube.list_requests
    kube.drop_watches()
    create_ready(kube, "drop-0", "127.0.6.1")
    wait_workers_from(gateway, SOURCE, {url("127.0.6.1", port)}, "drop-")
    assert kube.list_requests == lists
    kube.delete_pod("drop-0", NS)
    wait_workers_from(gateway, SOURCE, set(), "drop-")


@pytest.mark.parametrize("expire_with", ["http", "event"])
def test_a_deletion_while_the_watch_is_down_and_expired_is_not_missed(gateway, kube, port, expire_with):
    kube.expire_with = expire_with
    create_ready(kube, "gap-keep", "127.0.7.1")
    create_ready(kube, "gap-gone", "127.0.7.2")
    wait_workers_from(gateway, SOURCE, {url("127.0.7.1", port), url("127.0.7.2", port)}, "gap-")
    expired, lists, watches = kube.expired_watches, kube.list_requests, len(kube.watch_requests)

    kube.hold_watches()
    kube.drop_watches()
    gateway.process.wait_for(lambda: len(kube.watch_requests) > watches, 10, "the gateway's held reconnect")
    kube.delete_pod("gap-gone", NS)  # nobody is watching...
    kube.compact()  # ...and the history that recorded the deletion is gone: resuming gets 410
    kube.release_watches()

    wait_workers_from(gateway, SOURCE, {url("127.0.7.1", port)}, "gap-")
    assert kube.expired_watches == expired + 1
    assert kube.list_requests == lists + 1
    kube.delete_pod("gap-keep", NS)
    wait_workers_from(gateway, SOURCE, set(), "gap-")


def test_pd_roles_from_selectors_with_bootstrap_port_annotations(tmp_path, kube, port):
    args = (
        "--pd-disaggregation",
        "--service-discovery",
        "--prefill-selector", "app=sglang", "role=prefill",
        "--decode-selector", "app=sglang", "role=decode",
        "--service-discovery-namespace", "pd",
        "--service-discovery-port", str(port),
        "--bootstrap-port-annotation", "example.com/bootstrap-port",
    )  # fmt: skip
    with launch(tmp_path, kube, *args) as gw:
        annotation = {"example.com/bootstrap-port": "9001"}
        prefill, decode = {"app": "sglang", "role": "prefill"}, {"app": "sglang", "role": "decode"}
        kube.create_pod("pd-p0", "pd", labels=prefill, ip="127.0.8.1", annotations=annotation)
        kube.create_pod("pd-p1", "pd", labels=prefill, ip="127.0.8.2")
        kube.create_pod("pd-d0", "pd", labels=decode, ip="127.0.8.3", annotations=annotation)
        kube.create_pod("pd-r0", "pd", labels={"app": "sglang", "role": "router"}, ip="127.0.8.4")
        kube.create_pod("pd-xns", NS, labels=prefill, ip="127.0.8.5")  # not in the watched namespace
        found = wait_workers_from(gw, SOURCE, {url(f"127.0.8.{i}", port) for i in (1, 2, 3)}, "pd-")
        roles = {w["labels"]["smg.ai/pod-name"]: (w["worker_type"], w.get("bootstrap_port")) for w in found.values()}
        assert roles == {"pd-p0": ("prefill", 9001), "pd-p1": ("prefill", None), "pd-d0": ("decode", None)}

        kube.update_pod("pd-d0", "pd", labels=prefill)  # role change: replaced
        gw.process.wait_for(
            lambda: workers_from(gw, SOURCE, "pd-d0").get(url("127.0.8.3", port), {}).get("worker_type") == "prefill",
            15,
            "pd-d0 re-registered as prefill",
        )
        assert workers_from(gw, SOURCE, "pd-d0")[url("127.0.8.3", port)]["bootstrap_port"] == 9001
        assert metric(gw, "smg_discovery_workers_discovered", source=SOURCE) == 3
        for name in ("pd-p0", "pd-p1", "pd-d0", "pd-r0"):
            kube.delete_pod(name, "pd")
        kube.delete_pod("pd-xns", NS)
        wait_workers_from(gw, SOURCE, set(), "pd-")


def test_500_pods_churning_end_in_the_right_workers(gateway, kube, port):
    ns = "churn"

    def ip(i: int) -> str:
        return f"127.0.{100 + i // 250}.{1 + i % 250}"

    for i in range(500):
        create_ready(kube, f"churn-{i}", ip(i), namespace=ns)
    wait_workers_from(gateway, SOURCE, {url(ip(i), port) for i in range(500)}, "churn-", timeout=60)
    registered = metric(gateway, "smg_discovery_registrations_total", source=SOURCE, result="success")
    deregistered = metric(gateway, "smg_discovery_deregistrations_total", source=SOURCE, reason="reconciled")

    alive = set(range(500))
    for i in range(0, 150):  # scale down
        kube.delete_pod(f"churn-{i}", ns)
        alive.discard(i)
    for i in range(150, 250):  # readiness lost: workers stay
        kube.update_pod(f"churn-{i}", ns, ready=False)
    for i in range(250, 300):  # relabeled away
        kube.update_pod(f"churn-{i}", ns, labels={"app": "sglang-worker", "tier": "cpu"})
        alive.discard(i)
    for i in range(300, 350):  # terminating
        kube.update_pod(f"churn-{i}", ns, terminating=True)
        alive.discard(i)
    for i in range(0, 50):  # recreated at the same IPs with new uids
        create_ready(kube, f"churn-{i}", ip(i), namespace=ns)
        alive.add(i)
    for i in range(500, 600):  # scale up
        create_ready(kube, f"churn-{i}", ip(i), namespace=ns)
        alive.add(i)

    found = wait_workers_from(gateway, SOURCE, {url(ip(i), port) for i in alive}, "churn-", timeout=60)
    assert len(found) == 400  # 500 - 150 deleted - 50 relabeled - 50 terminating + 50 recreated + 100 new
    assert {w["labels"]["smg.ai/pod-uid"] for w in found.values()} == {
        p["metadata"]["uid"] for p in kube.pods.values() if p["metadata"]["name"] in {f"churn-{i}" for i in alive}
    }
    # Exactly one registration per new pod (50 recreated + 100 new) and one removal per pod gone (150 deleted,
    # 50 relabeled, 50 terminating): no worker flapped on the way.
    gateway.process.wait_for(
        lambda: (
            metric(gateway, "smg_discovery_registrations_total", source=SOURCE, result="success") == registered + 150
        ),
        10,
        "150 more registrations",
    )
    assert metric(gateway, "smg_discovery_deregistrations_total", source=SOURCE, reason="reconciled") == (
        deregistered + 250
    )

    for i in range(600):
        if i in alive or 150 <= i < 350:
            kube.delete_pod(f"churn-{i}", ns)
    wait_workers_from(gateway, SOURCE, set(), "churn-", timeout=30)
