"""Per-worker prefix (KV) cache model.

Tokens are grouped into pages of ``page_size``; only full pages are cached.  A page is keyed
by a hash of *all* tokens up to and including it (a hash chain, like vLLM / llm-d block
hashes), so equal keys mean equal prefixes and a lookup walks the chain until the first miss.

Pages used by running requests are pinned (reference counted) and never evicted.  Unpinned
pages sit in an LRU; when a request releases its pages, deeper pages are queued for eviction
before their ancestors, which approximates a radix tree's leaf-first eviction and keeps
shared prefixes (system prompts) resident.

An optional event sink (``KvEventSink``, e.g. ``shepherd.sim.kv_events.KvEventPublisher``) hears
every change of what is resident: pages stored (in chain order, with the key of the page before
the first one), pages evicted or flushed, and a flush that empties the cache.  With a sink the
cache also remembers each resident page's parent and tokens, for ``resident_pages``; without one
it keeps nothing more and pays one check per call (per eviction in ``_make_room``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class KvEventSink(Protocol):
    """Hears a ``PrefixCache``'s changes of residency, in the order they happen."""

    def stored(self, parent: int | None, pages: list[tuple[int, list[int]]]) -> None:
        """``pages`` became resident: (chain key, its ``page_size`` token ids) in chain order, each page the
        child of the one before it; ``parent`` is the key of the page before the first one (None: the root)."""

    def removed(self, keys: list[int]) -> None:
        """These pages were evicted or flushed (the pages still resident are unaffected)."""

    def cleared(self) -> None:
        """The cache was flushed and nothing is resident any more."""


class ResidentPage(NamedTuple):
    key: int
    parent: int | None  # None: a first page
    tokens: list[int]


def chain_runs(pages: Iterable[ResidentPage]) -> list[tuple[int | None, list[tuple[int, list[int]]]]]:
    """``pages`` (parents before children) as runs of a chain, each page the child of the one before it: one
    (parent of the run, [(key, tokens), ...]) per ``stored`` event."""
    runs: list[tuple[int | None, list[tuple[int, list[int]]]]] = []
    for page in pages:
        if not runs or page.parent != runs[-1][1][-1][0]:
            runs.append((page.parent, []))
        runs[-1][1].append((page.key, page.tokens))
    return runs


@dataclass(slots=True)
class Lease:
    """Pages pinned on behalf of one request, and how many prompt tokens were already cached."""

    keys: list[int]
    cached_tokens: int
    released: bool = False


