"""Engine statistics of one simulated worker, rendered as SGLang-named Prometheus metrics.

Hand-rendered rather than built on ``prometheus_client``: observations happen on the hot path
of a worker that must sustain thousands of requests per second, and plain attribute updates
are several times cheaper than the client library's locked metric objects.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
    0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0,
)  # fmt: skip


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


@dataclass(frozen=True, slots=True)
class LiveState:
    """Instantaneous engine state sampled at scrape time."""

    running: int
    queued: int
    token_usage: float


class WorkerStats:
    """Cumulative counters and latency histograms of one worker (all DP ranks together)."""

    def __init__(self) -> None:
        self.num_requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(_LATENCY_BUCKETS)
        self.e2e = Histogram(_LATENCY_BUCKETS)
        self.itl = Histogram(_ITL_BUCKETS)
        # Generation throughput: tokens counted per wall-clock second; the gauge reports the
        # last complete second.
        self._tp_second = 0
        self._tp_tokens = 0
        self._tp_last = 0

    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens

    def on_tokens(self, n: int) -> None:
        self.generation_tokens += n
        second = int(time.monotonic())
        if second != self._tp_second:
            self._tp_last = self._tp_tokens if second == self._tp_second + 1 else 0
            self._tp_second = second
            self._tp_tokens = 0
        self._tp_tokens += n

    def on_finish(self, ttft: float, e2e: float) -> None:
        self.num_requests += 1
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def gen_throughput(self) -> float:
        second = int(time.monotonic())
        if second == self._tp_second:
            return float(self._tp_last)
        return float(self._tp_tokens) if second == self._tp_second + 1 else 0.0

    def render(self, model_name: str, engine_type: str, live: LiveState) -> str:
        labels = f'model_name="{_escape(model_name)}",engine_type="{engine_type}"'
        out: list[str] = []
        gauge = _family(out, labels, "gauge")
        gauge("num_running_reqs", "The number of running requests.", live.running)
        gauge("num_queue_reqs", "The number of requests in the waiting queue.", live.queued)
        gauge("token_usage", "The token usage.", live.token_usage)
        gauge("cache_hit_rate", "The prefix cache hit rate.", self.cache_hit_rate)
        gauge("gen_throughput", "The generation throughput (token/s).", self.gen_throughput())
        counter = _family(out, labels, "counter")
        counter("prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        counter("cached_tokens", "Number of prefill tokens served from the prefix cache.", self.cached_tokens)
        counter("generation_tokens", "Number of generation tokens processed.", self.generation_tokens)
        counter("num_requests", "Number of requests processed.", self.num_requests)
        _histogram(out, labels, "time_to_first_token_seconds", "Histogram of time to first token.", self.ttft)
        _histogram(out, labels, "e2e_request_latency_seconds", "Histogram of end-to-end latency.", self.e2e)
        _histogram(out, labels, "inter_token_latency_seconds", "Histogram of inter-token latency.", self.itl)
        out.append("")
        return "\n".join(out)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(out: list[str], labels: str, kind: str) -> Callable[[str, str, float], None]:
    suffix = "_total" if kind == "counter" else ""

    def add(name: str, help_text: str, value: float) -> None:
        out.append(f"# HELP sglang:{name} {help_text}")
        out.append(f"# TYPE sglang:{name} {kind}")
        out.append(f"sglang:{name}{suffix}{{{labels}}} {float(value)}")

    return add


def _histogram(out: list[str], labels: str, name: str, help_text: str, h: Histogram) -> None:
    out.append(f"# HELP sglang:{name} {help_text}")
    out.append(f"# TYPE sglang:{name} histogram")
    cumulative = 0
    for bound, count in zip((*h.bounds, "+Inf"), h.counts, strict=True):
        cumulative += count
        out.append(f'sglang:{name}_bucket{{{labels},le="{bound}"}} {float(cumulative)}')
    out.append(f"sglang:{name}_sum{{{labels}}} {h.sum}")
    out.append(f"sglang:{name}_count{{{labels}}} {float(h.count)}")
