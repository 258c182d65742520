"""HTTP/1.1 conformance of the gateway's own server and upstream client, as a black box over raw sockets.

The real gateway process runs in front of simulated workers (`shepherd.sim`) or, for upstream faults a real worker
cannot produce on demand, a hand-written stand-in (`tests/support/raw_worker.py`). Clients are raw sockets speaking
HTTP/1.1 byte by byte (so framing is checked exactly), plus the real `openai` client, `curl` and `wrk`.

Covered: keep-alive and upstream pooling, pooled-connection expiry and the stale-connection retry, pipelining past
`--max-pipelined-requests`, `Connection: close` and HTTP/1.0 framing, `Expect: 100-continue`, chunked bodies both
ways, bodiless responses and 1xx, header and body limits, the slow-header timeout, request smuggling, hop-by-hop
headers, upstream timeouts, backpressure, admission before the body, and draining on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.components import COMPONENTS, require
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import SimFleet, wait_until
from tests.support.raw_worker import HOP_BY_HOP_NAMES, RawRequest, RawWorker, answer_body, stream_frames

MODEL = "sim-model"
READ_TIMEOUT = 5.0  # generous next to every timeout the gateways below are configured with
GRACE = ("--shutdown-grace-period-secs", "2")  # a test that leaves a request hanging must not slow teardown


# -- a raw HTTP/1.1 client ---------------------------------------------------------------------------------------
@dataclass
class Response:
    """One response as read off the wire; `headers` keep their order and repeats, names lower-cased."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    framing: str = "none"  # how the body was delimited: "length", "chunked", "close" or "none"
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)  # 1xx statuses read before this one

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The SSE `data:` payloads of the body, in order."""
        return [line[len("data:") :].strip() for line in self.body.decode().split("\n") if line.startswith("data:")]


class RawClient:
    """A blocking socket to the gateway that writes exactly the bytes it is given and parses responses strictly."""

    def __init__(self, port: int, timeout: float = READ_TIMEOUT, rcvbuf: int | None = None) -> None:
        self.sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    @classmethod
    def parser(cls, data: bytes) -> RawClient:
        """A reader over bytes already received, with no socket behind them."""
        client = cls.__new__(cls)
        client.sock, client.buffer = None, data
        return client

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF (a reset counts as EOF)."""
        if self.sock is None:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return bool(data)

    def _until(self, delimiter: bytes, limit: int = 1 << 20) -> bytes:
        while delimiter not in self.buffer:
            assert len(self.buffer) < limit, f"no {delimiter!r} in {len(self.buffer)} bytes"
            if not self._fill():
                raise EOFError(f"connection closed before {delimiter!r}; got {self.buffer[:300]!r}")
        data, _, self.buffer = self.buffer.partition(delimiter)
        return data

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(f"connection closed {size - len(self.buffer)} bytes short")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_head(self) -> Response:
        """The next status line and headers (a 1xx too)."""
        head = self._until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        match = re.fullmatch(r"(HTTP/1\.[01]) (\d{3}) ?(.*)", status_line)
        assert match, f"bad status line {status_line!r}"
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip() and name, f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return Response(match[1], int(match[2]), match[3], headers)

    def read_response(self, method: str = "POST") -> Response:
        """The next final response with its body; 1xx responses before it are recorded in `interim`."""
        interim = []
        while True:
            response = self.read_head()
            if not 100 <= response.status < 200:
                break
            assert response.status != 101, "unexpected protocol switch"
            interim.append(response.status)
        response.interim = interim
        self.read_body(response, method)
        return response

    def read_body(self, response: Response, method: str = "POST") -> None:
        """Read the body as RFC 9112 section 6.3 delimits it, checking the framing headers are coherent."""
        te, cl = response.header("transfer-encoding"), response.header("content-length")
        assert not (te and cl), f"both Transfer-Encoding and Content-Length: {response.headers}"
        if method == "HEAD" or response.status in (204, 304):
            if response.status in (204, 304):
                assert te is None and cl is None, f"{response.status} with framing headers: {response.headers}"
            response.framing = "none"
        elif te is not None:
            assert te.lower() == "chunked", f"Transfer-Encoding {te!r}"
            response.framing = "chunked"
            while (chunk := self.next_chunk()) is not None:
                response.chunks.append(chunk)
                response.body += chunk
        elif cl is not None:
            assert re.fullmatch(r"\d+", cl), f"Content-Length {cl!r}"
            response.framing = "length"
            response.body = self.read_exact(int(cl))
        else:
            response.framing = "close"
            response.body = self.read_until_eof()

    def next_chunk(self) -> bytes | None:
        """One chunk of a chunked body; None after the last chunk (`0\\r\\n\\r\\n`, no trailers expected)."""
        size_line = self._until(b"\r\n", limit=64).decode("latin-1")
        assert re.fullmatch(r"[0-9a-fA-F]+", size_line), f"bad chunk size line {size_line!r}"
        size = int(size_line, 16)
        if size == 0:
            assert self.read_exact(2) == b"\r\n", "chunked body not terminated by 0\\r\\n\\r\\n"
            return None
        data = self.read_exact(size)
        assert self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    def read_until_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def closed(self) -> bool:
        """Whether the server closed the connection with nothing more sent (waits up to the socket timeout)."""
        return self.read_until_eof() == b""


