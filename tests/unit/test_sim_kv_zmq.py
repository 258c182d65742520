"""The sim's ZMQ KV events (SGLang's `--kv-events-config` wire): config, endpoints, msgpack batches, PUB sockets;
and the BPE prompt tokenizer the engine caches by when it publishes them."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import msgpack
import pytest
import zmq
from tokenizers import Tokenizer

from shepherd.sim import bpe
from shepherd.sim.config import SimConfig, add_sim_arguments
from shepherd.sim.kv_cache import PrefixCache
from shepherd.sim.kv_events import KvEventPublisher, Subscriber
from shepherd.sim.kv_zmq import KvEventsConfig, WorkerSockets, ZmqOutlet, binds, rank_endpoint, worker_endpoint
from shepherd.sim.prompt_tokens import BpePrompts
from shepherd.sim.server import run_sim
from shepherd.sim.tokenizer import OUTPUT_VOCAB
from shepherd.sim.wire import RequestError

INT64 = range(-(2**63), 2**63)


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


class RecordingSocket:
    """Stands in for a PUB socket: each multipart message goes into a queue (or a list without an event loop)."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.queue: asyncio.Queue[list[bytes]] | None = None

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        assert flags == zmq.NOBLOCK  # publishing never blocks the event loop
        self.sent.append(frames)
        if self.queue is not None:
            self.queue.put_nowait(frames)

    async def next(self) -> tuple[bytes, int, list]:
        assert self.queue is not None
        topic, sequence, payload = await asyncio.wait_for(self.queue.get(), timeout=5)
        return topic, int.from_bytes(sequence, "big"), msgpack.unpackb(payload)


def zmq_published(
    rank: int, topic: str = "", capacity_tokens: int = 1000
) -> tuple[PrefixCache, RecordingSocket, KvEventPublisher]:
    """A rank's cache whose publisher has a ZMQ outlet on a recording socket."""
    publisher = KvEventPublisher(rank)
    socket = RecordingSocket()
    publisher.add_outlet(ZmqOutlet(socket, topic))  # type: ignore[arg-type]
    cache = PrefixCache(capacity_tokens, 4, events=publisher)
    publisher.attach(cache.resident_pages)
    return cache, socket, publisher


# --- batches on the wire ----------------------------------------------------------------------------------------------


async def test_a_batch_is_three_frames_whose_payload_decodes_to_sglang_s_layout():
    cache, socket, _ = zmq_published(rank=0, topic="kv", capacity_tokens=12)  # 3 pages
    socket.queue = asyncio.Queue()
    before = time.time()
    a, b = tokens(0, 9), tokens(100, 13)
    a1, a2 = cache.page_keys(a)
    b1, b2, b3 = cache.page_keys(b)
    cache.release(cache.acquire(a))  # stores a1, a2
    lease_b = cache.acquire(b)  # evicts a2 then a1, stores b1, b2, b3
    topic, sequence, (ts, events) = await socket.next()
    assert socket.queue.empty()  # the events of one loop turn: one message
    assert (topic, sequence) == (b"kv", 0)
    assert isinstance(ts, float) and before <= ts <= time.time()
    assert events == [
        ["BlockStored", [a1, a2], None, a[:8], 4, None],
        ["BlockRemoved", [a2, a1]],
        ["BlockStored", [b1, b2, b3], None, b[:12], 4, None],
    ]
    assert all(key in INT64 for key in (a1, a2, b1, b2, b3))  # msgpack int64, as SGLang's hashes

    cache.release(lease_b)
    branch = [*b[:4], 7, 7, 7, 7, 7]
    cache.acquire(branch)  # a child of b1; its page evicts b3
    _, sequence, (_, events) = await socket.next()
    assert sequence == 1
    assert events == [["BlockRemoved", [b3]], ["BlockStored", [cache.page_keys(branch)[1]], b1, [7] * 4, 4, None]]

    cache.release(cache.acquire(tokens(500, 3)))  # less than a page: no event, no message
    cache.clear()  # b1 and the branch page are pinned: only b2 goes
    _, sequence, (_, events) = await socket.next()
    assert (sequence, events) == (2, [["BlockRemoved", [b2]]])

    fresh, fresh_socket, _ = zmq_published(rank=0)
    fresh_socket.queue = asyncio.Queue()
    fresh.clear()  # nothing pinned: a full flush
    assert await fresh_socket.next() == (b"", 0, [pytest.approx(time.time(), abs=5), [["AllBlocksCleared"]]])


