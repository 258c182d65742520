"""`shepherd bench routing`: how well gateways place requests on workers with prefix caches.

One fleet of simulated workers with the batching latency model and a bounded prefix (KV) cache each, then, one
gateway after the other, each workload through each gateway: Shepherd with every `--policies` policy, SMG's
`cache_aware` when its binary is found (`--smg`), sglang-router's `cache_aware` likewise (`--sglang-router`), and
every `--gateway NAME=TEMPLATE`. Before each run the workers' caches are flushed and their request logs cleared;
each gateway is started fresh for each workload, so no run inherits another's state.

Workloads (`shepherd.bench.workloads`, `shepherd.bench.trace`):
- shared-prefix: groups of prompts sharing a system prompt, shuffled (SGLang's generated-shared-prefix shape);
- multi-turn: conversations where each turn carries the history, with the real answers fed back; by default every
  conversation opens with the same system prompt, as in a chat product (`--conversation-system-tokens 0` for
  private conversations only), served round by round;
- zipf-prefix: a few hundred shared prefixes (system prompts, documents) with Zipf popularity, each request one
  prefix and a question of its own;
- multi-turn-think: the multi-turn conversations timed like users, starting at Poisson arrivals with exponential
  think times between turns, so they interleave in a random order;
- trace (with `--trace FILE`): a window of a Mooncake-format trace replayed with its own arrival times, each
  512-token block id as `--trace-block-tokens` tokens of deterministic text, on a fleet of `--trace-kv-tokens` per
  worker.
The first three run at `--rate` requests/s open loop, or closed loop with `--concurrency` clients; the timed ones
(multi-turn-think, trace) follow their own schedule.

Default sizes: 8 workers of 8,192 KV tokens (65,536 in all) at 100 req/s; shared prefix 80 groups x 16 prompts of
1,024 + 64 tokens; multi-turn 96 clients x 6 rounds, a 1,024-token shared system prompt, a 512-token first turn and
64-token later turns; zipf-prefix 1,280 prompts over 256 groups of the same sizes as shared prefix, exponent 1.0;
multi-turn-think 192 such conversations starting at 48/s, 2 s mean think time. Each workload's prefix set (the pages
a later prompt reuses) is 1.25 to 2.5 times the fleet's capacity, so not every prefix can stay cached and where
requests go decides which do. Trace: minutes 10 to 15 of the trace, 1 block = 64 tokens, ten times faster, answers
capped at 32 tokens, on workers of 32,768 KV tokens (4x `--kv-tokens`).

`--replicas 1 2 4`: every Shepherd gateway (named shepherd-*) also runs as 2 and 4 replicas of the same command
line on the same fleet; the load generator sends the i-th request it issues to replica i mod N (the simplest honest
splitter: a proxy process would add its own hop). The other gateways run once.

Per gateway and workload:
- hit rate: cached / prompt tokens summed over the workers' `/__log` counters (prefill workers in PD mode);
- TTFT and end-to-end latency p50/p99 (streamed chat requests) and throughput;
- share: the busiest worker's request count over the mean (1.0 is perfectly even);
- and per workload the bounds a router cannot beat (`shepherd.bench.cache_bounds`): the infinite-cache oracle and
  the optimal (Belady) cache of the fleet's total capacity, next to the workload's prefix set and distinct tokens.

`--grpc`: the workers are SGLang gRPC engines (`shepherd sim --grpc --kv-events`: URLs grpc://, prefix-cache
events published on `SubscribeKvEvents`), the gateways are given those URLs and fetch the tokenizer from the
workers (`GetTokenizer`), so they render the chat template, tokenize and detokenize themselves. The benchmark reads
the workers' counters on their HTTP sidecars. sglang-router (0.3.2) does not drive gRPC workers and is not measured.

`--pd`: 2 prefill + 2 decode workers (`--prefill-workers`, `--decode-workers`) of 32,768 KV tokens each (the
default regular fleet's total on the prefill side) at 48 req/s, gateways in PD mode (`{worker_urls}` then stands for
`--prefill URL BOOTSTRAP_PORT ... --decode URL ...`); hit rate from the prefill workers, share reported per role.

A table on the terminal, `--output` JSON, `--chart` PNG (matplotlib, from the `bench` extra).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import orjson

from shepherd.bench import trace as tr
from shepherd.bench import workloads as wl
from shepherd.bench.cache_bounds import (
    capacity_hit_rate,
    distinct_prompt_tokens,
    infinite_cache_hit_rate,
    pooled_lru_hit_rate,
    reused_prefix_tokens,
)
from shepherd.bench.conversation_load import WorkloadRun, run_workload
from shepherd.bench.fleet import FleetError, GatewayProcess, GatewayTemplate, SimFleet, wait_until
from shepherd.bench.report import fmt, render_table, run_and_report, run_metadata

CHAT_PATH = "/v1/chat/completions"
GENERATE_RPC = "/sglang.grpc.scheduler.SglangScheduler/Generate"  # what a gRPC worker's /__log counts instead
REQUEST_PATHS = (CHAT_PATH, GENERATE_RPC)  # a worker's served requests, over HTTP or gRPC
# `--grpc` workers: SGLang's gRPC service (URLs grpc://, the HTTP app on the sidecar port), publishing their prefix
# cache's KV events on `SubscribeKvEvents` as SGLang does with --kv-events-config, for the gateways that subscribe.
GRPC_SIM_ARGS = ("--grpc", "--kv-events")
# `--kv-events` on HTTP workers: SGLang's ZeroMQ publisher, each worker on ports of its own.
ZMQ_SIM_ARGS = ("--kv-events-config", '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}')
SIM_SEED = 0  # the simulators' seed: their answers, and so the multi-turn histories, follow from it
REFERENCE_SMG = "/work/refvenv/bin/smg"
SHEPHERD_PREFIX = "shepherd-"  # gateways named so are Shepherd's: the ones --replicas multiplies
SHEPHERD = "shepherd-cache_aware"
SMG = "smg-cache_aware"
SGLANG_ROUTER = "sglang-router-cache_aware"
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
DEFAULT_POLICIES = ("cache_aware", "round_robin", "power_of_two")
# PD defaults: the same total prefix-cache capacity as the default regular fleet, spread over the prefill workers,
# and a rate that two prefill workers sustain (at 60 req/s they serve about 51 of the default multi-turn workload).
PD_KV_TOKENS = 32768
PD_RATE = 48.0
TRACE_KV_FACTOR = 4  # trace workers' KV over --kv-tokens: its prompts are about twice the generated ones
# Shepherd cache_aware against each peer: (hit rate ratio at least, TTFT p99 ratio at most), and the peer's short name.
PEER_GOALS = {SMG: (1.1, 0.8), SGLANG_ROUTER: (1.0, 1.0)}
_PEER_LABELS = {SMG: "SMG", SGLANG_ROUTER: "sglang-router"}
GRPC_UNSUPPORTED = "sglang-router 0.3.2 does not drive gRPC workers"
GOAL_SHARE = 1.3  # busiest worker's share over the mean, at most
GOAL_REPLICA_HIT = 0.95  # hit rate of N replicas over one replica's, at least

_SHEPHERD = (
    "{python} -m shepherd.cli launch --host {host} --port {port} --prometheus-port {prom_port} --log-level warning "
    "--shutdown-drain-window-secs 0 "  # a benchmark's gateway has no load balancer to drain from
    "--load-monitor-interval 1"  # runs last 15 to 30 s: poll the engines' load every second, not every 10
)
_SMG = "{smg} launch --host {host} --port {port} --prometheus-port {prom_port} --log-level warn"
_SGLANG_ROUTER = _SMG.replace("{smg}", "{sglang_router}")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Settings:
    workloads: tuple[str, ...] = wl.WORKLOADS
    pd: bool = False
    workers: int = 8
    prefill_workers: int = 2
    decode_workers: int = 2
    sim_processes: int = 2
    kv_tokens: int = 8192
    page_size: int = 16
    max_running_requests: int = 64
    prefill_tokens_per_ms: float = 20.0
    decode_step_ms: float = 8.0
    decode_step_ms_per_request: float = 0.15
    sim_args: tuple[str, ...] = ()
    model: str = "sim-model"
    rate: float | None = 100.0
    concurrency: int | None = None
    groups: int = 80
    prompts_per_group: int = 16
    system_tokens: int = 1024
    question_tokens: int = 64
    clients: int = 96
    rounds: int = 6
    first_tokens: int = 512
    turn_tokens: int = 64
    conversation_system_tokens: int = 1024
    answer_tokens: int = 16
    zipf_groups: int = 256
    zipf_requests: int = 1280
    zipf_exponent: float = 1.0
    think_clients: int = 192
    think_time_s: float = 2.0
    conversation_rate: float = 48.0
    trace: str | None = None
    trace_start_s: float = 600.0
    trace_duration_s: float | None = 300.0
    trace_requests: int | None = None
    trace_time_scale: float = 0.1
    trace_block_tokens: int = 64
    trace_max_output_tokens: int = 32
    trace_kv_tokens: int = TRACE_KV_FACTOR * 8192
    seed: int = 0
    replicas: tuple[int, ...] = (1,)
    virtual: bool = False  # in virtual time, in-process (`virtual_time`): Shepherd's gateways only
    grpc: bool = False  # SGLang gRPC workers (`GRPC_SIM_ARGS`): the gateways tokenize; no sglang-router
    kv_events: bool = False  # HTTP workers publishing KV events over ZeroMQ (`ZMQ_SIM_ARGS`), caching BPE ids
    timeout_secs: float = 60.0
    startup_timeout: float = 60.0

    def sim_argv(self) -> list[str]:
        """`shepherd sim` flags shared by every simulated worker (PD roles add theirs)."""
        return [
            "--latency-model", "batch", "--model", self.model, "--seed", str(SIM_SEED),
            "--kv-tokens", str(self.kv_tokens), "--page-size", str(self.page_size),
            "--max-running-requests", str(self.max_running_requests),
            "--prefill-tokens-per-ms", str(self.prefill_tokens_per_ms), "--decode-step-ms", str(self.decode_step_ms),
            "--decode-step-ms-per-request", str(self.decode_step_ms_per_request),
            *(GRPC_SIM_ARGS if self.grpc else ZMQ_SIM_ARGS if self.kv_events else ()), *self.sim_args,
        ]  # fmt: skip

    @property
    def events(self) -> bool:
        """Whether the engines publish KV events (and cache the token ids of the BPE they publish)."""
        return self.grpc or self.kv_events

    @property
    def cache_workers(self) -> int:
        """Workers whose prefix cache saves prefill work: all of them, or the prefill workers in PD mode."""
        return self.prefill_workers if self.pd else self.workers

    @property
    def load(self) -> str:
        return f"{self.rate:g} req/s open loop" if self.rate is not None else f"{self.concurrency} clients closed loop"

    def for_workload(self, name: str) -> Settings:
        """The settings of `name`'s run: the trace has workers of its own KV size."""
        return replace(self, kv_tokens=self.trace_kv_tokens) if name == wl.TRACE else self


