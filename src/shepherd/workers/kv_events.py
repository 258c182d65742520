"""Engines' KV-cache events: what each engine says it stored and evicted.

With the cache_aware policy, SMG subscribes to every gRPC worker's event stream (`SubscribeKvEvents`) and routes on
the engines' actual cache contents; so does Shepherd, and it also follows HTTP engines that publish the same events
over ZeroMQ (workers/kv_events_zmq.py). One `KvEventFeed` per gateway keeps one stream per gRPC engine (DP ranks
share theirs: each batch names its rank) and one subscription per HTTP engine rank.

A gRPC (re)subscription starts with `CacheCleared`, then the engine's snapshot of what it holds, then live batches,
so a listener's view is exact from the first batch on. A stream that breaks or skips a sequence number is reported
as `FeedLost` (the listener stops trusting that worker's view) and subscribed again after a backoff; an engine that
does not publish events (`UNIMPLEMENTED`, SGLang without `--kv-events-config`) is left alone, and routing falls back
to its own model of the cache, as SMG does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shepherd.upstream.grpc_pool import GrpcClients, is_grpc_url
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

RETRY_FIRST_SECS = 0.5
RETRY_MAX_SECS = 30.0


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Blocks the engine cached, in chain order: each one's engine hash and token ids; `parent` is the engine hash of
    the block before the first one (None: they start at the root)."""

    parent: int | None
    blocks: tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CacheCleared:
    """The engine holds nothing (also the first event of every subscription, before its snapshot)."""


@dataclass(frozen=True, slots=True)
class FeedLost:
    """The stream broke: until the next `CacheCleared`, what the engine holds is unknown."""


KvEvent = BlocksStored | BlocksRemoved | CacheCleared | FeedLost
KvEventListener = Callable[[Worker, list[KvEvent]], None]


def batch_events(batch: Any) -> list[KvEvent]:
    """The events of one `KvEventBatch`, as plain data."""
    events: list[KvEvent] = []
    for event in batch.events:
        kind = event.WhichOneof("data")
        if kind == "stored":
            stored = event.stored
            parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
            blocks = tuple((block.block_hash, tuple(block.token_ids)) for block in stored.blocks)
            events.append(BlocksStored(parent, blocks))
        elif kind == "removed":
            events.append(BlocksRemoved(tuple(event.removed.block_hashes)))
        elif kind == "cleared":
            events.append(CacheCleared())
    return events


