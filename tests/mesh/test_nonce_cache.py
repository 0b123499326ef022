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
