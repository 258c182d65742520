"""Helpers for tests that run Shepherd components as real processes.

Waiting is always "poll until a condition holds or a deadline passes" -- never a fixed sleep --
and every failure message carries the tail of the process's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

POLL_INTERVAL_S = 0.02


class ProcessError(RuntimeError):
    """A managed process failed to start, became unreachable or exited unexpectedly."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(
    method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """A small blocking HTTP call: returns ``(status, parsed JSON or text)``; HTTP error
    statuses are returned, not raised.  Connection errors propagate as ``OSError``."""
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if data is not None else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, OSError):  # e.g. ConnectionRefusedError, not a wrapper
            raise exc.reason from None
        raise
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; ``AssertionError`` if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


class ManagedProcess:
    """A child process with its stdout/stderr in ``<log_dir>/<name>.log``.

    Usable as a context manager; ``stop()`` sends SIGTERM, then SIGKILL after a deadline.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.name = name or Path(self.args[0]).name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str) -> ProcessError:
        """An error for ``message`` that includes the process state and its log tail."""
        state = "running" if self.returncode is None else f"exited with {self.returncode}"
        return ProcessError(f"{self.name} (pid {self.pid}, {state}): {message}\n--- log tail ---\n{self.tail()}")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` until it is true; fail if the deadline passes or the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return
            if self.returncode is not None:
                raise self.fail(f"exited while waiting for {what}")
            if time.monotonic() >= deadline:
                raise self.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(POLL_INTERVAL_S)

    def wait_http(self, url: str, timeout: float = 15.0, expect_status: int | None = 200) -> None:
        """Wait until ``GET url`` answers (with ``expect_status``, or anything if ``None``)."""

        def answered() -> bool:
            try:
                status, _ = http_request("GET", url, timeout=1.0)
            except OSError:
                return False
            return expect_status is None or status == expect_status

        self.wait_for(answered, timeout, f"GET {url}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate (SIGTERM, then SIGKILL after ``timeout``) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimFleet:
    """Simulated SGLang workers served by one ``shepherd.sim`` process."""

    def __init__(
        self, process: ManagedProcess, urls: list[str], bootstrap_ports: list[int | None] | None = None
    ) -> None:
        self.process = process
        self.urls = urls
        self.bootstrap_ports = bootstrap_ports or [None] * len(urls)  # PD bootstrap listeners (--role prefill)

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        # Any worker can control and inspect its siblings; use the first one that still accepts
        # connections (a worker told to ``refuse`` does not).
        for url in self.urls:
            try:
                status, payload = http_request(method, url + path, body)
            except ConnectionRefusedError:
                continue
            if status != 200:
                raise self.process.fail(f"{method} {path} {body} -> {status} {payload}")
            return payload
        raise self.process.fail(f"no worker accepts connections for {method} {path}")

    def ctl(self, index: int, **faults: Any) -> dict[str, Any]:
        """``POST /__ctl`` for worker ``index`` (see ``shepherd.sim.control``); returns its fault state."""
        return self._control("POST", "/__ctl", {"worker": index, **faults})

    def log(self, index: int) -> dict[str, Any]:
        """``GET /__log`` of worker ``index``."""
        return self._control("GET", f"/__log?worker={index}")

    def clear_log(self, index: int) -> None:
        self._control("DELETE", f"/__log?worker={index}")

    def reset(self) -> None:
        """Clear every worker's faults, request log and prefix cache."""
        for i, url in enumerate(self.urls):
            self.ctl(i, reset=True)
            http_request("POST", url + "/flush_cache")
            self.clear_log(i)

    def stop(self) -> int | None:
        return self.process.stop()

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sim(tmp_path: Path, workers: int = 2, *extra_args: str, timeout: float = 15.0) -> SimFleet:
    """Start ``python -m shepherd.sim`` on OS-assigned ports and wait for its ready file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / f"sim-ready-{time.monotonic_ns()}.json"
    args = [sys.executable, "-m", "shepherd.sim", "--port", "0", "--workers", str(workers)]
    process = ManagedProcess([*args, "--ready-file", str(ready), *extra_args], tmp_path, name=ready.stem)
    try:
        process.wait_for(ready.exists, timeout, f"ready file {ready}")
        ready_info = json.loads(ready.read_text())
    except BaseException:
        process.stop()
        raise
    return SimFleet(process, ready_info["urls"], ready_info.get("bootstrap_ports"))
