"""The simulator's PD bootstrap handshake on its own: a decode answers only once the prefill named in the request
published the same room, reports orphans, and lets unverifiable (null port) rooms through."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.processes import SimFleet, free_port, http_request, start_sim

TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def pd_pair(tmp_path_factory) -> tuple[SimFleet, SimFleet]:
    tmp = tmp_path_factory.mktemp("sim-pd")
    with (
        start_sim(tmp, 1, "--role", "prefill", "--bootstrap-port", "0") as prefill,
        start_sim(tmp, 1, "--role", "decode", "--bootstrap-timeout-secs", str(TIMEOUT_S)) as decode,
    ):
        yield prefill, decode


@pytest.fixture
def pair(pd_pair) -> tuple[SimFleet, SimFleet]:
    for fleet in pd_pair:
        fleet.reset()
    return pd_pair


def paired(prefill: SimFleet, room, port=None, **body) -> dict:
    items = len(room) if isinstance(room, list) else None
    port = prefill.bootstrap_ports[0] if port is None else port
    return {
        "bootstrap_host": "127.0.0.1" if items is None else ["127.0.0.1"] * items,
        "bootstrap_port": port if items is None else [port] * items,
        "bootstrap_room": room,
        **body,
    }


def test_decode_waits_for_the_prefill_to_publish_the_room(pair):
    prefill, decode = pair
    body = paired(prefill, 7, text="hello there", return_logprob=True, sampling_params={"max_new_tokens": 4})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http_request, "POST", decode.urls[0] + "/generate", body)
        decode.process.wait_for(lambda: decode.log(0)["counts"].get("/generate") == 1, 5, "decode request")
        status, first = http_request("POST", prefill.urls[0] + "/generate", body)
        assert status == 200
        status, answer = waiting.result()
    assert status == 200, answer
    # The prefill stops after the first token and reports the prompt's logprobs; the decode generates the rest.
    meta = first["meta_info"]
    assert meta["completion_tokens"] == 1 and len(meta["input_token_logprobs"]) == meta["prompt_tokens"] > 0
    assert answer["meta_info"]["completion_tokens"] == 4 and answer["meta_info"]["input_token_logprobs"] == []
    assert answer["output_ids"][0] == first["output_ids"][0]
    assert prefill.log(0)["published_rooms"] == 1
    assert decode.log(0)["verified_rooms"] == 1 and decode.log(0)["orphan_rooms"] == 0


def test_batch_needs_every_room_published(pair):
    prefill, decode = pair
    body = paired(prefill, [1, 2], prompt=["a b", "c d"], max_tokens=2)
    assert http_request("POST", prefill.urls[0] + "/v1/completions", body)[0] == 200
    status, answer = http_request("POST", decode.urls[0] + "/v1/completions", body)
    assert status == 200 and len(answer["choices"]) == 2
    status, answer = http_request("POST", decode.urls[0] + "/v1/completions", {**body, "bootstrap_room": [2, 3]})
    assert status == 500 and "[3]" in answer["error"]["message"]
    assert decode.log(0)["verified_rooms"] == 3 and decode.log(0)["orphan_rooms"] == 1


def test_unpublished_room_is_an_orphan_and_fails_after_the_timeout(pair):
    prefill, decode = pair
    started = time.monotonic()
    status, answer = http_request("POST", decode.urls[0] + "/generate", paired(prefill, 99, text="lonely"))
    assert status == 500 and time.monotonic() - started >= TIMEOUT_S
    message = answer["error"]["message"]
    assert "room(s) [99] not published" in message and f"127.0.0.1:{prefill.bootstrap_ports[0]}" in message
    dead_port = free_port()  # nobody listens there: the same, with the connection error named
    status, answer = http_request("POST", decode.urls[0] + "/generate", paired(prefill, 5, port=dead_port, text="x"))
    assert status == 500 and "last error" in answer["error"]["message"]
    assert decode.log(0)["orphan_rooms"] == 2


def test_null_port_is_unverified_and_missing_or_misshapen_fields_are_rejected(pair):
    prefill, decode = pair
    url = decode.urls[0] + "/generate"
    assert http_request("POST", url, {**paired(prefill, 3, text="x"), "bootstrap_port": None})[0] == 200
    assert decode.log(0)["unverified_rooms"] == 1
    status, answer = http_request("POST", url, {"text": "unpaired"})
    assert status == 400 and "bootstrap_room" in answer["error"]["message"]
    status, answer = http_request("POST", url, paired(prefill, 4, input_ids=[[1, 2], [3, 4]]))  # batch, one room
    assert status == 400 and "lists of 2 items" in answer["error"]["message"]
