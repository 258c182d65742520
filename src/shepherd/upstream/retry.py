"""Which upstream outcomes are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random

from shepherd.config import RetryConfig

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def is_worker_fault(status: int) -> bool:
    """Statuses that count against a worker's circuit breaker (429 is neutral, other 4xx are the client's)."""
    return status >= 500 or status == 408


class Backoff:
    """Exponential backoff with jitter: min(initial * multiplier**k, max) * (1 + U(-jitter, +jitter))."""

    __slots__ = ("_config", "_rng")

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng or random.Random()

    def delay_secs(self, failed_attempt: int) -> float:
        """Seconds to wait after the 0-based attempt `failed_attempt` failed."""
        c = self._config
        delay = min(c.initial_backoff_ms * c.backoff_multiplier**failed_attempt, c.max_backoff_ms)
        if c.jitter_factor:
            delay += delay * self._rng.uniform(-c.jitter_factor, c.jitter_factor)
        return max(0.0, delay) / 1000.0