def test_sequence_numbers_count_from_zero_per_rank():
    rank0, socket0, _ = zmq_published(rank=0)
    rank1, socket1, _ = zmq_published(rank=1)
    for i in range(3):
        rank0.acquire(tokens(100 * i, 4))  # no event loop: every change is its own batch
    rank1.acquire(tokens(0, 4))
    assert [int.from_bytes(frames[1], "big") for frames in socket0.sent] == [0, 1, 2]
    assert [int.from_bytes(frames[1], "big") for frames in socket1.sent] == [0]
    assert all(len(frames) == 3 and len(frames[1]) == 8 for frames in socket0.sent + socket1.sent)


async def test_one_publisher_builds_each_batch_once_for_grpc_subscribers_and_zmq():
    cache, socket, publisher = zmq_published(rank=1)
    socket.queue = asyncio.Queue()
    queue: Subscriber = asyncio.Queue()
    publisher.subscribe(queue)
    queue.get_nowait()  # the (empty) snapshot
    prompt = tokens(0, 10)
    cache.release(cache.acquire(prompt), prompt + tokens(50, 6))
    grpc_batch = await asyncio.wait_for(queue.get(), timeout=5)
    _, zmq_sequence, (ts, events) = await socket.next()
    assert grpc_batch is not None and queue.empty() and socket.queue.empty()
    # The same batch on both wires: gRPC numbers from 1 (0 is the empty snapshot), ZMQ from 0 as SGLang does.
    assert (grpc_batch.sequence_number, zmq_sequence, grpc_batch.timestamp) == (1, 0, ts)
    assert [e.WhichOneof("data") for e in grpc_batch.events] == ["stored", "stored"]
    assert [[b.block_hash for b in e.stored.blocks] for e in grpc_batch.events] == [e[1] for e in events]
    assert [list(t for b in e.stored.blocks for t in b.token_ids) for e in grpc_batch.events] == [e[3] for e in events]
    publisher.unsubscribe(queue)
    cache.clear()
    assert await socket.next() == (b"", 1, [pytest.approx(time.time(), abs=5), [["AllBlocksCleared"]]])
    assert queue.empty()


def test_without_a_zmq_outlet_or_subscriber_nothing_is_built():
    publisher = KvEventPublisher()
    cache = PrefixCache(1000, 4, events=publisher)
    cache.acquire(tokens(0, 8))
    assert publisher.sequence == 1 and publisher._pending == []


# --- config and endpoints ---------------------------------------------------------------------------------------------


