"""`shepherd bench routing --virtual`: the virtual clock, the gateway's own configuration, and figures that follow
the policy."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from shepherd.bench.fleet import GatewayTemplate
from shepherd.bench.routing import (
    SHEPHERD,
    Settings,
    build_workload,
    default_gateways,
    is_shepherd,
    render,
    run_routing,
    settings_from_args,
)
from shepherd.bench.virtual_time import VirtualClockLoop, gateway_config, run_virtual
from shepherd.cli import build_parser

SMALL = Settings(groups=6, prompts_per_group=6, system_tokens=256, question_tokens=16, answer_tokens=4, kv_tokens=2048)


def gateway(policy: str, flags: str = "") -> GatewayTemplate:
    template = default_gateways([policy], None, False)[0]
    return GatewayTemplate(template.name, f"{template.template} {flags}")


def test_the_clock_jumps_to_the_next_timer_instead_of_sleeping() -> None:
    loop = VirtualClockLoop()

    async def sleepers() -> list[float]:
        woke: list[float] = []

        async def sleep(seconds: float) -> None:
            await asyncio.sleep(seconds)
            woke.append(loop.time())

        await asyncio.gather(sleep(30.0), sleep(3600.0), sleep(0.5))
        return woke

    started = time.monotonic()
    try:
        assert loop.run_until_complete(sleepers()) == [0.5, 30.0, 3600.0]
    finally:
        loop.close()
    assert time.monotonic() - started < 5  # an hour of virtual time


def test_a_run_that_can_never_end_is_an_error_not_a_hang() -> None:
    loop = VirtualClockLoop()
    try:
        with pytest.raises(RuntimeError, match="never end"):
            loop.run_until_complete(_forever())
    finally:
        loop.close()


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()  # nothing will ever resolve it


def test_the_policy_comes_from_the_gateways_own_command_line() -> None:
    template = gateway("cache_aware", "--cache-max-share 0 --cache-queue-tokens 128")
    config = gateway_config(template.argv(0, 0, ["http://w0:8000"]))
    assert config.policy == "cache_aware"
    assert (config.cache_aware.max_share, config.cache_aware.queue_tokens) == (0, 128)
    with pytest.raises(ValueError, match="not a Shepherd"):
        gateway_config(["smg", "--policy", "cache_aware"])
    assert is_shepherd(template) and not is_shepherd(GatewayTemplate("smg", "smg launch --port {port}"))


def test_cache_aware_keeps_prefixes_that_round_robin_spreads_and_replicas_split_the_requests() -> None:
    workload = build_workload("shared-prefix", SMALL)
    cache = run_virtual(gateway("cache_aware"), 1, workload, SMALL)
    spread = run_virtual(gateway("round_robin"), 1, workload, SMALL)
    assert cache["ok"] == spread["ok"] == workload.requests and cache["failed"] == 0
    assert cache["hit_rate"] > spread["hit_rate"] + 0.3
    # What the workers counted is what the answers reported, and round robin's spread is exact.
    assert cache["hit_rate"] == pytest.approx(cache["client_reported_hit_rate"])
    assert max(spread["worker_requests"]) - min(spread["worker_requests"]) <= 1
    two = run_virtual(gateway("cache_aware"), 2, workload, SMALL)
    assert sum(two["worker_requests"]) == workload.requests
    # The same run twice gives the same figures: the engines and the schedule run on the virtual clock.
    assert run_virtual(gateway("round_robin"), 1, workload, SMALL)["ttft_ms"] == spread["ttft_ms"]


def test_virtual_routing_runs_only_shepherds_gateways_and_reports_like_a_real_run() -> None:
    settings = replace(SMALL, workloads=("shared-prefix",), virtual=True)
    gateways = [gateway("cache_aware"), GatewayTemplate("smg-cache_aware", "smg launch --port {port}")]
    lines: list[str] = []
    document = run_routing(settings, gateways, progress=lines.append)
    result = document["results"]["shared-prefix"]
    assert set(result) == {"description", "requests", "load", "kv_tokens", "bounds", "gateways"}
    measured = result["gateways"]
    assert list(measured) == [SHEPHERD] and measured[SHEPHERD]["hit_rate"] > 0.3
    assert measured[SHEPHERD]["replicas"] == 1 and sum(measured[SHEPHERD]["worker_requests"]) == result["requests"]
    assert SHEPHERD in render(document) and "one LRU cache of them" in render(document)
    assert any("not measured: smg-cache_aware" in line for line in lines)


def test_virtual_needs_the_regular_fleet() -> None:
    with pytest.raises(ValueError, match="--virtual"):
        settings_from_args(build_parser().parse_args(["bench", "routing", "--virtual", "--pd"]))
