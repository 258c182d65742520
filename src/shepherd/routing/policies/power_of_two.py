"""Power of two choices: sample two distinct candidates, keep the one with fewer requests in flight."""

from __future__ import annotations

import random
from collections.abc import Sequence

from shepherd.routing.context import RequestContext
from shepherd.routing.policies.base import StatelessPolicy
from shepherd.workers.worker import Worker


class PowerOfTwoPolicy(StatelessPolicy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first, second = self._rng.sample(range(count), 2)
        a, b = candidates[first], candidates[second]
        return b if b.load < a.load else a
