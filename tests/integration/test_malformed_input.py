"""Seeded garbage at every route: always a JSON error with a client status, never a 5xx, never a dead gateway."""

from __future__ import annotations

import random

import aiohttp
import orjson

from tests.support.gateway import start_gateway
from tests.support.processes import start_sim

ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/workers")
SEED = 7


def garbage(rng: random.Random) -> bytes:
    """Bytes that are not a valid request for any route: broken JSON, wrong types, odd encodings."""
    choice = rng.randrange(6)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if choice == 1:
        return b'{"text": ' + bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 40)))
    if choice == 2:
        return orjson.dumps(rng.choice([[], 3, "text", None, True, [{"a": 1}]]))
    if choice == 3:
        return orjson.dumps({"messages": rng.choice([[], "hi", 5, None]), "prompt": rng.choice([None, 1, {}])})
    if choice == 4:
        return orjson.dumps({"model": rng.choice([7, [], {"x": 1}]), "text": "x", "messages": [{"content": "x"}]})
    return b"\xff\xfe" + "{}".encode("utf-16-le")


async def test_garbage_never_yields_a_server_error_or_leaks_load(tmp_path):
    rng = random.Random(SEED)
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls) as gw:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                route = rng.choice(ROUTES)
                headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form"])}
                async with session.post(gw.url + route, data=garbage(rng), headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    assert 400 <= resp.status < 500, (route, resp.status, body)
                    assert body["error"]["code"] and body["error"]["message"], body
            async with session.post(gw.url + "/generate", json={"text": "still alive"}) as resp:
                assert resp.status == 200
        assert gw.workers()[0]["requests_active"] == 0
        # only JSON objects reach a worker (which may then refuse them itself): never broken bytes
        forwarded = [r["body"] for r in sims.log(0)["requests"] if r["method"] == "POST"]
        assert all(isinstance(body, dict) for body in forwarded), forwarded
