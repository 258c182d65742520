"""`shepherd sim --kv-events-config`: KV events over ZMQ as SGLang's HTTP server publishes them, from a real process.

A SUB socket that just connected misses what is published before its subscription reaches the PUB socket (ZMQ's
slow joiner), so `KvFeed.sync` publishes a marker (a prompt of ids no request uses) until it arrives: after it,
every batch of that rank is received, in order. Waiting is always a poll of the socket with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import zmq
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2
from tokenizers import Tokenizer

from shepherd.tokenizer.chat_template import ChatTemplate
from tests.support.processes import SimFleet, http_request, start_sim

PAGE = 4
TOPIC = "sim-kv"
CONFIG = json.dumps({"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*", "topic": TOPIC})
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Explain how a prefix cache speeds up serving."},
]
_markers = itertools.count(1_000_000)  # prompt ids far outside the BPE's vocabulary: no request stores them


@dataclass
class Batch:
    topic: bytes
    sequence: int
    ts: float
    events: list[list[Any]]

    def stored_ids(self) -> list[int]:
        assert all(event[0] == "BlockStored" for event in self.events), self.events
        return [token for event in self.events for token in event[3]]


class KvFeed:
    """One SUB socket per DP rank of a sim worker, subscribed to everything."""

    def __init__(self, url: str, endpoint: str, ranks: int) -> None:
        self.url = url
        self.context = zmq.Context()
        host, port = endpoint.rsplit(":", 1)
        self.subs = []
        for rank in range(ranks):
            sub = self.context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"{host}:{int(port) + rank}")
            self.subs.append(sub)
        self.last_sequence = [-1] * ranks

    def close(self) -> None:
        for sub in self.subs:
            sub.close(linger=0)
        self.context.term()

    def poll(self, rank: int, timeout: float) -> Batch | None:
        sub = self.subs[rank]
        if not sub.poll(int(timeout * 1000)):
            return None
        topic, sequence, payload = sub.recv_multipart()
        ts, events = msgpack.unpackb(payload)
        batch = Batch(topic, int.from_bytes(sequence, "big"), ts, events)
        if self.last_sequence[rank] >= 0:  # once in sync, batches follow each other with no gap
            assert batch.sequence == self.last_sequence[rank] + 1, (rank, batch.sequence, self.last_sequence)
        self.last_sequence[rank] = batch.sequence
        return batch

    def next(self, rank: int, timeout: float = 10.0) -> Batch:
        batch = self.poll(rank, timeout)
        if batch is None:
            raise AssertionError(f"no KV event batch from rank {rank} within {timeout:g}s")
        return batch

    def sync(self, rank: int, timeout: float = 15.0) -> None:
        """Publish markers on `rank` until one arrives; everything up to it is skipped."""
        deadline = time.monotonic() + timeout
        self.last_sequence[rank] = -1
        while time.monotonic() < deadline:
            marker = [next(_markers)] * PAGE
            body = {"input_ids": [*marker, 0], "sampling_params": {"max_new_tokens": 0}, "data_parallel_rank": rank}
            assert http_request("POST", self.url + "/generate", body)[0] == 200
            poll_until = time.monotonic() + 0.2
            while (batch := self.poll(rank, max(0.0, poll_until - time.monotonic()))) is not None:
                if any(event[0] == "BlockStored" and event[3] == marker for event in batch.events):
                    return
        raise AssertionError(f"rank {rank}'s KV events never arrived within {timeout:g}s")

    def flush(self) -> None:
        """`POST /flush_cache`; each rank's next batch is the full flush."""
        assert http_request("POST", self.url + "/flush_cache")[0] == 200
        for rank in range(len(self.subs)):
            assert self.next(rank).events == [["AllBlocksCleared"]]


def server_info(url: str) -> dict[str, Any]:
    status, info = http_request("GET", url + "/get_server_info")
    assert status == 200
    return info


