"""Per-worker circuit breaker: closed -> open -> half_open -> closed.

closed: allows traffic; `failure_threshold` consecutive failures, all within `window_secs`, open it.
open: no traffic; after `timeout_secs` it becomes half_open (lazily, when someone asks).
half_open: allows at most `success_threshold` trial requests in flight at a time (the rest go to other workers,
or get 503 when there is none); `success_threshold` successes close it, any failure reopens it. A trial counts from
the request's dispatch to its end (`Lease`), so one that ends without a verdict (429, a client that left) frees its
slot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from shepherd.config import CircuitBreakerConfig


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TransitionListener = Callable[["CircuitBreaker", CircuitState, CircuitState], None]
TrialsListener = Callable[["CircuitBreaker"], None]


class CircuitBreaker:
    __slots__ = (
        "_config",
        "_failures",
        "_listener",
        "_opened_at",
        "_period",
        "_successes",
        "_trials",
        "on_trials",
        "state",
    )

    def __init__(self, config: CircuitBreakerConfig, listener: TransitionListener | None = None) -> None:
        self._config = config
        self._listener = listener
        self.state = CircuitState.CLOSED
        self._failures: deque[float] = deque()
        self._successes = 0
        self._opened_at = 0.0
        self._trials = 0  # half-open: trial requests in flight
        self._period = 0  # counts transitions, so a trial that outlives its half-open period is not counted in the next
        self.on_trials: TrialsListener | None = None  # called when the trial slots fill up or one frees (the registry)

    @property
    def consecutive_failures(self) -> int:
        return len(self._failures)

    @property
    def consecutive_successes(self) -> int:
        return self._successes

    def allows(self, now: float | None = None) -> bool:
        """True when traffic may be sent; moves open -> half_open once the timeout has passed."""
        state = self.state
        if state is CircuitState.CLOSED or self._config.disabled:
            return True
        if state is CircuitState.HALF_OPEN:
            return self._trials < self._config.success_threshold
        if (now if now is not None else time.monotonic()) - self._opened_at >= self._config.timeout_secs:
            self._transition(CircuitState.HALF_OPEN)
            return True
        return False

    def reopen_in(self, now: float | None = None) -> float:
        """Seconds until an open breaker may be tried again (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        elapsed = (now if now is not None else time.monotonic()) - self._opened_at
        return max(0.0, self._config.timeout_secs - elapsed)

    def begin_trial(self) -> int:
        """Count a request dispatched while half-open; returns the token for `end_trial`."""
        self._trials += 1
        if self._trials == self._config.success_threshold and self.on_trials is not None:
            self.on_trials(self)
        return self._period

    def end_trial(self, token: int) -> None:
        """A trial request ended (whatever its outcome); its slot frees unless the period it began in is over."""
        if token != self._period:
            return
        self._trials -= 1
        if self._trials == self._config.success_threshold - 1 and self.on_trials is not None:
            self.on_trials(self)

    def record_success(self) -> None:
        if self._config.disabled:
            return
        self._failures.clear()
        if self.state is CircuitState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self._config.success_threshold:
                self._transition(CircuitState.CLOSED)

    def record_failure(self, now: float | None = None) -> None:
        if self._config.disabled:
            return
        now = now if now is not None else time.monotonic()
        if self.state is CircuitState.HALF_OPEN:
            self._open(now)
            return
        if self.state is CircuitState.OPEN:
            return
        failures = self._failures
        failures.append(now)
        horizon = now - self._config.window_secs
        while failures and failures[0] < horizon:
            failures.popleft()
        if len(failures) >= self._config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._transition(CircuitState.OPEN)

    def _transition(self, new: CircuitState) -> None:
        old, self.state = self.state, new
        self._failures.clear()
        self._successes = 0
        self._trials = 0
        self._period += 1
        if self._listener is not None:
            self._listener(self, old, new)
