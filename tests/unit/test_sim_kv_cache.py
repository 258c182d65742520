from shepherd.sim.kv_cache import PrefixCache


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def test_repeated_prompt_hits_all_full_pages_but_the_last_token():
    cache = PrefixCache(capacity_tokens=1000, page_size=4)
    prompt = tokens(0, 10)  # two full pages + 2 tokens
    first = cache.acquire(prompt)
    assert first.cached_tokens == 0
    cache.release(first)
    assert cache.acquire(prompt).cached_tokens == 8


def test_page_aligned_prompt_recomputes_its_last_page():
    cache = PrefixCache(capacity_tokens=1000, page_size=4)
    cache.release(cache.acquire(tokens(0, 8)))
    assert cache.acquire(tokens(0, 8)).cached_tokens == 4


def test_shared_prefix_hits_only_the_shared_full_pages():
    cache = PrefixCache(capacity_tokens=1000, page_size=4)
    cache.release(cache.acquire(tokens(0, 12)))
    other = [*tokens(0, 6), 99, 98, 97, 96, 95, 94]  # diverges inside the second page
    assert cache.acquire(other).cached_tokens == 4


def test_page_key_depends_on_the_whole_prefix():
    cache = PrefixCache(capacity_tokens=1000, page_size=2)
    a = cache.page_keys([1, 2, 3, 4])
    b = cache.page_keys([9, 9, 3, 4])
    assert a[1] != b[1]  # same page content, different prefix
    assert cache.page_keys([1, 2, 3, 4, 5, 6], start_page=2, parent=a[-1]) == cache.page_keys([1, 2, 3, 4, 5, 6])[2:]


def test_lru_evicts_least_recently_used_leaf_first():
    cache = PrefixCache(capacity_tokens=12, page_size=4)  # 3 pages
    a, b = tokens(0, 9), tokens(100, 9)
    cache.release(cache.acquire(a))  # pages a1 <- a2
    cache.release(cache.acquire(b))  # b2 needs room: evicts a's leaf a2, keeps a1
    assert cache.resident_tokens == 12
    assert cache.match_tokens(a) == 4
    assert cache.match_tokens(b) == 8
    cache.release(cache.acquire(a))  # a1 hits; a2 evicts b's leaf (b is now least recent)
    assert cache.match_tokens(a) == 8
    assert cache.match_tokens(b) == 4


def test_leaf_first_eviction_keeps_a_shared_root():
    cache = PrefixCache(capacity_tokens=12, page_size=4)  # 3 pages
    cache.release(cache.acquire(tokens(0, 9)))  # root r + leaf x
    cache.release(cache.acquire([*tokens(0, 4), *tokens(50, 5)]))  # r + leaf y: evicts nothing yet
    cache.release(cache.acquire([*tokens(0, 4), *tokens(70, 5)]))  # r + leaf z: evicts leaf x, not r
    assert cache.match_tokens([*tokens(0, 4), *tokens(200, 5)]) == 4


def test_pinned_pages_are_never_evicted():
    cache = PrefixCache(capacity_tokens=8, page_size=4)  # 2 pages
    running = cache.acquire(tokens(0, 9))
    assert cache.pinned_tokens == 8
    other = cache.acquire(tokens(100, 9))
    assert other.keys == []  # no room: nothing pinned, nothing evicted
    cache.release(other)
    assert cache.match_tokens(tokens(0, 9)) == 8
    cache.release(running)
    assert cache.pinned_tokens == 0
    assert cache.acquire(tokens(100, 9)).cached_tokens == 0
    assert cache.match_tokens(tokens(0, 9)) == 0  # now evictable, and evicted


def test_release_caches_generated_tokens():
    cache = PrefixCache(capacity_tokens=1000, page_size=4)
    prompt, output = tokens(0, 6), tokens(500, 6)
    lease = cache.acquire(prompt)
    cache.release(lease, prompt + output)
    next_turn = [*prompt, *output, 7, 7, 7]
    assert cache.acquire(next_turn).cached_tokens == 12


def test_release_is_idempotent_and_clear_keeps_pinned_pages():
    cache = PrefixCache(capacity_tokens=1000, page_size=4)
    done = cache.acquire(tokens(0, 8))
    cache.release(done)
    cache.release(done)
    running = cache.acquire(tokens(100, 8))
    assert cache.clear() == 2
    assert cache.resident_tokens == 8
    cache.release(running)
    assert cache.pinned_tokens == 0
