"""`shepherd bench overhead`: aggregation, rendering and command-line handling (no processes)."""

from __future__ import annotations

import orjson
import pytest

from shepherd.bench import overhead
from shepherd.bench.fleet import SHEPHERD_TEMPLATE
from shepherd.bench.overhead import gateways_from_args, render, request_specs, summarize
from shepherd.cli import build_parser


def _run(p50: float, p99: float, rps: float, cpu: float | None = None, failed: int = 0) -> dict:
    throughput = {"rps": rps, "failed": failed, "upstream_cpu_us_per_req": 100.0, "client_cpu_us_per_req": 90.0}
    latency = {"latency_ms": {"p50": p50, "p99": p99}, "failed": 0}
    if cpu is not None:
        throughput["gateway_cpu_us_per_req"] = cpu
        latency["gateway_cpu_us_per_req"] = 2 * cpu
    return {"throughput": throughput, "latency": latency}


def _round(direct_p50: float, gateway_p50: float, gateway_cpu: float) -> dict:
    return {
        "direct": {"generate": _run(direct_p50, direct_p50 * 2, 8000)},
        "shepherd": {"generate": _run(gateway_p50, gateway_p50 * 2, 3000, gateway_cpu)},
        "other": {"generate": _run(gateway_p50 / 2, gateway_p50, 4000, gateway_cpu / 2, failed=1)},
    }


def test_summarize_takes_medians_and_subtracts_direct_latency() -> None:
    rounds = [_round(0.3, 0.8, 200), _round(0.5, 1.0, 100), _round(0.4, 0.9, 300)]
    summary = summarize(rounds, ["generate"])["generate"]
    assert summary["direct"]["p50_ms"] == pytest.approx(0.4)
    assert "cpu_us_per_req" not in summary["direct"]
    shepherd = summary["shepherd"]
    assert shepherd["cpu_us_per_req"] == 200
    assert shepherd["cpu_us_per_req_c1"] == 400
    assert shepherd["added_p50_ms"] == pytest.approx(0.9 - 0.4)
    assert shepherd["added_p99_ms"] == pytest.approx(1.8 - 0.8)
    assert summary["other"]["failed"] == 3  # failures add up over rounds


def test_render_shows_every_target_and_the_ratios_to_shepherd() -> None:
    document = {
        "settings": {"concurrency": 32, "workers": 2, "max_tokens": 16, "gateways": {"shepherd": "x", "other": "y"}},
        "summary": summarize([_round(0.3, 0.8, 200)], ["generate"]),
    }
    text = render(document)
    for needle in ("generate / direct", "generate / shepherd", "generate / other", "generate: shepherd/other"):
        assert needle in text
    assert "2.00x" in text  # shepherd CPU/req is twice the other's
    assert "Upstream direct throughput at c=32: generate 8,000 req/s" in text


def test_gateways_default_to_shepherd_and_can_be_added_or_overridden() -> None:
    assert [(g.name, g.template) for g in gateways_from_args([])] == [("shepherd", SHEPHERD_TEMPLATE)]
    gateways = gateways_from_args(["smg=smg launch --port {port}", "shepherd=custom {port}"])
    assert [(g.name, g.template) for g in gateways] == [
        ("shepherd", "custom {port}"),
        ("smg", "smg launch --port {port}"),
    ]
    with pytest.raises(ValueError):
        gateways_from_args(["direct=x"])


def test_request_specs_are_valid_bodies_of_each_kind() -> None:
    specs = request_specs(max_tokens=8, model="m")
    generate = orjson.loads(specs["generate"].body)
    chat = orjson.loads(specs["chat_stream"].body)
    assert specs["generate"].path == "/generate" and not specs["generate"].stream
    assert generate["sampling_params"]["max_new_tokens"] == 8
    assert specs["chat_stream"].path == "/v1/chat/completions" and specs["chat_stream"].stream
    assert chat["stream"] is True and chat["model"] == "m" and chat["messages"]


def test_cli_registers_the_overhead_benchmark() -> None:
    args = build_parser().parse_args(
        ["bench", "overhead", "--gateway", "smg=smg launch", "--requests", "10", "--sim-args", "--latency-model none"]
    )
    assert args.run is overhead.main
    assert args.gateway == ["smg=smg launch"]
    assert args.requests == 10
    assert args.sim_args == "--latency-model none"
