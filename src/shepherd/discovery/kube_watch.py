"""List-then-watch of Kubernetes pods, in a thread, with the real `kubernetes` client.

The client is synchronous, so one daemon thread does the HTTP and hands results to the event loop with
`call_soon_threadsafe`; the loop never blocks on the API server. The protocol, as client-go's reflector does it:

1. LIST (paginated); its `metadata.resourceVersion` is the point the watch starts from. The full list replaces
   the loop's view, so anything deleted while we were not watching disappears from it.
2. WATCH from that resourceVersion with bookmarks and a server-side timeout. Every event, bookmarks included,
   advances the resourceVersion to resume from.
3. The server ending the watch (its timeout) resumes it at once from the last resourceVersion; a dropped
   connection or an API error resumes it after a jittered exponential backoff.
4. 410 Gone (the resourceVersion was compacted away), as an HTTP status or as an `ERROR` event carrying a Status
   with code 410, means events were lost: go back to 1.

Watch lines are split by this module, not by `kubernetes.watch.Watch`, so a line of any size (a pod with large
annotations can exceed 512 KiB) is parsed whole, and objects stay plain dicts (no model deserialization).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from shepherd.discovery import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
_GONE = 410
_SOURCE = "kubernetes"
_RBAC_HINT = "check the service account's RBAC (pods: get, list, watch)"


@dataclass(frozen=True, slots=True)
class WatchTiming:
    watch_timeout_secs: int = 300  # server-side timeoutSeconds; each watch adds up to 25% jitter
    connect_timeout_secs: float = 10.0
    read_grace_secs: float = 30.0  # the client read timeout is the watch timeout plus this
    list_timeout_secs: float = 60.0
    backoff_initial_secs: float = 0.2
    backoff_max_secs: float = 30.0
    page_size: int = 500
    refusal_patience_secs: float = 30.0  # 401/403 after access worked: retried quietly this long before blaming RBAC


class _Expired(Exception):
    """The resourceVersion to resume from is gone: re-list."""


class _WatchFailed(Exception):
    """The server reported a watch error other than 410: re-list after a backoff."""


def load_core_api() -> Any:
    """A CoreV1Api authenticated by the pod's service account, or else by the kubeconfig ($KUBECONFIG)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        origin = "in-cluster service account"
    except config.ConfigException:
        # $KUBECONFIG is read now, not when the kubernetes package was imported.
        kubeconfig = os.environ.get("KUBECONFIG") or None
        config.load_kube_config(kubeconfig, client_configuration=configuration, persist_config=False)
        origin = "kubeconfig"
    log.info("Kubernetes API at %s (credentials from the %s)", configuration.host, origin)
    return client.CoreV1Api(client.ApiClient(configuration))


def iter_lines(resp: Any, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
    """Newline-delimited lines of a streamed urllib3 response, whatever their size or chunking."""
    buffer = bytearray()
    scanned = 0  # bytes of `buffer` known to hold no newline
    for data in resp.stream(chunk_size, decode_content=True):
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", max(start, scanned))) >= 0:
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        if start:
            del buffer[:start]
        scanned = len(buffer)


class _Backoff:
    def __init__(self, timing: WatchTiming) -> None:
        self._initial = timing.backoff_initial_secs
        self._max = timing.backoff_max_secs
        self._next = self._initial

    def reset(self) -> None:
        self._next = self._initial

    def next_delay(self) -> float:
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self._max)
        return delay


class _Refusals:
    """Logs HTTP 401/403 answers according to whether these credentials were ever accepted.

    Never accepted: a configuration problem, reported at every attempt with the RBAC hint. Accepted before: what an
    API server does for a few seconds after it restarts, until it has loaded its RBAC rules; said once, retried
    quietly, and blamed on RBAC only when it outlasts the patience.
    """

    def __init__(self, patience_secs: float) -> None:
        self._patience = patience_secs
        self._accepted = False
        self._since: float | None = None  # first refusal of the current run of refusals
        self._escalated = False

    def accepted(self) -> None:
        if self._since is not None:
            log.info("Kubernetes API accepts the credentials again after %.1fs", time.monotonic() - self._since)
        self._accepted, self._since, self._escalated = True, None, False

    def refused(self, what: str, why: str) -> None:
        now = time.monotonic()
        if not self._accepted:
            log.warning("Kubernetes pod %s failed (%s: %s); retrying", what, why, _RBAC_HINT)
        elif self._since is None:
            self._since = now
            log.info(
                "Kubernetes pod %s refused (%s) with credentials the API server accepted before; an API server that "
                "has just restarted refuses requests until it has loaded its RBAC rules: retrying quietly",
                what,
                why,
            )
        elif not self._escalated and now - self._since >= self._patience:
            self._escalated = True
            log.warning(
                "Kubernetes pod %s still refused after %.0fs (%s: %s); retrying",
                what,
                now - self._since,
                why,
                _RBAC_HINT,
            )
        else:
            log.debug("Kubernetes pod %s refused (%s); retrying", what, why)


