import asyncio

import pytest

from shepherd.http.admission import Admission
from shepherd.http.errors import GatewayError


async def hold(admission: Admission, release: asyncio.Event, entered: asyncio.Event | None = None):
    async with admission:
        if entered is not None:
            entered.set()
        await release.wait()


async def test_over_limit_without_queue_is_429():
    admission = Admission(limit=1, queue_size=0, timeout_secs=1)
    release = asyncio.Event()
    entered = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, entered))
    await entered.wait()
    with pytest.raises(GatewayError) as info:
        async with admission:
            pass
    assert info.value.status == 429 and info.value.headers["retry-after"]
    release.set()
    await holder
    assert admission.in_flight == 0


async def test_queued_request_gets_the_permit_in_fifo_order():
    admission = Admission(limit=1, queue_size=2, timeout_secs=5)
    release = asyncio.Event()
    entered = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, entered))
    await entered.wait()
    order = []

    async def waiter(name):
        async with admission:
            order.append(name)

    first = asyncio.create_task(waiter("first"))
    second = asyncio.create_task(waiter("second"))
    while admission.queued < 2:
        await asyncio.sleep(0)
    with pytest.raises(GatewayError) as info:  # the queue is full now
        async with admission:
            pass
    assert info.value.status == 429
    release.set()
    await asyncio.gather(holder, first, second)
    assert order == ["first", "second"]
    assert admission.in_flight == 0 and admission.queued == 0


async def test_queue_timeout_is_503_and_leaves_no_waiter():
    admission = Admission(limit=1, queue_size=1, timeout_secs=0.05)
    release = asyncio.Event()
    entered = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, entered))
    await entered.wait()
    with pytest.raises(GatewayError) as info:
        async with admission:
            pass
    assert info.value.status == 503 and info.value.code == "admission_queue_timeout"
    assert admission.queued == 0
    release.set()
    await holder
    assert admission.in_flight == 0


async def test_cancelled_waiter_does_not_leak_a_permit():
    admission = Admission(limit=1, queue_size=1, timeout_secs=5)
    release = asyncio.Event()
    entered = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, entered))
    await entered.wait()
    waiter = asyncio.create_task(hold(admission, asyncio.Event()))
    while admission.queued < 1:
        await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert admission.in_flight == 0 and admission.queued == 0


async def test_zero_limit_means_unlimited():
    admission = Admission(limit=0, queue_size=0, timeout_secs=1)
    async with admission, admission:
        pass
    assert admission.in_flight == 0
