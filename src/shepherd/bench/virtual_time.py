"""`shepherd bench routing --virtual`: the routing benchmark in virtual time, in one process, in seconds.

A real run spends most of its minutes waiting: on the simulated engines' step timers, on the workload's schedule.
Here everything runs on one event loop whose clock jumps to the next timer instead of sleeping (`VirtualClockLoop`),
so a workload of 1,280 requests takes about two seconds of CPU, and a policy that draws nothing at random gives the
same figures every time.

What runs is real: each Shepherd gateway's policy built from its own command line (`--policy`, the `--cache-*`
flags) by the gateway's own parser, `RequestContext` parsed from the same chat bodies, and the simulator's `Engine`
and `PrefixCache` with the benchmark's latency model, one per worker. The load driver is the real benchmark's
(`conversation_load.drive`), answers are fed back into conversations as there. What is left out is the network and
the gateway's HTTP work: a request reaches its engine at the instant it is routed, and the in-flight count the
policy reads is exact. Each of N replicas is a policy with its own `Worker` objects (its own in-flight counts) and
sees every N-th request, as behind the benchmark's splitter.

It is for tuning on many workloads and seeds; peers (SMG, sglang-router) need the real run. One gateway's figures
agree with the real benchmark's to within its run-to-run noise; replicas agree less closely, because in a real run
each replica sees the others' requests reach the workers a little later (docs/benchmarks.md, "Virtual time").
"""

from __future__ import annotations

import asyncio
import selectors
import shlex
from typing import TYPE_CHECKING, Any

import orjson

from shepherd.bench.conversation_load import Answer, WorkloadRun, drive
from shepherd.cli import build_parser, config_from_args
from shepherd.config import GatewayConfig
from shepherd.routing.context import CHAT, RequestContext
from shepherd.routing.policies import create_policy
from shepherd.sim.engine import Engine, LatencyModel, Sequence, SequenceGroup
from shepherd.sim.kv_cache import PrefixCache
from shepherd.sim.metrics import WorkerStats
from shepherd.sim.parsing import chat_prompt_text
from shepherd.sim.tokenizer import generate, tokenize
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KvEvent
from shepherd.workers.load_monitor import RankLoad
from shepherd.workers.worker import Worker

if TYPE_CHECKING:
    from shepherd.bench.fleet import GatewayTemplate
    from shepherd.bench.routing import Settings
    from shepherd.bench.workloads import Workload
    from shepherd.routing.policies.base import Policy


