"""Prefill-decode disaggregation across real processes: the gateway in PD mode and simulated prefill and decode
workers that check the bootstrap handshake (a decode only answers once its prefill published the same room)."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import SimFleet, http_request, start_sim, wait_until

MAX_ROOM = 2**63 - 1
# Quick retries, and health probes that never interfere with injected faults.
FAST = ("--retry-initial-backoff-ms", "1", "--retry-max-backoff-ms", "5", "--health-check-interval-secs", "60")


@pytest.fixture(scope="module")
def prefill_fleet(tmp_path_factory) -> SimFleet:
    args = ("--role", "prefill", "--bootstrap-port", "0", "--latency-model", "batch", "--decode-step-ms", "3")
    with start_sim(tmp_path_factory.mktemp("prefill"), 2, *args) as sims:
        yield sims


@pytest.fixture(scope="module")
def decode_fleet(tmp_path_factory) -> SimFleet:
    args = ("--role", "decode", "--bootstrap-timeout-secs", "10", "--latency-model", "batch", "--decode-step-ms", "3")
    with start_sim(tmp_path_factory.mktemp("decode"), 2, *args) as sims:
        yield sims


@pytest.fixture
def fleets(prefill_fleet: SimFleet, decode_fleet: SimFleet) -> tuple[SimFleet, SimFleet]:
    prefill_fleet.reset()
    decode_fleet.reset()
    return prefill_fleet, decode_fleet


def pd_args(prefills: SimFleet, decodes: SimFleet, prefill_ids=(0, 1), decode_ids=(0, 1)) -> list[str]:
    args = ["--pd-disaggregation"]
    for i in prefill_ids:
        args += ["--prefill", prefills.urls[i], str(prefills.bootstrap_ports[i])]
    for i in decode_ids:
        args += ["--decode", decodes.urls[i]]
    return args


def start_pd_gateway(tmp_path, prefills, decodes, *extra: str, prefill_ids=(0, 1), decode_ids=(0, 1)):
    args = pd_args(prefills, decodes, prefill_ids, decode_ids)
    return start_gateway(tmp_path, (), *args, *FAST, *extra, ready_workers=len(prefill_ids) + len(decode_ids))


@pytest.fixture(scope="module")
def gateway(prefill_fleet, decode_fleet, tmp_path_factory) -> GatewayProcess:
    """2 prefill + 2 decode workers, round robin for both roles."""
    with start_pd_gateway(
        tmp_path_factory.mktemp("pd-gw"), prefill_fleet, decode_fleet, "--policy", "round_robin"
    ) as gw:
        yield gw


def served(fleet: SimFleet, path: str) -> list[dict[str, Any]]:
    """The fleet's logged requests to `path` (per worker, oldest first), each with its worker index."""
    return [
        {**entry, "worker": i}
        for i in range(len(fleet.urls))
        for entry in fleet.log(i)["requests"]
        if entry["path"] == path
    ]


def room_counts(fleet: SimFleet) -> dict[str, int]:
    names = ("published_rooms", "verified_rooms", "unverified_rooms", "orphan_rooms")
    logs = [fleet.log(i) for i in range(len(fleet.urls))]
    return {name: sum(log[name] for log in logs) for name in names}


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None), CIMultiDict(resp.headers)


async def stream_frames(url: str, body: dict[str, Any]) -> tuple[CIMultiDict[str], list[tuple[float, Any]]]:
    """POST a stream request; the response headers and each `data:` frame (JSON, or the [DONE] text) with its
    arrival time."""
    frames: list[tuple[float, Any]] = []
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                raw = line[6:].strip()
                frames.append((time.monotonic(), raw.decode() if raw == b"[DONE]" else json.loads(raw)))
        return CIMultiDict(resp.headers), frames


