"""`shepherd bench policy`: CPU time of one routing decision, by policy and fleet size.

No network and no event loop: real `Worker` objects, and a `RequestContext` parsed from a chat body right before each
timed `pick` (so the routing text is extracted inside the timed call, as on the request path). The workload is shared
prefixes: `--groups` system prompts, each request one of them plus a fresh question, `--prompt-chars` in total.
A synthetic in-flight load keeps `--inflight-per-worker` requests per worker: each decision adds one to the chosen
worker and the oldest in-flight request completes.

Policies:
- cache_aware: Shepherd's (prefix index keyed by chained block hashes, sampled least-loaded selection);
- cache_aware_events: the same policy over gRPC workers whose engines publish KV events: each prompt is routed by
  its token ids (the simulator's tokenizer, outside the timed call, as the gateway tokenizes before routing), and
  after each decision the chosen worker's engine reports the prompt's 16-token blocks stored, evicting its least
  recently used blocks beyond `--engine-blocks` (an LRU per engine; the budget is raised to hold them all). The
  timed call includes matching the engines' blocks and placing the request's blocks in flight;
- cache_aware_http_events: the same over HTTP workers whose engines publish KV events over ZeroMQ, which cache the
  ids of the simulator's BPE: the timed call also tokenizes the prompt for routing, as the gateway does for them
  (the chat template, then the tokenizer's segment encoder, whose cache of long pieces the warmup fills);
- naive_scan: what a per-worker prefix store costs: every worker's set of 64-character block keys is walked per
  request and the least-loaded worker is found by a full scan (unbounded, no eviction);
- round_robin: the floor, no text work at all.

Per (policy, workers): mean, p50 and p99 microseconds per decision; for cache_aware also index probes and worker
entries examined per decision, which stay flat as the fleet grows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from shepherd.bench.report import fmt, render_table, run_metadata, write_json
from shepherd.bench.routing import load_bpe_tokenizers
from shepherd.config import CacheAwareConfig, CircuitBreakerConfig
from shepherd.generation.prompt import prompt_ids
from shepherd.routing.context import CHAT, RequestContext
from shepherd.routing.engine_cache import BLOCK_BYTES
from shepherd.routing.policies.base import Policy, StatelessPolicy
from shepherd.routing.policies.cache_aware import CacheAwarePolicy
from shepherd.routing.policies.round_robin import RoundRobinPolicy
from shepherd.sim.parsing import chat_prompt_text
from shepherd.sim.tokenizer import tokenize
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KvEvent
from shepherd.workers.worker import Worker

POLICIES = ("cache_aware", "cache_aware_events", "cache_aware_http_events", "naive_scan", "round_robin")
EVENT_CELLS = ("cache_aware_events", "cache_aware_http_events")
ENGINE_BLOCK_TOKENS = 16
_VOCABULARY = (
    "the gateway routes each request to a worker whose prefix cache probably holds the prompt while keeping load "
    "balanced across engines that batch tokens pages memory queue latency throughput model system user assistant"
)
_WORDS = tuple(_VOCABULARY.split(" "))


class NaiveScanPolicy(StatelessPolicy):
    """Baseline: per-worker sets of fixed-block chain keys, scanned worker by worker on every request."""

    name = "naive_scan"

    def __init__(self, threshold: float = 0.3, block: int = 64) -> None:
        self._threshold = threshold
        self._block = block
        self._held: dict[Worker, set[int]] = {}

    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        text = ctx.routing_text
        block = self._block
        keys = []
        key = 0
        for start in range(0, len(text), block):
            key = hash((key, text[start : start + block]))
            keys.append(key)
        best, best_depth = candidates[0], -1
        least = candidates[0]
        for worker in candidates:
            held = self._held.setdefault(worker, set())
            depth = 0
            for key in keys:
                if key not in held:
                    break
                depth += 1
            if depth > best_depth:
                best, best_depth = worker, depth
            if worker.load < least.load:
                least = worker
        matched = min(len(text), best_depth * block)
        target = best if text and matched / len(text) > self._threshold else least
        self._held[target].update(keys)
        return target


@dataclass(frozen=True, slots=True)
class Settings:
    workers: tuple[int, ...] = (16, 1000)
    policies: tuple[str, ...] = POLICIES
    prompt_chars: int = 8192
    shared_fraction: float = 0.75
    groups: int = 64
    decisions: int = 5000
    warmup: int = 2000
    inflight_per_worker: int = 4
    engine_blocks: int = 512  # the *_events cells: each engine's KV cache, in 16-token blocks (8,192 tokens)
    seed: int = 0


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    total = 0
    while total < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        total += len(word) + 1
    return " ".join(words)[:chars]


def _bodies(settings: Settings) -> list[bytes]:
    """Chat bodies: one of the group system prompts plus a fresh question, `prompt_chars` long in total."""
    rng = random.Random(settings.seed)
    shared = int(settings.prompt_chars * settings.shared_fraction)
    systems = [_text(rng, shared) for _ in range(settings.groups)]
    question = settings.prompt_chars - shared - 1  # the routing text joins the two messages with a space
    bodies = []
    for _ in range(settings.warmup + settings.decisions):
        messages = [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": _text(rng, question)},
        ]
        bodies.append(orjson.dumps({"model": "bench-model", "messages": messages}))
    return bodies


class _Engine:
    """A worker's KV cache as its KV events describe it: 16-token blocks in an LRU, reported stored and evicted.

    A prompt's blocks are touched deepest first, so its root is the most recent and eviction goes leaf first, as in
    an engine's radix cache (which never evicts a block before its descendants)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def serve(self, ids: list[int]) -> list[KvEvent]:
        """The events of caching the full blocks of `ids`."""
        blocks, parent, run, run_parent, chain = self.blocks, 0, [], None, []
        for start in range(0, len(ids) - ENGINE_BLOCK_TOKENS + 1, ENGINE_BLOCK_TOKENS):
            chunk = tuple(ids[start : start + ENGINE_BLOCK_TOKENS])
            block = hash((parent, chunk))
            if block not in blocks:
                if not run:
                    run_parent = parent or None
                run.append((block, chunk))
            chain.append(block)
            parent = block
        for block in reversed(chain):
            blocks[block] = None
            blocks.move_to_end(block)
        events: list[KvEvent] = [BlocksStored(run_parent, tuple(run))] if run else []
        evicted = []
        while len(blocks) > self.capacity:
            evicted.append(blocks.popitem(last=False)[0])
        if evicted:
            events.append(BlocksRemoved(tuple(evicted)))
        return events