class KvEventFeed:
    """One event stream per engine of the registry, for as long as it has workers: `SubscribeKvEvents` for a gRPC
    engine, a ZeroMQ subscription per DP rank for an HTTP engine that reports one (workers/kv_events_zmq.py)."""

    def __init__(self, registry: Registry, grpc_clients: GrpcClients, api_key: str | None) -> None:
        self._registry = registry
        self._grpc_clients = grpc_clients
        self._api_key = api_key
        self._listeners: list[KvEventListener] = []
        self._streams: dict[str, asyncio.Task] = {}  # gRPC engine base URL or ZMQ endpoint -> its stream
        self._zmq_workers: dict[str, list[Worker]] = {}  # ZMQ endpoint -> the workers it reports on
        self._zmq_context: Any = None  # created with the first ZMQ subscription

    def subscribe(self, listener: KvEventListener) -> None:
        self._listeners.append(listener)

    @property
    def listening(self) -> bool:
        """Whether anyone reads the events (only cache_aware does): else no stream is opened."""
        return bool(self._listeners)

    def start(self) -> None:
        """Follow the registry: a stream for every engine now and later, none for one whose workers all left."""
        self._registry.subscribe(on_added=self._on_added, on_removed=self._on_removed)
        for worker in self._registry.all():
            self._on_added(worker)

    async def close(self) -> None:
        tasks = list(self._streams.values())
        self._streams.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._zmq_context is not None:
            self._zmq_context.destroy(linger=0)  # also closes the sockets of streams cancelled but not yet unwound
            self._zmq_context = None

    def _on_added(self, worker: Worker) -> None:
        url = worker.base_url
        if is_grpc_url(url):
            if url not in self._streams:
                self._streams[url] = asyncio.get_running_loop().create_task(self._follow(url))
            return
        for endpoint in worker.kv_events_endpoints:
            self._zmq_workers.setdefault(endpoint, []).append(worker)
            if endpoint not in self._streams:
                self._streams[endpoint] = asyncio.get_running_loop().create_task(self._follow_zmq(endpoint))

    def _on_removed(self, worker: Worker) -> None:
        url = worker.base_url
        if is_grpc_url(url):
            if not self._registry.at_base_url(url):
                self._stop(url)
            return
        for endpoint in worker.kv_events_endpoints:
            workers = self._zmq_workers.get(endpoint, [])
            if worker in workers:
                workers.remove(worker)
            if not workers:
                self._zmq_workers.pop(endpoint, None)
                self._stop(endpoint)

    def _stop(self, source: str) -> None:
        task = self._streams.pop(source, None)
        if task is not None:
            task.cancel()

    def _workers(self, url: str, dp_rank: int | None) -> list[Worker]:
        """The workers a batch is about: the rank's worker of a DP engine, else every worker of the engine."""
        if url in self._zmq_workers:
            return self._zmq_workers[url]
        workers = self._registry.at_base_url(url)
        if dp_rank is not None:
            ranked = [worker for worker in workers if worker.dp_rank == dp_rank]
            if ranked:
                return ranked
        return workers

    def _set_state(self, source: str, state: str | None) -> None:
        for worker in self._workers(source, None):
            worker.kv_events = state

    def _emit(self, source: str, dp_rank: int | None, events: list[KvEvent]) -> None:
        for worker in self._workers(source, dp_rank):
            for listener in self._listeners:
                listener(worker, events)

    async def _follow(self, url: str) -> None:
        import grpc

        delay = RETRY_FIRST_SECS
        while True:
            try:
                await self._stream(url)
                delay = RETRY_FIRST_SECS  # the engine ended a stream that worked: subscribe again soon
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    log.info("%s publishes no KV events: cache_aware models its cache from the traffic", url)
                    self._emit(url, None, [FeedLost()])
                    self._set_state(url, "unpublished")
                    return
                log.debug("KV events of %s: %s", url, exc.details())
            except _SequenceGap as gap:
                log.info("KV events of %s skipped from %d to %d: subscribing again", url, gap.expected, gap.got)
                delay = RETRY_FIRST_SECS
            except Exception as exc:  # a closed channel, a malformed batch: the stream is lost, not the gateway
                log.warning("KV events of %s: %r", url, exc)
            self._emit(url, None, [FeedLost()])
            self._set_state(url, "lost")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECS)

    async def _stream(self, url: str) -> None:
        from smg_grpc_proto.generated import common_pb2

        workers = self._registry.at_base_url(url)
        client = self._grpc_clients.get(url, (workers[0].api_key if workers else None) or self._api_key)
        request = common_pb2.SubscribeKvEventsRequest(start_sequence_number=0, load_records_before_first_batch=True)
        call: grpc.aio.UnaryStreamCall = client.stub.SubscribeKvEvents(request, metadata=client.metadata)
        try:
            expected: dict[int | None, int] = {}  # each DP rank numbers its batches (they interleave on the stream)
            started = False
            async for batch in call:
                rank = batch.dp_rank if batch.HasField("dp_rank") else None
                number = batch.sequence_number
                if rank in expected and number != expected[rank]:
                    raise _SequenceGap(expected[rank], number)
                expected[rank] = number + 1
                if not started:  # the snapshot starts from nothing, whatever was known before
                    started = True
                    self._emit(url, None, [CacheCleared()])
                    self._set_state(url, "live")
                events = batch_events(batch)
                if events:
                    self._emit(url, rank, events)
        finally:
            with contextlib.suppress(Exception):
                call.cancel()

    async def _follow_zmq(self, endpoint: str) -> None:
        """Subscribe to one rank's PUB socket until the workers leave. ZeroMQ reconnects by itself, so the only
        faults seen here are batches missed or undecodable: the view then starts over from the next batch."""
        import zmq
        import zmq.asyncio

        from shepherd.workers.kv_events_zmq import decode_batch

        if self._zmq_context is None:
            self._zmq_context = zmq.asyncio.Context()
        socket = self._zmq_context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        expected: int | None = None  # the next sequence number, once a batch was heard
        try:
            while True:
                frames = await socket.recv_multipart()
                try:
                    if len(frames) != 3:
                        raise ValueError(f"a KV event message has 3 frames, not {len(frames)}")
                    number = int.from_bytes(frames[1], "big")
                    events = decode_batch(frames[2])
                except ValueError as exc:
                    log.warning("KV events of %s: %s; starting over", endpoint, exc)
                    if expected is not None:
                        self._emit(endpoint, None, [FeedLost()])
                        self._set_state(endpoint, "lost")
                    expected = None
                    continue
                if number != expected:
                    if expected is not None:
                        log.info("KV events of %s went from %d to %d: starting over", endpoint, expected, number)
                    self._emit(endpoint, None, [CacheCleared()])
                    self._set_state(endpoint, "live")
                expected = number + 1
                if events:
                    self._emit(endpoint, None, events)
        finally:
            socket.close()
            self._set_state(endpoint, None)


class _SequenceGap(Exception):
    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected batch {expected}, got {got}")
        self.expected = expected
        self.got = got
