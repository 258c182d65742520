"""cache_aware over gRPC workers that publish KV events (`shepherd sim --grpc --kv-events`): the gateway subscribes
to every engine's `SubscribeKvEvents` and routes on what the engines report they hold, including what other
gateways put there."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.support.gateway import start_gateway
from tests.support.processes import start_sim

SUBSCRIBE = "/sglang.grpc.scheduler.SglangScheduler/SubscribeKvEvents"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    sims = start_sim(tmp_path_factory.mktemp("kv-event-sims"), 3, "--grpc", "--kv-events")
    yield sims
    sims.stop()


def routed_to(gw, prompt: str) -> tuple[str, dict]:
    """The worker a completion went to, and its answer."""
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    request = urllib.request.Request(gw.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.headers["x-smg-routed-worker-id"], json.loads(resp.read())


def subscriptions(fleet) -> int:
    return sum(e["path"] == SUBSCRIBE for i in range(len(fleet.urls)) for e in fleet.log(i)["requests"])


def test_a_prefix_another_gateway_placed_is_found_through_the_engines_events(tmp_path, fleet):
    prompts = [f"shared document {i}: " + " ".join(f"term{i}x{j}" for j in range(300)) for i in range(3)]
    with (
        start_gateway(tmp_path / "other", fleet.urls, "--policy", "round_robin") as other,
        start_gateway(tmp_path / "this", fleet.urls) as gw,  # cache_aware, the default
    ):
        for g in (other, gw):
            g.process.wait_for(lambda g=g: g.get("/v1/models")[0] == 200, 20, "the tokenizer")
        gw.process.wait_for(lambda: subscriptions(fleet) == 3, 15, "a KV event stream from every worker")
        gw.wait_workers(lambda ws: [w["kv_events"] for w in ws] == ["live"] * 3, "live KV event streams")
        assert [w["kv_events"] for w in other.workers()] == [None] * 3  # round_robin reads no events
        placed = {prompt: routed_to(other, prompt)[0] for prompt in prompts}  # round robin: one per worker
        assert len(set(placed.values())) == 3
        for prompt in prompts:
            request = {"prompt": prompt + " and a question", "max_tokens": 1}
            gw.process.wait_for(
                lambda request=request: gw.post("/explain/v1/completions", request)[1]["regular"]["engine_events"],
                15,
                "the engines' events to reach the gateway",
            )
            status, explained = gw.post("/explain/v1/completions", request)
            assert status == 200 and explained["regular"]["worker"] == placed[prompt]
            assert explained["regular"]["known_chars"] > 0  # this gateway never sent the prompt: the engine said so
            worker, body = routed_to(gw, request["prompt"])
            assert worker == placed[prompt]
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
