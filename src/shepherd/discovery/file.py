"""File discovery: a JSON or YAML manifest lists the workers (VMs, Slurm, docker compose: no Kubernetes needed).

Accepted shapes (YAML is a superset of JSON, both are read):

    [{"url": "http://10.0.0.5:8000"}, "http://10.0.0.6:8000"]
    {"version": 1, "workers": [{"url": "http://10.0.0.7:8000", "worker_type": "prefill", "bootstrap_port": 8998,
                                "api_key": "...", "labels": {"zone": "a"}}]}

Each entry takes the fields of POST /workers (`url` required). The file is checked for changes every second
(or every interval, if shorter) and re-read in full every `--discovery-check-interval-secs`; each good read is
reconciled (additions registered, removals drained and removed, changed entries replaced). A file that cannot
be read or parsed is logged and the last good state kept, so a half-written manifest never empties the fleet
(write `[]` to remove every file-discovered worker).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import orjson
import yaml

from shepherd.config import GatewayConfig
from shepherd.discovery import metrics
from shepherd.discovery.reconciler import DesiredWorker, Reconciler, desired_worker
from shepherd.urls import display_url
from shepherd.workers.manager import SpecError, WorkerManager, WorkerSpec

log = logging.getLogger(__name__)

SOURCE = "file"
MANIFEST_VERSION = 1
_MAX_CHANGE_POLL_SECS = 1.0


class ManifestError(ValueError):
    """A manifest that cannot be used; the message says where."""


def parse_manifest(text: bytes, default_api_key: str | None = None) -> list[WorkerSpec]:
    """The worker specs of a manifest; raises ManifestError on any problem (nothing is partially applied)."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ManifestError(f"neither JSON nor YAML: {exc}") from None
    if isinstance(data, dict):
        version = data.get("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise ManifestError(f"unsupported manifest version {version!r} (expected {MANIFEST_VERSION})")
        data = data.get("workers")
    if not isinstance(data, list):
        raise ManifestError("expected a list of workers or {'version': 1, 'workers': [...]}; write [] for none")
    specs: dict[str, WorkerSpec] = {}
    for index, entry in enumerate(data):
        try:
            spec = WorkerSpec.from_json({"url": entry} if isinstance(entry, str) else entry, source=SOURCE)
        except SpecError as exc:
            raise ManifestError(f"workers[{index}]: {exc}") from None
        if spec.url in specs:
            raise ManifestError(f"workers[{index}]: {display_url(spec.url)} is listed twice")
        spec.api_key = spec.api_key or default_api_key
        specs[spec.url] = spec
    return list(specs.values())


class FileDiscovery:
    """Keeps the file-owned workers equal to the manifest's last good content."""

    def __init__(self, config: GatewayConfig, manager: WorkerManager) -> None:
        sd = config.discovery
        assert sd.file is not None
        self._path = sd.file
        self._interval = sd.check_interval_secs
        self._api_key = config.api_key
        self._desired_workers: dict[str, DesiredWorker] = {}
        self._stat: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the last read
        self._last_problem: str | None = None  # logged once until it changes
        self._reconciler = Reconciler(manager, SOURCE, lambda: self._desired_workers)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        log.info("Watching worker manifest %s (full re-read every %.0fs)", self._path, self._interval)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._reconciler.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        poll = min(_MAX_CHANGE_POLL_SECS, self._interval)
        next_full_read = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_full_read:
                    next_full_read = now + self._interval
                    await self._refresh()
                elif await asyncio.to_thread(self._file_stat) != self._stat:
                    await self._refresh()
            except Exception:  # a bug must not end discovery for the life of the gateway
                log.exception("file discovery pass failed")
            await asyncio.sleep(poll)

    def _file_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> bytes:
        with open(self._path, "rb") as f:
            return f.read()

    async def _refresh(self) -> None:
        """Re-read the manifest and reconcile; on failure keep the last good state (and still reconcile it)."""
        self._stat = await asyncio.to_thread(self._file_stat)  # taken first: a later write is seen next poll
        try:
            text = await asyncio.to_thread(self._read)
            specs = parse_manifest(text, self._api_key)
        except (OSError, ManifestError) as exc:
            self._report(f"worker manifest {self._path} unusable, keeping the last good state: {exc}")
        else:
            if self._last_problem is not None:
                log.info("worker manifest %s is valid again", self._path)
            self._last_problem = None
            self._desired_workers = {spec.url: desired_worker(spec, display_url(spec.url)) for spec in specs}
            log.debug("worker manifest %s: %d workers (sha256 %s)", self._path, len(specs), _digest(text))
        self._reconciler.reconcile()

    def _report(self, problem: str) -> None:
        metrics.SNAPSHOT_ERRORS.labels(SOURCE).inc()
        if problem != self._last_problem:
            log.error("%s", problem)
            self._last_problem = problem


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:12]
