"""Processes a benchmark runs: simulated workers and gateways started from command-line templates.

Also reads a process tree's CPU time from /proc, which is how the benchmarks charge a gateway for its work.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever http_proxy says

SHEPHERD_TEMPLATE = (
    "{python} -m shepherd.cli launch --host {host} --port {port} --worker-urls {worker_urls} "
    "--policy round_robin --prometheus-port {prom_port} --log-level warning"
)


class FleetError(RuntimeError):
    """A benchmark process failed to start, exited early or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; FleetError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


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
    """A child process with its output in a log file; stop() escalates SIGTERM to SIGKILL after a deadline."""

    def __init__(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        self._env = env
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, "process not started"
        return self._process.pid

    @property
    def log_path(self) -> str:
        return self._log.name

    def start(self) -> ManagedProcess:
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # a terminal Ctrl-C reaches the benchmark, which then stops us in order
            )
        except OSError as exc:
            raise FleetError(f"cannot start {self.name} ({shlex.join(self.argv)}): {exc}") from exc
        return self

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self._process.returncode if self._process else None
            raise FleetError(f"{self.name} exited (code {code}); last output:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """CPU time of the process and its descendants so far."""
        return process_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if still running after `timeout` seconds; the log file is removed."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._log.close()
        Path(self.log_path).unlink(missing_ok=True)


class SimFleet:
    """`python -m shepherd.sim` processes serving simulated workers; the URLs come from their ready files."""

    def __init__(
        self, workers: int = 2, processes: int = 1, extra_args: Sequence[str] = ("--latency-model", "none")
    ) -> None:
        if workers < 1 or processes < 1:
            raise ValueError("workers and processes must be >= 1")
        self._workers = workers
        self._processes = min(processes, workers)
        self._extra_args = list(extra_args)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-sim-")
        self.procs: list[ManagedProcess] = []
        self.urls: list[str] = []
        self.bootstrap_ports: list[int | None] = []  # per URL; null unless the workers run `--role prefill`

    def start(self, timeout: float = 30.0) -> SimFleet:
        ready_files = []
        for i in range(self._processes):
            workers = self._workers // self._processes + (1 if i < self._workers % self._processes else 0)
            ready = Path(self._dir.name) / f"sim-{i}.json"
            argv = [sys.executable, "-m", "shepherd.sim", "--host", "127.0.0.1", "--port", "0"]
            argv += ["--workers", str(workers), "--ready-file", str(ready), *self._extra_args]
            self.procs.append(ManagedProcess(argv, f"sim{i}").start())
            ready_files.append(ready)

        def all_ready() -> bool:
            for proc in self.procs:
                proc.check_alive()
            return all(path.exists() for path in ready_files)

        try:
            wait_until(all_ready, timeout, "the simulated workers")
        except FleetError:
            self.stop()
            raise
        for path in ready_files:
            ready = json.loads(path.read_text())
            self.urls += ready["urls"]
            self.bootstrap_ports += ready.get("bootstrap_ports") or [None] * len(ready["urls"])
        return self

    def cpu_seconds(self) -> float:
        return sum(proc.cpu_seconds() for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()
        self._dir.cleanup()


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
        self.port = free_port(host)
        self.prom_port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process = ManagedProcess(template.argv(self.port, self.prom_port, worker_urls, host), template.name)

    def start(self, probe_path: str, probe_body: bytes, timeout: float = 60.0) -> GatewayProcess:
        self.process.start()
        try:
            wait_until(self._ready, timeout, f"gateway {self.template.name} at {self.url}", interval=0.1)
            wait_until(
                lambda: self._probe(probe_path, probe_body), timeout, f"a first answer from {self.template.name}"
            )
        except FleetError:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        self.process.check_alive()
        status = _http_status(self.url + "/readiness")
        return status == 200 or status == 404  # no readiness route: the probe request decides

    def _probe(self, path: str, body: bytes) -> bool:
        self.process.check_alive()
        return _http_status(self.url + path, body) == 200

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout)


def _http_status(url: str, body: bytes | None = None) -> int | None:
    """Status of a GET (or a JSON POST when `body` is given); None when nothing answered."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with _NO_PROXY.open(request, timeout=5) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None