def _make_policy(name: str, workers: int = 0, settings: Settings | None = None) -> Policy:
    if name == "cache_aware":
        return CacheAwarePolicy(CacheAwareConfig(), random.Random(0))
    if name in EVENT_CELLS:
        assert settings is not None
        budget = max(CacheAwareConfig().max_tree_size, 2 * workers * settings.engine_blocks * BLOCK_BYTES)
        return CacheAwarePolicy(CacheAwareConfig(max_tree_size=budget), random.Random(0))
    if name == "naive_scan":
        return NaiveScanPolicy()
    return RoundRobinPolicy()


def measure(name: str, workers: int, bodies: list[bytes], settings: Settings) -> dict[str, Any]:
    """Time every decision after the warmup; returns the figures of one (policy, fleet size) cell."""
    breaker_config = CircuitBreakerConfig()
    events = name in EVENT_CELLS
    # Each cell has its own tokenizer: a cache of encoded pieces left by another cell would hold its questions.
    tokenizer = load_bpe_tokenizers()[1] if name == "cache_aware_http_events" else None
    scheme = "grpc" if name == "cache_aware_events" else "http"
    fleet = tuple(
        Worker(f"{scheme}://worker-{i}:8000", CircuitBreaker(breaker_config),
               kv_events_endpoints=(f"tcp://worker-{i}:5557",) if tokenizer is not None else ())
        for i in range(workers)
    )  # fmt: skip
    policy = _make_policy(name, workers, settings)
    engines = {worker: _Engine(settings.engine_blocks) for worker in fleet} if events else {}
    for worker in engines:
        policy.on_kv_events(worker, [CacheCleared()])
    words = events and tokenizer is None  # gRPC cell: ids tokenized ahead, as the gateway does before routing
    prompts = [tokenize(chat_prompt_text(orjson.loads(body)["messages"])) for body in bodies] if words else []
    ids: list[int] = []
    prompt_tokens: list[int] = []  # event cells: each timed prompt's token ids
    inflight: deque[tuple[Worker, RequestContext]] = deque()
    limit = settings.inflight_per_worker * workers
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i, body in enumerate(bodies):
        ctx = RequestContext(CHAT, body, f"bench-{i}")
        started = clock()
        if tokenizer is not None:
            ids = prompt_ids(CHAT, ctx.payload, tokenizer)
            ctx.route_by_tokens(ids)
        elif events:
            ids = prompts[i]
            ctx.route_by_tokens(ids)
        worker = policy.pick(fleet, ctx)
        elapsed = clock() - started
        ctx.forget_routing_text()  # as the dispatch loop does once the worker is chosen
        if i >= settings.warmup:
            samples.append(elapsed)
            prompt_tokens.append(len(ids))
        if events:
            policy.on_kv_events(worker, engines[worker].serve(ids))
        worker.load += 1
        inflight.append((worker, ctx))
        if len(inflight) > limit:
            done, done_ctx = inflight.popleft()
            done.load -= 1
            policy.on_request_done(done, done_ctx, True)
    samples.sort()
    result: dict[str, Any] = {
        "policy": name,
        "workers": workers,
        "decisions": len(samples),
        "mean_us": statistics.fmean(samples) / 1000,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000,
    }
    if isinstance(policy, CacheAwarePolicy) and events:
        result["prompt_tokens"] = sum(prompt_tokens) / len(prompt_tokens)
        result["engine_blocks"] = sum(policy.engines.blocks_held(worker) for worker in fleet)
    if isinstance(policy, CacheAwarePolicy):
        index = policy.index_for("bench-model")
        total = len(bodies)
        result["index_probes_per_decision"] = index.lookups / total
        result["entries_examined_per_decision"] = policy.examined / total
        result["indexed_chars"] = index.chars
        result["index_bytes"] = index.estimated_bytes
    return result