class PodListWatch(Generic[T]):
    """Keeps the event loop informed of the pods matching a label selector.

    `parse` turns a pod object into what the loop wants (it runs in the thread); `on_snapshot(items)` gets every
    full list and `on_event(type, item)` every ADDED/MODIFIED/DELETED event, both called on the loop in order.
    """

    def __init__(
        self,
        namespace: str | None,
        label_selector: str,
        parse: Callable[[dict[str, Any]], T],
        on_snapshot: Callable[[list[T]], None],
        on_event: Callable[[str, T], None],
        api_factory: Callable[[], Any] = load_core_api,
        timing: WatchTiming | None = None,
    ) -> None:
        self._namespace = namespace
        self._selector = label_selector
        self._parse = parse
        self._on_snapshot = on_snapshot
        self._on_event = on_event
        self._api_factory = api_factory
        self._timing = timing or WatchTiming()
        self._refusals = _Refusals(self._timing.refusal_patience_secs)
        self._stop = threading.Event()
        self._resp: Any = None
        self._progress = False  # the current watch delivered an event
        self._resource_version: str | None = None  # where the next watch starts; None: list first
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="k8s-pod-watch", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; a request still waiting for the API server's answer is left to its daemon thread."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # urllib3 >= 2.3: shutting the socket down unblocks the thread's read; close() is the fallback.
            getattr(resp, "shutdown", resp.close)()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    # --- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = _Backoff(self._timing)
        api = None
        expired_idle = False  # the last attempt ended in 410 and no event came since: back off before re-listing
        while not self._stop.is_set():
            self._progress = False
            try:
                if api is None:
                    api = self._api_factory()
                if self._resource_version is None:
                    self._list(api)
                self._watch(api)
                backoff.reset()
                expired_idle = False
                continue  # the server ended the watch at its timeout: resume at once
            except _Expired as exc:
                self._resource_version = None
                log.info("Pod watch expired (%s); re-listing", exc)
                repeated = expired_idle and not self._progress
                expired_idle = True
                if not repeated:
                    continue
            except _WatchFailed as exc:
                self._resource_version = None
                metrics.SNAPSHOT_ERRORS.labels(_SOURCE).inc()
                log.warning("Pod watch failed (%s); re-listing", exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                metrics.SNAPSHOT_ERRORS.labels(_SOURCE).inc()
                what = "list" if self._resource_version is None else "watch"
                if getattr(exc, "status", None) in (401, 403):
                    self._refusals.refused(what, _why(exc))
                else:
                    log.warning("Kubernetes pod %s failed (%s); retrying", what, _why(exc))
            if self._progress:
                backoff.reset()
                expired_idle = False
            if self._stop.wait(backoff.next_delay()):
                break

    def _list(self, api: Any) -> None:
        """List every matching pod (page by page), hand the loop the full set, and note where to watch from."""
        items: list[T] = []
        continue_token: str | None = None
        timing = self._timing
        while True:
            resp = self._request(
                api,
                limit=timing.page_size,
                _continue=continue_token,
                _request_timeout=(timing.connect_timeout_secs, timing.list_timeout_secs),
            )
            try:
                body = orjson.loads(resp.read())
            finally:
                resp.release_conn()
            items.extend(self._parse(obj) for obj in body.get("items") or ())
            meta = body.get("metadata") or {}
            continue_token = meta.get("continue") or None
            if continue_token is None:
                break
        self._resource_version = str(meta.get("resourceVersion") or "")
        log.debug("listed %d pods at resourceVersion %s", len(items), self._resource_version)
        self._deliver(self._on_snapshot, items)

    def _watch(self, api: Any) -> None:
        """Follow one watch until the server ends it, advancing the resourceVersion to resume from."""
        timing = self._timing
        timeout = int(timing.watch_timeout_secs * random.uniform(1.0, 1.25))
        resp = self._request(
            api,
            watch=True,
            resource_version=self._resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(timing.connect_timeout_secs, timeout + timing.read_grace_secs),
        )
        self._resp = resp
        try:
            for line in iter_lines(resp):
                if self._stop.is_set():
                    break
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    code, message = obj.get("code"), f"{obj.get('reason')}: {obj.get('message')}"
                    if code == _GONE:
                        raise _Expired(message)
                    raise _WatchFailed(f"ERROR event {code} {message}")
                self._progress = True
                self._resource_version = (obj.get("metadata") or {}).get("resourceVersion") or self._resource_version
                if kind == "BOOKMARK":
                    log.debug("watch bookmark at resourceVersion %s", self._resource_version)
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._deliver(self._on_event, kind, self._parse(obj))
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()

    def _request(self, api: Any, **params: Any) -> Any:
        """One list or watch call; non-2xx answers raise (410 as `_Expired`)."""
        from kubernetes.client.exceptions import ApiException

        params["label_selector"] = self._selector or None
        try:
            if self._namespace:
                resp = api.list_namespaced_pod(self._namespace, _preload_content=False, **params)
            else:
                resp = api.list_pod_for_all_namespaces(_preload_content=False, **params)
        except ApiException as exc:
            if exc.status == _GONE:
                raise _Expired(f"HTTP 410 {exc.reason}") from None
            raise
        self._refusals.accepted()
        return resp

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the gateway is gone
            self._stop.set()


def _why(exc: Exception) -> str:
    """`HTTP 403 Forbidden (the API server's message)`, or the exception's type and text."""
    status = getattr(exc, "status", None)
    if not status:
        return f"{type(exc).__name__}: {exc}"
    why = f"HTTP {status} {getattr(exc, 'reason', None) or ''}".rstrip()
    try:
        message = orjson.loads(getattr(exc, "body", None) or b"{}").get("message")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    return f"{why} ({message})" if message else why
