"""A stand-in Kubernetes API server for pods, speaking the real wire protocol to the real `kubernetes` client.

What it serves (JSON only, bearer-token auth):
- LIST `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods` with `labelSelector` (`k=v`, `k==v`, `k!=v`,
  `k`, `!k`, comma-joined) and `limit`/`continue` pagination; a `PodList` whose `metadata.resourceVersion` is the
  point to watch from.
- WATCH (`?watch=true&resourceVersion=..&allowWatchBookmarks=true&timeoutSeconds=..`): a chunked stream of
  newline-delimited `{"type", "object"}` events. Changes after the requested resourceVersion are replayed from
  the history, then live ones follow. As the real watch cache does, a change that makes an object match the
  selector is sent as ADDED and one that makes it stop matching as DELETED. BOOKMARK events carry the latest
  resourceVersion; the server ends the stream after `timeoutSeconds`.
- Expiry: `compact()` forgets the history; a watch from an older resourceVersion then gets 410 Gone, as an
  HTTP 410 Status (`expire_with="http"`) or as an ERROR event carrying a Status with code 410 (`"event"`).

Test controls (call them on the server's event loop): `create_pod`, `update_pod`, `delete_pod`, `compact`,
`drop_watches` (abort open watch connections mid-stream), `hold_watches`/`release_watches` (new watch requests
wait), and counters of list and watch requests. `write_kubeconfig(path)` points a real client at it.
`FakeKubeThread` runs one on its own event-loop thread for synchronous tests and forwards those calls.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import yaml
from aiohttp import web

PodKey = tuple[str, str]  # (namespace, name)
_KEEP = object()  # update_pod: leave the pod IP as it is


@dataclass(frozen=True, slots=True)
class _Change:
    resource_version: int
    kind: str  # ADDED, MODIFIED, DELETED
    old: dict[str, Any] | None
    new: dict[str, Any]  # for DELETED: the object as deleted


class _Requirement:
    def __init__(self, text: str) -> None:
        text = text.strip()
        self.negate_exists = text.startswith("!")
        if "!=" in text:
            self.key, self.value, self.op = *text.split("!=", 1), "!="
        elif "==" in text:
            self.key, self.value, self.op = *text.split("==", 1), "="
        elif "=" in text:
            self.key, self.value, self.op = *text.split("=", 1), "="
        else:
            self.key, self.value, self.op = text.lstrip("!"), "", "!" if self.negate_exists else "exists"

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "=":
            return labels.get(self.key) == self.value
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.op == "!":
            return self.key not in labels
        return self.key in labels


class LabelSelector:
    def __init__(self, text: str | None) -> None:
        self.requirements = [_Requirement(part) for part in (text or "").split(",") if part.strip()]

    def matches(self, pod: Mapping[str, Any] | None) -> bool:
        if pod is None:
            return False
        labels = pod["metadata"].get("labels") or {}
        return all(r.matches(labels) for r in self.requirements)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeKube:
    def __init__(
        self,
        token: str = "fake-token",
        bookmark_interval: float = 0.5,
        expire_with: str = "event",
        write_chunk: int = 16 * 1024,
    ) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.expire_with = expire_with  # "event" (ERROR event in a 200 stream) or "http" (HTTP 410)
        self.write_chunk = write_chunk  # events are written in chunks of at most this size, like HTTP/2 frames
        self.pods: dict[PodKey, dict[str, Any]] = {}
        self.resource_version = 100
        self.history: list[_Change] = []
        self.oldest_watchable = self.resource_version  # watches from an older resourceVersion get 410
        self.list_requests = 0
        self.watch_requests: list[dict[str, str]] = []  # the query of each watch request
        self.expired_watches = 0
        self._subscribers: set[asyncio.Queue[_Change]] = set()
        self._watching: set[asyncio.Transport] = set()  # connections of the open watch streams
        self._released = asyncio.Event()
        self._released.set()
        self._pages: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.url = ""

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods_route)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_route)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        self.release_watches()
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeKube:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def write_kubeconfig(self, path: str, namespace: str = "default") -> str:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    # --- pods ----------------------------------------------------------------------------------------------
    def create_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        ip: str | None = None,
        phase: str = "Running",
        ready: bool = True,
        uid: str | None = None,
    ) -> dict[str, Any]:
        key = (namespace, name)
        if key in self.pods:
            raise ValueError(f"pod {namespace}/{name} exists")
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid or str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "labels": dict(labels or {}),
                "annotations": dict(annotations or {}),
            },
            "spec": {
                "containers": [{"name": "worker", "image": "lmsysorg/sglang:latest", "ports": [{"containerPort": 80}]}],
                "nodeName": "node-1",
            },
            "status": {},
        }
        self._set_status(pod, ip=ip, phase=phase, ready=ready)
        self._record("ADDED", None, pod)
        self.pods[key] = pod
        return pod

    def update_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        ip: Any = _KEEP,
        phase: str | None = None,
        ready: bool | None = None,
        terminating: bool = False,
    ) -> dict[str, Any]:
        old = self.pods[(namespace, name)]
        pod = orjson.loads(orjson.dumps(old))
        meta, status = pod["metadata"], pod["status"]
        if labels is not None:
            meta["labels"] = dict(labels)
        if annotations is not None:
            meta["annotations"] = dict(annotations)
        if terminating:
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 30
        self._set_status(
            pod,
            ip=status.get("podIP") if ip is _KEEP else ip,
            phase=phase or status["phase"],
            ready=_is_ready(old) if ready is None else ready,
        )
        self._record("MODIFIED", old, pod)
        self.pods[(namespace, name)] = pod
        return pod

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        old = self.pods.pop((namespace, name))
        pod = orjson.loads(orjson.dumps(old))
        self._record("DELETED", old, pod)

    def _set_status(self, pod: dict[str, Any], *, ip: str | None, phase: str, ready: bool) -> None:
        status: dict[str, Any] = {"phase": phase, "hostIP": "192.168.0.1"}
        if ip:
            status["podIP"] = ip
            status["podIPs"] = [{"ip": ip}]
        status["conditions"] = [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "PodScheduled", "status": "True"},
        ]
        pod["status"] = status

    def _record(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        self.resource_version += 1
        new["metadata"]["resourceVersion"] = str(self.resource_version)
        change = _Change(self.resource_version, kind, old, new)
        self.history.append(change)
        for queue in self._subscribers:
            queue.put_nowait(change)

    # --- failure injection ---------------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the event history: resuming a watch from any earlier resourceVersion now gets 410 Gone."""
        self.history.clear()
        self.oldest_watchable = self.resource_version

    def drop_watches(self) -> None:
        """Abort every open watch connection mid-stream (no chunked terminator: a broken connection)."""
        for transport in list(self._watching):
            transport.abort()

    def hold_watches(self) -> None:
        """New watch requests wait (without an answer) until `release_watches`."""
        self._released.clear()

    def release_watches(self) -> None:
        self._released.set()

    @property
    def open_watches(self) -> int:
        return len(self._watching)

    # --- the API -------------------------------------------------------------------------------------------
    async def _pods_route(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        namespace = request.match_info.get("namespace")
        selector = LabelSelector(request.query.get("labelSelector"))
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, namespace, selector)
        return self._list(request, namespace, selector)

    def _list(self, request: web.Request, namespace: str | None, selector: LabelSelector) -> web.Response:
        self.list_requests += 1
        token = request.query.get("continue")
        if token:
            if token not in self._pages:
                return web.json_response(_status(410, "Expired", "continue token expired"), status=410)
            resource_version, items = self._pages.pop(token)
        else:
            resource_version = self.resource_version
            items = [
                pod
                for (ns, _name), pod in sorted(self.pods.items())
                if (namespace is None or ns == namespace) and selector.matches(pod)
            ]
        limit = int(request.query.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(resource_version)}
        if limit and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            next_token = f"page-{next(self._ids)}"
            self._pages[next_token] = (resource_version, rest)
            meta["continue"] = next_token
            meta["remainingItemCount"] = len(rest)
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": [_without_kind(p) for p in items]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _watch(self, request: web.Request, namespace: str | None, selector: LabelSelector) -> web.StreamResponse:
        self.watch_requests.append(dict(request.query))
        await self._released.wait()
        try:
            return await self._serve_watch(request, namespace, selector)
        except (ConnectionResetError, RuntimeError):
            return web.Response(status=499)  # the client went away, or drop_watches() aborted it: nobody reads this

    async def _serve_watch(
        self, request: web.Request, namespace: str | None, selector: LabelSelector
    ) -> web.StreamResponse:
        requested = request.query.get("resourceVersion")
        start = int(requested) if requested and requested != "0" else None
        if start is not None and start < self.oldest_watchable:
            self.expired_watches += 1
            message = f"too old resource version: {start} ({self.oldest_watchable})"
            if self.expire_with == "http":
                return web.json_response(_status(410, "Expired", message), status=410)
            resp = await self._open_stream(request)
            await self._send(resp, {"type": "ERROR", "object": _status(410, "Expired", message)})
            await resp.write_eof()
            return resp

        resp = await self._open_stream(request)
        transport = request.transport
        assert transport is not None
        queue: asyncio.Queue[_Change] = asyncio.Queue()
        self._subscribers.add(queue)  # subscribed before the backlog is read: nothing falls in between
        self._watching.add(transport)
        try:
            if start is None:  # no resourceVersion: synthetic ADDED events for the current state, then live ones
                backlog = [
                    _Change(self.resource_version, "ADDED", None, pod)
                    for (ns, _name), pod in sorted(self.pods.items())
                    if namespace is None or ns == namespace
                ]
            else:
                backlog = [c for c in self.history if c.resource_version > start]
            for change in backlog:
                await self._send_change(resp, change, namespace, selector)
            await self._follow(resp, queue, request, namespace, selector)
            await resp.write_eof()
        finally:
            self._subscribers.discard(queue)
            self._watching.discard(transport)
        return resp

    async def _follow(
        self,
        resp: web.StreamResponse,
        queue: asyncio.Queue[_Change],
        request: web.Request,
        namespace: str | None,
        selector: LabelSelector,
    ) -> None:
        """Live changes (and bookmarks when idle) until the watch's timeoutSeconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        while (remaining := deadline - loop.time()) > 0:
            wait = min(remaining, self.bookmark_interval) if bookmarks else remaining
            try:
                change = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if bookmarks and remaining > wait:
                    await self._send(resp, _bookmark(self.resource_version))
                continue
            await self._send_change(resp, change, namespace, selector)

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        return resp

    async def _send_change(
        self, resp: web.StreamResponse, change: _Change, namespace: str | None, selector: LabelSelector
    ) -> None:
        obj = change.new
        if namespace is not None and obj["metadata"]["namespace"] != namespace:
            return
        was, now = selector.matches(change.old), selector.matches(change.new)
        if change.kind == "DELETED":
            kind = "DELETED" if was else None
        elif was and now:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif was:
            kind = "DELETED"  # stopped matching the selector
        else:
            kind = None
        if kind is not None:
            await self._send(resp, {"type": kind, "object": obj})

    async def _send(self, resp: web.StreamResponse, event: dict[str, Any]) -> None:
        line = orjson.dumps(event) + b"\n"
        for offset in range(0, len(line), self.write_chunk):
            await resp.write(line[offset : offset + self.write_chunk])


def _bookmark(resource_version: int) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(resource_version)}},
    }


def _without_kind(pod: dict[str, Any]) -> dict[str, Any]:
    """List items carry no kind/apiVersion in the real API."""
    return {k: v for k, v in pod.items() if k not in ("kind", "apiVersion")}


def _is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", ()))


class FakeKubeThread:
    """A FakeKube on its own event-loop thread, for synchronous tests.

    Control methods are forwarded to that loop and return their result (`kube.create_pod(...)`); plain
    attributes (counters, `expire_with`) are read and set directly.
    """

    def __init__(self, **options: Any) -> None:
        self.kube = FakeKube(**options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-kube", daemon=True)

    def __enter__(self) -> FakeKubeThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.kube.start(), self._loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.kube.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.kube, name)
        if not callable(target):
            return target

        def forward(*args: Any, **kwargs: Any) -> Any:
            async def call() -> Any:
                return target(*args, **kwargs)

            return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

        return forward

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("kube", "_loop", "_thread"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.kube, name, value)
