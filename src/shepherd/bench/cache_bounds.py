"""Upper bounds on the prefix-cache hit rate a router can reach on a workload (`cached / prompt` tokens).

Both replay the workload's turns in nominal order with the simulator's cache rules: only full pages are cached, a
page is keyed by its whole prefix, at most the pages before a prompt's last token can hit, and a finished request
leaves the pages of its prompt and answer behind.

- `infinite_cache_hit_rate`: one cache that never evicts. Every page of a prompt that some earlier prompt or answer
  already produced is a hit, which no placement of requests on workers can beat.
- `reused_prefix_tokens`: the size of the workload's prefix set, the distinct pages that some later prompt hits in
  that infinite cache. A fleet whose total KV capacity is below it cannot keep every reused prefix, so where requests
  go decides what stays cached.
- `distinct_prompt_tokens`: the tokens of the distinct full pages of all prompts, everything a cache would need to
  hold to never miss twice.
- `capacity_hit_rate`: one cache of the fleet's total capacity, managed by Belady's optimal offline policy (evict,
  or do not insert, the page whose next use is farthest away). Whatever a router does, the pages resident on the
  workers at any moment are a set of at most that many pages, filled only by requests, so no router can hit more
  often; replicas of a prefix on several workers, pages pinned by running requests and LRU eviction only lower what
  is reachable. It assumes the nominal arrival order.
- `pooled_lru_hit_rate`: one LRU cache of the fleet's total capacity (the simulator's own cache), fed every turn in
  nominal order. Not a bound: separate caches can beat it (a prefix that would thrash a pooled cache can be kept on
  some workers and not others). It is the reference for what LRU engines keep when no capacity is spent twice: one
  copy of every prefix, the system prompt included, which a balanced fleet must instead hold on every worker.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from shepherd.sim.kv_cache import PrefixCache

_NEVER = float("inf")

Turn = tuple[list[int], list[int]]  # (prompt token ids, answer token ids)


def infinite_cache_hit_rate(turns: Iterable[Turn], page_size: int) -> float:
    """Fraction of prompt tokens that repeat a page-aligned prefix of an earlier prompt or answer."""
    return pooled_lru_hit_rate(turns, page_size, 1 << 62)


def pooled_lru_hit_rate(turns: Iterable[Turn], page_size: int, capacity_tokens: int) -> float:
    """Hit rate of one least-recently-used cache of `capacity_tokens` fed every turn in order."""
    cache = PrefixCache(capacity_tokens=capacity_tokens, page_size=page_size)
    prompt_tokens = cached_tokens = 0
    for prompt, answer in turns:
        lease = cache.acquire(prompt)
        cached_tokens += lease.cached_tokens
        prompt_tokens += len(prompt)
        cache.release(lease, prompt + answer)
    return cached_tokens / prompt_tokens if prompt_tokens else 0.0


def reused_prefix_tokens(turns: Iterable[Turn], page_size: int) -> int:
    """Tokens of the distinct pages that a later prompt finds in a cache that never evicts."""
    cache = PrefixCache(capacity_tokens=1 << 62, page_size=page_size)
    reused: set[int] = set()
    for prompt, answer in turns:
        lease = cache.acquire(prompt)
        reused.update(lease.keys[: lease.cached_tokens // page_size])
        cache.release(lease, prompt + answer)
    return len(reused) * page_size


def distinct_prompt_tokens(turns: Iterable[Turn], page_size: int) -> int:
    """Tokens of the distinct full pages of all prompts."""
    keys = PrefixCache(0, page_size).page_keys
    return len({key for prompt, _ in turns for key in keys(prompt)}) * page_size


def capacity_hit_rate(turns: Iterable[Turn], page_size: int, capacity_tokens: int) -> float:
    """Hit rate of an optimal offline cache holding `capacity_tokens` tokens (whole pages)."""
    keys = PrefixCache(0, page_size).page_keys  # chain keys only; the cache itself is not used
    uses: list[list[int]] = []  # per turn: keys of the pages that can hit
    inserts: list[list[int]] = []  # per turn: keys of the pages it leaves behind
    prompt_tokens = 0
    for prompt, answer in turns:
        limit = (len(prompt) - 1) // page_size if prompt else 0
        uses.append(keys(prompt)[:limit])
        inserts.append(keys(prompt + answer))
        prompt_tokens += len(prompt)
    if not prompt_tokens:
        return 0.0

    # next_use[t][key]: the first turn after t that can hit `key`, computed backwards.
    upcoming: dict[int, int] = {}
    next_use: list[dict[int, float]] = [{} for _ in uses]
    for t in range(len(uses) - 1, -1, -1):
        next_use[t] = {key: upcoming.get(key, _NEVER) for key in inserts[t]}
        for key in uses[t]:
            upcoming[key] = t

    capacity = capacity_tokens // page_size
    resident: dict[int, float] = {}  # key -> its next use
    farthest: list[tuple[float, int]] = []  # max-heap of (-next use, key), stale entries skipped lazily
    hits = 0
    for t, (used, inserted) in enumerate(zip(uses, inserts, strict=True)):
        hits += sum(1 for key in used if key in resident)
        for key in inserted:  # the used pages are among them: their next use moves on
            when = next_use[t][key]
            if key in resident:
                resident[key] = when
                heapq.heappush(farthest, (-when, key))
                continue
            if when == _NEVER or capacity == 0:
                continue  # never needed again: not worth a slot
            if len(resident) >= capacity:
                while -farthest[0][0] != resident.get(farthest[0][1]):
                    heapq.heappop(farthest)  # stale
                if -farthest[0][0] <= when:
                    continue  # everything resident is needed sooner
                del resident[heapq.heappop(farthest)[1]]
            resident[key] = when
            heapq.heappush(farthest, (-when, key))
    return hits * page_size / prompt_tokens
