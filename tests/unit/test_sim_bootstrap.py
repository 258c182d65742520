"""The simulator's bootstrap room board and the parsing of a request's bootstrap fields."""

from __future__ import annotations

import asyncio

import pytest

from shepherd.sim.bootstrap import RoomBoard, bootstrap_items
from shepherd.sim.wire import RequestError
from tests.support.polling import until


async def test_waiting_ends_when_every_room_is_published():
    board = RoomBoard()
    board.publish(1)
    waiting = asyncio.ensure_future(board.missing([1, 2, 3], timeout=5))
    await until(lambda: set(board._waiters) == {2, 3}, "the wait for rooms 2 and 3 to begin", interval=0)
    board.publish(2)
    done, _ = await asyncio.wait([waiting], timeout=0.05)  # room 3 is still missing: no answer is the behaviour
    assert not done
    board.publish(3)
    assert await waiting == []


async def test_timeout_reports_the_missing_rooms_and_leaves_no_waiters():
    board = RoomBoard()
    board.publish(1)
    assert await board.missing([1, 2], timeout=0.01) == [2]
    assert board._waiters == {}
    assert await board.missing([2], timeout=0) == [2]


def test_oldest_rooms_are_forgotten_beyond_capacity():
    board = RoomBoard(capacity=2)
    for room in (1, 2, 3):
        board.publish(room)
    assert asyncio.run(board.missing([1, 2, 3], timeout=0)) == [1]


def test_bootstrap_items_single_and_batch():
    single = {"bootstrap_host": "h", "bootstrap_port": 9, "bootstrap_room": 5}
    assert bootstrap_items(single, None, required=True) == [(("h", 9), 5)]
    batch = {"bootstrap_host": ["h", "h"], "bootstrap_port": [None, None], "bootstrap_room": [1, 2]}
    assert bootstrap_items(batch, 2, required=True) == [(("h", None), 1), (("h", None), 2)]
    assert bootstrap_items({}, None, required=False) == []


@pytest.mark.parametrize(
    ("body", "batch"),
    [
        ({}, None),  # a decode needs a room
        ({"bootstrap_host": "h", "bootstrap_port": 9, "bootstrap_room": -1}, None),
        ({"bootstrap_host": "h", "bootstrap_port": 9, "bootstrap_room": 5}, 2),  # a batch needs lists
        ({"bootstrap_host": ["h"], "bootstrap_port": [9], "bootstrap_room": [1]}, 2),  # one per item
        ({"bootstrap_host": ["h"], "bootstrap_port": [9], "bootstrap_room": [1]}, None),
    ],
)
def test_misshapen_bootstrap_fields_are_rejected(body, batch):
    with pytest.raises(RequestError):
        bootstrap_items(body, batch, required=True)
