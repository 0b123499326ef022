"""A token bucket over explicit time (pure): `rate` tokens a second, at most `burst` held.

Used for the discovery probe budgets (per peer, per node and per probed address), the join agent's
punch budget and the signal server's message and per-key limits."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        """Starts full. With `now` None the clock starts at the first take."""
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many (after refilling up to `now`)."""
        if self.stamp is None:
            self.stamp = now
        elif now > self.stamp:  # a clock that steps back refills nothing and drains nothing
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


SWEEP_INTERVAL = 1.0  # a full KeyedLimiter with no idle bucket looks again this much later, not per new key


class KeyedLimiter:
    """One bucket per key (a node key, a source IP); bounded so a flood of keys cannot grow memory."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict = {}
        self._next_sweep = float("-inf")

    def allow(self, key, now: float, cost: float = 1.0) -> bool:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_keys:
                if now < self._next_sweep:
                    return False  # a sweep found nothing idle just now: new keys (a flood) must not each pay one
                # Buckets that have refilled carry no information: drop them first. (Stored tokens date
                # from the last take, which left them below burst: only the refill shows the idle ones.)
                idle = [k for k, v in self._buckets.items() if v.tokens + (now - v.stamp) * v.rate >= v.burst]
                for k in idle[: self.max_keys // 2]:
                    del self._buckets[k]
                if len(self._buckets) >= self.max_keys:
                    self._next_sweep = now + SWEEP_INTERVAL
                    return False
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return b.take(now, cost)

    def exhausted(self, key, now: float, cost: float = 1.0) -> bool:
        """Whether allow(key, now, cost) would refuse for lack of tokens; spends nothing."""
        b = self._buckets.get(key)
        if b is None:
            return False
        b.take(now, 0.0)  # refill only
        return b.tokens < cost

    def forget(self, key) -> None:
        self._buckets.pop(key, None)
