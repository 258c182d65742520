"""The gateway in front of real `shepherd sim --grpc` processes: SGLang's gRPC mode end to end.

The simulated workers serve `SglangScheduler` from the published stubs with a byte-level BPE trained at start-up,
and report no tokenizer path, so the gateway's tokenizer for `sim-model` comes from `GetTokenizer`.
"""

from __future__ import annotations

import json
import socket
import time

import openai
import orjson
import pytest

from shepherd.config import GatewayConfig
from shepherd.exchange import Response
from shepherd.http.admission import Admission
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.context import COMPLETIONS, RequestContext
from shepherd.routing.grpc_dispatch import GrpcDispatcher
from shepherd.routing.policies.cache_aware import CacheAwarePolicy
from shepherd.sim.bpe import build
from shepherd.tokenizer.loader import load_tokenizer
from shepherd.upstream.grpc_pool import GrpcClients
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker
from tests.support.gateway import start_gateway
from tests.support.processes import http_request, start_sim
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir

GENERATE = "/sglang.grpc.scheduler.SglangScheduler/Generate"
ABORT = "/sglang.grpc.scheduler.SglangScheduler/Abort"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    sims = start_sim(tmp_path_factory.mktemp("grpc-sims"), 2, "--grpc")
    yield sims
    sims.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fleet):
    gw = start_gateway(tmp_path_factory.mktemp("grpc-gw"), fleet.urls, "--policy", "round_robin")
    gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 20, "the sim-model tokenizer")
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def clean(fleet):
    fleet.reset()


@pytest.fixture
def client(gateway):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def generate_calls(fleet) -> list[dict]:
    """Every worker's Generate calls, oldest first."""
    calls = [e for i in range(len(fleet.urls)) for e in fleet.log(i)["requests"] if e["path"] == GENERATE]
    return sorted(calls, key=lambda e: e["ts"])


def tokenize(gateway, text: str) -> list[int]:
    status, body = gateway.post("/v1/tokenize", {"model": "sim-model", "prompt": text})
    assert status == 200, body
    return body["tokens"]


def script(fleet, text: str | None) -> None:
    for i in range(len(fleet.urls)):
        fleet.ctl(i, output_text=text)


def test_workers_register_as_grpc_with_a_tokenizer_fetched_from_a_worker(gateway, fleet):
    workers = gateway.workers()
    assert {w["url"] for w in workers} == set(fleet.urls)
    assert all(w["connection_mode"] == "grpc" and w["model_id"] == "sim-model" for w in workers)
    assert all(w["labels"].get("served_model_name") == "sim-model" for w in workers)
    status, listing = gateway.get("/v1/tokenizers")
    assert status == 200 and [t["name"] for t in listing["tokenizers"]] == ["sim-model"]
    assert listing["tokenizers"][0]["source"] == "sim-model"  # not a local path: the GetTokenizer fallback served it
    assert gateway.get("/v1/models")[1]["data"][0]["id"] == "sim-model"
    assert gateway.get("/health")[1]["models"] == ["sim-model"]


def test_chat_ids_are_the_rendered_template_encoded_without_special_tokens(gateway, fleet, client):
    reply = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "Hello there"}], max_tokens=5, temperature=0.5
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert reply.choices[0].message.content
    sent = generate_calls(fleet)[-1]["body"]
    expected = tokenize(gateway, "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert sent["tokenized"]["input_ids"] == expected
    params = sent["sampling_params"]
    assert params["temperature"] == 0.5 and params["top_p"] == 1.0 and params["top_k"] == -1
    assert params["max_new_tokens"] == 5 and params["skip_special_tokens"] is True
    assert sent["request_id"].startswith(reply.id.split("-")[0])


def test_eos_ends_the_output_and_is_hidden(gateway, fleet, client):
    script(fleet, "All done.")
    reply = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "go"}])
    choice = reply.choices[0]
    assert choice.message.content == "All done."
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == len(tokenize(gateway, "All done.")) + 1  # EOS counted, not shown


