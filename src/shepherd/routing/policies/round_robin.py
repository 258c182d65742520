"""One counter for every endpoint; each selection (retries included) advances it."""

from __future__ import annotations

from collections.abc import Sequence

from shepherd.routing.context import RequestContext
from shepherd.routing.policies.base import StatelessPolicy
from shepherd.workers.worker import Worker


class RoundRobinPolicy(StatelessPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        worker = candidates[self._counter % len(candidates)]
        self._counter += 1
        return worker
