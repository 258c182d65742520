"""cache_aware through the real gateway and simulated workers: prefix affinity turns into engine cache hits."""

from __future__ import annotations

import asyncio
import contextlib
import random
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import SimFleet, http_request


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


async def test_a_workers_pending_prefill_shows_while_it_prefills_and_is_released_however_requests_end(
    sims: SimFleet, tmp_path
):
    rng = random.Random(5)
    prompt = sentence(rng, 300)
    with start_gateway(tmp_path, sims.urls, "--retry-max-retries", "1") as gateway:
        async with aiohttp.ClientSession() as session:
            for i in range(len(sims.urls)):
                sims.ctl(i, hang=True)
            body = {"text": prompt, "sampling_params": {"max_new_tokens": 2}}
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(http_request, "POST", gateway.url + "/generate", body, None, 30)
                # Charged the whole prompt (nothing cached yet) until its first token comes back.
                workers = gateway.wait_workers(lambda ws: sum(w["load"] for w in ws) == 1, "the request in flight")
                pending = sorted(w["prefill_pending_chars"] for w in workers)
                assert pending == [0] * (len(workers) - 1) + [len(prompt)]
                for i in range(len(sims.urls)):
                    sims.ctl(i, hang=False)
                assert held.result()[0] == 200
            # Streamed, plain, cut by the worker, failing with a 500 on the first worker, abandoned by the client.
            sims.ctl(0, error_status=500)
            sims.ctl(1, disconnect_after_chunks=1)
            for n in range(12):
                text = prompt + " " + sentence(rng, 40)
                stream = n % 2 == 0
                body = {"text": text, "stream": stream, "sampling_params": {"max_new_tokens": 4}}
                async with session.post(gateway.url + "/generate", json=body) as resp:
                    if n % 3 == 0:
                        continue  # the client leaves without reading
                    await resp.read()
            # A client that gives up on a worker that has not answered at all: the gateway drops the request.
            sims.ctl(0, reset=True)
            sims.ctl(1, reset=True)
            for i in range(len(sims.urls)):
                sims.ctl(i, hang=True)
            body = {"text": prompt + " gone", "sampling_params": {"max_new_tokens": 2}}
            with contextlib.suppress(TimeoutError):
                async with session.post(gateway.url + "/generate", json=body, timeout=aiohttp.ClientTimeout(0.5)):
                    pass
        gateway.wait_workers(
            lambda ws: all(w["load"] == 0 and w["prefill_pending_chars"] == 0 for w in ws), "nothing left pending"
        )


async def test_the_engines_load_is_polled_and_tells_the_gateway_its_share_of_their_requests(sims: SimFleet, tmp_path):
    # The engines count every client's requests (/get_load), the gateway its own (`load`): a request sent to a
    # worker behind the gateway's back shows in the first only. (Long answers keep both in the engines until the
    # clients hang up.)
    body = {"text": "through the gateway", "sampling_params": {"max_new_tokens": 4000}}
    direct = {"text": "around the gateway", "sampling_params": {"max_new_tokens": 4000}}
    with start_gateway(tmp_path, sims.urls, "--load-monitor-interval", "0.1") as gateway:
        async with aiohttp.ClientSession() as session:
            calls = [
                asyncio.ensure_future(session.post(gateway.url + "/generate", json=body)),
                asyncio.ensure_future(session.post(sims.urls[0] + "/generate", json=direct)),
            ]
            workers = await asyncio.to_thread(
                gateway.wait_workers,
                lambda ws: sum(w["engine_requests"] or 0 for w in ws) == 2,
                "both requests in the engines' load",
            )
            assert sum(w["load"] for w in workers) == 1
            assert next(w for w in workers if w["url"] == sims.urls[0])["engine_requests"] >= 1
            # The same polls, as SMG's gauges: every worker's rank 0, its running and waiting requests, KV usage.
            exposition = await asyncio.to_thread(gateway.metrics)
            running = exposition.series("smg_engine_running_requests")
            assert {(s["worker"], s["dp_rank"]) for s in running} == {(url, "0") for url in sims.urls}
            in_engines = exposition.total("smg_engine_running_requests") + exposition.total(
                "smg_engine_waiting_requests"
            )
            assert in_engines == 2
            usage = [s.value for s in exposition.samples if s.name == "smg_engine_token_usage"]
            assert len(usage) == len(sims.urls) and all(0 <= u <= 1 for u in usage) and max(usage) > 0
            assert all(exposition.value("smg_engine_load_polls_total", worker=u, mode="poll") >= 1 for u in sims.urls)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.to_thread(
            gateway.wait_workers, lambda ws: all(w["engine_requests"] == 0 for w in ws), "the engines idle again"
        )


async def test_explain_shows_the_decision_a_request_would_get_and_sends_nothing(sims: SimFleet, tmp_path):
    rng = random.Random(6)
    system = sentence(rng, 300)
    with start_gateway(tmp_path, sims.urls) as gateway:
        first = {"text": system + " first " + sentence(rng, 20), "sampling_params": {"max_new_tokens": 2}}
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway.url + "/generate", json=first) as resp:
                assert resp.status == 200
                holder = resp.headers["x-smg-routed-worker-id"]
            served = [sims.log(i)["counts"].get("/generate", 0) for i in range(len(sims.urls))]
            second = {"text": system + " second " + sentence(rng, 20), "sampling_params": {"max_new_tokens": 2}}
            for _ in range(3):
                async with session.post(gateway.url + "/explain/generate", json=second) as resp:
                    assert resp.status == 200
                    explained = await resp.json()
            # Nothing reached a worker, nothing is charged to one.
            assert [sims.log(i)["counts"].get("/generate", 0) for i in range(len(sims.urls))] == served
            assert all(w["load"] == 0 and w["prefill_pending_chars"] == 0 for w in gateway.workers())
            decision = explained["regular"]
            assert explained["endpoint"] == "/generate" and decision["policy"] == "cache_aware"
            assert decision["worker"] == holder and decision["prompt_chars"] == len(second["text"])
            rows = {row["worker"]: row for row in decision["candidates"]}
            assert rows[holder]["matched_chars"] >= len(system) * 7 // 8  # the system prompt, to the index's cuts
            assert rows[holder]["cost"] == min(row["cost"] for row in rows.values() if row["excluded"] is None)
            # The request itself then goes where the explanation said.
            async with session.post(gateway.url + "/generate", json=second) as resp:
                assert resp.headers["x-smg-routed-worker-id"] == holder
            # Bad input: the same errors as the inference route, in the same shape.
            async with session.post(gateway.url + "/explain/v1/chat/completions", data=b"{not json") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["code"] == "invalid_json"
            async with session.post(gateway.url + "/explain/v1/chat/completions", json={"model": "m"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["param"] == "messages"