def request(
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    """The bytes of one request: Host, and Content-Length for a body, unless `headers` say otherwise."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    all_headers = {"Host": "gateway.test"}
    if data is not None:
        all_headers |= {"Content-Type": "application/json", "Content-Length": str(len(data))}
    all_headers |= headers or {}
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items()) + "\r\n"
    return head.encode("latin-1") + (data or b"")


def generate(tokens: int = 3, text: str = "hello") -> dict[str, Any]:
    return {"text": text, "sampling_params": {"max_new_tokens": tokens}}


def chat(stream: bool = False, tokens: int = 5, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": stream}


def chunked(*parts: bytes) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def assert_gateway_error(response: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A gateway error: the status, the JSON envelope, `x-smg-error-code` matching its code."""
    assert response.status == status, (response.status, response.body[:300])
    assert (response.header("content-type") or "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}, error
    assert error["message"] and error["code"], error
    assert response.header("x-smg-error-code") == error["code"], (response.headers, error)
    if code is not None:
        assert error["code"] == code, error
    return error


def poll(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    wait_until(lambda: bool(condition()), timeout, what, error=AssertionError)


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and its descendants (a gateway may run worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match[1]) * 1024 if match else 0
    return total


# -- gateways ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_gw(fleet: SimFleet, tmp_path_factory) -> Iterator[GatewayProcess]:
    """In front of the simulated fleet; a low pipelining cap so that 20 pipelined requests go past it."""
    args = ("--policy", "round_robin", "--max-pipelined-requests", "4", *GRACE)
    with start_gateway(tmp_path_factory.mktemp("sim-gw"), fleet.urls, *args) as gw:
        yield gw


@pytest.fixture(scope="module")
def limits_gw(fleet: SimFleet, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Small request limits and a short slow-header timeout."""
    args = ("--max-header-bytes", "4096", "--max-header-count", "16", "--max-payload-size", "1024")
    args += ("--client-header-timeout-secs", "0.5", *GRACE)
    with start_gateway(tmp_path_factory.mktemp("limits-gw"), fleet.urls, *args) as gw:
        yield gw


@pytest.fixture(scope="module")
def raw_worker() -> Iterator[RawWorker]:
    """Closes idle connections after 1 s like an engine's server; a listen backlog of 1 for the connect test."""
    with RawWorker(idle_close_secs=1.0, backlog=1) as worker:
        yield worker


@pytest.fixture(scope="module")
def raw_gw(raw_worker: RawWorker, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Short upstream timeouts, one attempt per request, no breaker (timeouts here are the point, not a fault)."""
    args = ("--upstream-idle-timeout-secs", "0.3", "--upstream-first-byte-timeout-secs", "0.5")
    args += ("--stream-idle-timeout-secs", "0.5", "--upstream-connect-timeout-secs", "0.5")
    args += ("--request-timeout-secs", "30", "--disable-retries", "--disable-circuit-breaker", *GRACE)
    with start_gateway(tmp_path_factory.mktemp("raw-gw"), [raw_worker.url], *args) as gw:
        yield gw


@pytest.fixture
def raw(raw_worker: RawWorker, raw_gw: GatewayProcess) -> Iterator[RawWorker]:
    """The raw gateway's worker, behaving `ok` with an empty record; held requests are let go afterwards."""
    raw_worker.reset()
    raw_worker.clear()
    yield raw_worker
    raw_worker.reset()
    raw_worker.resume_accepting()


@pytest.fixture(scope="module")
def plain_worker() -> Iterator[RawWorker]:
    with RawWorker() as worker:
        yield worker


@pytest.fixture(scope="module")
def plain_gw(plain_worker: RawWorker, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Default upstream timeouts (a 4 s pool expiry, a 300 s stream idle timeout) and one attempt per request."""
    args = ("--disable-retries", *GRACE)
    with start_gateway(tmp_path_factory.mktemp("plain-gw"), [plain_worker.url], *args) as gw:
        yield gw


@pytest.fixture
def plain(plain_worker: RawWorker, plain_gw: GatewayProcess) -> Iterator[RawWorker]:
    plain_worker.reset()
    plain_worker.clear()
    yield plain_worker
    plain_worker.reset()


def last_request(worker: RawWorker) -> RawRequest:
    requests = worker.inference_requests()
    assert requests, "the worker saw no inference request"
    return requests[-1]


# -- 1, 2: keep-alive and the upstream pool ----------------------------------------------------------------------
def test_client_keep_alive_serves_two_requests_on_one_socket(sim_gw):
    with RawClient(sim_gw.port) as client:
        for i in range(2):
            client.send(request("POST", "/generate", generate(), {"x-request-id": f"ka-{i}"}))
            response = client.read_response()
            assert response.status == 200, response.body
            assert response.header("x-request-id") == f"ka-{i}"
            assert "close" not in (response.header("connection") or "").lower()
            assert response.json()["meta_info"]["completion_tokens"] == 3


def test_upstream_connections_are_pooled(raw_gw, raw):
    requests = 20
    with RawClient(raw_gw.port) as client:
        for i in range(requests):
            client.send(request("POST", "/generate", generate(), {"x-request-id": f"pool-{i}"}))
            assert client.read_response().status == 200
    assert len(raw.inference_requests()) == requests
    used = raw.inference_connections()
    assert 1 <= len(used) <= 3, f"{requests} sequential requests used {len(used)} worker connections"


def test_pooled_connection_expires_before_the_workers_idle_timeout(raw_gw, raw):
    """--upstream-idle-timeout-secs 0.3, the worker closes idle connections after 1 s: a request 0.6 s after the
    last one finds the old connection closed by the gateway and opens a new one, with no error."""
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", "/generate", generate(), {"x-request-id": "idle-a"}))
        assert client.read_response().status == 200
        done = time.monotonic()
        first = raw.connection_of("idle-a")
        assert first is not None
        time.sleep(max(0.0, done + 0.6 - time.monotonic()))  # past the pool's expiry, before the worker's
        client.send(request("POST", "/generate", generate(), {"x-request-id": "idle-b"}))
        response = client.read_response()
    assert response.status == 200, response.body
    second = raw.connection_of("idle-b")
    assert second is not None and second.id != first.id, "the expired connection was reused"
    poll(lambda: not first.open, "the expired connection to be closed", 2)
    assert first.closed_by == "peer", "the worker's idle timeout closed the connection, not the gateway's expiry"
    assert first.closed_at is not None and first.closed_at - done < 1.0


def test_dead_pooled_connection_is_retried_once_on_a_fresh_one(plain_gw, plain):
    """A kept-alive connection the worker closes after reading the next request (no byte of answer) is retried on
    a new connection, even with --disable-retries, and counts as no failure of the worker."""
    with RawClient(plain_gw.port) as client:
        client.send(request("POST", "/generate", generate(), {"x-request-id": "stale-a"}))
        assert client.read_response().status == 200
        plain.drop_reused_once = True
        client.send(request("POST", "/generate", generate(), {"x-request-id": "stale-b"}))
        response = client.read_response()
    assert plain.dropped == 1, "the second request did not reuse the pooled connection"
    assert response.status == 200, response.body
    arrivals = [r.connection for r in plain.inference_requests() if r.request_id == "stale-b"]
    assert len(arrivals) == 2 and arrivals[0] != arrivals[1], arrivals
    assert arrivals[0] == plain.connection_of("stale-a").id
    (worker,) = plain_gw.workers()
    assert worker["circuit_state"] == "closed" and worker["status"] == "ready", worker
    metrics = plain_gw.metrics()
    failed = [s for s in metrics.samples if s.name == "smg_worker_requests_total" and s.labels.get("status") != "200"]
    assert not [s for s in failed if s.value], failed
    assert not metrics.total("smg_worker_cb_consecutive_failures")


# -- 3: pipelining -----------------------------------------------------------------------------------------------
def test_pipelined_requests_are_answered_in_order_past_the_cap(sim_gw):
    """20 requests in one write to a gateway with --max-pipelined-requests 4; earlier ones take longer to generate,
    so an out-of-order writer would show."""
    count = 20
    data = b""
    for i in range(count):
        headers = {"x-request-id": f"pipe-{i}"}
        if i % 7 == 3:
            data += request("GET", "/v1/models", headers=headers)
        elif i % 7 == 5:
            data += request("POST", "/v1/completions", {"model": MODEL, "prompt": f"p{i}", "max_tokens": 2}, headers)
        else:
            data += request("POST", "/generate", generate(tokens=count - i, text=f"pipelined {i}"), headers)
    with RawClient(sim_gw.port, timeout=15) as client:
        client.send(data)
        for i in range(count):
            response = client.read_response()
            assert response.status == 200, (i, response.body)
            assert response.header("x-request-id") == f"pipe-{i}", f"response {i} is for another request"
            if i % 7 == 3:
                assert response.json()["data"][0]["id"] == MODEL
            elif i % 7 == 5:
                assert response.json()["usage"]["completion_tokens"] == 2
            else:
                assert response.json()["meta_info"]["completion_tokens"] == count - i
        client.send(request("POST", "/generate", generate(), {"x-request-id": "after-pipeline"}))
        assert client.read_response().header("x-request-id") == "after-pipeline"


# -- 4: Connection: close and HTTP/1.0 ---------------------------------------------------------------------------
def test_connection_close_is_answered_then_closed(sim_gw):
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/generate", generate(), {"Connection": "close", "x-request-id": "closing"}))
        response = client.read_response()
        assert response.status == 200 and response.header("x-request-id") == "closing", response.body
        assert "close" in (response.header("connection") or "").lower(), response.headers
        assert client.closed(), "the server sent more after a Connection: close response"


def test_request_pipelined_after_connection_close_is_not_answered(sim_gw):
    """RFC 9112 section 9.6: the request carrying `close` is answered, nothing received after it is processed."""
    first = request("POST", "/generate", generate(), {"Connection": "close", "x-request-id": "closing"})
    follow_up = request("GET", "/liveness", headers={"x-request-id": "after-close"})
    with RawClient(sim_gw.port) as client:
        client.send(first + follow_up)
        response = client.read_response()
        assert response.status == 200 and response.header("x-request-id") == "closing", response.body
        assert "close" in (response.header("connection") or "").lower(), response.headers
        assert client.closed(), "the server answered a request sent after Connection: close"


def test_http10_request_gets_content_length_and_close(sim_gw):
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/generate", generate(), version="HTTP/1.0"))
        response = client.read_response()
        assert response.status == 200
        assert response.framing == "length", response.headers
        assert response.json()["meta_info"]["completion_tokens"] == 3
        assert client.closed()


def test_http10_stream_is_delimited_by_close(sim_gw):
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/v1/chat/completions", chat(stream=True), version="HTTP/1.0"))
        response = client.read_response()
    assert response.status == 200
    assert response.framing == "close", f"HTTP/1.0 stream framed by {response.framing}: {response.headers}"
    events = response.events()
    assert events[-1] == "[DONE]" and len(events) >= 5, events


# -- 5: Expect: 100-continue -------------------------------------------------------------------------------------
def test_expect_100_continue_before_the_body(sim_gw):
    body = json.dumps(generate()).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Expect": "100-continue"}
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/generate", headers=headers))
        interim = client.read_head()  # the body is not sent yet: only a 100 can come
        assert interim.status == 100, interim
        client.send(body)
        response = client.read_response()
    assert response.status == 200 and response.json()["meta_info"]["completion_tokens"] == 3


def test_expect_100_continue_over_the_limit_gets_413_without_continue(limits_gw):
    headers = {"Content-Type": "application/json", "Content-Length": "1000000", "Expect": "100-continue"}
    with RawClient(limits_gw.port) as client:
        client.send(request("POST", "/generate", headers=headers))
        response = client.read_response()
    assert response.interim == [], "100 Continue sent for a body that is refused"
    assert_gateway_error(response, 413, "request_body_too_large")


# -- 6: chunked bodies -------------------------------------------------------------------------------------------
def test_chunked_request_body_is_accepted(sim_gw, fleet):
    body = json.dumps(generate(text="chunked upload " * 8)).encode()
    parts = [body[:7], body[7:40], body[40:41], body[41:]]
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked", "x-request-id": "chunked-up"}
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/generate", headers=headers) + chunked(*parts))
        response = client.read_response()
    assert response.status == 200, response.body
    index = fleet.urls.index(response.header("x-smg-routed-worker-id"))
    seen = [r for r in fleet.log(index)["requests"] if r["headers"].get("x-request-id") == "chunked-up"]
    assert seen and seen[-1]["body"] == json.loads(body)


def test_streamed_response_is_valid_chunked_ending_with_done(sim_gw):
    with RawClient(sim_gw.port) as client:
        client.send(request("POST", "/v1/chat/completions", chat(stream=True, tokens=8)))
        response = client.read_response()  # parses the chunked framing strictly, through 0\r\n\r\n
        assert response.status == 200 and response.framing == "chunked", response.headers
        assert (response.header("content-type") or "").startswith("text/event-stream")
        events = response.events()
        assert events[-1] == "[DONE]", events[-3:]
        content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert content
        client.send(request("GET", "/liveness"))  # the connection is still in sync
        assert client.read_response("GET").status == 200


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_worker_chunks_split_across_writes_are_relayed_intact(raw_gw, raw, stream):
    raw.behavior = "odd_chunks"
    path, body = ("/v1/chat/completions", chat(stream=True, model="raw-model")) if stream else ("/generate", generate())
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", path, body))
        response = client.read_response()
    assert response.status == 200, response.body
    sent = last_request(raw)
    expected = b"".join(stream_frames(sent)) if stream else answer_body(sent)
    assert response.body == expected


# -- 7: responses without a body, interim responses, close-delimited upstream bodies -----------------------------
@pytest.mark.parametrize("path", ["/health", "/liveness"])
def test_head_has_no_body_and_the_connection_stays_usable(sim_gw, path):
    with RawClient(sim_gw.port) as client:
        client.send(request("HEAD", path))
        response = client.read_response("HEAD")
        assert response.status == 200
        client.send(request("GET", "/liveness", headers={"x-request-id": "after-head"}))
        follow_up = client.read_response("GET")  # a stray HEAD body would be parsed here as a status line
    assert follow_up.status == 200 and follow_up.header("x-request-id") == "after-head"


def test_worker_204_is_relayed_without_a_body(raw_gw, raw):
    raw.behavior = "no_content"
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", "/generate", generate()))
        response = client.read_response()  # asserts neither Content-Length nor Transfer-Encoding
        assert response.status == 204
        raw.behavior = "ok"
        client.send(request("POST", "/generate", generate(), {"x-request-id": "after-204"}))
        follow_up = client.read_response()
    assert follow_up.status == 200 and follow_up.header("x-request-id") == "after-204"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_worker_early_hints_then_200_reaches_the_client_as_the_200(raw_gw, raw, stream):
    raw.behavior = "early_hints"
    path, body = ("/v1/chat/completions", chat(stream=True, model="raw-model")) if stream else ("/generate", generate())
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", path, body))
        response = client.read_response()
    assert response.status == 200, response.body
    sent = last_request(raw)
    assert response.body == (b"".join(stream_frames(sent)) if stream else answer_body(sent))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_worker_body_delimited_by_close_is_relayed_completely(raw_gw, raw, stream):
    raw.behavior = "close_delimited"
    path, body = ("/v1/chat/completions", chat(stream=True, model="raw-model")) if stream else ("/generate", generate())
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", path, body))
        response = client.read_response()
        assert response.status == 200, response.body
        sent = last_request(raw)
        assert response.body == (b"".join(stream_frames(sent)) if stream else answer_body(sent))
        raw.behavior = "ok"
        client.send(request("POST", "/generate", generate(), {"x-request-id": "after-close-delimited"}))
        assert client.read_response().header("x-request-id") == "after-close-delimited"


# -- 8: limits ---------------------------------------------------------------------------------------------------
def test_header_block_over_max_header_bytes_gets_431_and_close(limits_gw):
    headers = {f"X-Big-{i}": "b" * 1500 for i in range(3)}  # ~4.6 KB, 3 headers
    with RawClient(limits_gw.port) as client:
        client.send(request("POST", "/generate", generate(), headers))
        assert_gateway_error(client.read_response(), 431)
        assert client.closed()


def test_more_headers_than_max_header_count_gets_431_and_close(limits_gw):
    headers = {f"X-Many-{i}": "1" for i in range(20)}
    with RawClient(limits_gw.port) as client:
        client.send(request("POST", "/generate", generate(), headers))
        assert_gateway_error(client.read_response(), 431)
        assert client.closed()


def test_content_length_over_the_limit_gets_413_before_the_body(limits_gw):
    headers = {"Content-Type": "application/json", "Content-Length": str(10 * 1024 * 1024)}
    with RawClient(limits_gw.port) as client:
        client.send(request("POST", "/generate", headers=headers))  # and never a byte of the body
        assert_gateway_error(client.read_response(), 413, "request_body_too_large")


def test_chunked_body_growing_past_the_limit_gets_413(limits_gw):
    """1.6 KB of chunks against a 1 KB limit, and no terminating chunk: the gateway must not wait for the end."""
    parts = [b" " * 400] * 4
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts)
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    with RawClient(limits_gw.port) as client:
        client.send(request("POST", "/generate", headers=headers) + body)
        assert_gateway_error(client.read_response(), 413, "request_body_too_large")


def test_client_stalling_mid_head_is_disconnected(limits_gw):
    with RawClient(limits_gw.port, timeout=READ_TIMEOUT) as client:
        client.send(b"POST /generate HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: appl")
        started = time.monotonic()
        try:
            received = client.read_until_eof()
        except TimeoutError:
            pytest.fail(f"still connected {READ_TIMEOUT:g}s after stalling (--client-header-timeout-secs 0.5)")
    assert time.monotonic() - started >= 0.4
    if received:  # a 408 before closing is allowed
        assert_gateway_error(RawClient.parser(received).read_response(), 408)


# -- 9: request smuggling ----------------------------------------------------------------------------------------
_SMUGGLE_BODY = json.dumps(generate()).encode()
_SMUGGLED = b"GET /liveness HTTP/1.1\r\nHost: gateway.test\r\nx-request-id: smuggled\r\n\r\n"


def _head(*lines: str) -> bytes:
    """A POST /generate head with these framing header lines."""
    head = "POST /generate HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
    return (head + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


SMUGGLING = {
    "cl-then-te": _head(f"Content-Length: {len(chunked(_SMUGGLE_BODY))}", "Transfer-Encoding: chunked")
    + chunked(_SMUGGLE_BODY)
    + _SMUGGLED,
    "te-then-cl": _head("Transfer-Encoding: chunked", "Content-Length: 4") + chunked(_SMUGGLE_BODY) + _SMUGGLED,
    "conflicting-cl": _head(f"Content-Length: {len(_SMUGGLE_BODY)}", f"Content-Length: {len(_SMUGGLE_BODY) + 4}")
    + _SMUGGLE_BODY
    + b"\r\n\r\n"
    + _SMUGGLED,
    "duplicate-cl": _head(f"Content-Length: {len(_SMUGGLE_BODY)}", f"Content-Length: {len(_SMUGGLE_BODY)}")
    + _SMUGGLE_BODY
    + _SMUGGLED,
    "cl-list": _head(f"Content-Length: {len(_SMUGGLE_BODY)}, {len(_SMUGGLE_BODY)}") + _SMUGGLE_BODY + _SMUGGLED,
    "bad-chunk-size": _head("Transfer-Encoding: chunked") + b"zz\r\n" + _SMUGGLE_BODY + b"\r\n0\r\n\r\n" + _SMUGGLED,
    "chunked-not-last": _head("Transfer-Encoding: chunked, identity") + chunked(_SMUGGLE_BODY) + _SMUGGLED,
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_ambiguous_framing_gets_400_and_close_and_nothing_smuggled(sim_gw, name):
    with RawClient(sim_gw.port) as client:
        client.send(SMUGGLING[name])
        assert_gateway_error(client.read_response(), 400)
        rest = client.read_until_eof()
    assert b"HTTP/1." not in rest and b"smuggled" not in rest, f"answered a smuggled request: {rest[:300]!r}"


# -- 10: hop-by-hop headers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_hop_by_hop_headers_from_the_worker_are_not_relayed(raw_gw, raw, stream):
    raw.behavior = "hop_headers"
    path, body = ("/v1/chat/completions", chat(stream=True, model="raw-model")) if stream else ("/generate", generate())
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", path, body))
        response = client.read_response()
    assert response.status == 200
    assert response.header("x-worker-thing") == "1", "an end-to-end header was dropped"
    leaked = {name: response.header(name) for name in HOP_BY_HOP_NAMES if response.header(name) is not None}
    own_connection = leaked.pop("connection", "keep-alive").lower()  # the gateway's own header may say this
    assert own_connection in ("keep-alive", "close"), f"Connection relayed from the worker: {own_connection!r}"
    assert not leaked, f"hop-by-hop headers relayed: {leaked}"


# -- 11: upstream timeouts ---------------------------------------------------------------------------------------
def test_first_byte_timeout_gives_504_and_closes_the_worker_connection(raw_gw, raw):
    raw.behavior = "never"
    started = time.monotonic()
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", "/generate", generate(), {"x-request-id": "no-answer"}))
        response = client.read_response()
    elapsed = time.monotonic() - started
    assert_gateway_error(response, 504, "call_upstream_timeout")
    assert elapsed < 3, f"504 after {elapsed:.1f}s with --upstream-first-byte-timeout-secs 0.5"
    conn = raw.connection_of("no-answer")
    assert conn is not None
    poll(lambda: not conn.open, "the gateway to close the unanswered worker connection", 5)
    assert conn.closed_by == "peer"


def test_stream_idle_timeout_ends_the_stream_with_an_error_frame(raw_gw, raw):
    raw.behavior = "stall_stream"
    headers = {"x-request-id": "stalled-stream"}
    with RawClient(raw_gw.port) as client:
        client.send(request("POST", "/v1/chat/completions", chat(stream=True, model="raw-model"), headers))
        response = client.read_response()  # through a proper 0\r\n\r\n
    assert response.status == 200 and response.framing == "chunked", response.headers
    events = response.events()
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok0 ", events
    assert "error" in json.loads(events[-1]), events
    assert "[DONE]" not in events
    conn = raw.connection_of("stalled-stream")
    assert conn is not None
    poll(lambda: not conn.open, "the gateway to close the stalled worker connection", 5)
    assert conn.closed_by == "peer"


def test_upstream_connect_timeout_gives_504(raw_gw, raw):
    """The worker stops accepting and its backlog of 1 is full: a connect hangs (SYN dropped), and
    --upstream-connect-timeout-secs 0.5 turns that into a 504."""
    poll(lambda: not raw.open_connections(), "the pooled worker connections to be closed", 5)
    raw.pause_accepting()
    fillers = []
    try:
        for _ in range(2):
            fillers.append(socket.create_connection(("127.0.0.1", raw.port), timeout=2))
        with pytest.raises(TimeoutError):  # precondition: a new connect hangs now
            fillers.append(socket.create_connection(("127.0.0.1", raw.port), timeout=0.3))
        started = time.monotonic()
        with RawClient(raw_gw.port) as client:
            client.send(request("POST", "/generate", generate()))
            response = client.read_response()
        elapsed = time.monotonic() - started
        assert_gateway_error(response, 504, "call_upstream_timeout")
        assert elapsed < 3, f"504 after {elapsed:.1f}s with --upstream-connect-timeout-secs 0.5"
    finally:
        for filler in fillers:
            filler.close()
        raw.resume_accepting()


# -- 12: backpressure --------------------------------------------------------------------------------------------
def test_slow_client_backpressures_the_worker_and_its_leaving_releases_it(plain_gw, plain):
    pid = plain_gw.process.pid
    with RawClient(plain_gw.port) as warmup:  # let the gateway settle its memory on a first stream
        warmup.send(request("POST", "/v1/chat/completions", chat(stream=True, model="raw-model")))
        assert warmup.read_response().status == 200
    baseline = tree_rss_bytes(pid)
    plain.behavior = "flood"
    client = RawClient(plain_gw.port, rcvbuf=64 * 1024)
    try:
        headers = {"x-request-id": "flood"}
        client.send(request("POST", "/v1/chat/completions", chat(stream=True, model="raw-model"), headers))
        head = client.read_head()
        assert head.status == 200
        client.read_exact(4096)  # the stream flows; from here on the client reads nothing

        flood = None
        last = (-1, time.monotonic())

        def writes_blocked() -> bool:
            nonlocal flood, last
            flood = flood or plain.connection_of("flood")
            if flood is None:
                return False
            now = time.monotonic()
            if flood.bytes_sent != last[0]:
                last = (flood.bytes_sent, now)
                return False
            return now - last[1] >= 0.5

        poll(writes_blocked, "the worker's writes to block", 20)
        assert flood is not None and flood.open
        assert flood.bytes_sent < plain.flood_cap, "the gateway took the whole stream from the worker"
        grown = tree_rss_bytes(pid) - baseline
        assert grown < 64 * 1024 * 1024, f"gateway RSS grew {grown / 2**20:.0f} MiB for one unread stream"
    finally:
        client.close()
    poll(lambda: not flood.open, "the gateway to close the worker connection after the client left", 10)
    assert flood.closed_by == "peer"
    plain_gw.wait_workers(lambda ws: ws[0]["requests_active"] == 0, "load back to 0", 10)


# -- 13: admission before the body -------------------------------------------------------------------------------
def test_admission_refuses_before_the_body_is_sent(tmp_path):
    with RawWorker(behavior="never") as worker:
        args = ("--max-concurrent-requests", "1", "--queue-size", "0", "--disable-retries", *GRACE)
        with start_gateway(tmp_path, [worker.url], *args) as gw:
            busy = RawClient(gw.port)
            try:
                busy.send(request("POST", "/generate", generate(), {"x-request-id": "holder"}))
                poll(lambda: worker.connection_of("holder"), "the first request to reach the worker", 5)
                with RawClient(gw.port) as client:
                    headers = {"Content-Type": "application/json", "Content-Length": str(10 * 1024 * 1024)}
                    client.send(request("POST", "/generate", headers=headers))  # no body follows
                    assert_gateway_error(client.read_response(), 429, "admission_queue_full")
            finally:
                worker.reset()  # the held request ends (the gateway answers it 502)
                busy.close()


# -- 14: graceful shutdown ---------------------------------------------------------------------------------------
def test_stream_in_flight_at_sigterm_completes_and_the_gateway_exits_0(fleet, tmp_path):
    args = ("--shutdown-drain-window-secs", "0", "--shutdown-grace-period-secs", "20")
    with start_gateway(tmp_path, fleet.urls, *args) as gw, RawClient(gw.port, timeout=15) as client:
        client.send(request("POST", "/v1/chat/completions", chat(stream=True, tokens=300)))
        head = client.read_head()
        assert head.status == 200 and (head.header("transfer-encoding") or "").lower() == "chunked"
        first = client.next_chunk()
        assert first
        gw.process.send_signal(signal.SIGTERM)
        client.read_body(head)  # the rest, through 0\r\n\r\n
        head.body = first + head.body
        events = head.events()
        assert events[-1] == "[DONE]", events[-3:]
        finish = [c.get("finish_reason") for e in events[:-1] for c in json.loads(e)["choices"]]
        assert "length" in finish, "the stream ended before its 300 tokens"
        assert gw.process.wait(20) == 0


# -- 15: real clients --------------------------------------------------------------------------------------------
def test_openai_client(sim_gw):
    client = openai.OpenAI(base_url=sim_gw.url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert completion.choices[0].message.content and completion.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = client.completions.create(model=MODEL, prompt="once upon", max_tokens=4)
    assert text.choices[0].text and text.usage.completion_tokens == 4


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require("curl")), "--http1.1", "-sS", "--max-time", "20", "--noproxy", "*", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_curl_streams_with_no_buffering(sim_gw):
    result = curl(
        "-N",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        json.dumps(chat(stream=True)),
        sim_gw.url + "/v1/chat/completions",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("data: [DONE]"), result.stdout[-300:]


def test_curl_expect_100_continue_for_a_large_body(sim_gw, tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(generate(text="x" * 2000)))
    result = curl(
        "-v",
        "--expect100-timeout",
        "10",
        "-H",
        "Expect: 100-continue",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{path}",
        "-w",
        "\n%{http_code}",
        sim_gw.url + "/generate",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^< HTTP/1\.1 100 Continue", result.stderr, re.MULTILINE), result.stderr
    assert result.stdout.rsplit("\n", 1)[-1] == "200", result.stdout[-300:]


def test_curl_chunked_upload(sim_gw, tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(generate(text="y" * 3000)))
    result = curl(
        "-v",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{path}",
        "-w",
        "\n%{http_code}",
        sim_gw.url + "/generate",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^> Transfer-Encoding: chunked", result.stderr, re.MULTILINE | re.IGNORECASE), result.stderr
    assert result.stdout.rsplit("\n", 1)[-1] == "200", result.stdout[-300:]


def test_wrk_sees_no_socket_errors_and_no_failures(sim_gw, tmp_path):
    if shutil.which("wrk") is None and not (COMPONENTS / "bin" / "wrk").exists():
        pytest.fail(
            "wrk is not installed: run `bash tools/components/wrk.sh` (apt-get install -y wrk) or `make components`",
            pytrace=False,
        )
    wrk = require("wrk")
    script = tmp_path / "generate.lua"
    body = json.dumps(generate(tokens=2))
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n')
    result = subprocess.run(
        [str(wrk), "-t1", "-c8", "-d2s", "-s", str(script), sim_gw.url + "/generate"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Socket errors" not in result.stdout, result.stdout
    assert "Non-2xx" not in result.stdout, result.stdout
    total = re.search(r"(\d+) requests in", result.stdout)
    assert total and int(total[1]) > 0, result.stdout
