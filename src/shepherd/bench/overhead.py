"""`shepherd bench overhead`: what a gateway costs on the request path.

One upstream fleet of simulated workers (answering at once, so the gateway is the bottleneck), then, one after the
other: direct to the workers, through Shepherd, through each `--gateway NAME=TEMPLATE`. For every target and request
kind (non-stream `/generate`, streamed `/v1/chat/completions`):

- gateway CPU per request: utime+stime of the gateway's process tree from /proc, before/after a fixed number of
  requests at the throughput concurrency (and, for reference, during the concurrency-1 run);
- requests/s at `--concurrency` (default 32), closed loop;
- latency at concurrency 1, and what the gateway adds to the direct p50/p99.

Everything shares this machine's cores, so req/s are comparable between targets of one run, not across machines.
With `--rounds R` the targets are measured R times in turn and each figure is the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shepherd.bench.fleet import SHEPHERD_TEMPLATE, GatewayProcess, GatewayTemplate, SimFleet
from shepherd.bench.loadgen import LoadGenPool, LoadPlan, LoadResult, RequestSpec
from shepherd.bench.report import fmt, fmt_ratio, render_table, run_and_report, run_metadata

DIRECT = "direct"
SHEPHERD = "shepherd"
KINDS = ("generate", "chat_stream")
_PROMPT = (
    "You are a helpful assistant. Summarize the following paragraph in one sentence: the gateway receives a request, "
    "chooses a worker by policy, forwards the body unchanged and relays the answer back to the client."
)


def request_specs(max_tokens: int, model: str) -> dict[str, RequestSpec]:
    """The request of each kind, encoded once."""
    generate = {"text": _PROMPT, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": _PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    return {
        "generate": RequestSpec("/generate", orjson.dumps(generate)),
        "chat_stream": RequestSpec("/v1/chat/completions", orjson.dumps(chat), stream=True),
    }


@dataclass(frozen=True, slots=True)
class Settings:
    workers: int = 2
    sim_processes: int = 1
    sim_args: tuple[str, ...] = ("--latency-model", "none")
    model: str = "sim-model"
    concurrency: int = 32
    requests: int = 10000  # per target and kind at `concurrency`: CPU per request and req/s
    latency_requests: int = 2000  # per target and kind at concurrency 1
    warmup_requests: int = 500
    max_secs: float = 15.0  # a measured run stops early after this long (a slow target then sends fewer)
    max_tokens: int = 16
    kinds: tuple[str, ...] = KINDS
    rounds: int = 1
    loadgen_processes: int = 1
    startup_timeout: float = 60.0


CpuSource = Callable[[], float]


def _measured(pool: LoadGenPool, plan: LoadPlan, cpu: dict[str, CpuSource]) -> dict[str, Any]:
    """Run `plan` and summarize it, with the CPU µs per request each source (gateway, upstream) spent meanwhile."""
    before = {name: read() for name, read in cpu.items()}
    result: LoadResult = pool.run(plan)
    after = {name: read() for name, read in cpu.items()}
    summary = result.summary()
    for name in cpu:
        summary[f"{name}_cpu_us_per_req"] = 1e6 * (after[name] - before[name]) / max(1, result.count)
    return summary


def measure_target(
    pool: LoadGenPool,
    base_urls: Sequence[str],
    specs: dict[str, RequestSpec],
    settings: Settings,
    cpu: dict[str, CpuSource],
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Warm-up, throughput run and latency run of every request kind against one target."""
    out: dict[str, dict[str, Any]] = {}
    urls = tuple(base_urls)
    for kind in settings.kinds:
        spec = specs[kind]
        if settings.warmup_requests:
            pool.run(LoadPlan(urls, spec, settings.warmup_requests, concurrency=settings.concurrency))
        throughput = _measured(
            pool, LoadPlan(urls, spec, settings.requests, settings.concurrency, max_secs=settings.max_secs), cpu
        )
        latency = _measured(pool, LoadPlan(urls, spec, settings.latency_requests, 1, max_secs=settings.max_secs), cpu)
        out[kind] = {"throughput": throughput, "latency": latency}
        failed = throughput["failed"] + latency["failed"]
        progress(
            f"  {kind:<12} {throughput['rps']:8.0f} req/s at c={settings.concurrency}"
            f"  p50 {latency['latency_ms']['p50']:.3f} ms  p99 {latency['latency_ms']['p99']:.3f} ms at c=1"
            + (f"  gateway {throughput['gateway_cpu_us_per_req']:.0f} µs CPU/req" if "gateway" in cpu else "")
            + (f"  FAILED {failed}" if failed else "")
        )
    return out