class PrefixCache:
    def __init__(self, capacity_tokens: int, page_size: int, events: KvEventSink | None = None) -> None:
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        self.page_size = page_size
        self.capacity_pages = max(0, capacity_tokens // page_size)
        self._refs: dict[int, int] = {}  # every resident page -> pin count
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unpinned pages, LRU first
        self._events = events
        # With a sink only: every resident page -> (parent key or None, token ids), in insertion order.
        self._pages: dict[int, tuple[int | None, list[int]]] = {}
        # With a sink, during `release`: pages it inserted and has not announced yet (an eviction in the same
        # call drops them silently: nobody heard of them).
        self._unannounced: set[int] = set()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_pages * self.page_size

    @property
    def resident_tokens(self) -> int:
        return len(self._refs) * self.page_size

    @property
    def pinned_tokens(self) -> int:
        return (len(self._refs) - len(self._evictable)) * self.page_size

    def page_keys(self, tokens: list[int], start_page: int = 0, parent: int = 0) -> list[int]:
        """Chain keys of the full pages of ``tokens`` from ``start_page`` on; ``parent`` is the
        key of the page before ``start_page`` (0 for the root)."""
        ps = self.page_size
        keys = []
        for i in range(start_page * ps, len(tokens) - ps + 1, ps):
            parent = hash((parent, *tokens[i : i + ps]))
            keys.append(parent)
        return keys

    def match_tokens(self, tokens: list[int]) -> int:
        """Tokens of ``tokens`` that a request would find cached right now (no side effects)."""
        return self._match(self.page_keys(tokens), len(tokens))

    def acquire(self, tokens: list[int]) -> Lease:
        """Look up the cached prefix of a prompt, then insert and pin all its full pages."""
        keys = self.page_keys(tokens)
        cached = self._match(keys, len(tokens))
        if self._events is not None:
            return Lease(self._pin_announcing(keys, tokens), cached)
        pinned: list[int] = []
        for key in keys:
            if not self._pin(key):
                break  # no room: the rest of the chain stays uncached
            pinned.append(key)
        return Lease(pinned, cached)

    def release(self, lease: Lease, full_tokens: list[int] | None = None) -> None:
        """Unpin a request's pages.  ``full_tokens`` (prompt + output) additionally caches the
        pages the request produced, as a real engine does when a request finishes."""
        if lease.released:
            return
        lease.released = True
        keys = lease.keys
        if full_tokens is not None:
            # Recency order after this call, oldest first: new output pages (deepest first),
            # then the prompt pages (deepest first), so leaves are evicted before ancestors.
            chain = self.page_keys(full_tokens, len(keys), keys[-1] if keys else 0)
            if self._events is not None:
                self._insert_announcing(chain, full_tokens, len(keys), keys[-1] if keys else None)
            else:
                for key in reversed(chain):
                    self._insert_unpinned(key)
        for key in reversed(keys):
            self._unpin(key)

    def clear(self) -> int:
        """Drop every unpinned page (``/flush_cache``); returns the number of pages dropped.

        The sink hears ``cleared`` if nothing stays resident, else ``removed`` with the dropped pages."""
        evictable = self._evictable
        dropped = len(evictable)
        for key in evictable:
            del self._refs[key]
        events = self._events
        if events is not None:
            if not self._refs:
                self._pages.clear()
                events.cleared()
            elif evictable:
                for key in evictable:
                    del self._pages[key]
                events.removed(list(evictable))
        evictable.clear()
        return dropped

    def resident_pages(self) -> list[ResidentPage]:
        """Every resident page, each one after its parent (needs an event sink: only then are pages' parents and
        tokens kept)."""
        if self._events is None:
            raise RuntimeError("a PrefixCache keeps its pages' parents and tokens only with an event sink")
        pages = self._pages
        ordered: list[ResidentPage] = []
        listed: set[int] = set()
        for key in pages:
            # Walk up to the first ancestor already listed (or not resident), then list the walk root-first.
            walk: list[int] = []
            node: int | None = key
            while node is not None and node not in listed and node in pages:
                walk.append(node)
                listed.add(node)
                node = pages[node][0]
            for node in reversed(walk):
                parent, tokens = pages[node]
                ordered.append(ResidentPage(node, parent, tokens))
        return ordered

    def _pin_announcing(self, keys: list[int], tokens: list[int]) -> list[int]:
        """``acquire``'s pinning with a sink: each run of pages that were not resident is one ``stored``."""
        events = self._events
        assert events is not None
        refs, pages, ps = self._refs, self._pages, self.page_size
        pinned: list[int] = []
        fresh: list[ResidentPage] = []
        parent: int | None = None
        for i, key in enumerate(keys):
            new = key not in refs
            if not self._pin(key):
                break
            pinned.append(key)
            if new:
                page = tokens[i * ps : (i + 1) * ps]
                pages[key] = (parent, page)
                fresh.append(ResidentPage(key, parent, page))
            parent = key
        # Pages evicted to make room were announced as removed first: none of them is in these runs or their
        # parents (all pinned now).
        for run_parent, run in chain_runs(fresh):
            events.stored(run_parent, run)
        return pinned

    def _insert_announcing(self, chain: list[int], tokens: list[int], start_page: int, parent: int | None) -> None:
        """``release``'s insertion with a sink: the same insertions (deepest first), then one ``stored`` per run of
        pages that became resident and still are, in chain order."""
        events = self._events
        assert events is not None
        refs, pages, ps, fresh = self._refs, self._pages, self.page_size, self._unannounced
        for i in range(len(chain) - 1, -1, -1):
            key = chain[i]
            if key in refs:
                self._insert_unpinned(key)
            elif self._make_room():
                refs[key] = 0
                self._evictable[key] = None
                start = (start_page + i) * ps
                pages[key] = (chain[i - 1] if i else parent, tokens[start : start + ps])
                fresh.add(key)
        if not fresh:
            return
        for run_parent, run in chain_runs(ResidentPage(key, *pages[key]) for key in chain if key in fresh):
            events.stored(run_parent, run)
        fresh.clear()

    def _match(self, keys: list[int], n_tokens: int) -> int:
        # The last prompt token is always recomputed (its logits start decoding), so a prompt
        # that is an exact multiple of the page size can hit at most all but its last page.
        limit = (n_tokens - 1) // self.page_size if n_tokens else 0
        hits = 0
        refs = self._refs
        for key in keys[:limit]:
            if key not in refs:
                break
            hits += 1
        return hits * self.page_size

    def _pin(self, key: int) -> bool:
        count = self._refs.get(key)
        if count is None:
            if not self._make_room():
                return False
            self._refs[key] = 1
            return True
        if count == 0:
            del self._evictable[key]
        self._refs[key] = count + 1
        return True

    def _unpin(self, key: int) -> None:
        count = self._refs[key]
        self._refs[key] = count - 1
        if count == 1:
            self._evictable[key] = None  # most recently used

    def _insert_unpinned(self, key: int) -> None:
        count = self._refs.get(key)
        if count is None:
            if self._make_room():
                self._refs[key] = 0
                self._evictable[key] = None
        elif count == 0:
            self._evictable.move_to_end(key)

    def _make_room(self) -> bool:
        if len(self._refs) < self.capacity_pages:
            return True
        if not self._evictable:
            return False
        key, _ = self._evictable.popitem(last=False)
        del self._refs[key]
        if self._events is not None:
            del self._pages[key]
            if key in self._unannounced:
                self._unannounced.discard(key)  # inserted and evicted within one `release`: never announced
            else:
                self._events.removed([key])
        return True
