"""Per-worker prefix (KV) cache model.

Tokens are grouped into pages of ``page_size``; only full pages are cached.  A page is keyed
by a hash of *all* tokens up to and including it (a hash chain, like vLLM / llm-d block
hashes), so equal keys mean equal prefixes and a lookup walks the chain until the first miss.

Pages used by running requests are pinned (reference counted) and never evicted.  Unpinned
pages sit in an LRU; when a request releases its pages, deeper pages are queued for eviction
before their ancestors, which approximates a radix tree's leaf-first eviction and keeps
shared prefixes (system prompts) resident.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    """Pages pinned on behalf of one request, and how many prompt tokens were already cached."""

    keys: list[int]
    cached_tokens: int
    released: bool = False


class PrefixCache:
    def __init__(self, capacity_tokens: int, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        self.page_size = page_size
        self.capacity_pages = max(0, capacity_tokens // page_size)
        self._refs: dict[int, int] = {}  # every resident page -> pin count
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unpinned pages, LRU first

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
            for key in reversed(self.page_keys(full_tokens, len(keys), keys[-1] if keys else 0)):
                self._insert_unpinned(key)
        for key in reversed(keys):
            self._unpin(key)

    def clear(self) -> int:
        """Drop every unpinned page (``/flush_cache``); returns the number of pages dropped."""
        dropped = len(self._evictable)
        for key in self._evictable:
            del self._refs[key]
        self._evictable.clear()
        return dropped

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
        return True
