"""File discovery end to end: the real gateway process follows a manifest on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.discovery import metric, wait_workers_from
from tests.support.gateway import start_gateway
from tests.support.processes import SimFleet, start_sim

SOURCE = "file"


def write(path: Path, text: str) -> None:
    """Replace the manifest atomically, as an operator's tooling should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return tmp_path / "workers.json"


def test_manifest_changes_are_applied_and_a_malformed_one_keeps_the_last_good_state(tmp_path, manifest, fleet):
    sims: SimFleet = fleet
    static, a, b = sims.urls
    write(manifest, json.dumps({"version": 1, "workers": [{"url": a, "labels": {"zone": "a"}}]}))
    args = ("--discovery-provider", "file", "--discovery-file", str(manifest), "--discovery-check-interval-secs", "1")
    with start_gateway(tmp_path, [static], *args, ready_workers=1) as gw:
        first = wait_workers_from(gw, SOURCE, {a})
        assert first[a]["labels"]["zone"] == "a"
        assert first[a]["labels"]["smg.ai/discovery-provider"] == SOURCE

        # YAML, a bare list, one worker kept (same spec: not re-registered) and one added.
        write(manifest, f"- url: {a}\n  labels: {{zone: a}}\n- {b}\n")
        second = wait_workers_from(gw, SOURCE, {a, b})
        assert second[a]["id"] == first[a]["id"]

        # A malformed manifest is reported and ignored: the last good state stays, re-read after re-read.
        errors = metric(gw, "smg_discovery_snapshot_errors_total", source=SOURCE)
        write(manifest, "- url: [this is not\n")
        gw.process.wait_for(
            lambda: metric(gw, "smg_discovery_snapshot_errors_total", source=SOURCE) >= errors + 2,
            10,
            "two failed reads (the change, then the periodic re-read)",
        )
        assert {w["url"]: w["id"] for w in wait_workers_from(gw, SOURCE, {a, b}).values()} == {
            a: second[a]["id"],
            b: second[b]["id"],
        }
        assert "unusable, keeping the last good state" in gw.process.log_path.read_text()

        # Fixed, with a changed spec for `a` (replaced) and `b` gone (drained and removed).
        write(manifest, json.dumps([{"url": a, "labels": {"zone": "b"}}]))
        gw.process.wait_for(
            lambda: {w["url"]: w["labels"].get("zone") for w in gw.workers() if w["source"] == SOURCE} == {a: "b"},
            10,
            "a relabeled, b removed",
        )
        assert wait_workers_from(gw, SOURCE, {a})[a]["id"] != second[a]["id"]

        # An empty list removes every file worker; the static worker is not the file's to remove.
        write(manifest, "[]")
        wait_workers_from(gw, SOURCE, set())
        assert [w["url"] for w in gw.workers()] == [static]
        assert metric(gw, "smg_discovery_registrations_total", source=SOURCE, result="success") == 3
        assert metric(gw, "smg_discovery_deregistrations_total", source=SOURCE, reason="reconciled") == 3
        assert metric(gw, "smg_discovery_workers_discovered", source=SOURCE) == 0


def test_a_bare_address_in_the_manifest_is_probed_and_registered_as_what_answers(tmp_path, manifest, fleet):
    """`host:port` without a scheme: an SGLang gRPC engine is registered as grpc://, an HTTP one as http://."""
    grpc_sims = start_sim(tmp_path, 1, "--grpc")
    try:
        grpc_addr = grpc_sims.urls[0].removeprefix("grpc://")
        http_addr = fleet.urls[0].removeprefix("http://")
        write(manifest, json.dumps([{"url": grpc_addr}, {"url": http_addr}]))
        args = (
            "--discovery-provider",
            "file",
            "--discovery-file",
            str(manifest),
            "--discovery-check-interval-secs",
            "1",
        )
        with start_gateway(tmp_path, (), *args, ready_workers=2) as gw:
            found = wait_workers_from(gw, SOURCE, {grpc_sims.urls[0], fleet.urls[0]})
            assert found[grpc_sims.urls[0]]["connection_mode"] == "grpc"
            assert found[fleet.urls[0]]["connection_mode"] == "http"
            write(manifest, json.dumps([{"url": http_addr}]))  # the gRPC one leaves: matched by its address
            wait_workers_from(gw, SOURCE, {fleet.urls[0]})
    finally:
        grpc_sims.stop()
