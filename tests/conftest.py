"""Shared fixtures: one simulated fleet per test module where tests can share it."""

from __future__ import annotations

import pytest

from tests.support.processes import SimFleet, start_sim


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> SimFleet:
    """Three simulated workers (model `sim-model`), shared by a module's tests and reset before each.

    They run the batching latency model with short steps, so streams really arrive token by token.
    """
    args = ("--latency-model", "batch", "--decode-step-ms", "3")
    with start_sim(tmp_path_factory.mktemp("fleet"), 3, *args) as sims:
        yield sims


@pytest.fixture
def sims(fleet: SimFleet) -> SimFleet:
    fleet.reset()
    return fleet
