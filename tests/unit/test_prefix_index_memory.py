"""The prefix index's memory stays within its byte budget, measured with tracemalloc, whatever the prompts."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from shepherd.cli import build_parser, config_from_args
from shepherd.config import CircuitBreakerConfig
from shepherd.routing.prefix_index import PrefixIndex
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker

BUDGET = 1024 * 1024


def workloads(count: int) -> dict[str, list[str]]:
    rng = random.Random(7)
    long_text = "".join(rng.choice("abcdefgh ") for _ in range(20_000))
    return {
        # The case a character budget cannot bound: every prompt a few characters, one key each.
        "tiny": [str(i) for i in range(count)],
        # Long distinct prompts: many keys each, block sizes that are not small cached ints.
        "long": [f"{i:08d}" + long_text[: rng.randrange(500, 20_000)] for i in range(count // 20)],
        # Shared prefixes held by many workers at once.
        "shared": [long_text[: 64 * rng.randrange(1, 60)] + str(i % 50) for i in range(count)],
    }


@pytest.mark.parametrize("workload", ["tiny", "long", "shared"])
def test_memory_stays_within_the_byte_budget(workload):
    prompts = workloads(10_000)[workload]
    fleet = tuple(Worker(f"http://w{i}", CircuitBreaker(CircuitBreakerConfig())) for i in range(8))
    rng = random.Random(1)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(page_chars=64, budget_bytes=BUDGET)
        view = index.view(fleet)
        highest = 0
        for i, prompt in enumerate(prompts):
            keys, ends = index.layout.keys(prompt)  # made while tracing: the index keeps these very key objects
            index.record(view.entries[rng.randrange(len(fleet))], keys, ends)
            if i % 500 == 0:
                highest = max(highest, tracemalloc.get_traced_memory()[0] - base)
        highest = max(highest, tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    assert highest <= BUDGET, f"{highest} bytes for {index.pairs} pairs"
    assert index.estimated_bytes <= BUDGET and index.pairs * 2 > BUDGET // 512  # it fills up: a cache, not a leak


def test_max_tree_size_is_bytes_and_takes_units():
    def parse(*argv: str) -> int:
        return config_from_args(build_parser().parse_args(["launch", *argv])).cache_aware.max_tree_size

    assert parse() == 64 * 1024 * 1024
    assert parse("--max-tree-size", "256MiB") == 256 * 1024 * 1024
    assert parse("--max-tree-size", "1000000") == 1_000_000
