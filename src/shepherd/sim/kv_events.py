"""KV events of a simulated worker: one DP rank's prefix-cache changes, batched once and handed to its outlets.

A `KvEventPublisher` is the `KvEventSink` of one rank's `PrefixCache`, the sim's stand-in for SGLang's KV event
publisher (`--kv-events-config`). The events of one event-loop turn (one engine step, one request finished...) make
one `KvBatch`, published by a `loop.call_soon` callback the first event of the turn schedules: `sequence` counts up
from 1 per publisher, `timestamp` is the wall clock at publishing. Events are `Stored` (one per run of pages of a
chain: the cache's chain keys, the pages' token ids, and the key of the page before the run unless it starts at the
root), `Removed` (keys; consecutive removals of one batch are merged) and `Cleared` (a flush that emptied the cache).

The publisher builds each batch once and hands it to its outlets (`KvEventOutlet`), which encode it for their wire:

* `KvSubscribers`, every publisher's own outlet: gRPC `SubscribeKvEvents` subscribers, as protobuf `KvEventBatch`es
  (`subscribe`, `unsubscribe` and `subscribers` of the publisher reach it);
* `shepherd.sim.kv_zmq.ZmqOutlet`: SGLang's ZMQ PUB wire (msgpack), added with `add_outlet`.

Events are collected only while an outlet listens (a ZMQ outlet always does, `KvSubscribers` while someone
subscribes); sequence numbers count every turn with events either way. Without a running event loop (a synchronous
caller) every event is its own batch.

`KvSubscribers`: a subscriber is an `asyncio.Queue`. `subscribe` first puts a snapshot of what is resident, as
`KvSnapshotChunk` batches (see that message in smg_grpc_proto's common.proto): chunk 0 starts with a `cleared`,
then `stored` events list every resident page, parents before children, with `event_id` 0; the chunks carry
consecutive sequence numbers ending at the publisher's last batch, so live batches continue after the last chunk
with no gap and no duplicate (pending events of the turn are published first, and the snapshot is taken and the
queue registered in the same synchronous step). Then every batch follows, as a `KvEventBatch` with `dp_rank` and
each event's next `event_id` (they count the events converted), until `unsubscribe`, or until the subscriber falls
more than `max_backlog` batches behind: then it gets `None` and no more batches.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from smg_grpc_proto.generated import common_pb2

from shepherd.sim.kv_cache import ResidentPage, chain_runs

MAX_BACKLOG = 10_000  # batches a subscriber may fall behind before it is dropped
SNAPSHOT_CHUNK_BLOCKS = 4096  # blocks per snapshot chunk (fewer chunks when there are fewer sequence numbers)

Subscriber = asyncio.Queue[common_pb2.KvEventBatch | None]


class Stored(NamedTuple):
    """Pages that became resident, in chain order: (chain key, token ids); `parent` is the key before the first."""

    parent: int | None
    pages: list[tuple[int, list[int]]]


class Removed(NamedTuple):
    keys: list[int]


class Cleared(NamedTuple):
    pass


KvEvent = Stored | Removed | Cleared


@dataclass(frozen=True, slots=True)
class KvBatch:
    """The events of one turn of one DP rank."""

    sequence: int  # from 1, per publisher
    timestamp: float  # wall clock, seconds
    dp_rank: int | None
    events: list[KvEvent]


class KvEventOutlet(Protocol):
    """Where a publisher's batches go, encoded for one wire."""

    @property
    def listening(self) -> bool:
        """Whether it wants batches now (the publisher collects events only while an outlet does)."""

    def publish(self, batch: KvBatch) -> None: ...