def test_stream_relays_deltas_usage_and_done(gateway, fleet, client):
    script(fleet, "one two three")
    stream = client.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokenize(gateway, text)) + 1


def test_a_stop_string_split_across_tokens_is_cut_in_stream_and_not(gateway, fleet, client):
    script(fleet, "alpha beta STOPWORD gamma delta")
    assert len(tokenize(gateway, " STOPWORD")) > 1  # the premise: the engine cannot see this stop
    messages = [{"role": "user", "content": "x"}]
    reply = client.chat.completions.create(model="sim-model", messages=messages, stop=[" STOPWORD"])
    assert reply.choices[0].message.content == "alpha beta"
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="sim-model", messages=messages, stop=" STOPWORD", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "alpha beta"
    kept = client.chat.completions.create(
        model="sim-model", messages=messages, stop=[" STOPWORD"], extra_body={"no_stop_trim": True}
    )
    assert kept.choices[0].message.content == "alpha beta STOPWORD"


def test_a_character_split_across_tokens_is_never_sent_in_halves(gateway, fleet, client):
    text = "snow 🦙 llama ünïcödé 漢字"
    script(fleet, text)
    assert len(tokenize(gateway, "🦙")) > 1  # the premise: byte-level pieces of one character
    stream = client.completions.create(model="sim-model", prompt="p", stream=True)
    deltas = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_n_choices_stream_and_not(gateway, fleet, client):
    reply = client.completions.create(model="sim-model", prompt="hello", n=2, max_tokens=4)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.text for c in reply.choices) and reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts.values())