def assert_paired(prefills: SimFleet, decodes: SimFleet, path: str, items: int | None) -> dict[str, Any]:
    """Exactly one request reached a prefill and one a decode, with the same body: the prefill named by the
    bootstrap fields, one room per item. Returns the body."""
    [decode_seen], [prefill_seen] = served(decodes, path), served(prefills, path)
    body = decode_seen["body"]
    assert prefill_seen["body"] == body
    hosts, ports, rooms = body["bootstrap_host"], body["bootstrap_port"], body["bootstrap_room"]
    if items is None:
        hosts, ports, rooms = [hosts], [ports], [rooms]
    else:
        assert len(hosts) == len(ports) == len(rooms) == items
    assert set(hosts) == {"127.0.0.1"}
    assert set(ports) == {prefills.bootstrap_ports[prefill_seen["worker"]]}
    assert all(isinstance(r, int) and 0 <= r <= MAX_ROOM for r in rooms) and len(set(rooms)) == len(rooms)
    assert room_counts(decodes) == {
        "published_rooms": 0, "verified_rooms": len(rooms), "unverified_rooms": 0, "orphan_rooms": 0
    }  # fmt: skip
    assert room_counts(prefills)["published_rooms"] == len(rooms)
    return body


def test_workers_are_listed_with_roles_and_counted(gateway, fleets):
    prefills, decodes = fleets
    status, listing = gateway.get("/workers")
    assert status == 200
    by_url = {w["url"]: w for w in listing["workers"]}
    for url, port in zip(prefills.urls, prefills.bootstrap_ports, strict=True):
        assert by_url[url]["worker_type"] == "prefill" and by_url[url]["bootstrap_port"] == port
    for url in decodes.urls:
        assert by_url[url]["worker_type"] == "decode" and "bootstrap_port" not in by_url[url]
    assert listing["stats"] == {"regular_count": 0, "prefill_count": 2, "decode_count": 2}


SINGLE_REQUESTS = {
    "/generate": {"text": "pair me up", "sampling_params": {"max_new_tokens": 5}},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "pair me"}], "max_tokens": 5},
    "/v1/completions": {"prompt": "pair me up", "max_tokens": 5},
}
BATCH_REQUESTS = {  # path: (body, items)
    "/v1/completions": ({"prompt": ["one two", "three four", "five six"], "max_tokens": 2}, 3),
    "/generate": ({"input_ids": [[11, 12, 13], [14, 15]], "sampling_params": {"max_new_tokens": 2}}, 2),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "twice"}], "n": 2, "max_tokens": 2}, 2),
}


def completion_tokens(answer: dict[str, Any]) -> int:
    return answer["meta_info"]["completion_tokens"] if "meta_info" in answer else answer["usage"]["completion_tokens"]


@pytest.mark.parametrize("path", list(SINGLE_REQUESTS))
async def test_single_request_sends_one_body_with_one_room_to_both_sides(gateway, fleets, path):
    prefills, decodes = fleets
    request_body = SINGLE_REQUESTS[path]
    status, answer, headers = await post(gateway.url + path, request_body)
    assert status == 200, answer
    body = assert_paired(prefills, decodes, path, None)
    assert {k: body[k] for k in request_body} == request_body
    # The client got the decode's answer: all 5 tokens (a prefill stops after the first) and the decode's id.
    assert completion_tokens(answer) == 5
    assert headers["x-smg-routed-worker-id"] == decodes.urls[served(decodes, path)[0]["worker"]]


@pytest.mark.parametrize("path", list(BATCH_REQUESTS))
async def test_batch_request_gets_one_room_per_item(gateway, fleets, path):
    """Completions with a prompt list, /generate with lists of input_ids, chat with n > 1."""
    prefills, decodes = fleets
    request_body, items = BATCH_REQUESTS[path]
    status, answer, _ = await post(gateway.url + path, request_body)
    assert status == 200, answer
    assert len(answer if isinstance(answer, list) else answer["choices"]) == items
    assert_paired(prefills, decodes, path, items)


