"""`shepherd bench routing` pieces that need no processes: settings, gateway templates, figures, report, chart."""

from __future__ import annotations

import math
import shlex
from dataclasses import replace

import pytest

from shepherd.bench import routing
from shepherd.bench.conversation_load import WorkloadRun
from shepherd.bench.routing import (
    PD_KV_TOKENS,
    PD_RATE,
    SHEPHERD,
    SMG,
    Fleet,
    Settings,
    bounds,
    build_workload,
    figures,
    gateways_from_args,
    goal,
    render,
    settings_from_args,
    share,
)
from shepherd.cli import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["bench", "routing", *argv])


def test_defaults_and_pd_defaults() -> None:
    args = parse()
    assert args.run is routing.main
    settings = settings_from_args(args)
    assert settings == Settings()
    assert settings.workers == 8 and settings.rate == 100.0 and settings.concurrency is None
    assert settings.conversation_system_tokens > 0  # chat products open every conversation with a system prompt
    pd = settings_from_args(parse("--pd"))
    assert pd.pd and pd.kv_tokens == PD_KV_TOKENS and pd.rate == PD_RATE and pd.cache_workers == 2
    assert settings_from_args(parse("--pd", "--kv-tokens", "1000", "--rate", "5")).kv_tokens == 1000


def test_concurrency_replaces_the_rate_and_sizes_are_validated() -> None:
    settings = settings_from_args(parse("--concurrency", "12", "--workloads", "multi-turn", "multi-turn"))
    assert settings.rate is None and settings.concurrency == 12 and settings.workloads == ("multi-turn",)
    assert settings.load == "12 clients closed loop"
    for bad in (["--rate", "0"], ["--concurrency", "0"], ["--workers", "0"], ["--groups", "0"], ["--kv-tokens", "0"]):
        with pytest.raises(ValueError):
            settings_from_args(parse(*bad))
    with pytest.raises(SystemExit):
        parse("--rate", "5", "--concurrency", "2")  # one load shape only


def test_sim_flags_follow_the_settings() -> None:
    argv = Settings(kv_tokens=1234, page_size=8, sim_args=("--dp-size", "2")).sim_argv()
    assert argv[:2] == ["--latency-model", "batch"]
    assert argv[argv.index("--kv-tokens") + 1] == "1234" and argv[argv.index("--page-size") + 1] == "8"
    assert argv[-2:] == ["--dp-size", "2"]


def test_default_gateways_are_shepherd_policies_then_smg() -> None:
    gateways = gateways_from_args(["cache_aware", "round_robin"], "/opt/smg", [], pd=False)
    assert [g.name for g in gateways] == [SHEPHERD, "shepherd-round_robin", SMG]
    argv = gateways[0].argv(9000, 9001, ["http://w1", "http://w2"])
    assert argv[argv.index("--worker-urls") + 1 : argv.index("--worker-urls") + 3] == ["http://w1", "http://w2"]
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    smg = gateways[2].argv(9000, 9001, ["http://w1"])
    assert smg[:2] == ["/opt/smg", "launch"] and smg[smg.index("--policy") + 1] == "cache_aware"
    assert "--pd-disaggregation" in gateways_from_args(["cache_aware"], None, [], pd=True)[0].template


def test_gateway_options_add_and_replace_by_name() -> None:
    gateways = gateways_from_args(["cache_aware"], None, [SHEPHERD + "=custom {port}", "other=x {port}"], False)
    assert [(g.name, g.template) for g in gateways] == [(SHEPHERD, "custom {port}"), ("other", "x {port}")]
    with pytest.raises(ValueError):
        gateways_from_args([], None, [], False)  # nothing to measure
    with pytest.raises(ValueError):
        gateways_from_args([], None, ["a/b=x"], False)


def test_pd_fleet_hands_prefill_and_decode_arguments_to_the_template() -> None:
    fleet = Fleet(Settings(pd=True))
    try:
        fleet.groups["prefill"].urls = ["http://p1", "http://p2"]
        fleet.groups["prefill"].bootstrap_ports = [8998, None]
        fleet.groups["decode"].urls = ["http://d1"]
        assert fleet.gateway_args() == ["--prefill", "http://p1", "8998", "--prefill", "http://p2", "none",
                                        "--decode", "http://d1"]  # fmt: skip
        assert fleet.cache_role == "prefill" and list(fleet.urls()) == ["http://p1", "http://p2", "http://d1"]
        [template] = gateways_from_args(["round_robin"], None, [], pd=True)
        line = shlex.join(template.argv(1, 2, fleet.gateway_args()))
        assert "--pd-disaggregation --prefill http://p1 8998 --prefill http://p2 none --decode http://d1" in line
    finally:
        fleet.stop()


def test_share_is_busiest_over_mean() -> None:
    assert share([10, 10, 10, 10]) == 1.0
    assert share([30, 10, 0, 0]) == 3.0
    assert share([0, 0]) is None


def run_with(latencies: list[float], statuses: list[int]) -> WorkloadRun:
    run = WorkloadRun(prompt_tokens=100, cached_tokens=60, skipped=1)
    for latency, status in zip(latencies, statuses, strict=True):
        run.load.record(latency, latency / 2, status, 10)
    run.load.elapsed = 2.0
    return run


