"""KvEventFeed against a scripted `SubscribeKvEvents` stream: faults a real engine cannot produce on demand (a skipped
sequence number, a stream that ends with UNIMPLEMENTED)."""

import asyncio

import grpc
from smg_grpc_proto.generated import common_pb2

from shepherd.config import CircuitBreakerConfig
from shepherd.workers import kv_events
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.kv_events import BlocksStored, CacheCleared, FeedLost, KvEventFeed
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker

URL = "grpc://engine:1"


def batch(number, block_hash, rank=0):
    b = common_pb2.KvEventBatch(sequence_number=number, dp_rank=rank)
    b.events.add(event_id=number).stored.blocks.add(block_hash=block_hash, token_ids=[block_hash], block_size=1)
    return b


class ScriptedCall:
    """One stream: its batches, then the error it ends with (None: it just ends)."""

    def __init__(self, batches, error=None):
        self.batches, self.error = batches, error
        self.cancelled = False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for b in self.batches:
            yield b
        if self.error is not None:
            raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(), "scripted")

    def cancel(self):
        self.cancelled = True


class ScriptedClients:
    def __init__(self, calls):
        self.calls = list(calls)
        self.opened = []
        self.stub = self
        self.metadata = None

    def get(self, url, api_key):
        assert url == URL
        return self

    def SubscribeKvEvents(self, request, metadata=None):
        call = self.calls.pop(0)
        self.opened.append(call)
        return call


async def test_a_skipped_sequence_number_resubscribes_and_unimplemented_stops(monkeypatch):
    monkeypatch.setattr(kv_events, "RETRY_FIRST_SECS", 0.0)
    registry = Registry()
    worker = Worker(URL, CircuitBreaker(CircuitBreakerConfig()), model_id="m")
    registry.add(worker)
    first = ScriptedCall([batch(1, 11), batch(2, 12), batch(2, 13, rank=1), batch(4, 14)])  # rank 0 skips 3
    second = ScriptedCall([batch(7, 21)], grpc.StatusCode.UNIMPLEMENTED)
    clients = ScriptedClients([first, second])
    feed = KvEventFeed(registry, clients, None)  # type: ignore[arg-type]
    seen = []
    done = asyncio.Event()

    def listener(w, events):
        assert w is worker
        seen.extend(events)
        if len(clients.opened) == 2 and isinstance(events[-1], FeedLost):
            done.set()

    feed.subscribe(listener)
    feed.start()
    await asyncio.wait_for(done.wait(), 5)
    assert worker.kv_events == "unpublished" and worker.to_json()["kv_events"] == "unpublished"
    stored = [e.blocks[0][0] for e in seen if isinstance(e, BlocksStored)]
    assert stored == [11, 12, 13, 21]  # 14 came after the gap: not applied
    kinds = [type(e).__name__ for e in seen if not isinstance(e, BlocksStored)]
    assert kinds == ["CacheCleared", "FeedLost", "CacheCleared", "FeedLost"]
    assert first.cancelled and second.cancelled
    assert isinstance(seen[0], CacheCleared)
    await feed.close()
    assert clients.calls == []  # UNIMPLEMENTED: no third subscription


async def test_a_stream_per_engine_while_it_has_workers(monkeypatch):
    registry = Registry()
    clients = ScriptedClients([ScriptedCall([], grpc.StatusCode.UNIMPLEMENTED)])
    feed = KvEventFeed(registry, clients, None)  # type: ignore[arg-type]
    feed.subscribe(lambda w, events: None)
    feed.start()
    worker = Worker(URL, CircuitBreaker(CircuitBreakerConfig()), model_id="m")
    registry.add(worker)
    http = Worker("http://other:1", CircuitBreaker(CircuitBreakerConfig()), model_id="m")
    registry.add(http)  # HTTP workers have no stream
    assert list(feed._streams) == [URL]
    registry.remove(worker)
    assert feed._streams == {}
    await feed.close()
