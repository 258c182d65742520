"""`shepherd bench routing` pieces that need no processes: settings, gateway templates, figures, report, chart."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import pytest

from shepherd.bench import routing
from shepherd.bench.conversation_load import WorkloadRun
from shepherd.bench.fleet import GatewayTemplate
from shepherd.bench.routing import (
    GENERATE_RPC,
    GRPC_UNSUPPORTED,
    PD_KV_TOKENS,
    PD_RATE,
    SGLANG_ROUTER,
    SHEPHERD,
    SMG,
    TRACE_KV_FACTOR,
    Fleet,
    GatewayRun,
    Settings,
    bounds,
    build_workload,
    figures,
    gateway_runs,
    gateways_from_args,
    goal,
    grpc_replay,
    render,
    replica_scaling,
    rpc_counts,
    settings_from_args,
    share,
    unsupported,
)
from shepherd.bench.workloads import TRACE, WORKLOADS
from shepherd.cli import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["bench", "routing", *argv])


def test_defaults_and_pd_defaults() -> None:
    args = parse()
    assert args.run is routing.main
    settings = settings_from_args(args)
    assert settings == Settings()
    assert settings.workers == 8 and settings.rate == 100.0 and settings.concurrency is None
    assert settings.workloads == WORKLOADS and settings.trace is None and settings.replicas == (1,)
    assert settings.trace_kv_tokens == TRACE_KV_FACTOR * settings.kv_tokens
    assert settings.conversation_system_tokens > 0  # chat products open every conversation with a system prompt
    pd = settings_from_args(parse("--pd"))
    assert pd.pd and pd.kv_tokens == PD_KV_TOKENS and pd.rate == PD_RATE and pd.cache_workers == 2
    assert pd.trace_kv_tokens == TRACE_KV_FACTOR * PD_KV_TOKENS
    assert settings_from_args(parse("--pd", "--kv-tokens", "1000", "--rate", "5")).kv_tokens == 1000


def test_concurrency_replaces_the_rate_and_sizes_are_validated() -> None:
    settings = settings_from_args(parse("--concurrency", "12", "--workloads", "multi-turn", "multi-turn"))
    assert settings.rate is None and settings.concurrency == 12 and settings.workloads == ("multi-turn",)
    assert settings.load == "12 clients closed loop"
    bad_flags = (["--rate", "0"], ["--concurrency", "0"], ["--workers", "0"], ["--groups", "0"], ["--kv-tokens", "0"],
                 ["--replicas", "0"], ["--zipf-groups", "0"], ["--think-time", "0"],
                 ["--workloads", TRACE])  # fmt: skip
    for bad in bad_flags:
        with pytest.raises(ValueError):
            settings_from_args(parse(*bad))
    with pytest.raises(SystemExit):
        parse("--rate", "5", "--concurrency", "2")  # one load shape only


def test_sim_flags_follow_the_settings() -> None:
    argv = Settings(kv_tokens=1234, page_size=8, sim_args=("--dp-size", "2")).sim_argv()
    assert argv[:2] == ["--latency-model", "batch"]
    assert argv[argv.index("--kv-tokens") + 1] == "1234" and argv[argv.index("--page-size") + 1] == "8"
    assert argv[-2:] == ["--dp-size", "2"]


def test_grpc_runs_grpc_workers_with_kv_events_and_leaves_sglang_router_out() -> None:
    assert not Settings().grpc and "--grpc" not in Settings().sim_argv()
    settings = settings_from_args(parse("--grpc", "--sim-args", "--dp-size 2"))
    argv = settings.sim_argv()
    assert settings.grpc and {"--grpc", "--kv-events"} <= set(argv) and argv[-2:] == ["--dp-size", "2"]
    virtual = settings_from_args(parse("--virtual", "--grpc"))  # virtual time honours settings.grpc
    assert virtual.virtual and virtual.grpc
    gateways = gateways_from_args(["cache_aware"], "/opt/smg", [], False, "/opt/sglang-router")
    runs = gateway_runs(gateways, (1, 2))
    assert unsupported(runs, settings) == {SGLANG_ROUTER: GRPC_UNSUPPORTED}
    assert unsupported(runs, Settings()) == {}
    assert list(unsupported(runs, virtual)) == [SMG, SGLANG_ROUTER]
    # Shepherd and SMG get the grpc:// URLs as they are: both fetch the tokenizer from the workers (GetTokenizer).
    for gateway in gateways[:2]:
        argv = gateway.argv(9000, 9001, ["grpc://127.0.0.1:5001"])
        assert argv[argv.index("--worker-urls") + 1] == "grpc://127.0.0.1:5001" and "--tokenizer-path" not in argv


def test_kv_events_runs_http_workers_publishing_over_zeromq_for_every_gateway() -> None:
    assert "--kv-events-config" not in Settings().sim_argv() and not Settings().events
    settings = settings_from_args(parse("--kv-events"))
    argv = settings.sim_argv()
    config = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert config["publisher"] == "zmq" and config["endpoint"].endswith(":*")  # each worker binds ports of its own
    assert settings.events and not settings.grpc and "--grpc" not in argv
    gateways = gateways_from_args(["cache_aware"], "/opt/smg", [], False, "/opt/sglang-router")
    assert unsupported(gateway_runs(gateways, (1,)), settings) == {}  # the workers speak HTTP: every peer runs


def test_grpc_fleet_gives_gateways_the_grpc_urls_and_reads_the_sidecars() -> None:
    for pd in (False, True):
        fleet = Fleet(Settings(grpc=True, pd=pd))
        try:
            for i, group in enumerate(fleet.groups.values()):
                group.urls = [f"grpc://127.0.0.1:{5000 + i}"]
                group.http_urls = [f"http://127.0.0.1:{15000 + i}"]
                group.bootstrap_ports = [None]
            assert all(url.startswith("grpc://") for url in fleet.urls())
            assert all(url.startswith("grpc://") for url in fleet.gateway_args() if "://" in url)
            assert list(fleet.control_urls()) == [f"http://127.0.0.1:{15000 + i}" for i in range(len(fleet.groups))]
        finally:
            fleet.stop()


def test_grpc_replay_is_what_the_gateway_sends_with_the_workers_bpe() -> None:
    settings = Settings(grpc=True, clients=2, rounds=2, first_tokens=32, turn_tokens=8, answer_tokens=4,
                        conversation_system_tokens=16)  # fmt: skip
    workload = build_workload("multi-turn", settings)
    turns = list(grpc_replay(workload, 0))
    assert len(turns) == workload.requests and all(len(answer) == 4 for _, answer in turns)
    http = list(workload.replay(0))
    # The chat template adds its markers, and the BPE splits most of the workloads' words into several ids.
    assert all(len(g) > 1.5 * len(h) for (g, _), (h, _) in zip(turns, http, strict=True))
    # A conversation's second turn extends its first: the first prompt and its answer, then the new turn.
    first, second = turns[0], turns[2]
    assert second[0][: len(first[0])] == first[0]
    assert bounds(workload, settings)["prompt_tokens"] == sum(len(p) for p, _ in turns)
    virtual = bounds(workload, replace(settings, virtual=True))  # virtual engines take the simulator's ids
    assert virtual["prompt_tokens"] == sum(len(p) for p, _ in http)


TRACE_LINES = "".join(
    f'{{"timestamp": {1000 * i}, "input_length": 1024, "output_length": 64, "hash_ids": [0, {i + 1}]}}\n'
    for i in range(10)
)


def test_a_trace_adds_its_workload_and_window_and_runs_on_its_own_kv_size(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(TRACE_LINES)
    args = ["--trace", str(path), "--trace-start", "2", "--trace-duration", "5", "--trace-requests", "4"]
    settings = settings_from_args(parse(*args, "--trace-block-tokens", "32", "--trace-kv-tokens", "999"))
    assert settings.workloads == (*WORKLOADS, TRACE) and settings.trace_kv_tokens == 999
    assert settings.for_workload(TRACE).kv_tokens == 999 and settings.for_workload("multi-turn") == settings
    workload = build_workload(TRACE, settings)
    assert workload.timed and workload.requests == 4
    assert [c.start for c in workload.conversations] == pytest.approx([0, 0.1, 0.2, 0.3])
    whole = settings_from_args(parse("--trace", str(path), "--trace-start", "0", "--trace-duration", "0"))
    assert whole.trace_duration_s is None and build_workload(TRACE, whole).requests == 10
    assert settings_from_args(parse("--trace", str(path), *args, "--workloads", TRACE)).workloads == (TRACE,)
    with pytest.raises(ValueError):  # the default window starts ten minutes in
        settings_from_args(parse("--trace", str(path)))
    for bad in (["--trace-start", "100"], ["--trace-time-scale", "0"], ["--trace-start", "-1"]):
        with pytest.raises(ValueError):
            settings_from_args(parse("--trace", str(path), *bad))
    with pytest.raises(ValueError):
        settings_from_args(parse("--trace", str(tmp_path / "missing.jsonl")))


def test_replicas_multiply_only_shepherd_gateways() -> None:
    settings = settings_from_args(parse("--replicas", "4", "2", "2"))
    assert settings.replicas == (1, 2, 4)  # one replica always runs: the reference
    gateways = gateways_from_args(["cache_aware"], "/opt/smg", [], False, "/opt/sglang-router")
    runs = gateway_runs(gateways, settings.replicas)
    assert [run.name for run in runs] == [SHEPHERD, f"{SHEPHERD}-x2", f"{SHEPHERD}-x4", SMG, SGLANG_ROUTER]
    assert [run.replicas for run in runs] == [1, 2, 4, 1, 1] and runs[1].gateway is gateways[0]
    assert GatewayRun(GatewayTemplate("other", "x")).name == "other"


def test_default_gateways_are_shepherd_policies_then_smg() -> None:
    gateways = gateways_from_args(["cache_aware", "round_robin"], "/opt/smg", [], pd=False)
    assert [g.name for g in gateways] == [SHEPHERD, "shepherd-round_robin", SMG]
    argv = gateways[0].argv(9000, 9001, ["http://w1", "http://w2"])
    assert argv[argv.index("--worker-urls") + 1 : argv.index("--worker-urls") + 3] == ["http://w1", "http://w2"]
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    smg = gateways[2].argv(9000, 9001, ["http://w1"])
    assert smg[:2] == ["/opt/smg", "launch"] and smg[smg.index("--policy") + 1] == "cache_aware"
    assert "--pd-disaggregation" in gateways_from_args(["cache_aware"], None, [], pd=True)[0].template
    *_, sglang_router = gateways_from_args(["cache_aware"], None, [], False, "/opt/sglang-router")
    argv = sglang_router.argv(9000, 9001, ["http://w1"])
    assert sglang_router.name == SGLANG_ROUTER and argv[:2] == ["/opt/sglang-router", "launch"]
    assert argv[argv.index("--policy") + 1] == "cache_aware" and argv[argv.index("--worker-urls") + 1] == "http://w1"


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
    assert "worker_rpcs" not in f


def test_figures_count_generate_calls_on_grpc_workers() -> None:
    def grpc_log(count: int, prompt: int, cached: int) -> dict:
        rpcs = {GENERATE_RPC: count, "/sglang.grpc.scheduler.SglangScheduler/GetLoads": 2, "/get_load": 5}
        return {"counts": rpcs, "prompt_tokens": prompt, "cached_tokens": cached}

    logs = {"regular": [grpc_log(3, 600, 300), grpc_log(1, 400, 100)]}
    f = figures(run_with([0.1, 0.2], [200, 200]), logs, "regular")
    assert f["worker_requests"] == [3, 1] and f["share_max_mean"] == 1.5 and f["hit_rate"] == pytest.approx(0.4)
    assert f["worker_rpcs"] == rpc_counts(logs) == {"Generate": 4, "GetLoads": 4}


def gateway_figures(hit: float, p99: float, share_: float, name: str = SHEPHERD, replicas: int = 1) -> dict:
    return {"hit_rate": hit, "ttft_ms": {"p50": p99 / 2, "p99": p99}, "latency_ms": {"p50": 1.0, "p99": 2.0},
            "rps": 10.0, "share_max_mean": share_, "failed": 0, "skipped": 0, "gateway": name,
            "replicas": replicas}  # fmt: skip


def document(ours: dict, smg: dict | None, sglang_router: dict | None = None, **more: dict) -> dict:
    gateways = {SHEPHERD: ours, **more}
    gateways.update({name: f for name, f in ((SMG, smg), (SGLANG_ROUTER, sglang_router)) if f is not None})
    result = {"description": "d", "requests": 10, "load": "10 req/s open loop", "kv_tokens": 100, "gateways": gateways,
              "bounds": {"infinite_cache": 0.9, "fleet_capacity": 0.8, "fleet_capacity_tokens": 100,
                         "pooled_lru": 0.7, "prefix_set_tokens": 125, "distinct_tokens": 150}}  # fmt: skip
    results = {"shared-prefix": result}
    settings = {"pd": False, "workers": 8, "kv_tokens": 100, "rate": 10.0, "concurrency": None}
    return {
        "settings": settings,
        "results": results,
        "goal": goal(results),
        "replica_scaling": replica_scaling(results),
    }


def test_goal_compares_shepherd_with_each_peer_and_the_bound() -> None:
    smg, sglang_router = gateway_figures(0.8, 60.0, 1.0, SMG), gateway_figures(0.85, 45.0, 1.0, SGLANG_ROUTER)
    met = document(gateway_figures(0.9, 40.0, 1.2), smg, sglang_router)["goal"]["shared-prefix"]
    assert met[f"hit_rate_vs_{SMG}"] == pytest.approx(1.125) and met[f"ttft_p99_vs_{SMG}"] == pytest.approx(2 / 3)
    assert met[f"hit_rate_vs_{SGLANG_ROUTER}"] == pytest.approx(0.9 / 0.85)
    assert met["of_capacity_bound"] == pytest.approx(0.9 / 0.8) and met["met"] is True
    too_uneven = document(gateway_figures(0.9, 40.0, 1.4), smg, sglang_router)
    no_better_hits = document(gateway_figures(0.8, 40.0, 1.0), smg, sglang_router)
    slower_than_sglang_router = document(gateway_figures(0.9, 50.0, 1.0), smg, sglang_router)
    for doc in (too_uneven, no_better_hits, slower_than_sglang_router):
        assert doc["goal"]["shared-prefix"]["met"] is False
    # Without every peer the goal cannot be judged, but the bound and the share still are.
    partial = document(gateway_figures(0.9, 40.0, 1.2), smg)["goal"]["shared-prefix"]
    assert partial["met"] is None and partial[f"hit_rate_vs_{SGLANG_ROUTER}"] is None
    assert partial["of_capacity_bound"] == pytest.approx(0.9 / 0.8)
    assert goal({"w": {"gateways": {SMG: smg}}}) == {}


def test_replica_scaling_is_the_hit_rate_over_one_replicas() -> None:
    replicas = {f"{SHEPHERD}-x2": gateway_figures(0.76, 40.0, 1.0, SHEPHERD, 2),
                f"{SHEPHERD}-x4": gateway_figures(0.6, 40.0, 1.0, SHEPHERD, 4)}  # fmt: skip
    doc = document(gateway_figures(0.8, 40.0, 1.0), None, **replicas)
    scaling = doc["replica_scaling"]["shared-prefix"][SHEPHERD]
    assert scaling["hit_rate"] == {"1": 0.8, "2": 0.76, "4": 0.6}
    assert scaling["ratio"] == {"2": pytest.approx(0.95), "4": pytest.approx(0.75)}
    text = render(doc)
    assert "0.760 (0.95x)" in text and "0.600 (0.75x)" in text and "within 5%" in text
    assert document(gateway_figures(0.8, 40.0, 1.0), None)["replica_scaling"] == {}


def test_grpc_documents_judge_the_goal_without_sglang_router_and_say_so() -> None:
    doc = document(gateway_figures(0.9, 40.0, 1.2), gateway_figures(0.8, 60.0, 1.0, SMG))
    assert doc["goal"]["shared-prefix"]["met"] is None  # HTTP workers: sglang-router is a peer
    doc["goal"] = goal(doc["results"], [SMG])
    doc["settings"]["grpc"] = True
    doc["not_measured"] = {SGLANG_ROUTER: GRPC_UNSUPPORTED}
    assert doc["goal"]["shared-prefix"]["met"] is True
    text = render(doc)
    assert "8 gRPC workers" in text and f"Not measured: {SGLANG_ROUTER} ({GRPC_UNSUPPORTED})" in text


def test_render_prints_figures_bounds_and_the_goal() -> None:
    smg, sglang_router = gateway_figures(0.8, 60.0, 1.0, SMG), gateway_figures(0.85, 45.0, 1.0, SGLANG_ROUTER)
    text = render(document(gateway_figures(0.9, 40.0, 1.2), smg, sglang_router))
    assert "0.900 with an infinite cache" in text and "0.800 with the fleet's 100 tokens" in text
    assert "(one LRU cache of them: 0.700; prefix set 125" in text
    assert SHEPHERD in text and "1.12x" in text and "0.67x" in text and "yes" in text and "1.06x" in text
    assert "10 req/s open loop" in text and "of bound" in text


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
    for name in WORKLOADS:
        limits = bounds(build_workload(name, settings), settings)
        # Placement matters: not every reused prefix fits, even with perfect eviction.
        assert limits["prefix_set_tokens"] > 1.2 * limits["fleet_capacity_tokens"]
        assert limits["fleet_capacity"] < limits["infinite_cache"]


def test_chart_is_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from shepherd.bench.chart import write_chart

    doc = document(gateway_figures(0.9, 40.0, 1.2), gateway_figures(0.8, math.nan, 1.0, SMG))
    doc["results"]["multi-turn"] = doc["results"]["shared-prefix"]
    path = tmp_path / "chart.png"
    write_chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
