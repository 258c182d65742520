"""Wire shapes of the simulated SGLang worker, exercised over real HTTP against a real process."""

from __future__ import annotations

import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import SimFleet, http_request, start_sim


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with start_sim(tmp_path_factory.mktemp("sim"), 2, "--model", "test-model") as fleet:
        yield fleet


@pytest.fixture(autouse=True)
def _clean(sim: SimFleet):
    yield
    sim.reset()


async def post(url: str, body: object) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def sse_payloads(url: str, body: object) -> list[object]:
    """Decoded ``data:`` payloads of a streamed response (``[DONE]`` kept as a string)."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    frames = [f for f in raw.decode().split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    return [f[6:] if f == "data: [DONE]" else json.loads(f[6:]) for f in frames]


def test_health_and_info_endpoints(sim: SimFleet):
    url = sim.urls[0]
    assert http_request("GET", url + "/health")[0] == 200
    assert http_request("GET", url + "/health_generate")[0] == 200
    for path in ("/get_model_info", "/model_info"):
        status, info = http_request("GET", url + path)
        assert status == 200
        assert info["model_path"] == "test-model" and info["is_generation"] is True
        assert info["architectures"] == ["LlamaForCausalLM"]
    for path in ("/get_server_info", "/server_info"):
        status, info = http_request("GET", url + path)
        assert status == 200
        assert info["served_model_name"] == "test-model"
        assert info["dp_size"] == 1 and info["tp_size"] == 1
        assert info["disaggregation_mode"] == "null"
        assert info["max_total_num_tokens"] == 200_000 and info["page_size"] == 16
        assert info["port"] == int(url.rsplit(":", 1)[1])
    status, models = http_request("GET", url + "/v1/models")
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "test-model" and models["data"][0]["owned_by"] == "sglang"
    status, load = http_request("GET", url + "/get_load")
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]


async def test_generate_single_batch_and_n(sim: SimFleet):
    url = sim.urls[0] + "/generate"
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 7}, "rid": "r1"}
    status, out = await post(url, body)
    assert status == 200
    meta = out["meta_info"]
    assert meta["id"] == "r1"
    assert meta["finish_reason"] == {"type": "length", "length": 7}
    assert meta["completion_tokens"] == 7 and meta["prompt_tokens"] == 4 and meta["cached_tokens"] == 0
    assert len(out["text"].split()) == 7 and len(out["output_ids"]) == 7
    assert (await post(url, body))[1]["text"] == out["text"]  # deterministic

    status, outs = await post(url, {"text": ["a b c", "d e f"], "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and len(outs) == 2 and outs[0]["text"] != outs[1]["text"]

    status, outs = await post(url, {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 2}})
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 2]

    status, outs = await post(url, {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "n": 3}})
    assert len(outs) == 3 and len({o["text"] for o in outs}) == 3

    status, out = await post(url, {"text": "default length"})
    assert out["meta_info"]["completion_tokens"] == 16


async def test_generate_logprobs(sim: SimFleet):
    _, out = await post(
        sim.urls[0] + "/generate",
        {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}, "return_logprob": True},
    )
    meta = out["meta_info"]
    assert [t[1] for t in meta["input_token_logprobs"]] == [5, 6, 7]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_token_logprobs"][1][0] < 0
    assert [t[1] for t in meta["output_token_logprobs"]] == out["output_ids"]


async def test_generate_stream_ends_with_the_whole_answer_and_done(sim: SimFleet):
    # Without a latency model the answer comes in one frame; test_sim_batch checks frame-by-frame cumulative text.
    body = {"text": "stream me", "sampling_params": {"max_new_tokens": 5}, "stream": True}
    frames = await sse_payloads(sim.urls[0] + "/generate", body)
    assert frames[-1] == "[DONE]"
    last = frames[-2]
    assert last["meta_info"]["completion_tokens"] == 5
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    _, whole = await post(sim.urls[0] + "/generate", {**body, "stream": False})
    assert last["text"] == whole["text"]

    batch = await sse_payloads(sim.urls[0] + "/generate", {**body, "text": ["x", "y"]})
    assert sorted(f["index"] for f in batch[:-1]) == [0, 1]


async def test_openai_shapes_over_raw_http(sim: SimFleet):
    status, chat = await post(
        sim.urls[0] + "/v1/chat/completions",
        {
            "model": "whatever",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_completion_tokens": 4,
            "n": 2,
        },
    )
    assert status == 200
    assert chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion"
    assert chat["model"] == "whatever"
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["finish_reason"] == "length"
    usage = chat["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}

    status, cmpl = await post(sim.urls[0] + "/v1/completions", {"model": "m", "prompt": ["a", "b"], "max_tokens": 2})
    assert cmpl["id"].startswith("cmpl-") and cmpl["object"] == "text_completion"
    assert len(cmpl["choices"]) == 2 and cmpl["usage"]["completion_tokens"] == 4

    frames = await sse_payloads(
        sim.urls[0] + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True},
    )
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]


async def test_cached_tokens_grow_on_a_repeated_prefix(sim: SimFleet):
    url = sim.urls[1]
    system = {"role": "system", "content": "You are a meticulous assistant. " * 20}
    turn1 = [system, {"role": "user", "content": "What is a prefix cache?"}]
    _, first = await post(url + "/v1/chat/completions", {"messages": turn1, "max_tokens": 8})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
    turn2 = [*turn1, reply, {"role": "user", "content": " And why does it help?"}]
    _, second = await post(url + "/v1/chat/completions", {"messages": turn2, "max_tokens": 8})
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The whole first turn, including the generated reply, is cached (page-aligned).
    assert cached >= first["usage"]["total_tokens"] - 16
    assert cached % 16 == 0

    log = sim.log(1)
    assert log["prompt_tokens"] == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    assert log["cached_tokens"] == cached

    assert http_request("POST", url + "/flush_cache")[0] == 200
    _, third = await post(url + "/v1/chat/completions", {"messages": turn2, "max_tokens": 8})
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_embeddings_and_rerank(sim: SimFleet):
    status, emb = await post(sim.urls[0] + "/v1/embeddings", {"model": "m", "input": ["alpha", "beta"]})
    assert status == 200 and emb["object"] == "list"
    vectors = [d["embedding"] for d in emb["data"]]
    assert [d["index"] for d in emb["data"]] == [0, 1]
    assert len(vectors[0]) == 16 and vectors[0] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-9
    assert emb["usage"]["prompt_tokens"] == emb["usage"]["total_tokens"] > 0
    _, again = await post(sim.urls[0] + "/v1/embeddings", {"input": "alpha", "dimensions": 16})
    assert again["data"][0]["embedding"] == vectors[0]

    status, ranked = await post(
        sim.urls[0] + "/v1/rerank",
        {"query": "red fox", "documents": ["a blue whale", "the red fox runs", "a red car"]},
    )
    assert status == 200
    assert [r["index"] for r in ranked] == [1, 2, 0]
    assert ranked[0] == {"score": 1.0, "document": "the red fox runs", "index": 1}


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/generate", b"{not json", "Malformed JSON"),
        ("/v1/chat/completions", b"{}", "messages"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/generate", b'{"sampling_params": {}}', "text or input_ids"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 40000}', "context length"),
        ("/__ctl", b'{"eror_status": 500}', "unknown"),
    ],
)
async def test_bad_requests_get_openai_style_400(sim: SimFleet, path: str, body: bytes, fragment: str):
    async with aiohttp.ClientSession() as session, session.post(sim.urls[0] + path, data=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert fragment in error["message"]


async def test_metrics_use_sglang_names_and_labels(sim: SimFleet):
    await post(sim.urls[0] + "/generate", {"text": "count me " * 10, "sampling_params": {"max_new_tokens": 3}})
    await post(sim.urls[0] + "/generate", {"text": "count me " * 10, "sampling_params": {"max_new_tokens": 3}})
    status, text = http_request("GET", sim.urls[0] + "/metrics")
    assert status == 200
    samples = {
        s.name: s for family in text_string_to_metric_families(text) for s in family.samples if "le" not in s.labels
    }
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:gen_throughput",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:num_requests_total",
        "sglang:time_to_first_token_seconds_count",
        "sglang:e2e_request_latency_seconds_count",
        "sglang:inter_token_latency_seconds_count",
    ):
        assert name in samples, name
    assert samples["sglang:num_requests_total"].labels == {"model_name": "test-model", "engine_type": "unified"}
    assert samples["sglang:num_requests_total"].value >= 2
    assert samples["sglang:generation_tokens_total"].value >= 6
    assert 0 < samples["sglang:cache_hit_rate"].value < 1


def test_api_key_roles_and_dp_ranks(tmp_path):
    args = ("--api-key", "s3cret", "--role", "prefill", "--dp-size", "2", "--bootstrap-port", "0")
    with start_sim(tmp_path, 1, *args) as fleet:
        url = fleet.urls[0]
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}
        status, err = http_request("POST", url + "/generate", body)
        assert status == 401 and err["error"]["code"] == 401
        assert http_request("POST", url + "/generate", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert http_request("POST", url + "/generate", body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert http_request("GET", url + "/health")[0] == 200
        status, info = http_request("GET", url + "/get_server_info")
        assert status == 200
        assert info["disaggregation_mode"] == "prefill"
        assert info["disaggregation_bootstrap_port"] == fleet.bootstrap_ports[0] > 0
        assert info["dp_size"] == 2
        assert [r["dp_rank"] for r in http_request("GET", url + "/get_load")[1]] == [0, 1]
        assert 'engine_type="prefill"' in http_request("GET", url + "/metrics")[1]
        sent = [r["headers"].get("authorization") for r in fleet.log(0)["requests"] if r["path"] == "/generate"]
        assert sent == [None, "Bearer wrong", "Bearer s3cret"]
