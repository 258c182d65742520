"""Scheduler / latency model of one simulated engine (one DP rank of a worker).

Two modes:

* immediate (``--latency-model none``): a request is admitted, "computed" and finished inside
  :meth:`Engine.submit`, with prefix-cache bookkeeping but no waiting.  Used where the sim
  must not be the bottleneck.
* batch (``--latency-model batch``): one asyncio task runs an SGLang-like step loop.  Each
  step admits waiting requests (bounded by ``max_running`` and KV capacity), spends a
  chunked-prefill budget on the *uncached* prompt tokens of newly admitted requests, and emits
  one token for every request that finished prefill earlier.  Its duration is
  ``decode_step_ms + decode_step_ms_per_request * decode_batch + prefill_tokens /
  prefill_tokens_per_ms``, so time to first token grows with uncached prompt length and
  queueing, and inter-token latency grows with batch size.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from shepherd.sim.kv_cache import Lease, PrefixCache
from shepherd.sim.metrics import WorkerStats
from shepherd.sim.tokenizer import Completion


@dataclass(frozen=True, slots=True)
class LatencyModel:
    prefill_tokens_per_ms: float = 20.0
    decode_step_ms: float = 8.0
    decode_step_ms_per_request: float = 0.15
    chunked_prefill_size: int = 8192

    def step_seconds(self, decode_batch: int, prefill_tokens: int) -> float:
        ms = self.decode_step_ms + self.decode_step_ms_per_request * decode_batch
        if prefill_tokens:
            ms += prefill_tokens / self.prefill_tokens_per_ms
        return ms / 1000.0


class Sequence:
    """One generation request (one choice of one prompt) as the engine sees it."""

    __slots__ = (
        "_engine", "_listener", "aborted", "cached_tokens", "completion", "created", "finished",
        "finished_at", "first_token_at", "generated", "index", "kv_transferred", "last_token_at", "lease",
        "max_new_tokens", "prefill_left", "prompt_ids",
    )  # fmt: skip

    def __init__(self, prompt_ids: list[int], completion: Completion, kv_transferred: bool = False) -> None:
        self.prompt_ids = prompt_ids
        self.completion = completion
        self.kv_transferred = kv_transferred  # PD decode: the prompt's KV cache came from a prefill worker
        self.max_new_tokens = len(completion.token_ids)
        self.index = 0  # position in its SequenceGroup
        self.generated = 0
        self.cached_tokens = 0
        self.prefill_left = 0
        self.created = 0.0  # set by Engine.submit, on the engine's clock
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finished_at = 0.0
        self.finished = False
        self.aborted = False
        self.lease: Lease | None = None
        self._engine: Engine | None = None
        self._listener: asyncio.Queue[int] | None = None  # its group's: gets its index (a reference would be a cycle)

    @property
    def text(self) -> str:
        return self.completion.text_upto(self.generated)

    @property
    def output_ids(self) -> list[int]:
        return self.completion.token_ids[: self.generated]

    @property
    def e2e_latency(self) -> float:
        now = self._engine.clock() if self._engine is not None else self.created
        return (self.finished_at or now) - self.created

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener.put_nowait(self.index)


class SequenceGroup:
    """The sequences of one HTTP request (batch prompts x ``n`` choices).

    Consumers either ``await wait()`` or iterate ``updates()``, and must call ``abort()`` if
    they stop early (client went away) so the engine frees the slots and cache pages.  An abort
    from elsewhere (gRPC ``Abort``) ends ``wait()`` and ``updates()`` early, with ``aborted`` set.
    """

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        for index, seq in enumerate(seqs):
            seq.index = index
            seq._listener = self._queue

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def aborted(self) -> bool:
        return any(s.aborted for s in self.seqs)

    async def wait(self) -> None:
        while not self.done and not self.aborted:
            await self._queue.get()

    async def updates(self) -> AsyncIterator[Sequence]:
        """Yield a sequence whenever it produced tokens or finished, until all are finished.
        Tokens produced while the consumer was busy are coalesced into one update."""
        reported = [(0, False)] * len(self.seqs)
        unfinished = len(self.seqs)
        while unfinished:
            seq = self.seqs[await self._queue.get()]
            if seq.aborted:
                return
            state = (seq.generated, seq.finished)
            if reported[seq.index] == state:
                continue
            reported[seq.index] = state
            if seq.finished:
                unfinished -= 1
            yield seq

    def abort(self) -> None:
        for seq in self.seqs:
            if not seq.finished and seq._engine is not None:
                seq._engine.abort(seq)


class Engine:
    def __init__(
        self,
        cache: PrefixCache,
        stats: WorkerStats,
        max_running: int,
        latency: LatencyModel | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # the event loop's clock when it is not the wall's (`shepherd bench routing --virtual`)
        self.cache = cache
        self.stats = stats
        self.max_running = max_running
        self.latency = latency
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._reserved_tokens = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def num_tokens(self) -> int:
        """KV tokens held by running requests (prompt plus tokens generated so far)."""
        return sum(len(s.prompt_ids) + s.generated for s in self.running)

    @property
    def token_usage(self) -> float:
        capacity = self.cache.capacity_tokens
        return self.num_tokens / capacity if capacity else 0.0

    def submit(self, seq: Sequence) -> None:
        seq._engine = self
        seq.created = self.clock()
        if self.latency is None:
            self._complete_immediately(seq)
            return
        self.waiting.append(seq)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._step_loop())
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        if seq.finished or seq.aborted:
            return
        seq.aborted = True
        seq._notify()
        if seq.lease is None:
            self.waiting.remove(seq)
            return
        self.running.remove(seq)
        self._reserved_tokens -= len(seq.prompt_ids) + seq.max_new_tokens
        self.cache.release(seq.lease, seq.prompt_ids + seq.output_ids)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _complete_immediately(self, seq: Sequence) -> None:
        lease = self.cache.acquire(seq.prompt_ids)
        seq.cached_tokens = lease.cached_tokens
        self.stats.on_admit(len(seq.prompt_ids), lease.cached_tokens)
        seq.generated = seq.max_new_tokens
        self.stats.on_tokens(seq.generated)
        self.cache.release(lease, seq.prompt_ids + seq.completion.token_ids)
        now = self.clock()
        seq.first_token_at = seq.last_token_at = now
        self._finish(seq, now)

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.finished = True
        seq.finished_at = now
        self.stats.on_finish((seq.first_token_at or now) - seq.created, now - seq.created)
        seq._notify()

    def _admit(self) -> None:
        capacity = self.cache.capacity_tokens
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            need = len(seq.prompt_ids) + seq.max_new_tokens
            # Like SGLang, wait for KV room unless the engine is idle (then run it regardless).
            if self.running and self._reserved_tokens + need > capacity:
                break
            self.waiting.popleft()
            seq.lease = self.cache.acquire(seq.prompt_ids)
            seq.cached_tokens = seq.lease.cached_tokens
            # A transferred KV cache still costs one step (the first decode step), not a prefill.
            seq.prefill_left = 1 if seq.kv_transferred else max(1, len(seq.prompt_ids) - seq.cached_tokens)
            self._reserved_tokens += need
            self.running.append(seq)
            self.stats.on_admit(len(seq.prompt_ids), seq.cached_tokens)

    async def _step_loop(self) -> None:
        assert self.latency is not None
        latency = self.latency
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            decoding = [s for s in self.running if s.prefill_left == 0]
            prefilled: list[Sequence] = []
            budget = latency.chunked_prefill_size
            prefill_tokens = 0
            for seq in self.running:
                if seq.prefill_left and budget > 0:
                    chunk = min(budget, seq.prefill_left)
                    seq.prefill_left -= chunk
                    budget -= chunk
                    prefill_tokens += chunk
                    if seq.prefill_left == 0:
                        prefilled.append(seq)
            await asyncio.sleep(latency.step_seconds(len(decoding), prefill_tokens))
            now = self.clock()
            emitted = 0
            for seq in decoding:
                if not seq.aborted:
                    self.stats.itl.observe(now - seq.last_token_at)
                    emitted += self._emit(seq, now)
            for seq in prefilled:
                if not seq.aborted:
                    seq.first_token_at = now
                    emitted += self._emit(seq, now)
            self.stats.on_tokens(emitted)
            if any(s.finished for s in self.running):
                self.running = [s for s in self.running if not s.finished]

    def _emit(self, seq: Sequence, now: float) -> int:
        """Produce one token (none if ``max_new_tokens`` is 0); returns the tokens produced."""
        produced = 0
        if seq.generated < seq.max_new_tokens:
            seq.generated += 1
            produced = 1
        seq.last_token_at = now
        if seq.generated >= seq.max_new_tokens:
            self._reserved_tokens -= len(seq.prompt_ids) + seq.max_new_tokens
            assert seq.lease is not None
            self.cache.release(seq.lease, seq.prompt_ids + seq.output_ids)
            self._finish(seq, now)
        else:
            seq._notify()
        return produced
