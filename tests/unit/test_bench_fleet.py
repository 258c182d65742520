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


def test_wait_for_reports_an_early_exit_with_its_code_and_output() -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], "crasher").start()
    try:
        with pytest.raises(FleetError, match=r"(?s)crasher \(exited with code 3\): exited while waiting for .*boom"):
            proc.wait_for(lambda: False, 10, "a condition that never holds")
    finally:
        proc.stop()


def test_wait_for_reports_the_deadline_with_the_log_tail() -> None:
    code = "print('still starting', flush=True); import time; time.sleep(60)"
    with ManagedProcess([sys.executable, "-c", code], "slow").start() as proc:
        wait_until(lambda: "still starting" in proc.log_path.read_text(), 10, "the first output")
        with pytest.raises(FleetError, match=r"(?s)slow \(running\): timed out after 0.1s waiting for ready.*starting"):
            proc.wait_for(lambda: False, 0.1, "ready")


def test_a_log_dir_keeps_the_log_after_stop(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "print('kept')"], "short", log_dir=tmp_path).start()
    assert proc.wait(10) == 0
    assert proc.stop() == 0
    assert (tmp_path / "short.log").read_text() == "kept\n"


def test_free_ports_are_distinct():
    from shepherd.bench.fleet import free_ports

    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
