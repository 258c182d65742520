"""Processes the benchmarks and the integration tests run: simulated workers and gateways, each logging to a file.

Waiting is always "poll until a condition holds or a deadline passes", and a process that fails to start or exits
early is reported with the tail of its log. Also reads a process tree's CPU time from /proc, which is how the
benchmarks charge a gateway for its work.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

POLL_INTERVAL_S = 0.02
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever http_proxy says

SHEPHERD_TEMPLATE = (
    "{python} -m shepherd.cli launch --host {host} --port {port} --worker-urls {worker_urls} "
    "--policy round_robin --prometheus-port {prom_port} --log-level warning --shutdown-drain-window-secs 0"
)


class FleetError(RuntimeError):
    """A managed process failed to start, exited early or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to 0, read it back, release it)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: every socket stays bound until all are chosen, so the OS cannot hand the same
    port out twice (two separate `free_port()` calls can)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL_S,
    error: Callable[[str], Exception] = FleetError,
) -> None:
    """Poll `predicate` until it holds; raise `error(message naming what)` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http_call(
    method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """A blocking HTTP call that bypasses any proxy: `(status, body)`; error statuses are returned, not raised.

    When nothing answers the underlying `OSError` (e.g. `ConnectionRefusedError`) propagates.
    """
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, OSError):  # the real cause, not urllib's wrapper
            raise exc.reason from None
        raise


def _http_status(url: str, body: bytes | None = None, timeout: float = 5.0) -> int | None:
    """Status of a GET (or a JSON POST when `body` is given); None when nothing answered."""
    method, headers = ("GET", None) if body is None else ("POST", {"Content-Type": "application/json"})
    try:
        return http_call(method, url, body, headers, timeout)[0]
    except OSError:
        return None


# -- CPU accounting --------------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces and parentheses)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, include_children: bool = True) -> float:
    """utime+stime of `pid` (all its threads) and, with `include_children`, of its whole process tree.

    Live descendants are found through their parent pid; descendants that already exited and were waited for
    are in the process's cutime+cstime.
    """
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if include_children:
        ticks += int(fields[13]) + int(fields[14])
        for child in _descendants(pid):
            try:
                child_fields = _stat_fields(child)
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited between the scan and the read
            ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / _CLOCK_TICK


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


# -- processes -------------------------------------------------------------------------------------------------------


class ManagedProcess:
    """A child process with its output in a log file; stop() escalates SIGTERM to SIGKILL after a deadline.

    With `log_dir` the log is `<log_dir>/<name>.log` and outlives the process (tests keep it for inspection);
    without, it is a temporary file that stop() removes.
    """

    def __init__(
        self,
        argv: Sequence[str],
        name: str,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.argv = [str(arg) for arg in argv]
        self.name = name
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if log_dir is None:
            self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 -- closed in stop()
        self._keep_log = log_dir is not None
        self.log_path = Path(self._log.name)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # a terminal Ctrl-C reaches the benchmark or pytest, which stops us in order
            )
        except OSError as exc:
            raise FleetError(f"cannot start {self.name} ({shlex.join(self.argv)}): {exc}") from exc
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None, "process not started"
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited, else None."""
        return None if self._process is None else self._process.poll()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def fail(self, message: str) -> FleetError:
        """An error for `message` that names the process, its state and the tail of its log."""
        state = "running" if self.alive() else f"exited with code {self.returncode}"
        return FleetError(f"{self.name} ({state}): {message}\n--- last output ---\n{self.log_tail()}")

    def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str, interval: float = POLL_INTERVAL_S
    ) -> None:
        """Poll `condition` until it holds; FleetError with the log tail on the deadline or if the process exits."""

        def done() -> bool:
            if condition():
                return True
            if not self.alive():
                raise self.fail(f"exited while waiting for {what}")
            return False

        wait_until(done, timeout, what, interval, error=self.fail)

    def wait_http(
        self,
        url: str,
        timeout: float = 15.0,
        statuses: Container[int] | None = (200,),
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        """Wait until `GET url` answers with one of `statuses` (with anything when None)."""

        def answered() -> bool:
            status = _http_status(url, timeout=1.0)
            return status is not None and (statuses is None or status in statuses)

        self.wait_for(answered, timeout, f"GET {url}", interval)

    def send_signal(self, sig: int) -> None:
        assert self._process is not None, "process not started"
        self._process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited; `subprocess.TimeoutExpired` after `timeout` seconds."""
        assert self._process is not None, "process not started"
        return self._process.wait(timeout)

    def cpu_seconds(self) -> float:
        """CPU time of the process and its descendants so far."""
        return process_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if still running after `timeout` seconds; returns the exit code."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._log.close()
        if not self._keep_log:
            self.log_path.unlink(missing_ok=True)
        return self.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimFleet:
    """`python -m shepherd.sim` processes serving simulated workers; the URLs come from their ready files.

    With `log_dir` the ready files and logs stay there; without, they live in a temporary directory.
    """

    def __init__(
        self,
        workers: int = 2,
        processes: int = 1,
        extra_args: Sequence[str] = ("--latency-model", "none"),
        log_dir: Path | None = None,
    ) -> None:
        if workers < 1 or processes < 1:
            raise ValueError("workers and processes must be >= 1")
        self._workers = workers
        self._processes = min(processes, workers)
        self._extra_args = list(extra_args)
        self._log_dir = log_dir
        self._tmp = None if log_dir is not None else tempfile.TemporaryDirectory(prefix="bench-sim-")
        self._dir = log_dir if log_dir is not None else Path(self._tmp.name)
        self.procs: list[ManagedProcess] = []
        self.urls: list[str] = []
        self.http_urls: list[str] = []  # each worker's HTTP app (/metrics, /__ctl, /__log); for --grpc its sidecar
        self.bootstrap_ports: list[int | None] = []  # per URL; null unless the workers run `--role prefill`

    def start(self, timeout: float = 30.0) -> Self:
        deadline = time.monotonic() + timeout
        tag = time.monotonic_ns()  # unique names: several fleets may share a log directory
        ready_files = []
        try:
            for i in range(self._processes):
                workers = self._workers // self._processes + (1 if i < self._workers % self._processes else 0)
                name = f"sim-{tag}-{i}"
                ready = self._dir / f"{name}.json"
                argv = [sys.executable, "-m", "shepherd.sim", "--host", "127.0.0.1", "--port", "0"]
                argv += ["--workers", str(workers), "--ready-file", str(ready), *self._extra_args]
                self.procs.append(ManagedProcess(argv, name, log_dir=self._log_dir).start())
                ready_files.append(ready)
            for proc, ready in zip(self.procs, ready_files, strict=True):
                proc.wait_for(ready.exists, max(0.0, deadline - time.monotonic()), f"the ready file {ready}")
        except BaseException:
            self.stop()
            raise
        for path in ready_files:
            ready = json.loads(path.read_text())
            self.urls += ready["urls"]
            self.http_urls += ready.get("http_urls") or ready["urls"]
            self.bootstrap_ports += ready.get("bootstrap_ports") or [None] * len(ready["urls"])
        return self

    def cpu_seconds(self) -> float:
        return sum(proc.cpu_seconds() for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class GatewayTemplate:
    """A named gateway command line with placeholders: {port} {prom_port} {worker_urls} {host} {python}."""

    name: str
    template: str

    @classmethod
    def parse(cls, text: str) -> GatewayTemplate:
        """`NAME=TEMPLATE`, as given to `--gateway`."""
        name, sep, template = text.partition("=")
        if not sep or not name.strip() or not template.strip():
            raise ValueError(f"expected NAME=TEMPLATE, got {text!r}")
        return cls(name.strip(), template.strip())

    def argv(self, port: int, prom_port: int, worker_urls: Sequence[str], host: str = "127.0.0.1") -> list[str]:
        try:
            line = self.template.format(
                port=port,
                prom_port=prom_port,
                worker_urls=" ".join(shlex.quote(u) for u in worker_urls),
                host=host,
                python=shlex.quote(sys.executable),
            )
        except (KeyError, IndexError) as exc:
            raise ValueError(f"gateway template {self.name!r} has an unknown placeholder: {exc}") from None
        return shlex.split(line)


class GatewayProcess:
    """A gateway started from a template on fresh ports, ready once `/readiness` and a probe request succeed."""

    def __init__(self, template: GatewayTemplate, worker_urls: Sequence[str], host: str = "127.0.0.1") -> None:
        self.template = template
        self.port, self.prom_port = free_ports(2, host)
        self.url = f"http://{host}:{self.port}"
        self.process = ManagedProcess(template.argv(self.port, self.prom_port, worker_urls, host), template.name)

    def start(self, probe_path: str, probe_body: bytes, timeout: float = 60.0) -> GatewayProcess:
        self.process.start()
        try:
            # No readiness route (404): the probe request decides.
            self.process.wait_http(self.url + "/readiness", timeout, statuses=(200, 404), interval=0.1)
            self.process.wait_for(
                lambda: _http_status(self.url + probe_path, probe_body) == 200,
                timeout,
                f"a first answer from {self.template.name}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout)