def test_generate_native_shapes(gateway, fleet):
    status, body = gateway.post("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 3}})
    assert status == 200, body
    assert len(body["output_ids"]) == 3 and body["meta_info"]["finish_reason"]["type"] == "length"
    assert body["meta_info"]["prompt_tokens"] == len(tokenize(gateway, "hi"))
    ids = tokenize(gateway, "hello world")
    status, body = gateway.post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and generate_calls(fleet)[-1]["body"]["tokenized"]["input_ids"] == ids
    assert generate_calls(fleet)[-1]["body"]["log_metrics"] is True


def test_generate_stream_text_accumulates(gateway, fleet):
    script(fleet, "red green blue")
    events = _sse(gateway, "/generate", {"text": "colors", "stream": True})
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert texts[-1] == "red green blue" and all(texts[-1].startswith(t) for t in texts)


def test_tokenize_and_detokenize(gateway):
    status, body = gateway.post("/v1/tokenize", {"model": "sim-model", "prompt": ["a b", "héllo"]})
    assert status == 200 and body["count"] == [len(t) for t in body["tokens"]] and body["char_count"] == [3, 5]
    status, back = gateway.post("/v1/detokenize", {"model": "sim-model", "tokens": body["tokens"]})
    assert status == 200 and back["text"] == ["a b", "héllo"]
    status, err = gateway.post("/v1/tokenize", {"model": "nope", "prompt": "x"})
    assert status == 400 and "sim-model" in err["error"]["message"]
    status, err = gateway.post("/v1/detokenize", {"model": "sim-model", "tokens": [10**9]})
    assert status == 400 and err["error"]["param"] == "tokens"


def test_client_disconnect_cancels_the_call_and_sends_abort(gateway, fleet):
    fleet.ctl(0, latency_ms=0)
    for i in range(2):
        fleet.ctl(i, output_text=" tick" * 2000)
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        body = json.dumps({"text": "go", "stream": True, "sampling_params": {"max_new_tokens": 2000}}).encode()
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200" in sock.recv(4096).split(b"\r\n", 1)[0]

    def aborted() -> dict | None:
        for i in range(2):
            entries = fleet.log(i)["requests"]
            gen = [e for e in entries if e["path"] == GENERATE]
            abort = [e for e in entries if e["path"] == ABORT]
            if gen and abort and gen[-1]["disconnected"]:
                return {"generate": gen[-1], "abort": abort[-1]}
        return None

    gateway.process.wait_for(lambda: aborted() is not None, 10, "the worker's cancel and Abort")
    seen = aborted()
    assert seen is not None and seen["abort"]["body"]["request_id"] == seen["generate"]["body"]["request_id"]
    gateway.wait_workers(lambda ws: all(w["load"] == 0 for w in ws), "loads back to zero")


def test_grpc_errors_map_to_http_and_retry_on_another_worker(gateway, fleet, client):
    fleet.ctl(0, error_status=400)
    fleet.ctl(1, error_status=400)
    status, body = gateway.post("/v1/completions", {"model": "sim-model", "prompt": "x"})
    assert status == 400 and body["error"]["code"] == "start_generation_failed"
    assert len(generate_calls(fleet)) == 1  # a client error is never retried
    fleet.reset()
    fleet.ctl(0, error_status=503)
    for _ in range(4):
        status, body = gateway.post("/v1/completions", {"model": "sim-model", "prompt": "x", "max_tokens": 2})
        assert status == 200, body  # worker 0's UNAVAILABLE is retried on worker 1
    fleet.ctl(1, error_status=429)
    status, body = gateway.post("/v1/completions", {"model": "sim-model", "prompt": "x", "stream": True})
    assert status in (429, 503) and body["error"]["code"] == "start_generation_failed"


def test_a_stream_cut_mid_way_ends_with_an_error_frame_and_done(gateway, fleet):
    for i in range(2):
        fleet.ctl(i, disconnect_after_chunks=2)
    events = _sse(gateway, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert events[-1] == "[DONE]"
    assert "Stream error" in json.loads(events[-2])["error"]["message"]


def test_embeddings_over_embed(gateway, client):
    reply = client.embeddings.create(model="sim-model", input="embed me")
    assert len(reply.data[0].embedding) > 0 and reply.usage.prompt_tokens == len(tokenize(gateway, "embed me"))


def test_tokenizer_api(gateway, tmp_path):
    directory = write_tiny_tokenizer_dir(tmp_path / "tiny")
    status, job = gateway.post("/v1/tokenizers", {"name": "tiny", "source": str(directory)})
    assert status == 202 and job["status"] == "pending"
    gateway.process.wait_for(
        lambda: gateway.get(f"/v1/tokenizers/{job['id']}/status")[1]["status"] == "completed", 10, "tiny loaded"
    )
    status, entry = gateway.get("/v1/tokenizers/tiny")
    assert status == 200 and entry["id"] == job["id"] and entry["vocab_size"] == 400
    status, dup = gateway.post("/v1/tokenizers", {"name": "tiny", "source": str(directory)})
    assert status == 409 and dup["id"] == job["id"]
    assert gateway.post("/v1/tokenize", {"model": "tiny", "prompt": "<|im_end|>"})[1]["tokens"] == [2]
    status, gone = http_request("DELETE", gateway.url + "/v1/tokenizers/tiny")
    assert status == 200 and gone["success"] is True
    assert gateway.get("/v1/tokenizers/tiny")[0] == 404
    assert gateway.get("/v1/tokenizers/tiny/status")[0] == 404
    assert gateway.get(f"/v1/tokenizers/{job['id']}/status")[0] == 404
    # Not a local path, no such model on the hub (or no hub), no gRPC worker serves it: it fails, saying why.
    status, missing = gateway.post("/v1/tokenizers", {"name": "nowhere", "source": "no-such-org/no-such-model"})
    assert status == 202
    gateway.process.wait_for(
        lambda: gateway.get(f"/v1/tokenizers/{missing['id']}/status")[1]["status"] == "failed", 15, "failure"
    )
    message = gateway.get(f"/v1/tokenizers/{missing['id']}/status")[1]["message"]
    assert "not a local path" in message and "hub" in message and "No healthy gRPC worker" in message


def test_no_tokenizer_no_model(tmp_path, fleet):
    """Without autoload, a gRPC model is not advertised nor served until its tokenizer is registered."""
    with start_gateway(tmp_path, fleet.urls, "--disable-tokenizer-autoload") as gw:
        assert gw.get("/v1/models")[0] == 503
        assert gw.get("/health")[1]["models"] == []
        status, body = gw.post("/v1/completions", {"model": "sim-model", "prompt": "x"})
        assert status == 503 and body["error"]["code"] == "tokenizer_not_ready"
        status, _ = gw.post("/v1/tokenizers", {"name": "sim-model", "source": "sim-model"})
        assert status == 202
        gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 15, "sim-model served")
        assert gw.post("/v1/completions", {"model": "sim-model", "prompt": "x", "max_tokens": 2})[0] == 200


def test_mixed_http_and_grpc_fleet_of_one_model(tmp_path, fleet):
    http_sim = start_sim(tmp_path, 1)
    try:
        with start_gateway(tmp_path, [*fleet.urls, *http_sim.urls], "--policy", "round_robin") as gw:
            gw.process.wait_for(lambda: gw.get("/v1/tokenizers")[1]["tokenizers"], 20, "a tokenizer")
            routed = set()
            for _ in range(6):
                status, headers, _body = _post_with_headers(
                    gw.url + "/v1/completions", {"model": "sim-model", "prompt": "x", "max_tokens": 2}
                )
                assert status == 200
                routed.add(headers["x-smg-routed-worker-id"])
            assert routed == {*fleet.urls, *http_sim.urls}
    finally:
        http_sim.stop()


def test_pd_disaggregation_over_grpc(tmp_path):
    prefill = start_sim(tmp_path, 1, "--grpc", "--role", "prefill", "--bootstrap-port", "0")
    decode = start_sim(tmp_path, 1, "--grpc", "--role", "decode")
    try:
        args = ["--pd-disaggregation", "--prefill", prefill.urls[0], str(prefill.bootstrap_ports[0])]
        with start_gateway(tmp_path, (), *args, "--decode", decode.urls[0], ready_workers=2) as gw:
            gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 20, "the tokenizer")
            status, body = gw.post("/v1/completions", {"model": "sim-model", "prompt": "pd", "max_tokens": 4})
            assert status == 200 and body["usage"]["completion_tokens"] == 4
            sent_p = [e for e in prefill.log(0)["requests"] if e["path"] == GENERATE][-1]["body"]
            sent_d = [e for e in decode.log(0)["requests"] if e["path"] == GENERATE][-1]["body"]
            assert sent_p["disaggregated_params"] == sent_d["disaggregated_params"]
            assert sent_p["disaggregated_params"]["bootstrap_port"] == prefill.bootstrap_ports[0]
            assert sent_p["tokenized"] == sent_d["tokenized"]
            events = _sse(gw, "/v1/completions", {"model": "sim-model", "prompt": "pd", "stream": True})
            assert events[-1] == "[DONE]" and len(events) > 2
    finally:
        prefill.stop()
        decode.stop()


