import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from shepherd.errors import GatewayError
from shepherd.http.admission import Admission
from tests.support.polling import until


async def hold(admission: Admission, release: asyncio.Event, entered: asyncio.Event | None = None):
    async with admission:
        if entered is not None:
            entered.set()
        await release.wait()


@contextlib.asynccontextmanager
async def permit_held(admission: Admission) -> AsyncIterator[None]:
    """Another task holds a permit for the duration of the block (the only one, at limit 1)."""
    release, entered = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, entered))
    await entered.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def test_over_limit_without_queue_is_429():
    admission = Admission(limit=1, queue_size=0, timeout_secs=1)
    async with permit_held(admission):
        with pytest.raises(GatewayError) as info:
            async with admission:
                pass
        assert info.value.status == 429 and info.value.headers["retry-after"]
    assert admission.in_flight == 0


async def test_queued_request_gets_the_permit_in_fifo_order():
    admission = Admission(limit=1, queue_size=2, timeout_secs=5)
    order = []

    async def waiter(name):
        async with admission:
            order.append(name)

    async with permit_held(admission):
        first = asyncio.create_task(waiter("first"))
        await until(lambda: admission.queued == 1, "the first waiter queued")
        second = asyncio.create_task(waiter("second"))
        await until(lambda: admission.queued == 2, "both waiters queued")
        with pytest.raises(GatewayError) as info:  # the queue is full now
            async with admission:
                pass
        assert info.value.status == 429
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert admission.in_flight == 0 and admission.queued == 0


async def test_queue_timeout_is_503_and_leaves_no_waiter():
    admission = Admission(limit=1, queue_size=1, timeout_secs=0.05)
    async with permit_held(admission):
        with pytest.raises(GatewayError) as info:
            async with admission:
                pass
        assert info.value.status == 503 and info.value.code == "admission_queue_timeout"
        assert admission.queued == 0
    assert admission.in_flight == 0


async def test_cancelled_waiter_does_not_leak_a_permit():
    admission = Admission(limit=1, queue_size=1, timeout_secs=5)
    async with permit_held(admission):
        waiter = asyncio.create_task(hold(admission, asyncio.Event()))
        await until(lambda: admission.queued == 1, "the waiter queued")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert admission.in_flight == 0 and admission.queued == 0


async def test_zero_limit_means_unlimited():
    admission = Admission(limit=0, queue_size=0, timeout_secs=1)
    async with admission, admission:
        pass
    assert admission.in_flight == 0
