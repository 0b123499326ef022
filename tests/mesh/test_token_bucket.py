"""The one token bucket (discovery budgets, the join agent's punches, the signal server's limits)."""

from meshwg.token_bucket import TokenBucket


def test_starts_full_refills_at_rate_and_caps_at_burst():
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]  # the clock starts at 10
    assert bucket.take(10.4) is False          # 0.8 tokens
    assert bucket.take(10.5) is True           # 1.0
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at 3


def test_a_clock_stepping_back_neither_refills_nor_drains():
    bucket = TokenBucket(rate=1.0, burst=2.0, now=5.0)
    assert bucket.take(5.0) and bucket.take(5.0)
    assert not bucket.take(1.0)
    assert bucket.stamp == 5.0 and bucket.tokens == 0.0
    assert bucket.take(6.0)


def test_cost_larger_than_one():
    bucket = TokenBucket(rate=1.0, burst=4.0, now=0.0)
    assert bucket.take(0.0, cost=3.0)
    assert not bucket.take(0.0, cost=2.0)
    assert bucket.take(1.0, cost=2.0)