def test_the_config_reads_sglang_s_fields_and_reports_the_resolved_endpoint():
    config = KvEventsConfig.parse('{"publisher": "zmq", "topic": "kv", "hwm": 10, "replay_endpoint": null}')
    assert (config.publisher, config.endpoint, config.topic, config.hwm) == ("zmq", "tcp://*:5557", "kv", 10)
    assert config.zmq and (config.buffer_steps, config.max_queue_size) == (10_000, 100_000)
    reported = json.loads(config.reported("tcp://*:5557"))
    assert reported == {
        "publisher": "zmq",
        "topic": "kv",
        "hwm": 10,
        "replay_endpoint": None,
        "endpoint": "tcp://*:5557",
    }
    wildcard = KvEventsConfig.parse('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}')
    assert json.loads(wildcard.reported("tcp://127.0.0.1:41234"))["endpoint"] == "tcp://127.0.0.1:41234"
    null = KvEventsConfig.parse('{"publisher": "null"}')
    assert not null.zmq and json.loads(null.reported(None)) == {"publisher": "null"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{publisher: zmq}", "not valid JSON"),
        ('["zmq"]', "must be a JSON object"),
        ('{"publisher": "kafka"}', "unknown publisher 'kafka'"),
        ('{"publisher": "zmq", "port": 5557}', "unknown field(s) ['port']"),
        ('{"publisher": "zmq", "hwm": "10"}', "'hwm' has the wrong type"),
        ('{"publisher": "zmq", "endpoint": "udp://*:5557"}', "must be tcp://, ipc:// or inproc://"),
        ('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1"}', "needs a port"),
        ('{"publisher": "zmq", "endpoint": "tcp://[::1]"}', "needs a port"),
        ('{"publisher": "zmq", "endpoint": "tcp://*:65535"}', "bad port"),  # 2 workers x 2 ranks: past 65535
    ],
)
def test_a_bad_config_is_a_cli_error(text, message, capsys):
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    args = parser.parse_args(["--workers", "2", "--dp-size", "2", "--kv-events-config", text])
    assert run_sim(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("shepherd sim: --kv-events-config") and message in err


def sim_config(*argv: str) -> SimConfig:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return SimConfig.from_args(parser.parse_args(list(argv)))


def test_the_zmq_publisher_turns_kv_events_on_and_null_does_not():
    assert not sim_config().kv_events and sim_config().kv_events_config is None
    assert sim_config("--kv-events").kv_events and not sim_config("--kv-events").zmq_kv_events
    zmq_config = sim_config("--kv-events-config", '{"publisher": "zmq"}')
    assert zmq_config.kv_events and zmq_config.zmq_kv_events
    null_config = sim_config("--kv-events-config", '{"publisher": "null"}')
    assert not null_config.kv_events and not null_config.zmq_kv_events and null_config.kv_events_config is not None


def test_rank_and_worker_endpoints_follow_sglang_s_port_offsets():
    assert rank_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert rank_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert rank_endpoint("tcp://[::1]:5557", 1) == "tcp://[::1]:5558"
    assert rank_endpoint("tcp://127.0.0.1:*", 2) == "tcp://127.0.0.1:*"  # a wildcard stays one: resolved at bind
    assert rank_endpoint("inproc://kv", 1) == "inproc://kv_dp1"
    # Worker i of a process starts at port + i * dp_size, so its ranks never share a port with another worker's.
    assert [worker_endpoint("tcp://*:5557", worker, 2) for worker in range(3)] == [
        "tcp://*:5557",
        "tcp://*:5559",
        "tcp://*:5561",
    ]
    assert binds("tcp://*:5557") and binds("tcp://[::]:5557") and binds("ipc:///tmp/kv") and binds("inproc://kv")
    assert not binds("tcp://127.0.0.1:5557") and not binds("tcp://gateway.local:5557")


# --- real PUB sockets -------------------------------------------------------------------------------------------------


def receive(sub: zmq.Socket[bytes], timeout_ms: int) -> list[bytes] | None:
    return sub.recv_multipart() if sub.poll(timeout_ms) else None


def until_received(outlet: ZmqOutlet, sub: zmq.Socket[bytes], rank: int) -> tuple[int, list]:
    """Publish on `outlet` until `sub` gets a message (a SUB that just connected misses the first ones); returns the
    first received message's sequence number and payload."""
    publisher = KvEventPublisher(rank)
    publisher.add_outlet(outlet)
    cache = PrefixCache(1000, 4, events=publisher)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cache.clear()  # AllBlocksCleared, every time
        frames = receive(sub, 100)
        if frames is not None:
            return int.from_bytes(frames[1], "big"), msgpack.unpackb(frames[2])
    raise AssertionError("no KV event batch arrived within 10 s")


def test_a_wildcard_port_binds_consecutive_ports_one_per_rank_and_reports_rank_0_s():
    context = zmq.Context()
    config = KvEventsConfig.parse('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}')
    worker = WorkerSockets(context, config, worker=0, dp_size=3)
    subs = []
    try:
        host, port = worker.endpoint.rsplit(":", 1)
        assert host == "tcp://127.0.0.1" and port.isdigit()
        bound = [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in worker.sockets]
        assert bound == [f"tcp://127.0.0.1:{int(port) + rank}" for rank in range(3)]
        for rank, outlet in enumerate(worker.outlets):
            sub = context.socket(zmq.SUB)
            subs.append(sub)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"{host}:{int(port) + rank}")
            sequence, (_, events) = until_received(outlet, sub, rank)
            assert events == [["AllBlocksCleared"]] and sequence < outlet.sequence
    finally:
        for sub in subs:
            sub.close(linger=0)
        worker.close()
        context.term()


