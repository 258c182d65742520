"""`shepherd bench scale`: does a gateway stay fast with thousands of registered workers?

One `shepherd sim` process answers at once (`--latency-model none`) on one port of every loopback address, and the
gateway is given `--workers` distinct URLs `http://127.A.B.C:PORT` for it (all of 127/8 reaches loopback on Linux):
thousands of separate workers to the gateway, one process on this machine. For every gateway (Shepherd, and each
`--gateway NAME=TEMPLATE`, whose template places `{policy}`) and every policy:

- registration at launch: seconds from launching a gateway with all the URLs in `--worker-urls` until its
  `/readiness` counts them all healthy, for `--baseline-workers` and for `--workers`;
- latency at `--concurrency` (closed loop) of non-stream `/generate` and non-stream chat through both gateways, which
  run side by side and are measured in turn `--rounds` times (medians; max: the largest), after a warm-up of at least
  three requests per worker (so that, whatever the policy, nearly every worker has a pooled connection, as in a
  long-running gateway);
- `GET /workers` with `--workers` registered: median and max of `--list-calls` sequential calls;
- registration under load: a gateway started with `--baseline-workers` URLs serves `/generate` at `--concurrency`
  while the other URLs arrive by `POST /workers` (`--post-concurrency` in flight): seconds until all are healthy, and
  the latency of the requests served meanwhile.

The goal (the scale issue): p99 with `--workers` within 1.5x of p99 with `--baseline-workers`, for every policy.
The simulated workers share one process, which pays for thousands of open connections too (a policy that spreads
requests at random over them touches cold memory on both sides). Everything shares this machine's cores: compare the
sizes and gateways of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from shepherd.bench.fleet import GatewayProcess, GatewayTemplate, SimFleet, http_call
from shepherd.bench.loadgen import LoadGenPool, LoadPlan, LoadResult, RequestSpec
from shepherd.bench.report import fmt, fmt_ratio, render_table, run_and_report, run_metadata

SHEPHERD = "shepherd"
POLICIES = ("round_robin", "power_of_two", "cache_aware")
KINDS = ("generate", "chat")
SIZES = ("baseline", "scale")
P99_GOAL_RATIO = 1.5
SHEPHERD_SCALE_TEMPLATE = (
    "{python} -m shepherd.cli launch --host {host} --port {port} --worker-urls {worker_urls} "
    "--policy {policy} --prometheus-port {prom_port} --log-level warning --shutdown-drain-window-secs 0"
)
_READY_POLL_S = 0.2
_WARMUP_PER_WORKER = 3  # random picks reach ~95% of the workers in three requests per worker
_LOAD_CHUNK_S = 1.0  # load under registration runs in chunks this long until every worker is healthy
_PROMPT = (
    "You are a helpful assistant. Summarize the following paragraph in one sentence: the gateway receives a request, "
    "chooses a worker by policy, forwards the body unchanged and relays the answer back to the client."
)


@dataclass(frozen=True, slots=True)
class Settings:
    workers: int = 4000
    baseline_workers: int = 4
    policies: tuple[str, ...] = POLICIES
    kinds: tuple[str, ...] = KINDS
    concurrency: int = 32
    requests: int = 5000  # per measured run (gateway, policy, size, kind, round)
    rounds: int = 3
    warmup_requests: int = 500  # before the runs of each kind, and at least _WARMUP_PER_WORKER per worker
    max_secs: float = 30.0  # a measured run stops early after this long
    max_tokens: int = 16
    list_calls: int = 20
    post_concurrency: int = 32
    register_timeout: float = 300.0
    loadgen_processes: int = 1
    model: str = "sim-model"


# -- the fleet ---------------------------------------------------------------------------------------------------------


def loopback_urls(count: int, port: int) -> list[str]:
    """`count` distinct worker URLs on `port`, one per loopback address from 127.0.0.1 up (no .0 or .255 host byte)."""
    if count > 254 * 65536:
        raise ValueError("more workers than loopback addresses")
    urls = []
    for i in range(count):
        high, low = divmod(i, 254)
        urls.append(f"http://127.{high >> 8}.{high & 255}.{low + 1}:{port}")
    return urls


def request_specs(max_tokens: int, model: str) -> dict[str, RequestSpec]:
    """The request of each kind, encoded once; both non-stream."""
    generate = {"text": _PROMPT, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
    chat = {"model": model, "messages": [{"role": "user", "content": _PROMPT}], "max_tokens": max_tokens}
    return {
        "generate": RequestSpec("/generate", orjson.dumps(generate)),
        "chat": RequestSpec("/v1/chat/completions", orjson.dumps(chat)),
    }


def gateways_from_args(specs: Sequence[str]) -> list[GatewayTemplate]:
    """Shepherd first (unless overridden by name), then the others; every template must place `{policy}`."""
    templates = {SHEPHERD: GatewayTemplate(SHEPHERD, SHEPHERD_SCALE_TEMPLATE)}
    for spec in specs:
        template = GatewayTemplate.parse(spec)
        if "{policy}" not in template.template:
            raise ValueError(f"gateway template {template.name!r} must place {{policy}} (e.g. --policy {{policy}})")
        templates[template.name] = template
    return list(templates.values())


def with_policy(template: GatewayTemplate, policy: str) -> GatewayTemplate:
    """The template with `{policy}` filled in (the other placeholders are GatewayTemplate's)."""
    return GatewayTemplate(template.name, template.template.replace("{policy}", policy))


# -- measurements ------------------------------------------------------------------------------------------------------


def healthy_workers(gateway_url: str) -> int:
    """How many workers the gateway's `/readiness` counts healthy (Shepherd and SMG both say `healthy_workers`)."""
    try:
        status, body = http_call("GET", gateway_url + "/readiness", timeout=30.0)
    except OSError:
        return 0
    return int(orjson.loads(body).get("healthy_workers", 0)) if status == 200 else 0


def wait_registered(gateway: GatewayProcess, count: int, since: float, timeout: float) -> float:
    """Seconds from `since` (monotonic) until `count` workers are healthy."""
    gateway.process.wait_for(
        lambda: healthy_workers(gateway.url) >= count, timeout, f"{count} healthy workers", _READY_POLL_S
    )
    return time.monotonic() - since


def launch(template: GatewayTemplate, urls: Sequence[str], timeout: float) -> tuple[GatewayProcess, float]:
    """A gateway with `urls` in `--worker-urls`, and the seconds from its launch until all were healthy."""
    gateway = GatewayProcess(template, urls)
    started = time.monotonic()
    gateway.process.start()
    try:
        return gateway, wait_registered(gateway, len(urls), started, timeout)
    except BaseException:
        gateway.stop()
        raise


def list_latency(gateway_url: str, calls: int) -> dict[str, float]:
    """Median and max milliseconds of `calls` sequential `GET /workers`, and the size of the answer."""
    samples = []
    size = 0
    for _ in range(calls):
        started = time.perf_counter()
        status, body = http_call("GET", gateway_url + "/workers", timeout=120.0)
        samples.append(1e3 * (time.perf_counter() - started))
        if status != 200:
            raise RuntimeError(f"GET /workers answered {status}")
        size = len(body)
    return {"median_ms": statistics.median(samples), "max_ms": max(samples), "bytes": size}


def figures(result: LoadResult) -> dict[str, Any]:
    """The headline numbers of one run: percentiles of the successful requests, their rate, the failures."""
    summary = result.summary()
    ok = [latency for latency, status in zip(result.latencies, result.statuses, strict=True) if 200 <= status < 300]
    out = {
        "requests": summary["requests"],
        "failed": summary["failed"],
        "rps": summary["rps"],
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "max_ms": 1e3 * max(ok) if ok else float("nan"),
    }
    if "errors" in summary:
        out["errors"] = summary["errors"]
    return out


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one measurement: medians of the percentiles and rate, the largest max, every failure."""
    return {
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "max_ms": max(r["max_ms"] for r in runs),
        "rps": statistics.median(r["rps"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "rounds": list(runs),
    }


def measure_sizes(
    pool: LoadGenPool,
    targets: dict[str, tuple[str, ...]],
    workers: dict[str, int],
    specs: dict[str, RequestSpec],
    settings: Settings,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Per size and kind: warm-ups, then `rounds` runs that alternate between the sizes (so drift in the machine's
    load hits both alike)."""
    out: dict[str, dict[str, Any]] = {size: {} for size in targets}
    for kind in settings.kinds:
        spec = specs[kind]
        for size, urls in targets.items():
            warmup = max(settings.warmup_requests, _WARMUP_PER_WORKER * workers[size])
            pool.run(LoadPlan(urls, spec, warmup, concurrency=settings.concurrency, max_secs=settings.max_secs))
        runs: dict[str, list[dict[str, Any]]] = {size: [] for size in targets}
        for _ in range(settings.rounds):
            for size, urls in targets.items():
                plan = LoadPlan(urls, spec, settings.requests, settings.concurrency, max_secs=settings.max_secs)
                runs[size].append(figures(pool.run(plan)))
        for size in targets:
            out[size][kind] = combined = combine(runs[size])
            progress(
                f"    {kind:<9} {workers[size]:>5} workers  p50 {combined['p50_ms']:7.2f} ms"
                f"  p99 {combined['p99_ms']:7.2f} ms  max {combined['max_ms']:7.1f} ms  {combined['rps']:6.0f} req/s"
                + (f"  FAILED {combined['failed']}" if combined["failed"] else "")
            )
    return out


async def _post_workers(gateway_url: str, urls: Sequence[str], concurrency: int) -> dict[str, int]:
    """`POST /workers` every URL, `concurrency` at a time; counts of answers by status."""
    statuses: dict[str, int] = {}
    queue = iter(urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def poster() -> None:
            for url in queue:
                try:
                    async with session.post(gateway_url + "/workers", json={"url": url}) as response:
                        await response.read()
                        key = str(response.status)
                except (aiohttp.ClientError, TimeoutError):
                    key = "error"
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(poster() for _ in range(concurrency)))
    return statuses


def measure_registration_under_load(
    pool: LoadGenPool,
    template: GatewayTemplate,
    urls: Sequence[str],
    spec: RequestSpec,
    settings: Settings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """A gateway with the baseline URLs serves `spec` at the run's concurrency while the others are POSTed; the
    registration's duration and the latency meanwhile."""
    first = urls[: settings.baseline_workers]
    gateway, _ = launch(template, first, settings.register_timeout)
    try:
        pool.run(LoadPlan((gateway.url,), spec, settings.warmup_requests, concurrency=settings.concurrency))
        out: dict[str, Any] = {"workers": len(urls), "posted": len(urls) - len(first)}
        failure: list[BaseException] = []

        def register() -> None:
            try:
                started = time.monotonic()
                out["statuses"] = asyncio.run(_post_workers(gateway.url, urls[len(first) :], settings.post_concurrency))
                out["post_s"] = time.monotonic() - started
                accepted = sum(n for status, n in out["statuses"].items() if status.startswith("2"))
                out["ready_s"] = wait_registered(gateway, len(first) + accepted, started, settings.register_timeout)
            except BaseException as exc:  # re-raised by the measuring thread
                failure.append(exc)

        thread = threading.Thread(target=register, name="register", daemon=True)
        thread.start()
        results = []
        while thread.is_alive():
            plan = LoadPlan((gateway.url,), spec, 10**9, settings.concurrency, max_secs=_LOAD_CHUNK_S)
            results.append(pool.run(plan))
        thread.join()
        if failure:
            raise failure[0]
        merged = LoadResult.merge(results)
        merged.elapsed = sum(r.elapsed for r in results)
        out["load"] = figures(merged)
        load = out["load"]
        progress(
            f"    POST /workers: all {len(urls)} healthy after {out['ready_s']:.2f} s (POSTs {out['post_s']:.2f} s);"
            f" meanwhile p50 {load['p50_ms']:.2f} ms  p99 {load['p99_ms']:.2f} ms  max {load['max_ms']:.1f} ms"
        )
        return out
    finally:
        gateway.stop()


def measure_policy(
    pool: LoadGenPool,
    template: GatewayTemplate,
    urls: Sequence[str],
    specs: dict[str, RequestSpec],
    settings: Settings,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Both sizes of one gateway and policy side by side, then registration under load."""
    out: dict[str, Any] = {}
    counts = {"baseline": settings.baseline_workers, "scale": settings.workers}
    gateways: dict[str, GatewayProcess] = {}
    try:
        for size in SIZES:
            gateway, seconds = launch(template, urls[: counts[size]], settings.register_timeout)
            gateways[size] = gateway
            out[size] = {"workers": counts[size], "register_s": seconds}
            progress(f"    {counts[size]} workers registered {seconds:.2f} s after launch")
        targets = {size: (gateway.url,) for size, gateway in gateways.items()}
        for size, kinds in measure_sizes(pool, targets, counts, specs, settings, progress).items():
            out[size]["kinds"] = kinds
        out["scale"]["list_workers"] = listed = list_latency(gateways["scale"].url, settings.list_calls)
        progress(f"    GET /workers: median {listed['median_ms']:.1f} ms, max {listed['max_ms']:.1f} ms")
    finally:
        for gateway in gateways.values():
            gateway.stop()
    out["post"] = measure_registration_under_load(pool, template, urls, specs[settings.kinds[0]], settings, progress)
    return out


def summarize(results: dict[str, dict[str, dict[str, Any]]], kinds: Sequence[str]) -> dict[str, Any]:
    """Per gateway, policy and kind: the p99 ratio large/baseline (the goal: <= 1.5x) and what the size added."""
    out: dict[str, Any] = {}
    for gateway, policies in results.items():
        for policy, sizes in policies.items():
            for kind in kinds:
                base, large = sizes["baseline"]["kinds"][kind], sizes["scale"]["kinds"][kind]
                out.setdefault(gateway, {}).setdefault(policy, {})[kind] = {
                    "p99_ratio": large["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan"),
                    "added_p99_ms": large["p99_ms"] - base["p99_ms"],
                    "added_p50_ms": large["p50_ms"] - base["p50_ms"],
                }
    return out


def run_scale(
    settings: Settings, gateways: Sequence[GatewayTemplate], progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Start the simulated worker, measure every gateway and policy, stop everything."""
    specs = request_specs(settings.max_tokens, settings.model)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    fleet = SimFleet(1, 1, ("--latency-model", "none", "--host", "0.0.0.0")).start()
    try:
        port = urlsplit(fleet.urls[0]).port
        assert port is not None
        urls = loopback_urls(settings.workers, port)
        with LoadGenPool(settings.loadgen_processes) as pool:
            for template in gateways:
                for policy in settings.policies:
                    progress(f"{template.name} {policy}")
                    chosen = with_policy(template, policy)
                    results.setdefault(template.name, {})[policy] = measure_policy(
                        pool, chosen, urls, specs, settings, progress
                    )
    finally:
        fleet.stop()
    return {
        "benchmark": "scale",
        "meta": run_metadata(),
        "settings": {**_asdict(settings), "gateways": {g.name: g.template for g in gateways}},
        "results": results,
        "summary": summarize(results, settings.kinds),
    }


def _asdict(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def render(document: dict[str, Any]) -> str:
    """Latency at both sizes per gateway, policy and kind; then registration and `GET /workers`."""
    settings, results, summary = document["settings"], document["results"], document["summary"]
    small, large, c = settings["baseline_workers"], settings["workers"], settings["concurrency"]
    headers = [
        "gateway / policy / kind", f"p50 ms @{small}", f"p99 ms @{small}", f"p50 ms @{large}", f"p99 ms @{large}",
        f"max ms @{large}", "p99 ratio", "+p99 ms", f"req/s @{small}", f"req/s @{large}", "goal", "failed",
    ]  # fmt: skip

    def row(name: str, base: dict[str, Any], scale: dict[str, Any], goal: str) -> list[str]:
        return [
            name,
            fmt(base["p50_ms"], 2),
            fmt(base["p99_ms"], 2),
            fmt(scale["p50_ms"], 2),
            fmt(scale["p99_ms"], 2),
            fmt(scale["max_ms"], 1),
            fmt_ratio(scale["p99_ms"], base["p99_ms"]),
            fmt(scale["p99_ms"] - base["p99_ms"], 2),
            fmt(base["rps"], 0),
            fmt(scale["rps"], 0),
            goal,
            str(base["failed"] + scale["failed"]),
        ]

    rows = []
    for gateway, policies in results.items():
        for policy, sizes in policies.items():
            for kind in settings["kinds"]:
                met = summary[gateway][policy][kind]["p99_ratio"] <= P99_GOAL_RATIO
                base, scale = sizes["baseline"]["kinds"][kind], sizes["scale"]["kinds"][kind]
                rows.append(row(f"{gateway} / {policy} / {kind}", base, scale, "ok" if met else "MISSED"))
    title = (
        f"Latency at c={c}, {small} vs {large} registered workers, median of {settings['rounds']} rounds"
        f" (goal: p99 ratio <= {P99_GOAL_RATIO}x)"
    )
    parts = [render_table(headers, rows, title=title)]
    ops_rows = []
    for gateway, policies in results.items():
        for policy, sizes in policies.items():
            listed, post = sizes["scale"]["list_workers"], sizes["post"]
            ops_rows.append(
                [
                    f"{gateway} / {policy}",
                    fmt(sizes["baseline"]["register_s"], 2),
                    fmt(sizes["scale"]["register_s"], 2),
                    fmt(post["post_s"], 2),
                    fmt(post["ready_s"], 2),
                    fmt(post["load"]["p50_ms"], 2),
                    fmt(post["load"]["p99_ms"], 2),
                    fmt(post["load"]["max_ms"], 1),
                    str(post["load"]["failed"] + sum(n for s, n in post["statuses"].items() if not s.startswith("2"))),
                    fmt(listed["median_ms"], 1),
                    fmt(listed["max_ms"], 1),
                    fmt(listed["bytes"] / 1024, 0),
                ]
            )
    ops_headers = [
        "gateway / policy", f"launch s @{small}", f"launch s @{large}", "POSTs s", "POST ready s",
        "p50 ms", "p99 ms", "max ms", "failed", "GET /workers ms", "max ms", "KiB",
    ]  # fmt: skip
    parts.append(
        render_table(
            ops_headers,
            ops_rows,
            title=f"Registering {large} workers: launched with them all (until all healthy), or POSTed to a gateway"
            f" serving {settings['kinds'][0]} at c={c} ({settings['post_concurrency']} POSTs in flight; latency of"
            f" the requests served meanwhile); GET /workers with {large} registered",
        )
    )
    return "\n\n".join(parts)


# -- command line ------------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    d = Settings()
    p = subparsers.add_parser(
        "scale",
        help="latency, registration and GET /workers with thousands of registered workers vs a handful",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--gateway", action="append", default=[], metavar="NAME=TEMPLATE",
        help="another gateway to measure (repeatable); placeholders {policy} (required) {port} {prom_port}"
        " {worker_urls} {host} {python}. The name 'shepherd' replaces Shepherd's own: " + SHEPHERD_SCALE_TEMPLATE,
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=d.workers, help="registered workers (default: %(default)s)")
    p.add_argument("--baseline-workers", type=int, default=d.baseline_workers, help="the comparison (default: 4)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(d.policies))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds))
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="closed loop (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="per measured run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="measured runs per size, alternating (default: 3)")
    p.add_argument(
        "--warmup-requests", type=int, default=d.warmup_requests, help="before each kind's runs; at least 3 a worker"
    )
    p.add_argument("--max-secs", type=float, default=d.max_secs, help="cap on each run's duration")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per generated answer")
    p.add_argument("--list-calls", type=int, default=d.list_calls, help="timed GET /workers calls (default: 20)")
    p.add_argument("--post-concurrency", type=int, default=d.post_concurrency, help="POST /workers in flight")
    p.add_argument("--register-timeout", type=float, default=d.register_timeout, help="seconds to wait for a fleet")
    p.add_argument("--loadgen-processes", type=int, default=d.loadgen_processes, help="0: in this process")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the JSON report here")
    p.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    try:
        gateways = gateways_from_args(args.gateway)
    except ValueError as exc:
        print(f"shepherd bench scale: {exc}", file=sys.stderr)
        return 2
    counts = (
        args.baseline_workers,
        args.concurrency,
        args.requests,
        args.rounds,
        args.list_calls,
        args.post_concurrency,
    )
    if min(counts) < 1 or args.workers <= args.baseline_workers:
        print("shepherd bench scale: counts must be >= 1 and --workers > --baseline-workers", file=sys.stderr)
        return 2
    settings = Settings(
        workers=args.workers,
        baseline_workers=args.baseline_workers,
        policies=tuple(dict.fromkeys(args.policies)),
        kinds=tuple(dict.fromkeys(args.kinds)),
        concurrency=args.concurrency,
        requests=args.requests,
        rounds=args.rounds,
        warmup_requests=args.warmup_requests,
        max_secs=args.max_secs,
        max_tokens=args.max_tokens,
        list_calls=args.list_calls,
        post_concurrency=args.post_concurrency,
        register_timeout=args.register_timeout,
        loadgen_processes=args.loadgen_processes,
    )
    document = run_and_report(
        "scale", lambda progress: run_scale(settings, gateways, progress=progress), render, args.json_path
    )
    if document is None:
        return 1
    failed = sum(
        sizes[size]["kinds"][kind]["failed"]
        for policies in document["results"].values()
        for sizes in policies.values()
        for size in SIZES
        for kind in settings.kinds
    )
    return 1 if failed else 0
