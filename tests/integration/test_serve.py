"""`shepherd serve --backend sim`: the README's first command, on free ports."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.processes import ManagedProcess, free_ports, http_request


@pytest.mark.parametrize("mode", ["http", "grpc"])
def test_serve_starts_simulated_workers_and_the_gateway_and_stops_both(tmp_path, mode):
    port, prometheus_port = free_ports(2)
    args = [sys.executable, "-m", "shepherd.cli", "serve", "--backend", "sim", "--dp-size", "2",
            "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prometheus_port),
            "--shutdown-drain-window-secs", "0"]  # fmt: skip
    if mode == "grpc":
        args.append("--grpc")
    gateway = GatewayProcess(ManagedProcess(args, "serve", log_dir=tmp_path).start(), port, prometheus_port)
    with gateway:
        gateway.process.wait_http(gateway.url + "/liveness", timeout=30)
        workers = gateway.wait_ready_workers(2)
        assert {w["connection_mode"] for w in workers} == {mode}
        gateway.process.wait_for(lambda: gateway.get("/v1/models")[0] == 200, 20, "the model served")
        chat = {"model": "sim-model", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        status, body = gateway.post("/v1/chat/completions", chat)
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert gateway.stop() == 0
    for worker in workers:  # the simulated workers went down with the gateway
        with pytest.raises(OSError):
            if mode == "http":
                http_request("GET", worker["url"] + "/health", timeout=1)
            else:
                socket.create_connection(tuple(worker["url"].removeprefix("grpc://").split(":")), timeout=1)
