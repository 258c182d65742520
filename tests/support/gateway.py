"""Start the real gateway (`python -m shepherd.cli launch ...`) as a process for integration tests."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.metrics import Exposition
from tests.support.processes import ManagedProcess, free_ports, http_request


class GatewayProcess:
    def __init__(self, process: ManagedProcess, port: int, prometheus_port: int) -> None:
        self.process = process
        self.port = port
        self.prometheus_port = prometheus_port
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return http_request("GET", self.url + path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return http_request("POST", self.url + path, body, **kwargs)

    def metrics(self) -> Exposition:
        """One scrape of the Prometheus listener."""
        status, text = http_request("GET", f"http://127.0.0.1:{self.prometheus_port}/metrics")
        assert status == 200, text
        return Exposition(text)

    def workers(self) -> list[dict[str, Any]]:
        status, body = self.get("/workers", headers=self._auth)
        assert status == 200, body
        return body["workers"]

    def wait_workers(self, predicate, what: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Poll GET /workers until `predicate(workers)` holds."""
        result: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal result
            result = self.workers()
            return bool(predicate(result))

        self.process.wait_for(check, timeout, what)
        return result

    def wait_ready_workers(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        return self.wait_workers(
            lambda ws: sum(w["status"] == "ready" for w in ws) >= count, f"{count} ready workers", timeout
        )

    _auth: dict[str, str] = {}

    def stop(self) -> int | None:
        return self.process.stop(timeout=10)

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateway(
    tmp_path: Path,
    worker_urls: Sequence[str] = (),
    *extra_args: str,
    ready_workers: int | None = None,
    api_key: str | None = None,
) -> GatewayProcess:
    """Launch the gateway on free ports; wait until it listens and `ready_workers` (default: all) are ready."""
    port, prometheus_port = free_ports(2)
    args = [
        sys.executable,
        "-m",
        "shepherd.cli",
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(prometheus_port),
        "--log-level",
        "debug",
        "--shutdown-drain-window-secs",  # nothing routes to a test gateway: stop() need not wait (a test may override)
        "0",
    ]
    if worker_urls:
        args += ["--worker-urls", *worker_urls]
    if api_key:
        args += ["--api-key", api_key]
    process = ManagedProcess([*args, *extra_args], f"gateway-{port}", log_dir=tmp_path).start()
    gateway = GatewayProcess(process, port, prometheus_port)
    if api_key:
        gateway._auth = {"Authorization": f"Bearer {api_key}"}
    try:
        process.wait_http(gateway.url + "/liveness")
        expected = len(worker_urls) if ready_workers is None else ready_workers
        if expected:
            gateway.wait_ready_workers(expected)
    except BaseException:
        process.stop()
        raise
    return gateway
