"""cache_aware over workers that publish KV events: gRPC engines (`shepherd sim --grpc --kv-events`), whose
`SubscribeKvEvents` the gateway subscribes to, and HTTP engines publishing over ZeroMQ (`--kv-events-config`), whose
endpoints the gateway reads in their server info. Either way it routes on what the engines report they hold,
including what other gateways put there."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.support.gateway import start_gateway
from tests.support.processes import start_sim

SUBSCRIBE = "/sglang.grpc.scheduler.SglangScheduler/SubscribeKvEvents"
MODES = {
    "grpc": ("--grpc", "--kv-events"),
    "http-zmq": ("--kv-events-config", '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}'),
}


@pytest.fixture(scope="module", params=list(MODES))
def fleet(request, tmp_path_factory):
    sims = start_sim(tmp_path_factory.mktemp("kv-event-sims"), 3, *MODES[request.param])
    sims.mode = request.param
    yield sims
    sims.stop()


def tokenizer_loaded(gw) -> bool:
    """gRPC workers: a model is listed once its tokenizer is; HTTP workers: the tokenizer registry says so."""
    if gw.get("/v1/models", headers=gw._auth)[0] != 200:
        return False
    return bool(gw.get("/v1/tokenizers", headers=gw._auth)[1]["tokenizers"])


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
        other.process.wait_for(lambda: other.get("/v1/models")[0] == 200, 20, "the workers")
        gw.process.wait_for(lambda: tokenizer_loaded(gw), 20, "the tokenizer")
        if fleet.mode == "grpc":  # a stream starts with the engine's snapshot: live before any traffic
            gw.process.wait_for(lambda: subscriptions(fleet) == 3, 15, "a KV event stream from every worker")
            gw.wait_workers(lambda ws: [w["kv_events"] for w in ws] == ["live"] * 3, "live KV event streams")
        else:  # a ZeroMQ subscription hears nothing until it is connected: live from the first batch it hears
            warmups = iter(range(1000))
            gw.wait_workers(
                lambda ws: (
                    routed_to(other, f"warm-up {next(warmups)}: " + "lorem ipsum " * 40)
                    and {w["kv_events"] for w in ws} == {"live"}
                ),
                "live KV event subscriptions",
            )
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


@pytest.fixture
def pd_fleets(tmp_path_factory):
    prefills = start_sim(tmp_path_factory.mktemp("pd-prefill"), 2, "--role", "prefill", "--bootstrap-port", "0",
                         *MODES["http-zmq"])  # fmt: skip
    decodes = start_sim(tmp_path_factory.mktemp("pd-decode"), 1, "--role", "decode")
    yield prefills, decodes
    prefills.stop()
    decodes.stop()


def test_pd_routing_matches_the_prefill_engines_events(tmp_path, pd_fleets):
    prefills, decodes = pd_fleets
    args = ["--pd-disaggregation", "--decode", decodes.urls[0]]
    for url, port in zip(prefills.urls, prefills.bootstrap_ports, strict=True):
        args += ["--prefill", url, str(port)]
    with start_gateway(tmp_path, (), *args, ready_workers=3) as gw:
        gw.process.wait_for(lambda: tokenizer_loaded(gw), 20, "the tokenizer")
        warmups = iter(range(1000))
        gw.wait_workers(
            lambda ws: (
                routed_to(gw, f"warm-up {next(warmups)}: " + "lorem ipsum " * 40)
                and [w["kv_events"] for w in ws if w["worker_type"] == "prefill"] == ["live"] * 2
            ),
            "live KV event subscriptions on both prefill workers",
        )
        document = "a shared document: " + " ".join(f"word{j}" for j in range(300))
        routed_to(gw, document)
        request = {"prompt": document + " and a question", "max_tokens": 1}
        gw.process.wait_for(
            lambda: gw.post("/explain/v1/completions", request)[1]["prefill"]["known_chars"] > 0,
            15,
            "the prefill engine's events to reach the gateway",
        )
        explained = gw.post("/explain/v1/completions", request)[1]["prefill"]
        assert explained["engine_events"] is True  # matched by the token ids the prefill engines reported


def test_each_dp_rank_publishes_on_its_own_port_and_is_followed_as_its_own_worker(tmp_path):
    key = "dp-secret"
    with (
        start_sim(tmp_path / "sims", 1, "--dp-size", "2", "--api-key", key, *MODES["http-zmq"]) as sims,
        start_gateway(tmp_path / "gw", sims.urls, "--dp-aware", api_key=key, ready_workers=2) as gw,
    ):
        gw.process.wait_for(lambda: tokenizer_loaded(gw), 20, "the tokenizer")
        base = sims.urls[0]

        def direct(prompt: str, rank: int) -> None:
            """Straight to the engine's rank, past the gateway: only the engine's events can tell it."""
            body = json.dumps({"prompt": prompt, "max_tokens": 1, "data_parallel_rank": rank}).encode()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", body, headers), timeout=10).read()

        warmups = iter(range(1000))

        def warm(workers) -> bool:
            i = next(warmups)
            direct(f"warm-up {i}: " + "lorem ipsum " * 40, i % 2)
            return [w["kv_events"] for w in workers] == ["live"] * 2

        gw.wait_workers(warm, "both ranks' KV event subscriptions live")
        document = "a document only rank 1 has seen: " + " ".join(f"token{j}" for j in range(300))
        direct(document, 1)
        request = {"prompt": document + " and a question", "max_tokens": 1}
        gw.process.wait_for(
            lambda: gw.post("/explain/v1/completions", request, headers=gw._auth)[1]["regular"]["known_chars"] > 0,
            15,
            "rank 1's events to reach the gateway",
        )
        explained = gw.post("/explain/v1/completions", request, headers=gw._auth)[1]["regular"]
        assert explained["engine_events"] is True and explained["worker"] == f"{base}@1"