def _post_with_headers(url: str, body: dict) -> tuple[int, dict, bytes]:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def _sse(gateway, path: str, body: dict) -> list[str]:
    status, text = gateway.post(path, body, timeout=15)
    assert status == 200, text
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def test_cache_aware_routes_a_repeated_prefix_to_the_worker_that_cached_its_tokens(tmp_path, fleet):
    with start_gateway(tmp_path, fleet.urls) as gw:  # cache_aware is the default policy
        gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 20, "the tokenizer")
        prompts = [f"conversation {i}: " + " ".join(f"word{i}x{j}" for j in range(300)) for i in range(4)]
        first: dict[str, str] = {}
        for prompt in prompts:
            status, headers, _ = _post_with_headers(gw.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
            assert status == 200
            first[prompt] = headers["x-smg-routed-worker-id"]
        for prompt in prompts:
            request = {"prompt": prompt + " and more", "max_tokens": 1}
            # The explanation matches token ids too (4 characters per id), and names the worker the request gets.
            status, explained = gw.post("/explain/v1/completions", request)
            assert status == 200 and explained["regular"]["worker"] == first[prompt]
            assert (
                explained["regular"]["prompt_chars"]
                == 4 * gw.post("/v1/tokenize", {"prompt": request["prompt"]})[1]["count"]
            )
            status, headers, body = _post_with_headers(gw.url + "/v1/completions", request)
            assert headers["x-smg-routed-worker-id"] == first[prompt]
            assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_the_engines_cached_tokens_reach_the_policy(tmp_path, fleet):
    # In process, to see the policy's index: two cache-aware gateways in turn (fresh policies) send one prompt. The
    # second finds it cached on the worker both send it to (its home), which it never placed there itself.
    build().write_dir(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    config = GatewayConfig()
    clients = GrpcClients()
    metrics = GatewayMetrics(Registry(), Admission(1, 1, 1))
    dispatcher = GrpcDispatcher(lambda _model: tokenizer, clients, config, metrics)
    workers = tuple(Worker(url, CircuitBreaker(config.circuit_breaker), model_id="sim-model") for url in fleet.urls)
    body = orjson.dumps({"model": "sim-model", "prompt": " ".join(f"w{j}" for j in range(400)), "max_tokens": 1})

    async def send(policy: CacheAwarePolicy) -> float:
        ctx = RequestContext(COMPLETIONS, body, "cached-tokens")
        await dispatcher.prepare_routing(ctx, workers)
        worker = policy.pick(workers, ctx)
        # Not streamed: the attempt never touches the client's connection, so there is no request object.
        result = await dispatcher.attempt(None, ctx, worker, True, time.monotonic(), policy)  # type: ignore[arg-type]
        assert isinstance(result, Response) and result.status == 200
        return policy.index_for("sim-model").foreign

    try:
        assert await send(CacheAwarePolicy(config.cache_aware)) == 0  # a cold worker: nothing cached, as expected
        assert await send(CacheAwarePolicy(config.cache_aware)) > 0  # more cached than this gateway placed there
    finally:
        await clients.close()


@pytest.mark.parametrize("policy", ["random", "power_of_two"])
def test_every_policy_routes_over_grpc(tmp_path, fleet, policy):
    with start_gateway(tmp_path, fleet.urls, "--policy", policy) as gw:
        gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 20, "the tokenizer")
        for i in range(4):
            status, body = gw.post("/v1/chat/completions", {"messages": [{"role": "user", "content": f"q{i}"}]})
            assert status == 200 and body["choices"][0]["message"]["content"], body
        assert len(generate_calls(fleet)) == 4


def test_admin_reads_and_actions_reach_grpc_workers(gateway, fleet):
    status, server = gateway.get("/get_server_info")
    assert status == 200 and server["served_model_name"] == "sim-model" and server["server_type"] == "grpc"
    status, model = gateway.get("/get_model_info")
    assert status == 200 and model["served_model_name"] == "sim-model"
    assert gateway.get("/health_generate")[0] == 200
    gateway.process.wait_for(
        lambda: all(load["engine"] for load in gateway.get("/get_loads")[1]["loads"]), 15, "GetLoads answers"
    )
    # The same poll gives each worker its engine's request count (what cache_aware compares with its own load).
    assert all(isinstance(w["engine_requests"], int) for w in gateway.workers())
    # And SMG's gauges from polling, GetLoads' throughput and hit rate included, for each worker's rank 0.
    exposition = gateway.metrics()
    for name in ("smg_engine_running_requests", "smg_engine_gen_throughput", "smg_engine_cache_hit_rate"):
        assert {(s["worker"], s["dp_rank"]) for s in exposition.series(name)} == {(u, "0") for u in fleet.urls}, name
    status, flushed = gateway.post("/flush_cache")
    assert status == 200 and flushed["workers_flushed"] == 2
    assert all(fleet.log(i)["counts"].get("/sglang.grpc.scheduler.SglangScheduler/FlushCache") for i in range(2))