def test_an_endpoint_without_a_wildcard_connects_to_a_subscriber_that_binds():
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    config = KvEventsConfig.parse(json.dumps({"publisher": "zmq", "endpoint": endpoint, "topic": "t"}))
    worker = WorkerSockets(context, config, worker=0, dp_size=1)
    try:
        assert worker.endpoint == endpoint
        (outlet,) = worker.outlets
        _, (_, events) = until_received(outlet, sub, 0)
        assert events == [["AllBlocksCleared"]]
    finally:
        sub.close(linger=0)
        worker.close()
        context.term()


def test_a_taken_port_fails_and_leaves_no_socket_open():
    context = zmq.Context()
    config = KvEventsConfig.parse('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*"}')
    first = WorkerSockets(context, config, worker=0, dp_size=2)
    port = int(first.endpoint.rsplit(":", 1)[1])
    # Rank 0 of this one is free (port - 1, most likely) or not; rank 1 at `port` is taken either way.
    taken = KvEventsConfig.parse(json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{port - 1}"}))
    with pytest.raises(zmq.ZMQError):
        WorkerSockets(context, taken, worker=0, dp_size=2)
    first.close()
    assert first.sockets == []
    # term() waits for every socket of the context to close: it returns only if the failed attempt closed its own.
    terminated = threading.Thread(target=context.term, daemon=True)
    terminated.start()
    terminated.join(timeout=5)
    assert not terminated.is_alive()


# --- the BPE prompt tokenizer -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_prompts() -> BpePrompts:
    return BpePrompts(bpe.build())


def test_a_chat_is_the_chat_template_rendered_then_encoded(bpe_prompts: BpePrompts, tmp_path):
    bpe_prompts.tokenizer.write_dir(tmp_path)
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what a gateway loads from tokenizer_path
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world 🙂"}]},
    ]
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello\nworld 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = bpe_prompts.chat(messages)
    assert ids == loaded.encode(text, add_special_tokens=False).ids
    assert ids[0] == loaded.token_to_id("<|im_start|>") and loaded.decode(ids, skip_special_tokens=False) == text
    assert bpe_prompts.text("What is the capital of France?") == loaded.encode("What is the capital of France?").ids
    for bad in ([], [{"role": "user", "content": 3}], [{"role": "user"}], "hi"):
        with pytest.raises(RequestError):
            bpe_prompts.chat(bad)


def test_bpe_outputs_are_the_same_words_as_single_bpe_tokens(bpe_prompts: BpePrompts):
    completion = bpe_prompts.completion([1, 2, 3], 12, seed=0, choice=0)
    words = [" " + word for word in completion.text.split(" ")[1:]]
    assert len(completion.token_ids) == 12 and len(words) == 12 and all(word in OUTPUT_VOCAB for word in words)
    assert bpe_prompts.tokenizer.encode(completion.text) == completion.token_ids
    assert completion.token_ids != bpe_prompts.completion([1, 2, 3], 12, seed=0, choice=1).token_ids