class _JumpingSelector(selectors.DefaultSelector):
    """Never waits: a wait for the next timer moves the loop's clock to it instead."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("virtual time: nothing scheduled and nothing ready (the run would never end)")
        if timeout > 0:
            self._loop.now += timeout
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock starts at 0 and advances only to the next due timer."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def gateway_config(argv: list[str]) -> GatewayConfig:
    """The configuration a Shepherd gateway would run with, from its command line (`... launch FLAGS`)."""
    if "launch" not in argv:
        raise ValueError(f"not a Shepherd gateway command line: {shlex.join(argv)}")
    args = build_parser().parse_args(argv[argv.index("launch") :])
    config = config_from_args(args)
    config.validate()
    return config


def run_virtual(gateway: GatewayTemplate, replicas: int, workload: Workload, settings: Settings) -> dict[str, Any]:
    """`workload` through `replicas` copies of `gateway` (a Shepherd command line), in virtual time; its figures,
    as `routing.figures` gives them."""
    from shepherd.bench.routing import figures

    scheme = "grpc" if settings.grpc else "http"
    urls = [f"{scheme}://virtual-worker-{i}:8000" for i in range(settings.workers)]
    config = gateway_config(gateway.argv(0, 0, urls))
    loop = VirtualClockLoop()
    try:
        run, logs = loop.run_until_complete(_run(config, urls, replicas, workload, settings))
    finally:
        loop.close()
    return figures(run, {"regular": logs}, "regular")


async def _run(
    config: GatewayConfig, urls: list[str], replicas: int, workload: Workload, settings: Settings
) -> tuple[WorkloadRun, list[dict[str, Any]]]:
    from shepherd.bench.routing import CHAT_PATH, SIM_SEED

    clock = asyncio.get_running_loop().time
    latency = LatencyModel(settings.prefill_tokens_per_ms, settings.decode_step_ms, settings.decode_step_ms_per_request)
    feeds = [_EventFeed() for _ in urls] if settings.events else [None] * len(urls)
    engines = [
        Engine(PrefixCache(settings.kv_tokens, settings.page_size, feed), WorkerStats(), settings.max_running_requests,
               latency, clock=clock)
        for feed in feeds
    ]  # fmt: skip
    labels = {
        "max_total_num_tokens": str(settings.kv_tokens),
        "max_running_requests": str(settings.max_running_requests),
    }
    gateways = []  # per replica: its workers (one snapshot, as a registry hands out) and its policy
    for _ in range(replicas):
        workers = tuple(Worker(url, CircuitBreaker(config.circuit_breaker), model_id=settings.model, labels=labels,
                               kv_events_endpoints=zmq_endpoints(url, settings))
                        for url in urls)  # fmt: skip
        gateways.append((workers, create_policy(config.policy, config)))
    engine_of = {worker: engine for workers, _ in gateways for worker, engine in zip(workers, engines, strict=True)}
    for workers, policy in gateways:
        for worker, feed in zip(workers, feeds, strict=True):
            if feed is not None and policy.reads_kv_events:
                feed.follow(worker, policy)
    log_of: dict[Worker, dict[str, Any]] = {}
    logs = [{"prompt_tokens": 0, "cached_tokens": 0, "counts": {CHAT_PATH: 0}} for _ in urls]
    for workers, _ in gateways:
        log_of.update(zip(workers, logs, strict=True))
    issued = 0

    async def send(body: dict[str, Any], started: float) -> Answer:
        nonlocal issued
        workers, policy = gateways[issued % replicas]
        issued += 1
        ctx = RequestContext(CHAT, orjson.dumps(body), f"virtual-{issued}")
        prompt = tokenize(chat_prompt_text(body["messages"]))
        if settings.events:  # a gateway routes by the token ids the engines report
            ctx.route_by_tokens(prompt)
        worker = policy.pick(workers, ctx)
        completion = generate(prompt, body["max_tokens"], SIM_SEED)
        seq = Sequence(prompt, completion)
        group = SequenceGroup([seq])
        worker.load += 1
        engine_of[worker].submit(seq)
        async for _ in group.updates():
            if seq.first_token_at is not None:
                break
        policy.on_first_token(worker, ctx)
        await group.wait()
        worker.load -= 1
        policy.on_request_done(worker, ctx, True, seq.cached_tokens if policy.reads_cached_tokens else None)
        log = log_of[worker]
        log["prompt_tokens"] += len(prompt)
        log["cached_tokens"] += seq.cached_tokens
        log["counts"][CHAT_PATH] += 1
        ttft = (seq.first_token_at or clock()) - started
        return Answer(200, ttft, completion.text, len(prompt), seq.cached_tokens)

    async def poll_loads() -> None:  # the gateways' load monitors
        while True:
            await asyncio.sleep(config.load_monitor_interval_secs)
            for workers, policy in gateways:
                for worker in workers:
                    engine = engine_of[worker]
                    worker.engine_ranks = (RankLoad(0, len(engine.running), len(engine.waiting)),)
                policy.on_engine_loads(list(workers))

    load = (None, None) if workload.timed else (settings.concurrency, settings.rate)
    monitor = asyncio.ensure_future(poll_loads())
    run = await drive(workload, settings.model, send, *load, clock)
    monitor.cancel()
    for engine in engines:
        await engine.close()
    return run, logs


def zmq_endpoints(url: str, settings: Settings) -> tuple[str, ...]:
    """`--kv-events`: an HTTP engine's ZeroMQ endpoint (a name only: `_EventFeed` delivers its events)."""
    return (url.replace("http://", "tcp://", 1),) if settings.kv_events and not settings.grpc else ()


class _EventFeed:
    """One engine's KV events, delivered to every gateway replica's policy at once (`--grpc` or `--kv-events`: what
    each replica's `SubscribeKvEvents` stream or ZeroMQ subscription gives it, without the transport's latency)."""

    def __init__(self) -> None:
        self._followers: list[tuple[Worker, Policy]] = []

    def follow(self, worker: Worker, policy: Policy) -> None:
        self._followers.append((worker, policy))
        policy.on_kv_events(worker, [CacheCleared()])

    def _send(self, events: list[KvEvent]) -> None:
        for worker, policy in self._followers:
            policy.on_kv_events(worker, events)

    def stored(self, parent: int | None, pages: list[tuple[int, list[int]]]) -> None:
        self._send([BlocksStored(parent, tuple((key, tuple(ids)) for key, ids in pages))])

    def removed(self, keys: list[int]) -> None:
        self._send([BlocksRemoved(tuple(keys))])

    def cleared(self) -> None:
        self._send([CacheCleared()])