def ready_file(directory: Path) -> dict[str, Any]:
    (path,) = directory.glob("sim-*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    directory = tmp_path_factory.mktemp("sim-kv-zmq")
    args = ("--dp-size", "2", "--page-size", str(PAGE), "--kv-events-config", CONFIG)
    with start_sim(directory, 1, *args) as fleet:
        fleet.ready = ready_file(directory)
        yield fleet


@pytest.fixture(scope="module")
def module_feed(sim: SimFleet) -> Iterator[KvFeed]:
    endpoint = json.loads(server_info(sim.urls[0])["kv_events_config"])["endpoint"]
    feed = KvFeed(sim.urls[0], endpoint, ranks=2)
    yield feed
    feed.close()


@pytest.fixture
def feed(module_feed: KvFeed) -> KvFeed:
    """In sync on both ranks, with an empty cache."""
    module_feed.sync(0)
    module_feed.sync(1)
    module_feed.flush()
    return module_feed


@pytest.fixture(scope="module")
def tokenizer(sim: SimFleet) -> tuple[Tokenizer, ChatTemplate]:
    """The tokenizer and chat template the worker reports, loaded as a gateway on the same machine would."""
    directory = Path(server_info(sim.urls[0])["tokenizer_path"])
    config = json.loads((directory / "tokenizer_config.json").read_text())
    return Tokenizer.from_file(str(directory / "tokenizer.json")), ChatTemplate(config["chat_template"])


def chat(url: str, rank: int, max_tokens: int = 6) -> dict[str, Any]:
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens, "data_parallel_rank": rank}
    status, answer = http_request("POST", url + "/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def aligned(ids: list[int]) -> list[int]:
    return ids[: len(ids) // PAGE * PAGE]


def test_server_info_reports_the_resolved_endpoint_the_tokenizer_and_the_page_size(sim: SimFleet):
    url = sim.urls[0]
    for path in ("/get_server_info", "/server_info"):
        status, info = http_request("GET", url + path)
        assert status == 200
        config = json.loads(info["kv_events_config"])
        host, port = config["endpoint"].rsplit(":", 1)
        assert (config["publisher"], config["topic"], host) == ("zmq", TOPIC, "tcp://127.0.0.1")
        assert port.isdigit() and info["page_size"] == PAGE
        directory = Path(info["tokenizer_path"])
        assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()
    ready = sim.ready
    assert ready["kv_events_endpoints"] == [config["endpoint"]] and ready["tokenizer_dir"] == str(directory)


def test_a_chat_completion_publishes_the_page_aligned_bpe_prompt_then_nothing_when_repeated(
    sim: SimFleet, feed: KvFeed, tokenizer: tuple[Tokenizer, ChatTemplate]
):
    bpe, template = tokenizer
    prompt_ids = bpe.encode(template.render(MESSAGES, add_generation_prompt=True), add_special_tokens=False).ids
    answer = chat(sim.urls[0], rank=0)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids) and answer["usage"]["completion_tokens"] == 6
    reply_ids = bpe.encode(answer["choices"][0]["message"]["content"], add_special_tokens=False).ids
    assert len(reply_ids) == 6  # every output word is one BPE token

    batch = feed.next(0)  # the request's whole turn: the prompt's pages, then the pages its output completed
    assert batch.topic == TOPIC.encode() and isinstance(batch.ts, float) and abs(batch.ts - time.time()) < 60
    assert [event[0] for event in batch.events] == ["BlockStored", "BlockStored"]
    (_, prompt_keys, root, prompt_tokens, size, lora), (_, output_keys, parent, _, size2, lora2) = batch.events
    assert prompt_tokens == aligned(prompt_ids)
    assert batch.stored_ids() == aligned(prompt_ids + reply_ids)
    assert (root, size, lora, size2, lora2) == (None, PAGE, None, PAGE, None)
    assert len(prompt_keys) == len(prompt_ids) // PAGE and parent == prompt_keys[-1]
    assert all(isinstance(key, int) and -(2**63) <= key < 2**63 for key in prompt_keys + output_keys)

    again = chat(sim.urls[0], rank=0)
    # Cached: the prompt's full pages (all of them but the last one if the prompt fills its last page).
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt_ids) - 1) // PAGE * PAGE
    feed.sync(0)  # the marker is the next batch: the repeated request stored nothing


