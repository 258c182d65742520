"""Uniform random choice."""

from __future__ import annotations

import random
from collections.abc import Sequence

from shepherd.routing.context import RequestContext
from shepherd.routing.policies.base import StatelessPolicy
from shepherd.workers.worker import Worker


class RandomPolicy(StatelessPolicy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        return candidates[self._rng.randrange(len(candidates))]
