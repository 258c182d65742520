"""List-then-watch with the real `kubernetes` client (configured by a kubeconfig) against the stand-in API server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shepherd.discovery.kube_watch import PodListWatch, WatchTiming
from shepherd.discovery.kubernetes import PodInfo
from tests.support.fake_kube import FakeKube
from tests.support.polling import until

SELECTOR = "app=sglang"
LABELS = {"app": "sglang"}


class Seen:
    """What the event loop was told, in order."""

    def __init__(self) -> None:
        self.snapshots: list[set[str]] = []
        self.events: list[tuple[str, str]] = []
        self.pods: dict[str, PodInfo] = {}

    def on_snapshot(self, pods: list[PodInfo]) -> None:
        self.snapshots.append({p.name for p in pods})

    def on_event(self, kind: str, pod: PodInfo) -> None:
        self.events.append((kind, pod.name))
        self.pods[pod.name] = pod


@pytest.fixture
async def kube(tmp_path, monkeypatch):
    async with FakeKube(bookmark_interval=0.1) as server:
        monkeypatch.setenv("KUBECONFIG", server.write_kubeconfig(str(tmp_path / "kubeconfig")))
        yield server


@pytest.fixture
async def start_watch():
    watches: list[PodListWatch] = []

    def start(namespace: str | None = None, timing: WatchTiming | None = None) -> Seen:
        seen = Seen()
        watch = PodListWatch(
            namespace,
            SELECTOR,
            lambda obj: PodInfo.from_json(obj, "sglang.ai/bootstrap-port"),
            seen.on_snapshot,
            seen.on_event,
            timing=timing or WatchTiming(backoff_initial_secs=0.05),
        )
        watch.start(asyncio.get_running_loop())
        watches.append(watch)
        return seen

    yield start
    for watch in watches:
        await watch.stop()
    assert not any(t.name == "k8s-pod-watch" for t in threading.enumerate()), "the watch thread outlived stop()"


async def test_watch_starts_at_the_list_resource_version_and_streams_changes(kube, start_watch):
    kube.create_pod("w-0", labels=LABELS, ip="10.0.0.1")
    kube.create_pod("web", labels={"app": "web"}, ip="10.0.0.9")
    kube.create_pod("elsewhere", "other-ns", labels=LABELS, ip="10.0.0.8")
    list_version = str(kube.resource_version)
    seen = start_watch(namespace="default")
    await until(lambda: kube.watch_requests, "the first watch")
    assert seen.snapshots == [{"w-0"}]
    query = kube.watch_requests[0]
    assert query["resourceVersion"] == list_version
    assert query["allowWatchBookmarks"] == "true"
    assert query["labelSelector"] == SELECTOR
    assert int(query["timeoutSeconds"]) >= 300

    kube.create_pod("w-1", labels=LABELS, ip="10.0.0.2", ready=False)
    kube.update_pod("w-1", ready=True)
    kube.update_pod("w-0", labels={"app": "sglang-old"})  # stops matching: the watch says DELETED
    kube.create_pod("w-2", "other-ns", labels=LABELS, ip="10.0.0.3")  # another namespace: not ours
    kube.delete_pod("w-1")
    await until(lambda: len(seen.events) == 4, "four events")
    assert seen.events == [("ADDED", "w-1"), ("MODIFIED", "w-1"), ("DELETED", "w-0"), ("DELETED", "w-1")]
    assert kube.list_requests == 1


async def test_all_namespaces_and_paginated_list(kube, start_watch):
    for i in range(1203):
        kube.create_pod(f"w-{i}", f"ns-{i % 3}", labels=LABELS, ip=f"10.1.{i // 250}.{i % 250}")
    seen = start_watch(timing=WatchTiming(page_size=500))
    await until(lambda: seen.snapshots, "the list")
    assert len(seen.snapshots[0]) == 1203
    assert kube.list_requests == 3  # 500 + 500 + 203


async def test_a_dropped_connection_resumes_the_watch_without_relisting(kube, start_watch):
    seen = start_watch()
    await until(lambda: kube.open_watches == 1, "an open watch")
    kube.drop_watches()
    kube.create_pod("w-0", labels=LABELS, ip="10.0.0.1")
    await until(lambda: seen.events == [("ADDED", "w-0")], "the event after the reconnect")
    assert kube.list_requests == 1
    assert len(kube.watch_requests) == 2


@pytest.mark.parametrize("expire_with", ["http", "event"])
async def test_expiry_relists_and_a_deletion_in_the_gap_is_not_missed(kube, start_watch, expire_with):
    kube.expire_with = expire_with
    kube.create_pod("keep", labels=LABELS, ip="10.0.0.1")
    kube.create_pod("gone", labels=LABELS, ip="10.0.0.2")
    seen = start_watch()
    await until(lambda: kube.open_watches == 1, "an open watch")
    kube.hold_watches()
    kube.drop_watches()
    await until(lambda: len(kube.watch_requests) == 2, "the reconnect attempt (held)")
    kube.delete_pod("gone")  # happens while nobody watches...
    kube.create_pod("new", labels=LABELS, ip="10.0.0.3")
    kube.compact()  # ...and the history that recorded it is gone
    kube.release_watches()
    await until(lambda: len(seen.snapshots) == 2, "a re-list")
    assert seen.snapshots == [{"keep", "gone"}, {"keep", "new"}]
    assert kube.expired_watches == 1
    await until(lambda: kube.open_watches == 1, "the watch from the new list")
    assert kube.watch_requests[-1]["resourceVersion"] == str(kube.resource_version)


async def test_a_watch_ended_by_its_server_side_timeout_resumes_from_the_last_bookmark(kube, start_watch):
    seen = start_watch(timing=WatchTiming(watch_timeout_secs=1, backoff_initial_secs=5))
    await until(lambda: kube.open_watches == 1, "an open watch")
    for i in range(5):
        kube.create_pod(f"web-{i}", labels={"app": "web"})  # advances the resourceVersion, no event for us
    latest = str(kube.resource_version)
    kube.compact()  # resuming from the list's resourceVersion would now get 410; bookmarks carry `latest`
    await until(lambda: len(kube.watch_requests) >= 2, "a second watch after the server-side timeout", 5)
    assert kube.watch_requests[1]["resourceVersion"] == latest
    assert kube.list_requests == 1 and kube.expired_watches == 0  # resumed at once (no 5 s backoff), no re-list
    kube.create_pod("w-0", labels=LABELS, ip="10.0.0.1")
    await until(lambda: seen.events == [("ADDED", "w-0")], "an event on the resumed watch")


async def test_an_event_line_larger_than_512_kib_is_parsed_whole(kube, start_watch):
    seen = start_watch()
    await until(lambda: kube.open_watches == 1, "an open watch")
    big = {"notes.example.com/blob": "x" * 700_000, "sglang.ai/bootstrap-port": "8998"}
    kube.create_pod("big", labels=LABELS, ip="10.0.0.1", annotations=big)
    kube.create_pod("after", labels=LABELS, ip="10.0.0.2")
    await until(lambda: len(seen.events) == 2, "both events")
    assert seen.events == [("ADDED", "big"), ("ADDED", "after")]
    assert seen.pods["big"].bootstrap_port == 8998
    assert kube.list_requests == 1 and len(kube.watch_requests) == 1  # the stream never broke