def _figures(run: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one target/kind measurement."""
    throughput, latency = run["throughput"], run["latency"]
    figures = {
        "rps": throughput["rps"],
        "p50_ms": latency["latency_ms"]["p50"],
        "p99_ms": latency["latency_ms"]["p99"],
        "upstream_cpu_us_per_req": throughput["upstream_cpu_us_per_req"],
        "client_cpu_us_per_req": throughput["client_cpu_us_per_req"],
        "failed": throughput["failed"] + latency["failed"],
    }
    if "gateway_cpu_us_per_req" in throughput:
        figures["cpu_us_per_req"] = throughput["gateway_cpu_us_per_req"]
        figures["cpu_us_per_req_c1"] = latency["gateway_cpu_us_per_req"]
    if "ttft_ms" in latency:
        figures["ttft_p50_ms"] = latency["ttft_ms"]["p50"]
    return figures


def summarize(rounds: list[dict[str, dict[str, Any]]], kinds: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Median over rounds of each figure, per kind and target, plus latency added over direct."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in kinds:
        per_target: dict[str, dict[str, float]] = {}
        for target in rounds[0]:
            samples = [_figures(r[target][kind]) for r in rounds]
            per_target[target] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
            per_target[target]["failed"] = sum(s["failed"] for s in samples)
        direct = per_target.get(DIRECT)
        for target, figures in per_target.items():
            if direct is not None and target != DIRECT:
                figures["added_p50_ms"] = figures["p50_ms"] - direct["p50_ms"]
                figures["added_p99_ms"] = figures["p99_ms"] - direct["p99_ms"]
        out[kind] = per_target
    return out


def run_overhead(
    settings: Settings, gateways: Sequence[GatewayTemplate], progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Start the fleet, measure direct and every gateway, stop everything; the JSON document of the run."""
    specs = request_specs(settings.max_tokens, settings.model)
    probe = specs["generate"]
    rounds: list[dict[str, dict[str, Any]]] = []
    fleet = SimFleet(settings.workers, settings.sim_processes, settings.sim_args).start(settings.startup_timeout)
    try:
        with LoadGenPool(settings.loadgen_processes) as pool:
            for index in range(settings.rounds):
                measured: dict[str, dict[str, Any]] = {}
                progress(f"round {index + 1}/{settings.rounds}: {DIRECT} ({len(fleet.urls)} simulated workers)")
                measured[DIRECT] = measure_target(
                    pool, fleet.urls, specs, settings, {"upstream": fleet.cpu_seconds}, progress
                )
                for template in gateways:
                    gateway = GatewayProcess(template, fleet.urls)
                    progress(f"round {index + 1}/{settings.rounds}: {template.name} ({gateway.url})")
                    gateway.start(probe.path, probe.body, settings.startup_timeout)
                    try:
                        cpu = {"gateway": gateway.cpu_seconds, "upstream": fleet.cpu_seconds}
                        measured[template.name] = measure_target(pool, [gateway.url], specs, settings, cpu, progress)
                    finally:
                        gateway.stop()
                rounds.append(measured)
    finally:
        fleet.stop()
    return {
        "benchmark": "overhead",
        "meta": run_metadata(),
        "settings": {**_asdict(settings), "gateways": {g.name: g.template for g in gateways}},
        "summary": summarize(rounds, settings.kinds),
        "rounds": rounds,
    }


def _asdict(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def render(document: dict[str, Any]) -> str:
    """The terminal report: one table of figures, and the ratios of Shepherd to each other gateway."""
    summary = document["summary"]
    settings = document["settings"]
    c = settings["concurrency"]
    headers = [
        "kind / target", "CPU µs/req", "CPU µs/req c=1", f"req/s c={c}", "p50 ms", "p99 ms",
        "+p50 ms", "+p99 ms", "TTFT p50", "failed",
    ]  # fmt: skip
    rows = []
    for kind, targets in summary.items():
        for target, f in targets.items():
            rows.append(
                [
                    f"{kind} / {target}",
                    fmt(f.get("cpu_us_per_req"), 0),
                    fmt(f.get("cpu_us_per_req_c1"), 0),
                    fmt(f["rps"], 0),
                    fmt(f["p50_ms"], 3),
                    fmt(f["p99_ms"], 3),
                    fmt(f.get("added_p50_ms"), 3),
                    fmt(f.get("added_p99_ms"), 3),
                    fmt(f.get("ttft_p50_ms"), 3),
                    str(int(f["failed"])),
                ]
            )
    parts = [
        render_table(
            headers,
            rows,
            title=f"Gateway overhead ({settings['workers']} simulated workers, {settings['max_tokens']} tokens/request;"
            f" CPU = gateway process tree, at c={c} unless noted; latency at c=1; + = over direct)",
        )
    ]
    others = [name for name in settings["gateways"] if name != SHEPHERD]
    if SHEPHERD in settings["gateways"] and others:
        ratio_rows = []
        for kind, targets in summary.items():
            ours = targets[SHEPHERD]
            for other in others:
                theirs = targets[other]
                ratio_rows.append(
                    [
                        f"{kind}: {SHEPHERD}/{other}",
                        fmt_ratio(ours.get("cpu_us_per_req"), theirs.get("cpu_us_per_req")),
                        fmt_ratio(ours["rps"], theirs["rps"]),
                        fmt_ratio(ours.get("added_p50_ms"), theirs.get("added_p50_ms")),
                        fmt_ratio(ours.get("added_p99_ms"), theirs.get("added_p99_ms")),
                    ]
                )
        parts.append(render_table(["ratio", "CPU/req", f"req/s c={c}", "+p50", "+p99"], ratio_rows, title="Ratios"))
    direct = [f"{kind} {fmt(t[DIRECT]['rps'], 0)} req/s" for kind, t in summary.items() if DIRECT in t]
    if direct:
        parts.append(f"Upstream direct throughput at c={c}: " + ", ".join(direct))
    return "\n\n".join(parts)


# -- command line ----------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    d = Settings()
    p = subparsers.add_parser(
        "overhead",
        help="gateway CPU/request, req/s and added latency: direct vs Shepherd vs other gateways",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--gateway", action="append", default=[], metavar="NAME=TEMPLATE",
        help="another gateway to measure (repeatable); placeholders {port} {prom_port} {worker_urls} {host} {python}."
        f" The name 'shepherd' replaces Shepherd's own command, which defaults to: {SHEPHERD_TEMPLATE}",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=d.workers, help="simulated workers (default: %(default)s)")
    p.add_argument("--sim-processes", type=int, default=d.sim_processes, help="processes serving them")
    p.add_argument("--sim-args", default=" ".join(d.sim_args), help="extra `shepherd sim` flags (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="throughput run (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="throughput run requests per target and kind")
    p.add_argument("--latency-requests", type=int, default=d.latency_requests, help="concurrency-1 run requests")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument(
        "--max-secs", type=float, default=d.max_secs, help="cap on each measured run's duration (default: %(default)s)"
    )
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per generated answer")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds))
    p.add_argument("--rounds", type=int, default=d.rounds, help="measure every target this many times (median)")
    p.add_argument("--loadgen-processes", type=int, default=d.loadgen_processes, help="0: in this process")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout, help="seconds per process start")
    p.add_argument("--output", help="write the JSON report here")
    p.set_defaults(run=main)


def gateways_from_args(specs: Sequence[str]) -> list[GatewayTemplate]:
    """Shepherd first (unless overridden by name), then the others in the order given."""
    templates = {SHEPHERD: GatewayTemplate(SHEPHERD, SHEPHERD_TEMPLATE)}
    for spec in specs:
        template = GatewayTemplate.parse(spec)
        if template.name == DIRECT:
            raise ValueError(f"'{DIRECT}' is the name of the gateway-less baseline; choose another")
        templates[template.name] = template
    return list(templates.values())


def main(args: argparse.Namespace) -> int:
    import shlex

    try:
        gateways = gateways_from_args(args.gateway)
    except ValueError as exc:
        print(f"shepherd bench overhead: {exc}", file=sys.stderr)
        return 2
    if min(args.workers, args.sim_processes, args.concurrency, args.requests, args.latency_requests, args.rounds) < 1:
        print("shepherd bench overhead: counts must be >= 1", file=sys.stderr)
        return 2
    settings = Settings(
        workers=args.workers,
        sim_processes=args.sim_processes,
        sim_args=tuple(shlex.split(args.sim_args)),
        concurrency=args.concurrency,
        requests=args.requests,
        latency_requests=args.latency_requests,
        warmup_requests=args.warmup_requests,
        max_secs=args.max_secs,
        max_tokens=args.max_tokens,
        kinds=tuple(args.kinds),
        rounds=args.rounds,
        loadgen_processes=args.loadgen_processes,
        startup_timeout=args.startup_timeout,
    )
    document = run_and_report(
        "overhead", lambda progress: run_overhead(settings, gateways, progress=progress), render, args.output
    )
    if document is None:
        return 1
    failed = sum(f["failed"] for targets in document["summary"].values() for f in targets.values())
    return 1 if failed else 0
