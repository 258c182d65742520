"""DP-aware routing across real processes: every data-parallel rank of a worker is its own routing target."""

from __future__ import annotations

import itertools
import subprocess
import sys

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import free_port, start_sim

KEY = "dp-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEALTH_INTERVAL = 0.3
INFERENCE_PATHS = ("/generate", "/v1/chat/completions")


def test_dp_aware_refuses_to_start_without_an_api_key(tmp_path):
    args = ["launch", "--dp-aware", "--worker-urls", "http://127.0.0.1:9", "--port", str(free_port())]
    result = subprocess.run(
        [sys.executable, "-m", "shepherd.cli", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0
    assert "--dp-aware requires --api-key" in result.stdout + result.stderr


async def test_ranks_alternate_under_round_robin_and_requests_go_to_the_base_url(tmp_path):
    args = ("--dp-aware", "--policy", "round_robin", "--health-check-interval-secs", str(HEALTH_INTERVAL))
    with (
        start_sim(tmp_path, 1, "--dp-size", "2", "--api-key", KEY) as sims,
        start_gateway(tmp_path, sims.urls, *args, api_key=KEY, ready_workers=2) as gw,
    ):
        base = sims.urls[0]
        ranks = sorted((w["url"], w["dp_rank"], w["dp_size"], w["dp_base_url"]) for w in gw.workers())
        assert ranks == [(f"{base}@0", 0, 2, base), (f"{base}@1", 1, 2, base)]

        routed = []
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for i in range(6):
                if i % 3 == 2:
                    path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"dp {i}"}]}
                else:
                    path, body = "/generate", {"text": f"dp {i}", "sampling_params": {"max_new_tokens": 2}}
                async with session.post(gw.url + path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    routed.append(resp.headers["x-smg-routed-worker-id"])
        assert all(a != b for a, b in itertools.pairwise(routed)), routed
        assert set(routed) == {f"{base}@0", f"{base}@1"}

        log = sims.log(0)
        sent = [e for e in log["requests"] if e["path"] in INFERENCE_PATHS]  # the base URL's own paths, no @rank
        assert [f"{base}@{e['body']['data_parallel_rank']}" for e in sent] == routed
        assert log["rank_requests"] == [3, 3]  # the sim served each request on the rank the body named
        assert {e["headers"]["authorization"] for e in sent} == {f"Bearer {KEY}"}
        [server_info] = [e for e in log["requests"] if e["path"] == "/server_info"]  # DP discovery: once per URL
        assert server_info["headers"]["authorization"] == f"Bearer {KEY}"

        # Health probes and metrics scrapes go once per base URL, not once per rank.
        def health_times() -> list[float]:
            return [e["ts"] for e in sims.log(0)["requests"] if e["path"] == "/health"]

        gw.process.wait_for(lambda: len(health_times()) >= 4, 10, "4 health probes")
        gaps = [b - a for a, b in itertools.pairwise(health_times())]
        assert min(gaps) > HEALTH_INTERVAL / 3, gaps  # two ranks probed separately would come in pairs
        metrics_before = sims.log(0)["counts"].get("/metrics", 0)
        status, _ = gw.get("/engine_metrics")
        assert status == 200
        assert sims.log(0)["counts"]["/metrics"] == metrics_before + 1
