"""The one replay cache (discovery messages, relay HELLOs)."""

from meshwg.nonce_cache import NonceCache


def test_a_nonce_is_seen_until_its_expiry():
    cache = NonceCache(capacity=10)
    cache.add(b"n1", until=100.0)
    assert cache.seen(b"n1", wall=50.0) and cache.seen(b"n1", wall=100.0)
    assert not cache.seen(b"n2", wall=50.0)
    assert not cache.seen(b"n1", wall=100.1)
    assert len(cache) == 0  # forgotten once expired


def test_bounded_by_capacity_oldest_first():
    cache = NonceCache(capacity=3)
    for i in range(5):
        cache.add(i, until=1000.0 + i)
    assert len(cache) == 3
    assert [cache.seen(i, wall=0.0) for i in range(5)] == [False, False, True, True, True]


def test_a_nonce_added_again_is_the_newest_not_the_first_evicted():
    """The relay refreshes proven (source, key) pairs this way: a refreshed entry must outlive older ones."""
    c = NonceCache(capacity=2)
    c.add("a", 10.0)
    c.add("b", 20.0)
    c.add("a", 30.0)  # refreshed
    c.add("c", 40.0)  # over capacity: the oldest entry ("b") goes
    assert c.seen("a", 25.0) and c.seen("c", 25.0) and not c.seen("b", 0.0)