def build_workload(name: str, settings: Settings) -> wl.Workload:
    """Workload `name` at `settings`' sizes; ValueError for invalid sizes (or a missing trace)."""
    s = settings
    if name == wl.SHARED_PREFIX:
        return _cached_shared_prefix(
            s.groups, s.prompts_per_group, s.system_tokens, s.question_tokens, s.answer_tokens, s.seed
        )
    if name == wl.MULTI_TURN:
        return _cached_multi_turn(
            s.clients, s.rounds, s.first_tokens, s.turn_tokens, s.answer_tokens, s.conversation_system_tokens, s.seed
        )
    if name == wl.ZIPF_PREFIX:
        return _cached_zipf_prefix(
            s.zipf_groups, s.zipf_requests, s.zipf_exponent, s.system_tokens, s.question_tokens, s.answer_tokens,
            s.seed,
        )  # fmt: skip
    if name == wl.MULTI_TURN_THINK:
        return _cached_multi_turn_think(
            s.think_clients, s.rounds, s.first_tokens, s.turn_tokens, s.answer_tokens, s.conversation_system_tokens,
            s.think_time_s, s.conversation_rate, s.seed,
        )  # fmt: skip
    if name == wl.TRACE:
        if s.trace is None:
            raise ValueError("the trace workload needs --trace FILE")
        return _cached_build_trace(
            s.trace, s.trace_start_s, s.trace_duration_s, s.trace_requests, s.trace_block_tokens, s.trace_time_scale,
            s.trace_max_output_tokens, s.seed,
        )  # fmt: skip
    raise ValueError(f"unknown workload {name!r}")


