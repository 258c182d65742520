"""Test conveniences on top of `shepherd.bench.fleet`, which owns process management and sim start-up.

Adds JSON HTTP calls and the simulator's fault-injection and inspection routes (`/__ctl`, `/__log`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shepherd.bench import fleet
from shepherd.bench.fleet import ManagedProcess, free_port, free_ports, http_call, wait_until

__all__ = ["ManagedProcess", "SimFleet", "free_port", "free_ports", "http_request", "start_sim", "wait_until"]


def http_request(
    method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """A small blocking JSON call: returns `(status, parsed JSON or text)`; HTTP error statuses are returned,
    not raised. Connection errors propagate as `OSError`."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if data is not None else {}
    all_headers.update(headers or {})
    status, raw = http_call(method, url, data, all_headers, timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


class SimFleet(fleet.SimFleet):
    """Simulated workers of one `shepherd.sim` process, with their fault-injection and inspection routes."""

    @property
    def process(self) -> ManagedProcess:
        return self.procs[0]

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        # Any worker can control and inspect its siblings; use the first one that still accepts
        # connections (a worker told to `refuse` does not).
        for url in self.http_urls:
            try:
                status, payload = http_request(method, url + path, body)
            except ConnectionRefusedError:
                continue
            if status != 200:
                raise self.process.fail(f"{method} {path} {body} -> {status} {payload}")
            return payload
        raise self.process.fail(f"no worker accepts connections for {method} {path}")

    def ctl(self, index: int, **faults: Any) -> dict[str, Any]:
        """`POST /__ctl` for worker `index` (see `shepherd.sim.control`); returns its fault state."""
        return self._control("POST", "/__ctl", {"worker": index, **faults})

    def log(self, index: int) -> dict[str, Any]:
        """`GET /__log` of worker `index`."""
        return self._control("GET", f"/__log?worker={index}")

    def clear_log(self, index: int) -> None:
        self._control("DELETE", f"/__log?worker={index}")

    def reset(self) -> None:
        """Clear every worker's faults, request log and prefix cache."""
        for i, url in enumerate(self.http_urls):
            self.ctl(i, reset=True)
            http_request("POST", url + "/flush_cache")
            self.clear_log(i)


def start_sim(tmp_path: Path, workers: int = 2, *extra_args: str, timeout: float = 15.0) -> SimFleet:
    """Start one `python -m shepherd.sim` process on OS-assigned ports, logging to `tmp_path`, and wait until ready."""
    return SimFleet(workers, 1, extra_args, log_dir=tmp_path).start(timeout)