def run(settings: Settings, json_path: str | None) -> int:
    bodies = _bodies(settings)
    results = [measure(name, n, bodies, settings) for n in settings.workers for name in settings.policies]
    rows = [
        [
            r["policy"],
            str(r["workers"]),
            fmt(r["mean_us"]),
            fmt(r["p50_us"]),
            fmt(r["p99_us"]),
            fmt(r.get("index_probes_per_decision")),
            fmt(r.get("entries_examined_per_decision")),
        ]
        for r in results
    ]
    title = (
        f"µs per routing decision: {settings.prompt_chars}-char chat prompts, {settings.groups} shared prefixes "
        f"({settings.shared_fraction:.0%}), {settings.decisions} decisions after {settings.warmup} warmup"
    )
    headers = ["policy", "workers", "mean µs", "p50 µs", "p99 µs", "probes/dec", "examined/dec"]
    print(render_table(headers, rows, title))
    if json_path:
        write_json(json_path, {"benchmark": "policy", "meta": run_metadata(), "settings": _settings_json(settings),
                               "results": results})  # fmt: skip
    return 0


def _settings_json(settings: Settings) -> dict[str, Any]:
    return {field: getattr(settings, field) for field in Settings.__dataclass_fields__}


def register(subparsers: argparse._SubParsersAction) -> None:
    d = Settings()
    p = subparsers.add_parser(
        "policy",
        help="µs per routing decision by policy and fleet size (in-process, no network)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, nargs="+", default=list(d.workers), help="fleet sizes (default: 16 1000)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(d.policies))
    p.add_argument("--prompt-chars", type=int, default=d.prompt_chars)
    p.add_argument("--shared-fraction", type=float, default=d.shared_fraction, help="system prompt share of a prompt")
    p.add_argument("--groups", type=int, default=d.groups, help="distinct system prompts")
    p.add_argument("--decisions", type=int, default=d.decisions, help="timed decisions per cell")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed decisions first (fill the index)")
    p.add_argument("--inflight-per-worker", type=int, default=d.inflight_per_worker)
    p.add_argument("--engine-blocks", type=int, default=d.engine_blocks,
                   help="the *_events cells: each engine's KV cache in 16-token blocks (default: 512)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the results here")
    p.set_defaults(run=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    if args.prompt_chars < 2 or not 0.0 <= args.shared_fraction < 1.0 or args.groups < 1 or args.decisions < 1:
        raise SystemExit("--prompt-chars >= 2, --shared-fraction in [0, 1), --groups and --decisions >= 1")
    settings = Settings(
        workers=tuple(args.workers),
        policies=tuple(args.policies),
        prompt_chars=args.prompt_chars,
        shared_fraction=args.shared_fraction,
        groups=args.groups,
        decisions=args.decisions,
        warmup=args.warmup,
        inflight_per_worker=args.inflight_per_worker,
        engine_blocks=args.engine_blocks,
        seed=args.seed,
    )
    return run(settings, args.json_path)
