"""A password in a worker URL (`http://user:password@host:port`): requests to the worker authenticate with it, and the
gateway shows it nowhere (API answers, headers, error bodies, metrics, logs)."""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import quote, urlsplit

import aiohttp

from tests.support.gateway import start_gateway
from tests.support.processes import free_port, http_request, start_sim

SECRET = "s3cr3t-pw"
KEY = "gw-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_a_password_in_a_worker_url_is_used_but_never_shown(tmp_path):
    with start_sim(tmp_path, 2) as sims:
        ports = [urlsplit(url).port for url in sims.urls]
        static = f"http://user:{SECRET}@127.0.0.1:{ports[0]}"
        added = f"http://admin:{SECRET}@127.0.0.1:{ports[1]}"
        shown = [f"http://user:***@127.0.0.1:{ports[0]}", f"http://admin:***@127.0.0.1:{ports[1]}"]
        args = ("--policy", "round_robin", "--disable-retries", "--worker-startup-timeout-secs", "1")
        with start_gateway(tmp_path, [static], *args, api_key=KEY) as gw:
            seen: list[str] = []  # everything the gateway answered

            def call(method: str, path: str, body: object = None) -> tuple[int, object]:
                status, answer = http_request(method, gw.url + path, body, headers=AUTH)
                seen.append(str(answer))
                return status, answer

            status, accepted = call("POST", "/workers", {"url": added, "labels": {"zone": "b"}})
            assert status == 202 and accepted["url"] == shown[1]
            gw.wait_ready_workers(2)
            assert sorted(w["url"] for w in gw.workers()) == sorted(shown)
            status, failed = call("POST", "/workers", {"url": f"http://u:{SECRET}@127.0.0.1:{free_port()}"})
            assert status == 202
            gw.process.wait_for(
                lambda: call("GET", f"/workers/{failed['worker_id']}")[1]["status"] == "failed", 10, "a failed job"
            )
            assert call("POST", "/workers", {"url": added})[0] == 409  # the duplicate's message names it masked
            for path in ("/workers", f"/workers/{accepted['worker_id']}", "/list_workers", "/get_loads", "/config"):
                assert call("GET", path)[0] == 200, path
            assert call("GET", "/workers/" + quote(shown[0], safe=""))[0] == 200  # found by the URL as shown
            assert call("PATCH", f"/workers/{accepted['worker_id']}", {"priority": 3})[0] == 202
            assert call("POST", "/flush_cache")[0] == 200
            assert call("GET", "/get_server_info")[0] == 200
            assert call("GET", "/engine_metrics")[0] == 200
            assert shown[0] in seen[-1]  # the worker_addr label, masked

            routed = set()
            async with aiohttp.ClientSession(headers=AUTH) as session:
                for i in range(4):
                    async with session.post(gw.url + "/generate", json={"text": f"hi {i}"}) as resp:
                        assert resp.status == 200, await resp.text()
                        routed.add(resp.headers["x-smg-routed-worker-id"])
                assert routed == set(shown)
                sims.ctl(0, refuse=True)
                statuses = []
                for i in range(4):  # round robin: some reach the refusing worker, with no retry
                    async with session.post(gw.url + "/generate", json={"text": f"err {i}"}) as resp:
                        statuses.append(resp.status)
                        seen.append(str(dict(resp.headers)) + await resp.text())
                assert 502 in statuses
                sims.ctl(0, refuse=False)

            # The workers got the password as HTTP Basic auth, for inference, probes and registration alike.
            for index, user in ((0, "user"), (1, "admin")):
                basic = "Basic " + base64.b64encode(f"{user}:{SECRET}".encode()).decode()
                requests = sims.log(index)["requests"]
                for path in ("/generate", "/server_info", "/metrics"):
                    sent = [r["headers"].get("authorization") for r in requests if r["path"] == path]
                    assert sent and set(sent) == {basic}, (index, path, sent)

            seen.append(await asyncio.to_thread(lambda: str(gw.metrics().text)))
            assert any("***" in text for text in seen)
            assert not [text for text in seen if SECRET in text]
            gw.stop()
            log = gw.process.log_path.read_text()
            assert "user:***@" in log and SECRET not in log
