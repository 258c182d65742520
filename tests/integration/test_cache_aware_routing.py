"""cache_aware through the real gateway and simulated workers: prefix affinity turns into engine cache hits."""

from __future__ import annotations

import random

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import SimFleet


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(("route", "cache", "page", "token", "batch", "queue", "prefix")) for _ in range(words))


async def test_default_policy_keeps_prefix_groups_together_and_workers_hit_their_cache(sims: SimFleet, tmp_path):
    rng = random.Random(4)
    systems = [sentence(rng, 400) for _ in range(3)]  # three prefix groups on a fleet of three
    order = [(group, question) for group in range(3) for question in range(8)]
    rng.shuffle(order)
    routed: dict[int, set[str]] = {group: set() for group in range(3)}
    with start_gateway(tmp_path, sims.urls) as gateway:  # no --policy: cache_aware is the default
        # The policy sizes its per-worker cache estimate and batch limit from what workers report at registration.
        for worker in gateway.workers():
            assert worker["labels"]["max_total_num_tokens"].isdigit()
            assert worker["labels"]["max_running_requests"].isdigit()
        async with aiohttp.ClientSession() as session:
            for group, _ in order:
                prompt = systems[group] + " question " + sentence(rng, 20)
                body = {"text": prompt, "sampling_params": {"max_new_tokens": 2}}
                async with session.post(gateway.url + "/generate", json=body) as resp:
                    assert resp.status == 200
                    routed[group].add(resp.headers["x-smg-routed-worker-id"])
    assert all(len(workers) == 1 for workers in routed.values()), routed  # each group stays at its home
    logs = [sims.log(i) for i in range(len(sims.urls))]
    prompt_tokens = sum(log["prompt_tokens"] for log in logs)
    cached_tokens = sum(log["cached_tokens"] for log in logs)
    # Seven of every eight requests find their ~400-word system prompt cached (the oracle is about 0.83).
    assert cached_tokens / prompt_tokens > 0.65
