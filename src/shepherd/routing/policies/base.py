"""The policy interface: choose one worker from the routable candidates. Policies never do I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from shepherd.routing.context import RequestContext
from shepherd.workers.kv_events import KvEvent
from shepherd.workers.worker import Worker


class Policy(Protocol):
    name: str
    reads_cached_tokens: bool  # whether `on_request_done` uses `cached_tokens` (else the router does not look)
    reads_kv_events: bool  # whether `on_kv_events` uses the engines' KV events (else nobody subscribes to them)

    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        """Choose one of `candidates` (never empty) for `ctx`."""
        ...

    def explain(self, candidates: Sequence[Worker], ctx: RequestContext) -> dict[str, Any]:
        """Why `pick` would choose what it would for `ctx`, as JSON-ready data; changes no state."""
        ...

    def on_first_token(self, worker: Worker, ctx: RequestContext) -> None:
        """Called when the worker's first generated token of the attempt arrives (its prefill is over)."""
        ...

    def on_request_done(self, worker: Worker, ctx: RequestContext, ok: bool, cached_tokens: int | None = None) -> None:
        """Called once per attempt after the worker answered (or failed); `cached_tokens` is how much of the prompt
        the worker reported it had cached, when it reported it."""
        ...

    def on_worker_removed(self, worker: Worker) -> None:
        """Forget everything learned about a worker that left the fleet."""
        ...

    def on_engine_loads(self, workers: list[Worker]) -> None:
        """The engines' load was just polled: `workers` have a fresh `engine_requests`."""
        ...

    def on_kv_events(self, worker: Worker, events: list[KvEvent]) -> None:
        """The worker's engine reported blocks it stored or evicted (workers/kv_events.py)."""
        ...


class StatelessPolicy:
    """Base for policies that learn nothing from traffic."""

    name = "stateless"
    reads_cached_tokens = False
    reads_kv_events = False

    def explain(self, candidates: Sequence[Worker], ctx: RequestContext) -> dict[str, Any]:
        """The candidates and their load: the choice itself is the draw or turn of the moment, made at `pick`."""
        loads = [{"worker": w.url, "load": w.load} for w in candidates]
        return {"policy": self.name, "worker": None, "candidates": loads}

    def on_first_token(self, worker: Worker, ctx: RequestContext) -> None:
        return None

    def on_request_done(self, worker: Worker, ctx: RequestContext, ok: bool, cached_tokens: int | None = None) -> None:
        return None

    def on_worker_removed(self, worker: Worker) -> None:
        return None

    def on_engine_loads(self, workers: list[Worker]) -> None:
        return None

    def on_kv_events(self, worker: Worker, events: list[KvEvent]) -> None:
        return None