def test_rank_1_publishes_on_the_next_port_and_rank_0_hears_nothing_of_it(
    sim: SimFleet, feed: KvFeed, tokenizer: tuple[Tokenizer, ChatTemplate]
):
    bpe, template = tokenizer
    prompt_ids = bpe.encode(template.render(MESSAGES, add_generation_prompt=True), add_special_tokens=False).ids
    chat(sim.urls[0], rank=1, max_tokens=0)
    batch = feed.next(1)
    assert batch.stored_ids() == aligned(prompt_ids) and batch.events[0][2] is None
    feed.sync(0)  # rank 0's next batch is the marker: it published nothing for rank 1's request


def test_flush_cache_publishes_all_blocks_cleared_on_every_rank(sim: SimFleet, feed: KvFeed):
    chat(sim.urls[0], rank=0)
    chat(sim.urls[0], rank=1)
    assert feed.next(0).stored_ids() and feed.next(1).stored_ids()
    sequences = list(feed.last_sequence)
    feed.flush()  # asserts each rank's next batch is [["AllBlocksCleared"]]
    assert feed.last_sequence == [sequence + 1 for sequence in sequences]


def test_shutdown_closes_the_sockets_and_removes_the_tokenizer_directory(tmp_path: Path):
    fleet = start_sim(tmp_path, 2, "--kv-events-config", CONFIG)
    try:
        infos = [server_info(url) for url in fleet.urls]
        endpoints = [json.loads(info["kv_events_config"])["endpoint"] for info in infos]
        ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in endpoints]
        assert len(set(ports)) == 2  # one port per worker
        directory = Path(infos[0]["tokenizer_path"])
        assert directory.is_dir() and infos[1]["tokenizer_path"] == str(directory)
    finally:
        assert fleet.process.stop() == 0
    assert not directory.exists()
    context = zmq.Context()
    try:
        for port in ports:  # the ports are free again: a PUB socket can bind them
            sock = context.socket(zmq.PUB)
            sock.bind(f"tcp://127.0.0.1:{port}")
            sock.close(linger=0)
    finally:
        context.term()


async def test_grpc_mode_serves_subscribe_kv_events_and_publishes_the_same_batches_over_zmq(tmp_path: Path):
    with start_sim(tmp_path, 1, "--grpc", "--page-size", str(PAGE), "--kv-events-config", CONFIG):
        ready = ready_file(tmp_path)
        grpc_url, http_url = ready["urls"][0], ready["http_urls"][0]
        (endpoint,) = ready["kv_events_endpoints"]
        assert json.loads(server_info(http_url)["kv_events_config"])["endpoint"] == endpoint
        feed = KvFeed(http_url, endpoint, ranks=1)
        try:
            feed.sync(0)  # over the HTTP sidecar's /generate: the same engine
            async with grpc.aio.insecure_channel(grpc_url.removeprefix("grpc://")) as channel:
                stub = pb_grpc.SglangSchedulerStub(channel)
                call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())
                snapshot = await asyncio.wait_for(call.read(), timeout=10)
                assert snapshot.HasField("snapshot")  # served, not UNIMPLEMENTED
                prompt = list(range(10, 10 + 3 * PAGE + 1))
                request = pb.GenerateRequest(
                    request_id="r1",
                    tokenized=pb.TokenizedInput(input_ids=prompt),
                    sampling_params=pb.SamplingParams(n=1, max_new_tokens=1),
                )
                async for _ in stub.Generate(request):
                    pass
                live = await asyncio.wait_for(call.read(), timeout=10)
                zmq_batch = feed.next(0)
                grpc_keys = [b.block_hash for e in live.events for b in e.stored.blocks]
                assert [key for event in zmq_batch.events for key in event[1]] == grpc_keys
                assert zmq_batch.stored_ids() == [t for e in live.events for b in e.stored.blocks for t in b.token_ids]
                assert zmq_batch.stored_ids()[: 3 * PAGE] == prompt[: 3 * PAGE]
                assert zmq_batch.ts == live.timestamp
                call.cancel()
        finally:
            feed.close()
