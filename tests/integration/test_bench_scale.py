"""`shepherd bench scale` end to end in a tiny configuration: real sim, real Shepherd, every figure reported."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from shepherd.bench.scale import KINDS, POLICIES


def test_scale_bench_reports_every_figure(tmp_path) -> None:
    output = tmp_path / "scale.json"
    argv = [sys.executable, "-m", "shepherd.cli", "bench", "scale", "--workers", "200", "--baseline-workers", "2"]
    argv += ["--requests", "60", "--rounds", "1", "--warmup-requests", "20", "--concurrency", "8", "--list-calls", "2"]
    argv += ["--json", str(output)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for policy in POLICIES:
        assert f"shepherd / {policy} / generate" in done.stdout and f"shepherd / {policy}  " in done.stdout

    report = json.loads(output.read_text())
    assert set(report["results"]) == {"shepherd"} and set(report["results"]["shepherd"]) == set(POLICIES)
    for policy, sizes in report["results"]["shepherd"].items():
        assert (sizes["baseline"]["workers"], sizes["scale"]["workers"]) == (2, 200)
        assert sizes["baseline"]["register_s"] > 0 and sizes["scale"]["register_s"] > 0
        for kind in KINDS:
            for size in ("baseline", "scale"):
                figures = sizes[size]["kinds"][kind]
                assert figures["failed"] == 0 and figures["requests"] == 60
                assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"] and figures["rps"] > 0
            assert math.isfinite(report["summary"]["shepherd"][policy][kind]["p99_ratio"])
        listed = sizes["scale"]["list_workers"]
        assert 0 < listed["median_ms"] <= listed["max_ms"] and listed["bytes"] > 200 * 100
        post = sizes["post"]
        assert post["statuses"] == {"202": 198} and post["workers"] == 200
        assert 0 < post["post_s"] <= post["ready_s"]
        assert post["load"]["failed"] == 0 and post["load"]["requests"] > 0