def log(count: int, prompt: int, cached: int) -> dict:
    return {"counts": {"/v1/chat/completions": count, "/health": 3}, "prompt_tokens": prompt, "cached_tokens": cached}


def test_figures_take_hit_rate_and_share_from_the_worker_logs() -> None:
    run = run_with([0.1, 0.2, 0.3], [200, 200, 500])
    f = figures(run, {"regular": [log(3, 600, 300), log(1, 400, 100)]}, "regular")
    assert f["hit_rate"] == pytest.approx(0.4) and f["client_reported_hit_rate"] == pytest.approx(0.6)
    assert f["worker_requests"] == [3, 1] and f["share_max_mean"] == 1.5
    assert f["ok"] == 2 and f["failed"] == 1 and f["skipped"] == 1 and f["rps"] == 1.0
    assert f["ttft_ms"]["p50"] == pytest.approx(75.0) and f["latency_ms"]["p99"] == pytest.approx(199.0)
    pd = figures(
        run, {"prefill": [log(2, 100, 90), log(2, 100, 10)], "decode": [log(4, 1, 1), log(0, 1, 1)]}, "prefill"
    )
    assert pd["hit_rate"] == pytest.approx(0.5)
    assert pd["prefill_share_max_mean"] == 1.0 and pd["decode_share_max_mean"] == 2.0


def gateway_figures(hit: float, p99: float, share_: float) -> dict:
    return {"hit_rate": hit, "ttft_ms": {"p50": p99 / 2, "p99": p99}, "latency_ms": {"p50": 1.0, "p99": 2.0},
            "rps": 10.0, "share_max_mean": share_, "failed": 0, "skipped": 0}  # fmt: skip


def document(ours: dict, theirs: dict) -> dict:
    result = {"description": "d", "requests": 10, "gateways": {SHEPHERD: ours, SMG: theirs},
              "bounds": {"infinite_cache": 0.9, "fleet_capacity": 0.8, "fleet_capacity_tokens": 100,
                         "prefix_set_tokens": 125}}  # fmt: skip
    results = {"shared-prefix": result}
    settings = {"pd": False, "workers": 8, "kv_tokens": 100, "rate": 10.0, "concurrency": None}
    return {"settings": settings, "results": results, "goal": goal(results)}


def test_goal_compares_shepherd_with_smg() -> None:
    met = document(gateway_figures(0.9, 40.0, 1.2), gateway_figures(0.8, 60.0, 1.0))["goal"]["shared-prefix"]
    assert met["hit_rate_ratio"] == pytest.approx(1.125) and met["ttft_p99_ratio"] == pytest.approx(2 / 3)
    assert met["met"] is True
    too_uneven = document(gateway_figures(0.9, 40.0, 1.4), gateway_figures(0.8, 60.0, 1.0))
    no_better_hits = document(gateway_figures(0.8, 40.0, 1.0), gateway_figures(0.8, 60.0, 1.0))
    assert not too_uneven["goal"]["shared-prefix"]["met"] and not no_better_hits["goal"]["shared-prefix"]["met"]
    assert goal({"w": {"gateways": {SHEPHERD: gateway_figures(0.8, 1.0, 1.0)}}}) == {}


def test_render_prints_figures_bounds_and_the_goal() -> None:
    text = render(document(gateway_figures(0.9, 40.0, 1.2), gateway_figures(0.8, 60.0, 1.0)))
    assert "0.900 with an infinite cache" in text and "0.800 with the fleet's 100 tokens (prefix set 125" in text
    assert SHEPHERD in text and "1.12x" in text and "0.67x" in text and "yes" in text


def test_bounds_follow_the_fleet_and_pd_prefill_keeps_one_answer_token() -> None:
    settings = Settings(clients=6, rounds=3, first_tokens=64, turn_tokens=16, answer_tokens=16, kv_tokens=4096)
    workload = build_workload("multi-turn", settings)
    regular = bounds(workload, settings)
    pd = bounds(workload, replace(settings, pd=True))
    assert regular["fleet_capacity_tokens"] == 8 * 4096 and pd["fleet_capacity_tokens"] == 2 * 4096
    assert regular["fleet_capacity"] == pytest.approx(regular["infinite_cache"])
    assert pd["infinite_cache"] < regular["infinite_cache"]  # the decoded answer was never on a prefill worker
    assert regular["prompt_tokens"] == pd["prompt_tokens"] == sum(len(p) for p, _ in workload.replay())
    assert 0 < regular["prefix_set_tokens"] < regular["prompt_tokens"]


def test_default_workloads_reuse_more_prefix_than_the_fleet_can_hold() -> None:
    settings = Settings()
    for name in ("shared-prefix", "multi-turn"):
        limits = bounds(build_workload(name, settings), settings)
        # Placement matters: not every reused prefix fits, even with perfect eviction.
        assert limits["prefix_set_tokens"] > 1.2 * limits["fleet_capacity_tokens"]
        assert limits["fleet_capacity"] < limits["infinite_cache"]


def test_chart_is_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from shepherd.bench.chart import write_chart

    doc = document(gateway_figures(0.9, 40.0, 1.2), gateway_figures(0.8, math.nan, 1.0))
    doc["results"]["multi-turn"] = doc["results"]["shared-prefix"]
    path = tmp_path / "chart.png"
    write_chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
