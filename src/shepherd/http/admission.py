"""Admission control for the data plane: at most N requests in flight, a bounded FIFO queue behind them.

Over the queue bound -> 429 with Retry-After; waited past the queue timeout -> 503. A permit is held for the
whole response, streams included.
"""

from __future__ import annotations

import asyncio
from collections import deque

from shepherd.errors import GatewayError

_RETRY_AFTER = {"retry-after": "2"}


class Admission:
    __slots__ = ("_active", "_limit", "_queue_size", "_timeout", "_waiters")

    def __init__(self, limit: int, queue_size: int, timeout_secs: float) -> None:
        self._limit = limit  # 0: unlimited
        self._queue_size = queue_size
        self._timeout = timeout_secs
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Take a permit if one is free right now (the common case, without a coroutine)."""
        if not self._limit:
            return True
        if self._active < self._limit and not self._waiters:
            self._active += 1
            return True
        return False

    async def wait_for_permit(self) -> None:
        """Queue for a permit after `try_enter` failed: 429 when the queue is full, 503 after the queue timeout."""
        if len(self._waiters) >= self._queue_size:
            message = (
                "concurrency limit reached and queuing is disabled"
                if self._queue_size == 0
                else "admission queue is at capacity"
            )
            raise GatewayError(429, "admission_queue_full", message, headers=_RETRY_AFTER)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the permit arrived just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    503, "admission_queue_timeout", "timed out waiting for an admission slot", headers=_RETRY_AFTER
                ) from None
            raise

    def leave(self) -> None:
        if self._limit:
            self._release()

    async def __aenter__(self) -> None:
        if not self.try_enter():
            await self.wait_for_permit()

    async def __aexit__(self, *exc: object) -> None:
        self.leave()

    def _release(self) -> None:
        """Hand the permit to the oldest waiter, or give it back."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1
