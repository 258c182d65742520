"""KV events of a simulated worker: one DP rank's prefix-cache changes as `KvEventBatch`es for `SubscribeKvEvents`.

A `KvEventPublisher` is the `KvEventSink` of one rank's `PrefixCache`, the sim's stand-in for SGLang's KV event
publisher (`--kv-events-config`). The events of one event-loop turn (one engine step, one request finished...) make
one batch, published by a `loop.call_soon` callback the first event of the turn schedules: `sequence_number` counts
up from 1 per publisher, `timestamp` is the wall clock at publishing, `dp_rank` is the rank, each event has the next
`event_id`. Events are `stored` (one per run of pages of a chain: `blocks` with `block_hash` = the cache's chain key,
the page's `token_ids` and `block_size`, and `parent_block_hash` unless the run starts at the root), `removed`
(`block_hashes`; consecutive removals of one batch are merged) and `cleared` (a flush that emptied the cache).

A subscriber is an `asyncio.Queue`: `subscribe` first puts a snapshot of what is resident, as `KvSnapshotChunk`
batches (see that message in smg_grpc_proto's common.proto): chunk 0 starts with a `cleared`, then `stored` events
list every resident page, parents before children, with `event_id` 0; the chunks carry consecutive sequence numbers
ending at the publisher's last batch, so live batches continue after the last chunk with no gap and no duplicate
(pending events of the turn are published first, and the snapshot is taken and the queue registered in the same
synchronous step). Then every batch follows, until `unsubscribe`, or until the subscriber falls more than
`max_backlog` batches behind: then it gets `None` and no more batches.

Batches are built only while someone subscribes (`event_id`s count the events built); sequence numbers count every
turn with events either way. Without a running event loop (a synchronous caller) every event is its own batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from smg_grpc_proto.generated import common_pb2

from shepherd.sim.kv_cache import ResidentPage, chain_runs

MAX_BACKLOG = 10_000  # batches a subscriber may fall behind before it is dropped
SNAPSHOT_CHUNK_BLOCKS = 4096  # blocks per snapshot chunk (fewer chunks when there are fewer sequence numbers)

Subscriber = asyncio.Queue[common_pb2.KvEventBatch | None]


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
        self.max_backlog = max_backlog
        self.snapshot_chunk_blocks = max(1, snapshot_chunk_blocks)
        self.sequence = 0  # the last batch's sequence number (0: none yet)
        self._event_id = 0
        self._pending: list[common_pb2.KvCacheEvent] = []
        self._open = False  # events since the last batch (built or not)
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a flush callback is pending on
        self._subscribers: list[Subscriber] = []
        self._resident: Callable[[], list[ResidentPage]] | None = None

    def attach(self, resident_pages: Callable[[], list[ResidentPage]]) -> None:
        """Where snapshots come from: the cache's `resident_pages` (the cache whose sink this publisher is)."""
        self._resident = resident_pages

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # --- KvEventSink --------------------------------------------------------------------------------------------------

    def stored(self, parent: int | None, pages: list[tuple[int, list[int]]]) -> None:
        if self._subscribers:
            self._pending.append(self._event(stored=_stored(parent, pages)))
        self._turn()

    def removed(self, keys: list[int]) -> None:
        if self._subscribers:
            pending = self._pending
            if pending and pending[-1].WhichOneof("data") == "removed":
                pending[-1].removed.block_hashes.extend(keys)
            else:
                pending.append(self._event(removed=common_pb2.KvBlocksRemoved(block_hashes=keys)))
        self._turn()

    def cleared(self) -> None:
        if self._subscribers:
            self._pending.append(self._event(cleared=common_pb2.KvCacheCleared()))
        self._turn()

    # --- subscribers --------------------------------------------------------------------------------------------------

    def subscribe(self, queue: Subscriber) -> None:
        """Put the snapshot chunks into `queue`, then every later batch (see the module docstring)."""
        if self._open:
            self._publish()  # the turn's events so far belong before the snapshot, not after it
        pages = self._resident() if self._resident is not None else []
        for batch in self._snapshot(pages):
            queue.put_nowait(batch)
        self._subscribers.append(queue)

    def unsubscribe(self, queue: Subscriber) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    # --- batches ------------------------------------------------------------------------------------------------------

    def _event(self, **data: object) -> common_pb2.KvCacheEvent:
        self._event_id += 1
        return common_pb2.KvCacheEvent(event_id=self._event_id, **data)

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
        if not self._subscribers:
            return
        batch = common_pb2.KvEventBatch(
            sequence_number=self.sequence, timestamp=time.time(), events=events, dp_rank=self.dp_rank
        )
        for queue in list(self._subscribers):
            if queue.qsize() >= self.max_backlog:
                self._subscribers.remove(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(batch)

    def _snapshot(self, pages: list[ResidentPage]) -> list[common_pb2.KvEventBatch]:
        """The snapshot chunks of `pages` (parents first). Chunks are numbered up to `sequence`, so there are at most
        `sequence + 1` of them: never more blocks in one than the largest batch stored, or `snapshot_chunk_blocks`."""
        count = max(1, min(math.ceil(len(pages) / self.snapshot_chunk_blocks), self.sequence + 1))
        size = math.ceil(len(pages) / count)
        now = time.time()
        chunks = []
        for index in range(count):
            part = pages[index * size : (index + 1) * size]
            events = [common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())] if index == 0 else []
            events += [common_pb2.KvCacheEvent(stored=_stored(parent, run)) for parent, run in chain_runs(part)]
            chunks.append(
                common_pb2.KvEventBatch(
                    sequence_number=self.sequence - count + 1 + index,
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