class KvEventPublisher:
    """The `KvEventSink` of one DP rank's `PrefixCache`; `attach` the cache to serve snapshots."""

    def __init__(
        self,
        dp_rank: int | None = None,
        *,
        max_backlog: int = MAX_BACKLOG,
        snapshot_chunk_blocks: int = SNAPSHOT_CHUNK_BLOCKS,
    ) -> None:
        self.dp_rank = dp_rank
        self.sequence = 0  # the last batch's sequence number (0: none yet)
        self.grpc = KvSubscribers(dp_rank, max_backlog, snapshot_chunk_blocks)
        self._outlets: list[KvEventOutlet] = [self.grpc]
        self._listening = False  # whether an outlet listens (cached: checked on every event)
        self._pending: list[KvEvent] = []
        self._open = False  # events since the last batch (collected or not)
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a flush callback is pending on
        self._resident: Callable[[], list[ResidentPage]] | None = None

    def attach(self, resident_pages: Callable[[], list[ResidentPage]]) -> None:
        """Where snapshots come from: the cache's `resident_pages` (the cache whose sink this publisher is)."""
        self._resident = resident_pages

    def add_outlet(self, outlet: KvEventOutlet) -> None:
        self._outlets.append(outlet)
        self._update_listening()

    # --- KvEventSink --------------------------------------------------------------------------------------------------

    def stored(self, parent: int | None, pages: list[tuple[int, list[int]]]) -> None:
        if self._listening:
            self._pending.append(Stored(parent, pages))
        self._turn()

    def removed(self, keys: list[int]) -> None:
        if self._listening:
            pending = self._pending
            if pending and isinstance(pending[-1], Removed):
                pending[-1].keys.extend(keys)
            else:
                pending.append(Removed(list(keys)))
        self._turn()

    def cleared(self) -> None:
        if self._listening:
            self._pending.append(Cleared())
        self._turn()

    # --- gRPC subscribers ---------------------------------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return self.grpc.subscribers

    def subscribe(self, queue: Subscriber) -> None:
        """Put the snapshot chunks into `queue`, then every later batch (see the module docstring)."""
        if self._open:
            self._publish()  # the turn's events so far belong before the snapshot, not after it
        pages = self._resident() if self._resident is not None else []
        self.grpc.subscribe(queue, pages, self.sequence)
        self._update_listening()

    def unsubscribe(self, queue: Subscriber) -> None:
        self.grpc.unsubscribe(queue)
        self._update_listening()

    # --- batches ------------------------------------------------------------------------------------------------------

    def _update_listening(self) -> None:
        self._listening = any(outlet.listening for outlet in self._outlets)

    def _turn(self) -> None:
        """An event arrived: publish it at the end of this loop turn."""
        self._open = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): every call is its own batch
            self._publish()
            return
        if self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if self._open:
            self._publish()

    def _publish(self) -> None:
        self._open = False
        self.sequence += 1
        events, self._pending = self._pending, []
        if not events:
            return
        batch = KvBatch(self.sequence, time.time(), self.dp_rank, events)
        for outlet in self._outlets:
            if outlet.listening:
                outlet.publish(batch)
        self._update_listening()  # a subscriber may have been dropped


class KvSubscribers:
    """The gRPC outlet of one publisher: `SubscribeKvEvents` queues, fed protobuf batches (module docstring)."""

    def __init__(self, dp_rank: int | None, max_backlog: int, snapshot_chunk_blocks: int) -> None:
        self.dp_rank = dp_rank
        self.max_backlog = max_backlog
        self.snapshot_chunk_blocks = max(1, snapshot_chunk_blocks)
        self._event_id = 0
        self._queues: list[Subscriber] = []

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    @property
    def listening(self) -> bool:
        return bool(self._queues)

    def subscribe(self, queue: Subscriber, pages: list[ResidentPage], sequence: int) -> None:
        """Put the snapshot of `pages` (numbered up to `sequence`, the last batch's) into `queue`, then register it."""
        for batch in self._snapshot(pages, sequence):
            queue.put_nowait(batch)
        self._queues.append(queue)

    def unsubscribe(self, queue: Subscriber) -> None:
        if queue in self._queues:
            self._queues.remove(queue)

    def publish(self, batch: KvBatch) -> None:
        message = common_pb2.KvEventBatch(
            sequence_number=batch.sequence,
            timestamp=batch.timestamp,
            events=[self._event(event) for event in batch.events],
            dp_rank=batch.dp_rank,
        )
        for queue in list(self._queues):
            if queue.qsize() >= self.max_backlog:
                self._queues.remove(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(message)

    def _event(self, event: KvEvent) -> common_pb2.KvCacheEvent:
        self._event_id += 1
        if isinstance(event, Stored):
            return common_pb2.KvCacheEvent(event_id=self._event_id, stored=_stored(event.parent, event.pages))
        if isinstance(event, Removed):
            removed = common_pb2.KvBlocksRemoved(block_hashes=event.keys)
            return common_pb2.KvCacheEvent(event_id=self._event_id, removed=removed)
        return common_pb2.KvCacheEvent(event_id=self._event_id, cleared=common_pb2.KvCacheCleared())

    def _snapshot(self, pages: list[ResidentPage], sequence: int) -> list[common_pb2.KvEventBatch]:
        """The snapshot chunks of `pages` (parents first). Chunks are numbered up to `sequence`, so there are at most
        `sequence + 1` of them: never more blocks in one than the largest batch stored, or `snapshot_chunk_blocks`."""
        count = max(1, min(math.ceil(len(pages) / self.snapshot_chunk_blocks), sequence + 1))
        size = math.ceil(len(pages) / count)
        now = time.time()
        chunks = []
        for index in range(count):
            part = pages[index * size : (index + 1) * size]
            events = [common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())] if index == 0 else []
            events += [common_pb2.KvCacheEvent(stored=_stored(parent, run)) for parent, run in chain_runs(part)]
            chunks.append(
                common_pb2.KvEventBatch(
                    sequence_number=sequence - count + 1 + index,
                    timestamp=now,
                    events=events,
                    dp_rank=self.dp_rank,
                    snapshot=common_pb2.KvSnapshotChunk(index=index, count=count, blocks=len(pages)),
                )
            )
        return chunks


def _stored(parent: int | None, pages: list[tuple[int, list[int]]]) -> common_pb2.KvBlocksStored:
    return common_pb2.KvBlocksStored(
        blocks=[common_pb2.KvBlock(block_hash=key, token_ids=tokens, block_size=len(tokens)) for key, tokens in pages],
        parent_block_hash=parent,
    )
