"""KV events of HTTP engines over ZeroMQ: endpoints from the engine's server info, SGLang's msgpack batches, and the
feed over a real PUB socket (this test's, so that it can skip a sequence number and send garbage on demand)."""

import asyncio
import contextlib
import json

import msgpack
import pytest
import zmq
import zmq.asyncio

from shepherd.config import CircuitBreakerConfig
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, FeedLost, KvEventFeed
from shepherd.workers.kv_events_zmq import decode_batch, zmq_endpoints
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker


def info(**config):
    return {"kv_events_config": json.dumps(config)}


def test_endpoints_put_the_workers_host_for_a_wildcard_and_offset_each_dp_rank():
    config = info(publisher="zmq", endpoint="tcp://*:5557")
    assert zmq_endpoints(config, "http://10.0.0.7:30000", range(1)) == ("tcp://10.0.0.7:5557",)
    assert zmq_endpoints(config, "http://[fd00::7]:30000", range(2)) == ("tcp://[fd00::7]:5557", "tcp://[fd00::7]:5558")
    assert zmq_endpoints(config, "http://h:1", range(2, 3)) == ("tcp://h:5559",)
    named = info(publisher="zmq", endpoint="tcp://events.internal:6000")
    assert zmq_endpoints(named, "http://h:1", range(1)) == ("tcp://events.internal:6000",)
    assert zmq_endpoints({"kv_events_config": {"publisher": "zmq"}}, "http://h:1", range(1)) == ("tcp://h:5557",)


@pytest.mark.parametrize(
    "server_info",
    [
        {},
        {"kv_events_config": None},
        {"kv_events_config": "{not json"},
        info(publisher="null"),
        info(publisher="zmq", endpoint="ipc:///tmp/events"),
        info(publisher="zmq", endpoint="tcp://*:port"),
    ],
)
def test_no_endpoint_without_a_reachable_zmq_publisher(server_info):
    assert zmq_endpoints(server_info, "http://h:1", range(1)) == ()


def test_a_batch_decodes_from_sglangs_array_like_tagged_layout():
    payload = msgpack.packb(
        [
            1.5,
            [
                ["BlockStored", [11, 12], None, list(range(8)), 4, None],
                ["BlockStored", [13], 12, [8, 9, 10, 11], 4, None, "gpu"],  # a newer engine's trailing field
                ["BlockRemoved", [11]],
                ["SomethingNew", 1],
                ["AllBlocksCleared"],
            ],
            0,
        ]
    )
    assert decode_batch(payload) == [
        BlocksStored(None, ((11, (0, 1, 2, 3)), (12, (4, 5, 6, 7)))),
        BlocksStored(12, ((13, (8, 9, 10, 11)),)),
        BlocksRemoved((11,)),
        CacheCleared(),
    ]


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0, [[]]])])
def test_a_malformed_batch_is_a_value_error(payload):
    with pytest.raises(ValueError):
        decode_batch(payload)


def stored(block_hash):
    return msgpack.packb([0.0, [["BlockStored", [block_hash], None, [1] * 16, 16, None]]])


async def test_the_feed_follows_a_pub_socket_and_starts_over_after_a_gap_or_garbage():
    context = zmq.asyncio.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    registry = Registry()
    worker = Worker("http://127.0.0.1:1", CircuitBreaker(CircuitBreakerConfig()), model_id="m",
                    kv_events_endpoints=(f"tcp://127.0.0.1:{port}",))  # fmt: skip
    registry.add(worker)
    feed = KvEventFeed(registry, None, None)  # type: ignore[arg-type]
    seen: list = []
    arrived = asyncio.Event()

    def listener(w, events):
        assert w is worker
        seen.extend(events)
        arrived.set()

    async def publish(number, payload, frames=None):
        arrived.clear()
        await pub.send_multipart(frames or [b"", number.to_bytes(8, "big"), payload])
        await asyncio.wait_for(arrived.wait(), 5)

    feed.subscribe(listener)
    feed.start()
    try:
        number = 0
        while not seen and number < 200:  # a new subscription hears nothing until connected: publish until it does
            arrived.clear()
            await pub.send_multipart([b"", number.to_bytes(8, "big"), stored(100 + number)])
            number += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 0.05)
        assert seen, "the feed's subscription never connected (200 batches over 10 s)"
        assert isinstance(seen[0], CacheCleared) and worker.kv_events == "live"
        first = seen[1].blocks[0][0]
        seen.clear()
        await publish(number, stored(1))
        assert seen == [BlocksStored(None, ((1, (1,) * 16),))]
        seen.clear()
        await publish(number + 5, stored(2))  # a gap: the view starts over from this batch
        assert seen == [CacheCleared(), BlocksStored(None, ((2, (1,) * 16),))]
        seen.clear()
        await publish(number + 6, b"\xc1")  # garbage: the view is lost until the next batch
        assert seen == [FeedLost()] and worker.kv_events == "lost"
        seen.clear()
        await publish(number + 7, stored(3))
        assert seen == [CacheCleared(), BlocksStored(None, ((3, (1,) * 16),))] and worker.kv_events == "live"
        assert first >= 100
        registry.remove(worker)
        assert feed._streams == {}
    finally:
        await feed.close()
        pub.close()
        context.term()
