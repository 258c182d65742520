"""The gateway core across real processes: proxying, streaming, models, ids, errors, admin API, load counters."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import aiohttp
import openai
import pytest

from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import SimFleet, free_port, http_request, start_sim

MODEL = "sim-model"


@pytest.fixture(scope="module")
def gateway(fleet: SimFleet, tmp_path_factory) -> GatewayProcess:
    with start_gateway(
        tmp_path_factory.mktemp("gw"), fleet.urls, "--policy", "round_robin", "--max-payload-size", "65536"
    ) as gw:
        yield gw


def total_count(sims: SimFleet, path: str) -> int:
    return sum(sims.log(i)["counts"].get(path, 0) for i in range(len(sims.urls)))


def assert_no_load(gateway: GatewayProcess) -> None:
    """Every worker's in-flight counter is back to zero (polled: the relay may still be unwinding)."""
    gateway.wait_workers(lambda ws: all(w["requests_active"] == 0 for w in ws), "load counters back to 0", 5)


async def test_generate_is_proxied_with_body_unchanged_and_ids(gateway, sims):
    raw = b'{"text":   "hello   world",  "sampling_params": {"max_new_tokens": 3}}'
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/generate", data=raw, headers={"x-request-id": "my-id-1"}) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert resp.headers["x-request-id"] == "my-id-1"
            routed = resp.headers["x-smg-routed-worker-id"]
    assert routed in sims.urls
    assert body["meta_info"]["completion_tokens"] == 3
    index = sims.urls.index(routed)
    seen = sims.log(index)["requests"][-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-request-id"] == "my-id-1"
    assert int(headers["content-length"]) == len(raw)  # the client's bytes, not a re-encoding
    assert seen["body"] == {"text": "hello   world", "sampling_params": {"max_new_tokens": 3}}


async def test_generated_request_ids_use_route_prefixes(gateway, sims):
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/generate", json={"text": "a"}) as resp:
            assert resp.headers["x-request-id"].startswith("gnt-")
        async with session.get(gateway.url + "/workers") as resp:
            assert resp.headers["x-request-id"].startswith("req-")
        async with session.get(gateway.url + "/nowhere") as resp:
            assert resp.status == 404 and resp.headers["x-request-id"]


async def test_stream_is_relayed_frame_by_frame(gateway, sims):
    payload = {"text": "stream me", "stream": True, "sampling_params": {"max_new_tokens": 30}}
    frames: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session, session.post(gateway.url + "/generate", json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                frames.append((time.monotonic(), line.strip()))
    assert frames[-1][1] == b"data: [DONE]"
    assert len(frames) >= 10  # the worker's token frames, not one buffered blob
    # 30 decode steps of >= 3 ms: the first frame reached us well before the last one was produced
    assert frames[-1][0] - frames[0][0] > 0.05
    assert_no_load(gateway)


async def test_models_route_and_model_selection(gateway, sims):
    status, models = gateway.get("/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/generate", json={"text": "x", "model": "no-such-model"}) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
            assert error["code"] == "model_not_found" and "no-such-model" in error["message"]
        async with session.post(gateway.url + "/generate", json={"text": "x", "model": MODEL}) as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    "method,path,body,status,code",
    [
        ("POST", "/generate", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b'{"model": "sim-model"}', 400, "missing_required_parameter"),
        ("POST", "/v1/completions", b'{"model": "sim-model"}', 400, "missing_required_parameter"),
        ("GET", "/v2/nothing", None, 404, "unknown_url"),
        ("GET", "/generate", None, 405, "method_not_allowed"),
        ("POST", "/generate", b'{"text": "' + b"x" * 70000 + b'"}', 413, "request_body_too_large"),
    ],
)
async def test_error_envelope(gateway, sims, method, path, body, status, code):
    async with aiohttp.ClientSession() as session, session.request(method, gateway.url + path, data=body) as resp:
        assert resp.status == status
        assert resp.headers["content-type"].startswith("application/json")
        error = (await resp.json())["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert total_count(sims, "/generate") == 0  # nothing reached a worker


def test_openai_client_sync_and_streaming(gateway, sims):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
    completion = client.completions.create(model=MODEL, prompt="once upon", max_tokens=4)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=6, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason is not None
    embedding = client.embeddings.create(model=MODEL, input="vector please")
    assert len(embedding.data[0].embedding) > 0
    assert [m.id for m in client.models.list()] == [MODEL]


async def test_openai_async_client_streams(gateway, sims):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused")
    stream = await client.completions.create(model=MODEL, prompt="tell me", max_tokens=5, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len([piece for piece in pieces if piece]) >= 2  # several chunks with text, not one buffered answer
    await client.close()


async def test_round_robin_spreads_over_all_workers(gateway, sims):
    async with aiohttp.ClientSession() as session:
        for _ in range(9):
            async with session.post(gateway.url + "/generate", json={"text": "rr"}) as resp:
                assert resp.status == 200
    assert [sims.log(i)["counts"].get("/generate", 0) for i in range(3)] == [3, 3, 3]


async def test_rerank_goes_to_v1_rerank(gateway, sims):
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + "/rerank", json={"query": "q", "documents": ["a", "b"]}) as resp:
            assert resp.status == 200
    assert total_count(sims, "/v1/rerank") == 1


def test_info_and_admin_routes(gateway, sims):
    assert gateway.get("/liveness")[0] == 200
    status, health = gateway.get("/health")
    assert status == 200 and health["workers"]["healthy"] == 3
    status, ready = gateway.get("/readiness")
    assert status == 200 and ready["healthy_workers"] == 3
    status, config = gateway.get("/config")
    assert status == 200 and config["policy"] == "round_robin"
    status, info = gateway.get("/get_server_info")
    assert status == 200 and info["served_model_name"] == MODEL
    status, info = gateway.get("/get_model_info")
    assert status == 200 and "model_path" in info
    status, loads = gateway.get("/get_loads")
    assert status == 200 and len(loads["loads"]) == 3 and all(entry["engine"] is not None for entry in loads["loads"])
    status, flushed = gateway.post("/flush_cache")
    assert status == 200 and flushed["workers_flushed"] == 3
    assert total_count(sims, "/flush_cache") == 3
    status, listed = gateway.get("/list_workers")
    assert sorted(listed["urls"]) == sorted(sims.urls)


def test_workers_listing_shape(gateway, sims):
    status, body = gateway.get("/workers")
    assert status == 200
    assert body["total"] == 3 and body["healthy"] == 3
    assert body["stats"] == {"regular_count": 3, "prefill_count": 0, "decode_count": 0}
    worker = body["workers"][0]
    for field in (
        "id",
        "url",
        "model",
        "model_id",
        "worker_type",
        "status",
        "healthy",
        "is_healthy",
        "requests_total",
        "requests_active",
        "latency_p99_ms",
        "circuit_state",
        "labels",
        "priority",
        "cost",
    ):
        assert field in worker, field
    assert worker["model"] == MODEL and worker["status"] == "ready" and worker["circuit_state"] == "closed"
    by_id = gateway.get(f"/workers/{worker['id']}")[1]
    by_url = gateway.get("/workers/" + urllib.parse.quote(worker["url"], safe=""))[1]
    assert by_id["id"] == by_url["id"] == worker["id"]
    status, health = gateway.get("/workers/" + urllib.parse.quote(worker["url"], safe="") + "/health")
    assert status == 200 and health["healthy"] is True
    assert gateway.get("/workers/00000000-0000-0000-0000-000000000000")[0] == 404


def test_add_patch_delete_worker_through_api(tmp_path):
    with start_sim(tmp_path, 2) as sims, start_gateway(tmp_path, sims.urls[:1]) as gw:
        status, accepted = gw.post("/workers", {"url": sims.urls[1], "api_key": "w-secret", "labels": {"zone": "b"}})
        assert status == 202 and accepted["status"] == "accepted"
        worker_id = accepted["worker_id"]
        assert accepted["location"] == f"/workers/{worker_id}"
        workers = gw.wait_ready_workers(2)
        added = next(w for w in workers if w["id"] == worker_id)
        assert added["labels"]["zone"] == "b" and "api_key" not in added and "w-secret" not in str(workers)
        assert gw.post("/workers", {"url": sims.urls[1]})[0] == 409
        status, error = gw.post("/workers", {"url": "not a url"})
        assert status == 400 and error["error"]["param"] == "url"
        status, error = gw.post("/workers", {"labels": {}})
        assert status == 400 and error["error"]["param"] == "url"

        status, _ = http_request("PATCH", f"{gw.url}/workers/{worker_id}", {"priority": 7, "labels": {"x": "1"}})
        assert status == 202
        patched = gw.get(f"/workers/{worker_id}")[1]
        assert patched["priority"] == 7 and patched["labels"]["x"] == "1" and patched["labels"]["zone"] == "b"

        status, _ = http_request("DELETE", f"{gw.url}/workers/{worker_id}")
        assert status == 202
        gw.wait_workers(lambda ws: len(ws) == 1, "the deleted worker to leave")
        assert gw.get(f"/workers/{worker_id}")[0] == 404


def test_legacy_add_and_remove_worker(tmp_path):
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, ready_workers=0) as gw:
        assert gw.get("/readiness")[0] == 503
        status, text = gw.post("/add_worker?url=" + urllib.parse.quote(sims.urls[0]))
        assert status == 200 and text == f"Successfully added worker: {sims.urls[0]}"
        assert gw.get("/readiness")[0] == 200
        status, text = gw.post("/remove_worker?url=" + urllib.parse.quote(sims.urls[0]))
        assert status == 200 and "Successfully removed" in text
        gw.wait_workers(lambda ws: not ws, "the worker to be removed")
        status, body = gw.post("/generate", {"text": "x"})  # the registration is over: nothing is coming
        assert status == 404 and body["error"]["code"] == "model_not_found"


def test_unreachable_worker_is_502_and_hung_worker_is_504(tmp_path):
    with (
        start_sim(tmp_path, 1) as sims,
        start_gateway(
            tmp_path, sims.urls, "--disable-retries", "--request-timeout-secs", "0.5", "--disable-health-check"
        ) as gw,
    ):
        sims.ctl(0, hang=True)
        started = time.monotonic()
        status, body = gw.post("/generate", {"text": "x"})
        assert status == 504 and body["error"]["code"] == "call_upstream_timeout"
        assert time.monotonic() - started < 5
        sims.ctl(0, reset=True)
        sims.stop()
        status, body = gw.post("/generate", {"text": "x"})
        assert status == 502 and body["error"]["code"] == "call_upstream_connection_failed"
        assert gw.workers()[0]["requests_active"] == 0


def test_no_workers_is_404_for_model_503_when_unavailable_and_503_while_registrations_are_under_way(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with start_gateway(tmp_path, ready_workers=0) as gw:
        status, body = gw.post("/generate", {"text": "x"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = gw.get("/v1/models")
        assert status == 503 and body["error"]["code"] == "no_models_available"
        for path in ("/get_model_info", "/get_server_info"):
            status, body = gw.get(path)
            assert status == 503 and body["error"]["code"] == "no_workers", path
        assert gw.get("/readiness")[0] == 503
        assert gw.post("/workers", {"url": dead})[0] == 202
        status, job = gw.get("/workers/" + urllib.parse.quote(dead, safe=""))
        assert status == 200 and job["status"] == "pending"
        # A pending registration is not a worker yet, but one may be coming (a gateway starting): retry, not 404.
        request = urllib.request.Request(gw.url + "/generate", b'{"text": "x"}', {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=5)
        body = json.loads(answer.value.read())
        assert answer.value.code == 503 and body["error"]["code"] == "no_available_workers"
        assert "1 registration(s) under way" in body["error"]["message"]
        assert answer.value.headers["retry-after"] == "1"


async def test_load_counters_return_to_zero_after_client_disconnect(gateway, sims):
    for i in range(3):
        sims.ctl(i, latency_ms=2000)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(gateway.url + "/generate", json={"text": "abandon"}))
        gateway_sees = lambda ws: sum(w["requests_active"] for w in ws) == 1  # noqa: E731
        await asyncio.to_thread(gateway.wait_workers, gateway_sees, "the request in flight")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.to_thread(assert_no_load, gateway)
