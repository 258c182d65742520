"""`shepherd bench overhead` end to end with tiny numbers: real sim workers, a real Shepherd, the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys


def test_overhead_bench_measures_direct_and_shepherd(tmp_path) -> None:
    output = tmp_path / "overhead.json"
    argv = [sys.executable, "-m", "shepherd.cli", "bench", "overhead"]
    argv += ["--requests", "300", "--latency-requests", "60", "--warmup-requests", "30", "--concurrency", "8"]
    argv += ["--output", str(output)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chat_stream / shepherd" in done.stdout
    assert "Upstream direct throughput" in done.stdout

    report = json.loads(output.read_text())
    assert report["settings"]["gateways"] == {"shepherd": report["settings"]["gateways"]["shepherd"]}
    for kind in ("generate", "chat_stream"):
        direct = report["summary"][kind]["direct"]
        shepherd = report["summary"][kind]["shepherd"]
        assert direct["failed"] == shepherd["failed"] == 0
        assert direct["rps"] > 0 and shepherd["rps"] > 0
        assert shepherd["cpu_us_per_req"] > 0  # the gateway's /proc CPU moved while it served
        assert shepherd["added_p50_ms"] == shepherd["p50_ms"] - direct["p50_ms"]
        run = report["rounds"][0]["shepherd"][kind]
        assert run["throughput"]["requests"] == 300 and run["latency"]["requests"] == 60
    assert report["summary"]["chat_stream"]["shepherd"]["ttft_p50_ms"] > 0
