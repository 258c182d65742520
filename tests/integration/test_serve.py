"""`shepherd serve --backend sim`: the README's first command, on free ports."""

from __future__ import annotations

import sys

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.processes import ManagedProcess, free_ports, http_request


def test_serve_starts_simulated_workers_and_the_gateway_and_stops_both(tmp_path):
    port, prometheus_port = free_ports(2)
    args = [sys.executable, "-m", "shepherd.cli", "serve", "--backend", "sim", "--dp-size", "2",
            "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prometheus_port)]  # fmt: skip
    gateway = GatewayProcess(ManagedProcess(args, "serve", log_dir=tmp_path).start(), port, prometheus_port)
    with gateway:
        gateway.process.wait_http(gateway.url + "/liveness", timeout=30)
        workers = gateway.wait_ready_workers(2)
        chat = {"model": "sim-model", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        status, body = gateway.post("/v1/chat/completions", chat)
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert gateway.stop() == 0
    for worker in workers:  # the simulated workers went down with the gateway
        with pytest.raises(OSError):
            http_request("GET", worker["url"] + "/health", timeout=1)
