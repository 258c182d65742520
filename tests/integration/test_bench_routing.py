"""`shepherd bench routing` end to end with tiny numbers: real sim workers, real Shepherd gateways, JSON and chart."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

WORKLOADS = ("shared-prefix", "multi-turn")
GATEWAYS = ("shepherd-cache_aware", "shepherd-round_robin")


@pytest.mark.parametrize("mode", ["regular", "pd", "grpc", "kv-events"])
def test_routing_bench_measures_each_workload_through_each_gateway(tmp_path, mode) -> None:
    output, chart = tmp_path / "routing.json", tmp_path / "routing.png"
    argv = [sys.executable, "-m", "shepherd.cli", "bench", "routing", "--no-smg", "--policies", "cache_aware"]
    argv += ["round_robin", "--sim-processes", "1", "--kv-tokens", "1024", "--decode-step-ms", "2"]
    argv += ["--pd", "--prefill-workers", "2", "--decode-workers", "1"] if mode == "pd" else ["--workers", "2"]
    # gRPC: the gateways tokenize; kv-events: HTTP workers cache BPE ids and publish them over ZeroMQ. Either way the
    # bounds are in the workers' BPE ids.
    argv += {"grpc": ["--grpc"], "kv-events": ["--kv-events"]}.get(mode, [])
    argv += ["--groups", "4", "--prompts-per-group", "3", "--system-tokens", "128", "--question-tokens", "16"]
    argv += ["--clients", "3", "--rounds", "3", "--first-tokens", "64", "--turn-tokens", "16", "--answer-tokens", "4"]
    argv += ["--rate", "50", "--workloads", "shared-prefix", "multi-turn", "--no-sglang-router"]
    argv += ["--output", str(output)]
    with_chart = importlib.util.find_spec("matplotlib") is not None
    if with_chart:
        argv += ["--chart", str(chart)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(name in done.stdout for name in GATEWAYS)
    assert "with an infinite cache" in done.stdout

    report = json.loads(output.read_text())
    assert list(report["results"]) == list(WORKLOADS)
    for workload in WORKLOADS:
        result = report["results"][workload]
        assert list(result["gateways"]) == list(GATEWAYS)
        limits = result["bounds"]
        assert 0 < limits["fleet_capacity"] <= limits["infinite_cache"] < 1
        for f in result["gateways"].values():
            assert f["failed"] == f["skipped"] == 0 and f["ok"] == result["requests"]
            roles = ("prefill_", "decode_") if mode == "pd" else ("",)
            for role in roles:  # every request reached one worker of each role; the probe and other runs were cleared
                assert sum(f[f"{role}worker_requests"]) == result["requests"]
            # The (prefill) workers saw exactly the prompts the replay predicts: the histories carry the real answers.
            assert f["prompt_tokens"] == limits["prompt_tokens"]
            if mode != "pd":  # what the streams reported matches the workers' own counters
                assert f["client_reported_hit_rate"] == f["hit_rate"]
            assert 0 <= f["hit_rate"] <= limits["fleet_capacity"] + 1e-9
            assert 0 < f["ttft_ms"]["p50"] <= f["ttft_ms"]["p99"] and f["rps"] > 0
            if mode == "grpc":  # the workers' counters are read on their HTTP sidecars
                assert f["worker_rpcs"]["Generate"] == result["requests"] and f["startup_rpcs"]["GetTokenizer"] == 1
        if mode == "grpc":  # cache_aware subscribes to every worker's KV events as it starts; round_robin does not
            subscribed = [f["startup_rpcs"].get("SubscribeKvEvents") for f in result["gateways"].values()]
            assert subscribed == [2, None]
    if with_chart:
        assert chart.read_bytes()[:4] == b"\x89PNG"