def build_trace(
    path: str,
    start_s: float,
    duration_s: float | None,
    count: int | None,
    block_tokens: int,
    time_scale: float,
    max_output_tokens: int,
    seed: int,
) -> wl.Workload:
    """The window of the trace at `path` as a workload; ValueError when it cannot be read or the window is empty."""
    if start_s < 0 or (duration_s is not None and not duration_s > 0) or (count is not None and count < 1):
        raise ValueError("--trace-start must be >= 0, --trace-duration > 0 and --trace-requests >= 1")
    try:
        requests = tr.read_trace(path)
    except OSError as exc:
        raise ValueError(f"cannot read the trace: {exc}") from None
    picked = tr.window(requests, start_s, duration_s, count)
    if not picked:
        span = (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000
        raise ValueError(
            f"no request of {path} ({span:,.0f}s long) in the window from {start_s:g}s"
            " (--trace-start, --trace-duration, --trace-requests)"
        )
    return tr.trace_workload(picked, block_tokens, time_scale, max_output_tokens, seed, Path(path).name)


# Checking the settings builds every workload, and the run uses them: each builder remembers its last ones.
_cached_shared_prefix = functools.lru_cache(maxsize=2)(wl.shared_prefix)
_cached_multi_turn = functools.lru_cache(maxsize=2)(wl.multi_turn)
_cached_zipf_prefix = functools.lru_cache(maxsize=2)(wl.zipf_prefix)
_cached_multi_turn_think = functools.lru_cache(maxsize=2)(wl.multi_turn_think)
_cached_build_trace = functools.lru_cache(maxsize=2)(build_trace)


def replay(workload: wl.Workload, settings: Settings) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of every turn in nominal order, as the workers see them: `Workload.replay` for HTTP
    workers (and in virtual time, whose engines take the simulator's ids either way); for real workers publishing
    KV events, gRPC or HTTP, their BPE's ids as a gateway tokenizes for them (`grpc_replay`)."""
    bpe = settings.events and not settings.virtual
    return list(grpc_replay(workload, SIM_SEED) if bpe else workload.replay(SIM_SEED))


@functools.cache
def bpe_tokenizers() -> tuple[Any, Any]:
    """`load_bpe_tokenizers`, once per process."""
    return load_bpe_tokenizers()


def load_bpe_tokenizers() -> tuple[Any, Any]:
    """The simulator's BPE, and Shepherd's tokenizer loaded from the directory the workers hand out (a new one at
    every call, with an empty cache of encoded pieces)."""
    from shepherd.sim.bpe import build
    from shepherd.tokenizer.loader import load_tokenizer

    sim = build()  # deterministic: the workers train the same one
    with tempfile.TemporaryDirectory(prefix="bench-routing-tokenizer-") as directory:
        sim.write_dir(Path(directory))
        return sim, load_tokenizer(directory)


def grpc_replay(workload: wl.Workload, seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """`Workload.replay` for gRPC workers: each prompt is what a gateway sends in `Generate` (the workers' chat
    template, encoded with their BPE, as `chat_prompt` does), each answer the gRPC simulator's ids for it, and the
    answer text fed back is what the gateway decodes them to. The BPE splits most of the workloads' 1-4 letter words
    into several ids, so the workers see more tokens than over HTTP."""
    from shepherd.generation.prompt import chat_prompt
    from shepherd.sim.tokenizer import OUTPUT_VOCAB, word_draws

    sim, tokenizer = bpe_tokenizers()
    answers: list[list[str]] = [[] for _ in workload.conversations]
    for index, turn in workload.nominal_order():
        prompt = chat_prompt({"messages": wl.messages(workload.conversations[index], turn, answers[index])}, tokenizer)
        draws = word_draws(prompt, workload.answer_tokens(index), seed)
        answers[index].append("".join(OUTPUT_VOCAB[b] for b in draws))  # one BPE id per output word
        yield prompt, [sim.word_ids[b] for b in draws]


def bounds(workload: wl.Workload, settings: Settings) -> dict[str, Any]:
    """The hit rates no router can beat on `workload` with this fleet, and its prefix set (see `cache_bounds`)."""
    turns = replay(workload, settings)
    if settings.pd:  # a prefill worker generates only the first token: that is all it leaves behind of an answer
        turns = [(prompt, answer[:1]) for prompt, answer in turns]
    capacity = settings.cache_workers * settings.kv_tokens
    return {
        "infinite_cache": infinite_cache_hit_rate(turns, settings.page_size),
        "fleet_capacity": capacity_hit_rate(turns, settings.page_size, capacity),
        "fleet_capacity_tokens": capacity,
        "pooled_lru": pooled_lru_hit_rate(turns, settings.page_size, capacity),
        "prefix_set_tokens": reused_prefix_tokens(turns, settings.page_size),
        "distinct_tokens": distinct_prompt_tokens(turns, settings.page_size),
        "prompt_tokens": sum(len(prompt) for prompt, _ in turns),
    }


# -- gateways ----------------------------------------------------------------------------------------------------


def default_gateways(
    policies: Sequence[str], smg: str | None, pd: bool, sglang_router: str | None = None
) -> list[GatewayTemplate]:
    """Shepherd with each policy, then the cache_aware of SMG and of sglang-router when their executables are given."""
    workers = "--pd-disaggregation {worker_urls}" if pd else "--worker-urls {worker_urls}"
    out = [
        GatewayTemplate(f"{SHEPHERD_PREFIX}{policy}", f"{_SHEPHERD} {workers} --policy {policy}") for policy in policies
    ]
    if smg:
        out.append(GatewayTemplate(SMG, _SMG.replace("{smg}", shlex.quote(smg)) + f" {workers} --policy cache_aware"))
    if sglang_router:
        line = _SGLANG_ROUTER.replace("{sglang_router}", shlex.quote(sglang_router))
        out.append(GatewayTemplate(SGLANG_ROUTER, f"{line} {workers} --policy cache_aware"))
    return out


def find_smg(requested: str | None) -> str | None:
    """The SMG executable: `requested`, else the reference install, else `smg` on PATH; None if absent."""
    if requested:
        return requested
    if Path(REFERENCE_SMG).exists():
        return REFERENCE_SMG
    return shutil.which("smg")


def find_sglang_router(requested: str | None) -> str | None:
    """The sglang-router executable: `requested`, else `sglang-router` on PATH; None if absent."""
    return requested or shutil.which("sglang-router")


def gateways_from_args(
    policies: Sequence[str], smg: str | None, specs: Sequence[str], pd: bool, sglang_router: str | None = None
) -> list[GatewayTemplate]:
    """The defaults in order, then each `NAME=TEMPLATE` (replacing a default of the same name)."""
    templates = {t.name: t for t in default_gateways(policies, smg, pd, sglang_router)}
    for spec in specs:
        template = GatewayTemplate.parse(spec)
        if "/" in template.name:
            raise ValueError(f"gateway names cannot contain '/': {template.name!r}")
        templates[template.name] = template
    if not templates:
        raise ValueError("no gateway to measure: give --policies, --smg, --sglang-router or --gateway")
    return list(templates.values())


@dataclass(frozen=True, slots=True)
class GatewayRun:
    """One row of a workload's table: a gateway as `replicas` processes behind the load generator's splitter."""

    gateway: GatewayTemplate
    replicas: int = 1

    @property
    def name(self) -> str:
        return self.gateway.name if self.replicas == 1 else f"{self.gateway.name}-x{self.replicas}"


def gateway_runs(gateways: Sequence[GatewayTemplate], replicas: Sequence[int]) -> list[GatewayRun]:
    """Each gateway once, and each Shepherd gateway also at every replica count beyond one."""
    counts = sorted({1, *replicas})
    return [
        GatewayRun(gateway, n)
        for gateway in gateways
        for n in (counts if gateway.name.startswith(SHEPHERD_PREFIX) else [1])
    ]


# -- the simulated fleet -----------------------------------------------------------------------------------------


class Fleet:
    """The simulated workers of one run: one group of regular workers, or prefill and decode groups (PD)."""

    def __init__(self, settings: Settings) -> None:
        base = settings.sim_argv()
        if settings.pd:
            prefill = [*base, "--role", "prefill", "--bootstrap-port", "0"]
            decode = [*base, "--role", "decode"]
            self.groups = {
                "prefill": SimFleet(settings.prefill_workers, settings.sim_processes, prefill),
                "decode": SimFleet(settings.decode_workers, settings.sim_processes, decode),
            }
        else:
            self.groups = {"regular": SimFleet(settings.workers, settings.sim_processes, base)}
        self.cache_role = "prefill" if settings.pd else "regular"

    def start(self, timeout: float) -> Fleet:
        try:
            for group in self.groups.values():
                group.start(timeout)
        except FleetError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for group in self.groups.values():
            group.stop()

    def urls(self) -> Iterator[str]:
        """The workers' URLs, as the gateways are given them (grpc:// for gRPC workers)."""
        for group in self.groups.values():
            yield from group.urls

    def control_urls(self) -> Iterator[str]:
        """Each worker's HTTP app (`/get_load`, `/flush_cache`, `/__log`): the worker URL itself, or for a gRPC
        worker its sidecar."""
        for group in self.groups.values():
            yield from group.http_urls

    def gateway_args(self) -> list[str]:
        """What `{worker_urls}` stands for in a gateway template."""
        if "regular" in self.groups:
            return list(self.groups["regular"].urls)
        prefill, decode = self.groups["prefill"], self.groups["decode"]
        args: list[str] = []
        for url, port in zip(prefill.urls, prefill.bootstrap_ports, strict=True):
            args += ["--prefill", url, "none" if port is None else str(port)]
        for url in decode.urls:
            args += ["--decode", url]
        return args

    def wait_idle(self, timeout: float) -> None:
        """Until no worker runs or queues a request (a stream can end at the client before its worker is done)."""
        wait_until(
            lambda: all(_idle(url) for url in self.control_urls()), timeout, "the simulated workers to go idle", 0.05
        )

    def reset(self, timeout: float) -> None:
        """Once idle, flush every prefix cache and clear every log."""
        self.wait_idle(timeout)
        for url in self.control_urls():
            _call("POST", url + "/flush_cache")
        self.clear_logs()

    def clear_logs(self) -> None:
        for url in self.control_urls():
            _call("DELETE", url + "/__log")

    def logs(self) -> dict[str, list[dict[str, Any]]]:
        """Each worker's `/__log` counters, per role."""
        return {role: [_log_counters(url) for url in group.http_urls] for role, group in self.groups.items()}


def _call(method: str, url: str) -> bytes:
    request = urllib.request.Request(url, method=method)
    try:
        with _NO_PROXY.open(request, timeout=30) as response:
            return response.read()
    except OSError as exc:  # URLError and HTTPError included
        raise FleetError(f"{method} {url} failed: {exc}") from exc


def _log_counters(url: str) -> dict[str, Any]:
    log = orjson.loads(_call("GET", url + "/__log"))
    return {key: log[key] for key in ("counts", "prompt_tokens", "cached_tokens", "num_requests")}


def _idle(url: str) -> bool:
    """No request running or queued on any DP rank (`/get_load`: cheaper to poll than `/__log` and its bodies)."""
    return all(rank["num_reqs"] == 0 for rank in orjson.loads(_call("GET", url + "/get_load")))


# -- measuring ---------------------------------------------------------------------------------------------------


def share(counts: Sequence[int]) -> float | None:
    """The busiest worker's request count over the mean; None when nothing was served."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else None


def figures(run: WorkloadRun, logs: dict[str, list[dict[str, Any]]], cache_role: str) -> dict[str, Any]:
    """The figures of one (workload, gateway) run."""
    summary = run.load.summary()
    cache_logs = logs[cache_role]
    prompt = sum(log["prompt_tokens"] for log in cache_logs)
    cached = sum(log["cached_tokens"] for log in cache_logs)
    out: dict[str, Any] = {
        "requests": summary["requests"],
        "ok": summary["ok"],
        "failed": summary["failed"],
        "skipped": run.skipped,
        "hit_rate": cached / prompt if prompt else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "client_reported_hit_rate": run.cached_tokens / run.prompt_tokens if run.prompt_tokens else None,
        "rps": summary["rps"],
        "elapsed_s": summary["elapsed_s"],
        "latency_ms": summary["latency_ms"],
        "ttft_ms": summary.get("ttft_ms"),
    }
    for role, role_logs in logs.items():
        counts = [sum(log["counts"].get(path, 0) for path in REQUEST_PATHS) for log in role_logs]
        key = "" if role == "regular" else f"{role}_"
        out[f"{key}worker_requests"] = counts
        out[f"{key}share_max_mean"] = share(counts)
    if rpcs := rpc_counts(logs):
        out["worker_rpcs"] = rpcs
    for key in ("failed_statuses", "errors"):
        if key in summary:
            out[key] = summary[key]
    return out


def rpc_counts(logs: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """The gRPC calls the workers received, by method name, summed over every worker; empty for HTTP workers."""
    out: Counter[str] = Counter()
    for role_logs in logs.values():
        for log in role_logs:
            for path, count in log["counts"].items():
                if path.startswith(("/sglang.grpc.", "/grpc.")):
                    out[path.rsplit("/", 1)[-1]] += count
    return dict(sorted(out.items()))


def measure(gateway: GatewayRun, fleet: Fleet, workload: wl.Workload, settings: Settings) -> dict[str, Any]:
    """Start `gateway`'s processes on the fleet, run `workload` through them from clean caches, stop them; its
    figures."""
    import uvloop

    probe = orjson.dumps({"model": settings.model, "messages": [{"role": "user", "content": " ping"}], "max_tokens": 1})
    processes: list[GatewayProcess] = []
    if settings.grpc:
        fleet.clear_logs()  # the previous run's calls: what follows is this gateway's start
    try:
        for _ in range(gateway.replicas):
            processes.append(GatewayProcess(gateway.gateway, fleet.gateway_args()))
            processes[-1].start(CHAT_PATH, probe, settings.startup_timeout)
        # What the gateways called on the gRPC workers as they started: model info, tokenizer, KV-event
        # subscriptions, the probe's Generate...
        startup = rpc_counts(fleet.logs()) if settings.grpc else {}
        fleet.reset(settings.timeout_secs)
        load = (None, None) if workload.timed else (settings.concurrency, settings.rate)
        run = uvloop.run(
            run_workload([p.url for p in processes], workload, settings.model, *load, settings.timeout_secs)
        )
        fleet.wait_idle(settings.timeout_secs)
        logs = fleet.logs()
    finally:
        for process in processes:
            process.stop()
    out = {**figures(run, logs, fleet.cache_role), "gateway": gateway.gateway.name, "replicas": gateway.replicas}
    return {**out, "startup_rpcs": startup} if startup else out


def run_routing(
    settings: Settings, gateways: Sequence[GatewayTemplate], progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every workload through every gateway, on one fleet per KV size; the JSON document of the run."""
    results: dict[str, Any] = {}
    runs = gateway_runs(gateways, settings.replicas)
    not_measured = unsupported(runs, settings)
    runs = [run for run in runs if run.name not in not_measured]
    for name, why in not_measured.items():
        progress(f"not measured: {name} ({why})")
    fleet: Fleet | None = None
    fleet_kv = 0
    try:
        for name in settings.workloads:
            run_settings = settings.for_workload(name)
            workload = build_workload(name, run_settings)
            limits = bounds(workload, run_settings)
            load = "timed by the workload" if workload.timed else run_settings.load
            progress(
                f"{name}: {workload.description}; {workload.requests} requests, {load};"
                f" hit-rate bounds {limits['infinite_cache']:.3f} (infinite cache),"
                f" {limits['fleet_capacity']:.3f} (the fleet's capacity), one LRU cache of that capacity"
                f" {limits['pooled_lru']:.3f}; prefix set"
                f" {limits['prefix_set_tokens']:,} tokens, distinct {limits['distinct_tokens']:,}"
                f" ({limits['distinct_tokens'] / limits['fleet_capacity_tokens']:.1f}x the fleet's"
                f" {limits['fleet_capacity_tokens']:,})"
            )
            if not settings.virtual and (fleet is None or fleet_kv != run_settings.kv_tokens):
                if fleet is not None:
                    fleet.stop()
                    fleet = None
                fleet = Fleet(run_settings).start(settings.startup_timeout)
                fleet_kv = run_settings.kv_tokens
            measured: dict[str, Any] = {}
            for run in runs:
                started = time.monotonic()
                if fleet is None:  # virtual time: no fleet is ever started
                    measured[run.name] = figures_ = measure_virtual(run, workload, run_settings)
                else:
                    measured[run.name] = figures_ = measure(run, fleet, workload, run_settings)
                took = f"{time.monotonic() - started:.0f}s" + (", virtual time" if settings.virtual else "")
                progress(f"  {run.name:<28} {_progress_line(figures_)}  ({took})")
            results[name] = {"description": workload.description, "requests": workload.requests, "load": load,
                             "kv_tokens": run_settings.kv_tokens, "bounds": limits, "gateways": measured}  # fmt: skip
    finally:
        if fleet is not None:
            fleet.stop()
    return {
        "benchmark": "routing",
        "meta": run_metadata(),
        "settings": {
            **{f.name: getattr(settings, f.name) for f in fields(settings)},
            "gateways": {g.name: g.template for g in gateways},
        },
        "workers": "gRPC" if settings.grpc else "HTTP, KV events over ZeroMQ" if settings.kv_events else "HTTP",
        "not_measured": not_measured,
        "results": results,
        "goal": goal(results, [peer for peer in PEER_GOALS if not (settings.grpc and peer == SGLANG_ROUTER)]),
        "replica_scaling": replica_scaling(results),
    }


def unsupported(runs: Sequence[GatewayRun], settings: Settings) -> dict[str, str]:
    """The runs these settings cannot measure, each with the reason: peers in virtual time, sglang-router on gRPC."""
    out: dict[str, str] = {}
    for run in runs:
        if settings.grpc and run.gateway.name == SGLANG_ROUTER:
            out[run.name] = GRPC_UNSUPPORTED
        elif settings.virtual and not is_shepherd(run.gateway):
            out[run.name] = "virtual time runs Shepherd's gateways only"
    return out


def is_shepherd(gateway: GatewayTemplate) -> bool:
    """Whether the template starts Shepherd's gateway (which virtual time can run in-process)."""
    return "shepherd.cli launch" in gateway.template or gateway.template.lstrip().startswith("shepherd launch")


def measure_virtual(gateway: GatewayRun, workload: wl.Workload, settings: Settings) -> dict[str, Any]:
    """`measure` in virtual time, in this process (`virtual_time`)."""
    from shepherd.bench.virtual_time import run_virtual

    figures_ = run_virtual(gateway.gateway, gateway.replicas, workload, settings)
    return {**figures_, "gateway": gateway.gateway.name, "replicas": gateway.replicas}


def _progress_line(f: dict[str, Any]) -> str:
    ttft = f["ttft_ms"] or {}
    shares = "  ".join(f"{k.removesuffix('_max_mean')} {fmt(v, 2)}" for k, v in f.items() if k.endswith("max_mean"))
    return (
        f"hit {fmt(f['hit_rate'], 3)}  TTFT p50 {fmt(ttft.get('p50'), 0)} p99 {fmt(ttft.get('p99'), 0)} ms"
        f"  {fmt(f['rps'], 1)} req/s  {shares}" + (f"  FAILED {f['failed']}" if f["failed"] else "")
    )


def goal(results: dict[str, Any], peers: Sequence[str] = tuple(PEER_GOALS)) -> dict[str, Any]:
    """Shepherd cache_aware per workload against each peer and the capacity bound: the issue's targets. `met` is
    None unless every one of `peers` (the peers that can run: no sglang-router on gRPC workers) ran."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        measured = result["gateways"]
        ours = measured.get(SHEPHERD)
        if ours is None:
            continue
        shares = [v for k, v in ours.items() if k.endswith("share_max_mean") and not k.startswith("decode")]
        worst_share = max((s for s in shares if s is not None), default=None)
        entry: dict[str, Any] = {
            "share_max_mean": worst_share,
            "of_capacity_bound": _ratio(ours["hit_rate"], result["bounds"]["fleet_capacity"]),
        }
        checks = [worst_share is not None and worst_share <= GOAL_SHARE]
        for peer, (min_hit, max_ttft) in PEER_GOALS.items():
            theirs = measured.get(peer)
            hit = ttft = None
            if theirs is not None:
                hit = _ratio(ours["hit_rate"], theirs["hit_rate"])
                ttft = _ratio((ours["ttft_ms"] or {}).get("p99"), (theirs["ttft_ms"] or {}).get("p99"))
                checks += [hit is not None and hit >= min_hit, ttft is not None and ttft <= max_ttft]
            entry[f"hit_rate_vs_{peer}"] = hit
            entry[f"ttft_p99_vs_{peer}"] = ttft
        entry["met"] = all(checks) if all(peer in measured for peer in peers) else None
        out[name] = entry
    return out


def replica_scaling(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload and replicated gateway: the hit rate at each replica count and its ratio to one replica's
    (keys are replica counts as strings, as in JSON)."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        per_gateway: dict[str, Any] = {}
        for f in result["gateways"].values():
            single = result["gateways"].get(f["gateway"])
            if f["replicas"] > 1 and single is not None:
                entry = per_gateway.setdefault(f["gateway"], {"hit_rate": {"1": single["hit_rate"]}, "ratio": {}})
                entry["hit_rate"][str(f["replicas"])] = f["hit_rate"]
                entry["ratio"][str(f["replicas"])] = _ratio(f["hit_rate"], single["hit_rate"])
        if per_gateway:
            out[name] = per_gateway
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- report ------------------------------------------------------------------------------------------------------


def render(document: dict[str, Any]) -> str:
    settings = document["settings"]
    pd = settings["pd"]
    parts = []
    for name, result in document["results"].items():
        limits = result["bounds"]
        share_headers = ["prefill share", "decode share"] if pd else ["share"]
        headers = ["gateway", "hit rate", "of bound", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99", "req/s"]
        headers += [*share_headers, "failed"]
        rows = []
        for gateway, f in result["gateways"].items():
            ttft, latency = f["ttft_ms"] or {}, f["latency_ms"]
            shares = [f.get("prefill_share_max_mean"), f.get("decode_share_max_mean")] if pd else [f["share_max_mean"]]
            rows.append(
                [gateway, fmt(f["hit_rate"], 3), fmt(_ratio(f["hit_rate"], limits["fleet_capacity"]), 2),
                 fmt(ttft.get("p50"), 1), fmt(ttft.get("p99"), 1), fmt(latency["p50"], 1), fmt(latency["p99"], 1),
                 fmt(f["rps"], 1), *(fmt(s, 2) for s in shares), str(f["failed"] + f["skipped"])]
            )  # fmt: skip
        kind = "gRPC " if settings.get("grpc") else ""
        fleet = (
            f"{settings['prefill_workers']} prefill + {settings['decode_workers']} decode {kind}workers" if pd
            else f"{settings['workers']} {kind}workers"
        )  # fmt: skip
        title = (
            f"{name}{' (PD)' if pd else ''}: {result['description']}; {result['requests']} requests, {fleet} of"
            f" {result['kv_tokens']:,} KV tokens, {result['load']}\n"
            f"hit-rate bounds: {limits['infinite_cache']:.3f} with an infinite cache,"
            f" {limits['fleet_capacity']:.3f} with the fleet's {limits['fleet_capacity_tokens']:,} tokens"
            f" (one LRU cache of them: {limits['pooled_lru']:.3f}; prefix set {limits['prefix_set_tokens']:,} tokens,"
            f" distinct {limits['distinct_tokens']:,});"
            f" of bound = hit rate / the fleet-capacity bound; times in ms; share = busiest worker's requests / mean"
        )
        parts.append(render_table(headers, rows, title))
    if document.get("not_measured"):
        parts.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in document["not_measured"].items()))
    if document["goal"]:
        parts.append(_render_goal(document["goal"]))
    if document["replica_scaling"]:
        parts.append(_render_replicas(document["replica_scaling"]))
    return "\n\n".join(parts)


def _render_goal(goals: dict[str, Any]) -> str:
    headers = [f"{SHEPHERD} vs"]
    for peer, (min_hit, max_ttft) in PEER_GOALS.items():
        headers += [f"hit/{_PEER_LABELS[peer]} (>= {min_hit})", f"p99/{_PEER_LABELS[peer]} (<= {max_ttft})"]
    headers += [f"share (<= {GOAL_SHARE})", "of bound", "goal met"]
    rows = []
    for name, g in goals.items():
        row = [name]
        for peer in PEER_GOALS:
            row += [fmt(g[f"hit_rate_vs_{peer}"], 2, "x"), fmt(g[f"ttft_p99_vs_{peer}"], 2, "x")]
        met = "-" if g["met"] is None else "yes" if g["met"] else "no"
        rows.append([*row, fmt(g["share_max_mean"], 2), fmt(g["of_capacity_bound"], 2), met])
    return render_table(headers, rows)


def _render_replicas(scaling: dict[str, Any]) -> str:
    counts = sorted({int(n) for per in scaling.values() for e in per.values() for n in e["hit_rate"]})
    headers = ["replicas: hit rate", "gateway", *(f"x{n}" for n in counts), f"within {1 - GOAL_REPLICA_HIT:.0%}"]
    rows = []
    for name, per_gateway in scaling.items():
        for gateway, e in per_gateway.items():
            cells = []
            for n in counts:
                hit, ratio = e["hit_rate"].get(str(n)), e["ratio"].get(str(n))
                cells.append(fmt(hit, 3) + ("" if ratio is None else f" ({ratio:.2f}x)"))
            ok = all(r is not None and r >= GOAL_REPLICA_HIT for r in e["ratio"].values())
            rows.append([name, gateway, *cells, "yes" if ok else "no"])
    return render_table(headers, rows)


# -- command line ------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    d = Settings()
    p = subparsers.add_parser(
        "routing",
        help="prefix-cache hit rate, TTFT and load spread of gateways and policies on simulated workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("gateways")
    g.add_argument(
        "--policies", nargs="*", choices=POLICIES, default=list(DEFAULT_POLICIES),
        help="Shepherd policies to measure, each as gateway shepherd-POLICY (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--smg", metavar="PATH",
        help=f"SMG executable, measured as {SMG} (default: {REFERENCE_SMG} if present, else smg on PATH)",
    )  # fmt: skip
    g.add_argument("--no-smg", action="store_true", help="do not measure SMG")
    g.add_argument(
        "--sglang-router", metavar="PATH",
        help=f"sglang-router executable, measured as {SGLANG_ROUTER} (default: sglang-router on PATH)",
    )  # fmt: skip
    g.add_argument("--no-sglang-router", action="store_true", help="do not measure sglang-router")
    g.add_argument(
        "--replicas", nargs="+", type=int, default=list(d.replicas), metavar="N",
        help="also run every Shepherd gateway as N replicas, request i to replica i mod N; one replica always runs"
        " (e.g. --replicas 2 4; default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--virtual", action="store_true",
        help="run in virtual time, in one process, in seconds: Shepherd's gateways only, no network, no peers"
        " (for tuning on many workloads and seeds; see docs/benchmarks.md)",
    )  # fmt: skip
    g.add_argument(
        "--gateway", action="append", default=[], metavar="NAME=TEMPLATE",
        help="another gateway (repeatable; a default of the same name is replaced); placeholders {port} {prom_port}"
        " {worker_urls} {host} {python}",
    )  # fmt: skip

    w = p.add_argument_group("workloads")
    w.add_argument(
        "--workloads", nargs="+", choices=[*wl.WORKLOADS, wl.TRACE],
        help=f"(default: {' '.join(wl.WORKLOADS)}, and {wl.TRACE} with --trace)",
    )  # fmt: skip
    w.add_argument("--groups", type=int, default=d.groups, help="shared prefix: system prompts (default: %(default)s)")
    w.add_argument("--prompts-per-group", type=int, default=d.prompts_per_group, help="(default: %(default)s)")
    w.add_argument("--system-tokens", type=int, default=d.system_tokens, help="(default: %(default)s)")
    w.add_argument("--question-tokens", type=int, default=d.question_tokens, help="(default: %(default)s)")
    w.add_argument("--clients", type=int, default=d.clients, help="multi-turn: conversations (default: %(default)s)")
    w.add_argument("--rounds", type=int, default=d.rounds, help="turns per conversation (default: %(default)s)")
    w.add_argument("--first-tokens", type=int, default=d.first_tokens, help="first turn (default: %(default)s)")
    w.add_argument("--turn-tokens", type=int, default=d.turn_tokens, help="later turns (default: %(default)s)")
    w.add_argument(
        "--conversation-system-tokens", type=int, default=d.conversation_system_tokens,
        help="a system prompt shared by every conversation; 0 for none (default: %(default)s)",
    )  # fmt: skip
    w.add_argument("--answer-tokens", type=int, default=d.answer_tokens, help="every answer (default: %(default)s)")
    w.add_argument(
        "--zipf-groups", type=int, default=d.zipf_groups,
        help="zipf-prefix: shared prefixes of --system-tokens, questions of --question-tokens (default: %(default)s)",
    )  # fmt: skip
    w.add_argument("--zipf-requests", type=int, default=d.zipf_requests, help="(default: %(default)s)")
    w.add_argument(
        "--zipf-exponent", type=float, default=d.zipf_exponent,
        help="the group of rank r is drawn with weight 1/r^exponent (default: %(default)s)",
    )  # fmt: skip
    w.add_argument(
        "--think-clients", type=int, default=d.think_clients,
        help="multi-turn-think: conversations, sized like multi-turn's (default: %(default)s)",
    )  # fmt: skip
    w.add_argument(
        "--think-time", type=float, default=d.think_time_s,
        help="mean exponential think time between turns, s (default: %(default)s)",
    )  # fmt: skip
    w.add_argument(
        "--conversation-rate", type=float, default=d.conversation_rate,
        help="conversations starting per second, Poisson (default: %(default)s)",
    )  # fmt: skip
    w.add_argument("--seed", type=int, default=d.seed, help="workload seed (default: %(default)s)")

    t = p.add_argument_group("trace replay")
    t.add_argument("--trace", metavar="FILE", help="a Mooncake-format JSONL trace: adds the trace workload")
    t.add_argument(
        "--trace-start", type=float, default=d.trace_start_s, metavar="S",
        help="window start, seconds of trace time after its first request (default: %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--trace-duration", type=float, default=d.trace_duration_s, metavar="S",
        help="window length in trace seconds; 0 for the rest of the trace (default: %(default)s)",
    )  # fmt: skip
    t.add_argument("--trace-requests", type=int, metavar="N", help="at most this many requests of the window")
    t.add_argument(
        "--trace-time-scale", type=float, default=d.trace_time_scale,
        help="replay time per trace time: 0.1 replays ten minutes in one (default: %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--trace-block-tokens", type=int, default=d.trace_block_tokens,
        help="simulator tokens per 512-token trace block; lengths scale alike (default: %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--trace-max-output", type=int, default=d.trace_max_output_tokens,
        help="cap on the scaled answer lengths (default: %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--trace-kv-tokens", type=int,
        help=f"prefix cache per worker for the trace (default: {TRACE_KV_FACTOR}x --kv-tokens)",
    )  # fmt: skip

    lo = p.add_argument_group("load").add_mutually_exclusive_group()
    lo.add_argument("--rate", type=float, help=f"open loop, requests/s (default: {d.rate:g}; {PD_RATE:g} with --pd)")
    lo.add_argument("--concurrency", type=int, help="closed loop with this many clients")

    f = p.add_argument_group("simulated fleet")
    f.add_argument("--workers", type=int, default=d.workers, help="(default: %(default)s)")
    f.add_argument("--pd", action="store_true", help="prefill-decode disaggregation")
    f.add_argument(
        "--grpc", action="store_true",
        help=f"SGLang gRPC workers (`shepherd sim {' '.join(GRPC_SIM_ARGS)}`, URLs grpc://): the gateways tokenize"
        " with the workers' tokenizer; sglang-router is not measured",
    )  # fmt: skip
    f.add_argument(
        "--kv-events", action="store_true",
        help=f"HTTP workers publishing KV events over ZeroMQ (`shepherd sim {shlex.join(ZMQ_SIM_ARGS)}`), caching"
        " the token ids of the same BPE as --grpc; every gateway is measured, and Shepherd follows the events",
    )  # fmt: skip
    f.add_argument("--prefill-workers", type=int, default=d.prefill_workers, help="PD (default: %(default)s)")
    f.add_argument("--decode-workers", type=int, default=d.decode_workers, help="PD (default: %(default)s)")
    f.add_argument("--sim-processes", type=int, default=d.sim_processes, help="(default: %(default)s)")
    f.add_argument(
        "--kv-tokens", type=int, help=f"prefix cache per worker (default: {d.kv_tokens}; {PD_KV_TOKENS} with --pd)"
    )
    f.add_argument("--page-size", type=int, default=d.page_size, help="(default: %(default)s)")
    f.add_argument("--max-running-requests", type=int, default=d.max_running_requests, help="(default: %(default)s)")
    f.add_argument(
        "--prefill-tokens-per-ms", type=float, default=d.prefill_tokens_per_ms, help="(default: %(default)s)"
    )
    f.add_argument("--decode-step-ms", type=float, default=d.decode_step_ms, help="(default: %(default)s)")
    f.add_argument(
        "--decode-step-ms-per-request", type=float, default=d.decode_step_ms_per_request, help="(default: %(default)s)"
    )
    f.add_argument("--sim-args", default="", help="more `shepherd sim` flags")

    o = p.add_argument_group("run and output")
    o.add_argument("--timeout-secs", type=float, default=d.timeout_secs, help="per request (default: %(default)s)")
    o.add_argument("--startup-timeout", type=float, default=d.startup_timeout, help="per process start")
    o.add_argument("--output", help="write the JSON report here")
    o.add_argument("--chart", help="write a PNG chart of hit rate and TTFT per gateway here")
    p.set_defaults(run=main)


def settings_from_args(args: argparse.Namespace) -> Settings:
    kv_tokens = args.kv_tokens if args.kv_tokens is not None else PD_KV_TOKENS if args.pd else Settings().kv_tokens
    trace_kv_tokens = args.trace_kv_tokens if args.trace_kv_tokens is not None else TRACE_KV_FACTOR * kv_tokens
    counts = (args.workers, args.prefill_workers, args.decode_workers, args.sim_processes, kv_tokens,
              args.page_size, args.max_running_requests, trace_kv_tokens, *args.replicas)  # fmt: skip
    if min(counts) < 1:
        raise ValueError("worker counts, processes, KV tokens, page size, running requests and replicas must be >= 1")
    if (args.rate is not None and not args.rate > 0) or (args.concurrency is not None and args.concurrency < 1):
        raise ValueError("--rate must be > 0 and --concurrency >= 1")
    if args.virtual and (args.pd or args.sim_args):
        raise ValueError("--virtual runs the regular fleet's latency model: no --pd, no --sim-args")
    if args.workloads is not None:
        workloads = tuple(dict.fromkeys(args.workloads))
    else:
        workloads = (*wl.WORKLOADS, wl.TRACE) if args.trace else wl.WORKLOADS
    settings = Settings(
        workloads=workloads,
        pd=args.pd,
        workers=args.workers,
        prefill_workers=args.prefill_workers,
        decode_workers=args.decode_workers,
        sim_processes=args.sim_processes,
        kv_tokens=kv_tokens,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        prefill_tokens_per_ms=args.prefill_tokens_per_ms,
        decode_step_ms=args.decode_step_ms,
        decode_step_ms_per_request=args.decode_step_ms_per_request,
        sim_args=tuple(shlex.split(args.sim_args)),
        groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        system_tokens=args.system_tokens,
        question_tokens=args.question_tokens,
        clients=args.clients,
        rounds=args.rounds,
        first_tokens=args.first_tokens,
        turn_tokens=args.turn_tokens,
        conversation_system_tokens=args.conversation_system_tokens,
        answer_tokens=args.answer_tokens,
        zipf_groups=args.zipf_groups,
        zipf_requests=args.zipf_requests,
        zipf_exponent=args.zipf_exponent,
        think_clients=args.think_clients,
        think_time_s=args.think_time,
        conversation_rate=args.conversation_rate,
        trace=args.trace,
        trace_start_s=args.trace_start,
        trace_duration_s=args.trace_duration or None,
        trace_requests=args.trace_requests,
        trace_time_scale=args.trace_time_scale,
        trace_block_tokens=args.trace_block_tokens,
        trace_max_output_tokens=args.trace_max_output,
        trace_kv_tokens=trace_kv_tokens,
        seed=args.seed,
        replicas=tuple(sorted({1, *args.replicas})),
        virtual=args.virtual,
        grpc=args.grpc,
        kv_events=args.kv_events,
        timeout_secs=args.timeout_secs,
        startup_timeout=args.startup_timeout,
    )
    if args.concurrency is not None:
        settings = replace(settings, rate=None, concurrency=args.concurrency)
    else:
        settings = replace(
            settings, rate=args.rate if args.rate is not None else PD_RATE if args.pd else Settings().rate
        )
    for name in settings.workloads:
        build_workload(name, settings)  # validates the sizes (and reads the trace)
    return settings


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        smg = None if args.no_smg else find_smg(args.smg)
        sglang_router = None if args.no_sglang_router else find_sglang_router(args.sglang_router)
        gateways = gateways_from_args(args.policies, smg, args.gateway, settings.pd, sglang_router)
    except ValueError as exc:
        print(f"shepherd bench routing: {exc}", file=sys.stderr)
        return 2
    document = run_and_report(
        "routing", lambda progress: run_routing(settings, gateways, progress=progress), render, args.output
    )
    if document is None:
        return 1
    if args.chart:
        from shepherd.bench.chart import write_chart

        write_chart(document, args.chart)
        print(f"Chart: {args.chart}")
    failed = sum(f["failed"] for r in document["results"].values() for f in r["gateways"].values())
    return 1 if failed else 0
