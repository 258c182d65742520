"""Benchmark process helpers: CPU accounting from /proc, templates, stopping processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shepherd.bench.fleet import (
    FleetError,
    GatewayTemplate,
    ManagedProcess,
    free_port,
    process_cpu_seconds,
    wait_until,
)

# A child that burns about 0.3 s of CPU, says so, then idles until its stdin closes.
_BURN_THEN_WAIT = (
    "import sys, time\n"
    "end = time.process_time() + 0.3\n"
    "while time.process_time() < end: pass\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_process_cpu_seconds_grows_with_work() -> None:
    import os

    before = process_cpu_seconds(os.getpid(), include_children=False)
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert process_cpu_seconds(os.getpid(), include_children=False) - before >= 0.05


def test_process_tree_cpu_includes_live_children() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_BURN_THEN_WAIT!r}])"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == b"burnt"  # the grandchild's output, once its CPU is spent
        assert process_cpu_seconds(parent.pid) - process_cpu_seconds(parent.pid, include_children=False) >= 0.2
    finally:
        parent.communicate(timeout=10)


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_wait_until_raises_after_its_deadline() -> None:
    with pytest.raises(FleetError, match="the impossible"):
        wait_until(lambda: False, 0.1, "the impossible", interval=0.01)


def test_template_parse_and_render() -> None:
    template = GatewayTemplate.parse("gw = {python} run --port {port} --metrics {prom_port} --w {worker_urls} {host}")
    assert template.name == "gw"
    argv = template.argv(8000, 9000, ["http://a:1", "http://b:2"], host="127.0.0.1")
    assert argv == [
        sys.executable,
        "run",
        "--port",
        "8000",
        "--metrics",
        "9000",
        "--w",
        "http://a:1",
        "http://b:2",
        "127.0.0.1",
    ]


@pytest.mark.parametrize("text", ["no-equals-sign", "=cmd", "name="])
def test_template_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        GatewayTemplate.parse(text)


def test_template_with_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        GatewayTemplate("gw", "run --x {nope}").argv(1, 2, [])


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = ManagedProcess([sys.executable, "-c", code], "stubborn").start()
    log = Path(proc.log_path)
    wait_until(lambda: "ready" in log.read_text(), 10, "the stubborn process")
    started = time.monotonic()
    proc.stop(timeout=0.3)
    assert not proc.alive()
    assert time.monotonic() - started < 5
    assert not log.exists()


def test_check_alive_reports_exit_code_and_output() -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], "crasher").start()
    try:
        wait_until(lambda: not proc.alive(), 10, "the crasher to exit")
        with pytest.raises(FleetError, match=r"(?s)code 3.*boom"):
            proc.check_alive()
    finally:
        proc.stop()