def test_null_bootstrap_port_is_sent_as_null_and_decode_proceeds_unverified(tmp_path, fleets):
    prefills, decodes = fleets
    args = ("--pd-disaggregation", "--prefill", prefills.urls[0], "none", "--decode", decodes.urls[0], *FAST)
    with start_gateway(tmp_path, (), *args, ready_workers=2) as gw:
        [prefill] = [w for w in gw.workers() if w["worker_type"] == "prefill"]
        assert prefill["bootstrap_port"] is None
        status, answer = gw.post("/generate", {"text": "no port", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200, answer
    [decode_seen], [prefill_seen] = served(decodes, "/generate"), served(prefills, "/generate")
    assert decode_seen["body"] == prefill_seen["body"]
    assert "bootstrap_port" in decode_seen["body"] and decode_seen["body"]["bootstrap_port"] is None
    assert room_counts(decodes)["unverified_rooms"] == 1 and room_counts(decodes)["verified_rooms"] == 0


async def test_prefill_input_logprobs_are_merged_in_front_non_stream(gateway, fleets):
    prefills, _ = fleets
    single = {"text": "alpha beta gamma delta", "return_logprob": True, "sampling_params": {"max_new_tokens": 3}}
    batch = {"input_ids": [[5, 6, 7], [8, 9, 10, 11]], "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
    # What a prefill worker reports on its own (the decode reports no input logprobs: it computed no prompt).
    expected_single = http_request("POST", prefills.urls[0] + "/generate", single)[1]["meta_info"]
    expected_batch = [item["meta_info"] for item in http_request("POST", prefills.urls[0] + "/generate", batch)[1]]
    assert expected_single["input_token_logprobs"]

    status, answer, _ = await post(gateway.url + "/generate", single)
    assert status == 200, answer
    assert answer["meta_info"]["input_token_logprobs"] == expected_single["input_token_logprobs"]
    assert len(answer["meta_info"]["output_token_logprobs"]) == 3  # the decode's own

    status, answer, _ = await post(gateway.url + "/generate", batch)
    assert status == 200, answer
    assert [a["meta_info"]["input_token_logprobs"] for a in answer] == [
        e["input_token_logprobs"] for e in expected_batch
    ]


async def test_prefill_input_logprobs_are_merged_into_every_stream_frame(gateway, fleets):
    prefills, _ = fleets
    single = {
        "text": "stream with logprobs",
        "return_logprob": True,
        "stream": True,
        "sampling_params": {"max_new_tokens": 4},
    }
    batch = {
        "input_ids": [[5, 6, 7], [8, 9, 10, 11]],
        "return_logprob": True,
        "stream": True,
        "sampling_params": {"max_new_tokens": 3},
    }
    plain = {k: v for k, v in single.items() if k != "stream"}
    expected = http_request("POST", prefills.urls[0] + "/generate", plain)[1]["meta_info"]["input_token_logprobs"]

    _, frames = await stream_frames(gateway.url + "/generate", single)
    data = [f for _, f in frames if isinstance(f, dict)]
    assert len(data) >= 2 and frames[-1][1] == "[DONE]"
    assert all(f["meta_info"]["input_token_logprobs"] == expected for f in data)

    _, frames = await stream_frames(gateway.url + "/generate", batch)
    by_index = {f["index"]: f["meta_info"]["input_token_logprobs"] for _, f in frames if isinstance(f, dict)}
    assert [[tok for _, tok, _ in by_index[i]] for i in (0, 1)] == batch["input_ids"]


async def test_input_logprobs_of_a_prefill_that_answers_a_stream_with_one_json_body_are_merged(gateway, fleets):
    prefills, _ = fleets
    for i in (0, 1):
        prefills.ctl(i, stream_as_json=True)  # streamed /generate answered with one JSON body
    body = {"text": "json prefill", "return_logprob": True, "stream": True, "sampling_params": {"max_new_tokens": 3}}
    plain = {k: v for k, v in body.items() if k != "stream"}
    expected = http_request("POST", prefills.urls[0] + "/generate", plain)[1]["meta_info"]["input_token_logprobs"]
    assert expected

    _, frames = await stream_frames(gateway.url + "/generate", body)
    data = [f for _, f in frames if isinstance(f, dict)]
    assert len(data) >= 2 and frames[-1][1] == "[DONE]"
    assert all(f["meta_info"]["input_token_logprobs"] == expected for f in data)


async def test_stream_is_the_decode_workers_relayed_as_it_arrives(gateway, fleets):
    prefills, decodes = fleets
    body = {"text": "stream from decode", "stream": True, "sampling_params": {"max_new_tokens": 20}}
    headers, frames = await stream_frames(gateway.url + "/generate", body)
    assert headers["content-type"].startswith("text/event-stream")
    [decode_seen] = served(decodes, "/generate")
    assert headers["x-smg-routed-worker-id"] == decodes.urls[decode_seen["worker"]]
    data = [f for _, f in frames if isinstance(f, dict)]
    assert data[-1]["meta_info"]["completion_tokens"] == 20  # the prefill's stream ends after one token
    assert len(data) >= 10  # token frames, not one buffered blob
    assert frames[-1][0] - frames[0][0] > 0.03  # 20 decode steps of >= 3 ms
    assert_paired(prefills, decodes, "/generate", None)


async def test_decode_stream_cut_midway_ends_with_one_error_event_and_no_retry(gateway, fleets):
    _, decodes = fleets
    for i in (0, 1):
        decodes.ctl(i, disconnect_after_chunks=3)
    body = {"text": "cut me off", "stream": True, "sampling_params": {"max_new_tokens": 20}}
    _, frames = await stream_frames(gateway.url + "/generate", body)
    data = [f for _, f in frames if isinstance(f, dict)]
    assert len(data) == 4 and "meta_info" in data[2]
    assert data[3]["error"]["code"] == "decode_stream_interrupted"
    assert len(served(decodes, "/generate")) == 1  # bytes went out: nothing to retry
    decodes.reset()
    status, answer, _ = await post(gateway.url + "/generate", {"text": "still fine"})
    assert status == 200, answer


def attempts(gateway: GatewayProcess) -> dict[str, int]:
    """Attempts the gateway made per worker URL (each attempt of a pair counts on both of its workers)."""
    return {w["url"]: w["requests_total"] for w in gateway.workers()}


def circuits(gateway: GatewayProcess) -> set[tuple[str, str]]:
    return {(w["worker_type"], w["circuit_state"]) for w in gateway.workers()}


def fail_until_open(gateway: GatewayProcess, role: str, body: dict[str, Any]) -> None:
    """Send failing requests until every `role` breaker opened (each such request fails on each worker)."""
    for _ in range(3):
        if (role, "closed") not in circuits(gateway):
            return
        gateway.post("/generate", body)


def wait_aborted(decodes: SimFleet) -> list[dict[str, Any]]:
    """Wait until every decode request either succeeded or was aborted by the gateway (none left waiting)."""
    seen: list[dict[str, Any]] = []

    def settled() -> bool:
        nonlocal seen
        seen = served(decodes, "/generate")
        return all(e["status"] == 200 or e["disconnected"] for e in seen)

    decodes.process.wait_for(settled, 5, "decode requests answered or aborted")
    return seen


def test_decode_failure_retries_the_pair_and_counts_against_the_decode(tmp_path, fleets):
    prefills, decodes = fleets
    args = ("--decode-policy", "round_robin", "--retry-max-retries", "3", "--cb-failure-threshold", "3")
    with start_pd_gateway(tmp_path, prefills, decodes, *args, prefill_ids=(0,)) as gw:
        decodes.ctl(0, error_status=503)
        body = {"text": "retry me", "sampling_params": {"max_new_tokens": 2}}
        for _ in range(2):  # round robin starts on either decode: at least one request meets the failing one
            status, answer = gw.post("/generate", body)
            assert status == 200, answer
        failed = decodes.log(0)["counts"]["/generate"]
        assert failed >= 1 and decodes.log(1)["counts"]["/generate"] == 2  # each failure retried on decode 1
        assert prefills.log(0)["counts"]["/generate"] == 2 + failed  # the pair is retried whole
        assert attempts(gw) == {prefills.urls[0]: 2 + failed, decodes.urls[0]: failed, decodes.urls[1]: 2}

        decodes.ctl(1, error_status=503)
        status, answer = gw.post("/generate", body)
        assert status == 503, answer
        error = answer["error"]
        assert error["code"] == "decode_unavailable" and error["type"] == "server_error"
        assert "decode worker http://127.0.0.1:" in error["message"] and "Injected fault" in error["message"]
        tries = attempts(gw)
        assert tries[decodes.urls[0]] + tries[decodes.urls[1]] == 2 + failed + 3  # --retry-max-retries 3
        assert tries[prefills.urls[0]] == 2 + failed + 3

        fail_until_open(gw, "decode", body)
        assert circuits(gw) == {("prefill", "closed"), ("decode", "open")}
    assert room_counts(decodes)["orphan_rooms"] == 0


def test_prefill_failure_aborts_the_decode_and_counts_against_the_prefill(tmp_path, fleets):
    prefills, decodes = fleets
    args = ("--prefill-policy", "round_robin", "--retry-max-retries", "3", "--cb-failure-threshold", "3")
    with start_pd_gateway(tmp_path, prefills, decodes, *args, decode_ids=(0,)) as gw:
        # The delay lets each decode request arrive (and wait for its room) before its prefill fails.
        prefills.ctl(0, error_status=500, latency_ms=50)
        body = {"text": "prefill fails", "sampling_params": {"max_new_tokens": 2}}
        for _ in range(2):
            status, answer = gw.post("/generate", body)
            assert status == 200, answer
        failed = prefills.log(0)["counts"]["/generate"]
        assert failed >= 1 and prefills.log(1)["counts"]["/generate"] == 2
        assert attempts(gw)[decodes.urls[0]] == 2 + failed

        prefills.ctl(1, error_status=500, latency_ms=50)
        status, answer = gw.post("/generate", body)
        assert status == 500, answer
        error = answer["error"]
        assert error["code"] == "prefill_internal_error" and error["type"] == "server_error"
        assert "prefill worker http://127.0.0.1:" in error["message"] and "Injected fault" in error["message"]
        assert sum(prefills.log(i)["counts"]["/generate"] for i in (0, 1)) == 2 + failed + 3
        assert attempts(gw)[decodes.urls[0]] == 2 + failed + 3

        # Every decode paired with a failed prefill was aborted by the gateway: none is left waiting for a room.
        seen = wait_aborted(decodes)
        assert sum(e["status"] == 200 for e in seen) == 2
        assert sum(e["disconnected"] for e in seen) >= 1 + 3 - 1  # the 50 ms head start is seldom not enough

        fail_until_open(gw, "prefill", body)
        assert circuits(gw) == {("prefill", "open"), ("decode", "closed")}
    assert room_counts(decodes)["orphan_rooms"] == 0


def test_unreachable_side_is_named_and_the_pair_retried(tmp_path, fleets):
    prefills, decodes = fleets
    args = ("--retry-max-retries", "2")
    with start_pd_gateway(tmp_path, prefills, decodes, *args, prefill_ids=(0,), decode_ids=(0,)) as gw:
        body = {"text": "anyone there", "sampling_params": {"max_new_tokens": 2}}
        decodes.ctl(0, refuse=True)
        status, answer = gw.post("/generate", body)
        assert status == 502, answer
        assert answer["error"]["code"] == "decode_unreachable"
        assert f"decode worker {decodes.urls[0]} is unreachable" in answer["error"]["message"]
        assert attempts(gw) == {prefills.urls[0]: 2, decodes.urls[0]: 2}
        decodes.ctl(0, reset=True)  # sent through its sibling while worker 0 refuses connections

        prefills.ctl(0, refuse=True)
        status, answer = gw.post("/generate", body)
        assert status == 502, answer
        assert answer["error"]["code"] == "prefill_unreachable"
        assert f"prefill worker {prefills.urls[0]} is unreachable" in answer["error"]["message"]
        assert attempts(gw) == {prefills.urls[0]: 4, decodes.urls[0]: 4}
        prefills.ctl(0, reset=True)
        assert not [e for e in wait_aborted(decodes) if e["status"] == 200]
    assert room_counts(decodes)["orphan_rooms"] == 0


def routing_sequence(fleet: SimFleet, count: int) -> list[int]:
    """Which worker served each of the requests tagged rid 0..count-1."""
    by_rid = {e["body"]["rid"]: e["worker"] for e in served(fleet, "/generate")}
    return [by_rid[f"r{i}"] for i in range(count)]


@pytest.mark.parametrize(
    ("policies", "prefill_sticks", "decode_sticks"),
    [
        (("--policy", "round_robin"), False, False),
        (("--policy", "round_robin", "--prefill-policy", "cache_aware"), True, False),
        (("--policy", "round_robin", "--decode-policy", "cache_aware"), False, True),
        (("--policy", "round_robin", "--prefill-policy", "cache_aware", "--decode-policy", "cache_aware"), True, True),
    ],
    ids=["policy-only", "policy+prefill", "policy+decode", "all-three"],
)
def test_policy_inheritance_follows_the_four_readme_rules(tmp_path, fleets, policies, prefill_sticks, decode_sticks):
    """The same prompt again and again: cache_aware keeps it on one worker, round_robin alternates."""
    prefills, decodes = fleets
    with start_pd_gateway(tmp_path, prefills, decodes, *policies) as gw:
        for i in range(6):
            status, answer = gw.post("/generate", {"text": "same prompt", "rid": f"r{i}"})
            assert status == 200, answer
        status, explained = gw.post("/explain/generate", {"text": "same prompt"})  # each side's policy, why
        assert status == 200, explained
    for fleet, sticks, side in ((prefills, prefill_sticks, "prefill"), (decodes, decode_sticks, "decode")):
        sequence = routing_sequence(fleet, 6)
        if sticks:
            assert len(set(sequence)) == 1, sequence
            assert explained[side]["policy"] == "cache_aware"
            assert explained[side]["worker"] == fleet.urls[sequence[0]]
        else:
            assert all(a != b for a, b in itertools.pairwise(sequence)), sequence
            assert explained[side]["policy"] == "round_robin" and explained[side]["worker"] is None


def test_workers_added_at_run_time_and_readiness_needs_both_roles(tmp_path, fleets):
    prefills, decodes = fleets
    args = ("--pd-disaggregation", "--decode", decodes.urls[0], *FAST)
    with start_gateway(tmp_path, (), *args, ready_workers=1) as gw:
        status, ready = gw.get("/readiness")
        assert status == 503 and ready["status"] == "not ready"
        assert gw.get("/health_generate")[0] == 503
        status, answer = gw.post("/generate", {"text": "too early"})
        assert status == 503 and "prefill" in answer["error"]["message"]

        spec = {"url": prefills.urls[1], "worker_type": "prefill", "bootstrap_port": prefills.bootstrap_ports[1]}
        assert gw.post("/workers", spec)[0] == 202
        assert gw.post("/workers", {"url": decodes.urls[1], "worker_type": "decode"})[0] == 202
        workers = gw.wait_ready_workers(3)
        [prefill] = [w for w in workers if w["worker_type"] == "prefill"]
        assert prefill["url"] == prefills.urls[1] and prefill["bootstrap_port"] == prefills.bootstrap_ports[1]
        assert gw.get("/workers")[1]["stats"] == {"regular_count": 0, "prefill_count": 1, "decode_count": 2}

        assert gw.get("/readiness")[0] == 200
        assert gw.get("/health_generate")[0] == 200
        status, answer = gw.post("/generate", {"text": "now paired", "sampling_params": {"max_new_tokens": 2}})
        assert status == 200, answer
        assert_paired(prefills, decodes, "/generate", None)

        prefills.ctl(1, health_status=503)  # the prefill's /health_generate fails: so does the gateway's
        assert gw.get("/health_generate")[0] == 503


@pytest.mark.parametrize("prefill_policy", ["cache_aware", "power_of_two"])
def test_load_counts_on_both_workers_from_dispatch(tmp_path, fleets, prefill_policy):
    """Long prompts with one output token: the prefill does the work, and still every prefill gets its share."""
    prefills, decodes = fleets
    args = ("--prefill-policy", prefill_policy, "--decode-policy", "round_robin")
    with start_pd_gateway(tmp_path, prefills, decodes, *args) as gw:
        for i in (0, 1):
            prefills.ctl(i, hang=True)  # prefills busy with the long prompts; decodes wait for their rooms
        prompts = [f"request {i}: " + " ".join(f"w{i}x{j}" for j in range(400)) for i in range(6)]
        requests = [{"text": p, "sampling_params": {"max_new_tokens": 1}} for p in prompts]
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(http_request, "POST", gw.url + "/generate", r, None, 30) for r in requests]
            loads: dict[str, list[int]] = {}

            def all_in_flight() -> bool:
                loads.clear()
                for w in gw.workers():
                    loads.setdefault(w["worker_type"], []).append(w["load"])
                return sum(loads["prefill"]) == 6 and sum(loads["decode"]) == 6

            gw.process.wait_for(all_in_flight, 10, "6 requests in flight on both roles")
            # Each prefill gets its share; cache_aware lets a prompt's home run a request or so ahead (routing.md).
            assert min(loads["prefill"]) >= 2 and loads["decode"] == [3, 3], loads
            split = sorted(loads["prefill"])
            pending = sum(w["prefill_pending_chars"] for w in gw.workers() if w["worker_type"] == "prefill")
            # cache_aware charges each prefill the prompts it is prefilling (no cache yet: all of them)
            assert pending == (sum(len(p) for p in prompts) if prefill_policy == "cache_aware" else 0)
            for i in (0, 1):
                prefills.ctl(i, hang=False)
            assert [f.result()[0] for f in futures] == [200] * 6
        gw.wait_workers(
            lambda ws: all(w["load"] == 0 and w["prefill_pending_chars"] == 0 for w in ws), "nothing left in flight"
        )
    assert sorted(prefills.log(i)["counts"]["/generate"] for i in (0, 1)) == split
    assert room_counts(decodes)["verified_rooms"] == 6 and room_counts(decodes)["orphan_rooms"] == 0


async def test_pd_traffic_is_counted_per_worker_and_streams_record_ttft(tmp_path, fleets):
    prefills, decodes = fleets
    with start_pd_gateway(tmp_path, prefills, decodes, "--policy", "round_robin") as gw:
        for _ in range(4):
            status, _, _ = await post(
                gw.url + "/generate", {"text": "count me", "sampling_params": {"max_new_tokens": 2}}
            )
            assert status == 200
        await stream_frames(
            gw.url + "/generate", {"text": "stream", "stream": True, "sampling_params": {"max_new_tokens": 4}}
        )

        def per_worker(fleet: SimFleet) -> list[float]:
            exposition = gw.metrics()
            return [exposition.total("smg_worker_requests_total", worker=url) for url in fleet.urls]

        # the stream's attempt is recorded just after its last byte went out: poll for it
        wait_until(lambda: sum(per_worker(decodes)) == 5, 5, "the stream's attempt to be counted")
        for fleet in (prefills, decodes):
            assert sum(per_worker(fleet)) == 5 and all(n >= 2 for n in per_worker(fleet)), per_worker(fleet)
        assert gw.metrics().total("smg_router_ttft_seconds_count") == 1


def test_dp_aware_pd_addresses_each_sides_rank_in_its_own_body(tmp_path):
    prefill_args = ("--role", "prefill", "--bootstrap-port", "0", "--dp-size", "2", "--api-key", "k")
    decode_args = ("--role", "decode", "--bootstrap-timeout-secs", "10", "--dp-size", "2", "--api-key", "k")
    with start_sim(tmp_path / "p", 1, *prefill_args) as prefills, start_sim(tmp_path / "d", 1, *decode_args) as decodes:
        args = ("--pd-disaggregation", "--prefill", prefills.urls[0], str(prefills.bootstrap_ports[0]),
                "--decode", decodes.urls[0], "--dp-aware", "--policy", "round_robin", *FAST)  # fmt: skip
        with start_gateway(tmp_path, (), *args, ready_workers=4, api_key="k") as gw:
            for _ in range(4):
                status, body = gw.post("/generate", {"text": "rank"}, headers={"Authorization": "Bearer k"})
                assert status == 200, body
        prefill_ranks = [r["body"]["data_parallel_rank"] for r in served(prefills, "/generate")]
        decode_ranks = [r["body"]["data_parallel_rank"] for r in served(decodes, "/generate")]
        assert sorted(prefill_ranks) == [0, 0, 1, 1] and sorted(decode_ranks) == [0, 0, 1, 1]
        assert room_counts(decodes)["orphan_rooms"] == 0
