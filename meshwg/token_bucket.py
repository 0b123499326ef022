"""A token bucket over explicit time (pure): `rate` tokens a second, at most `burst` held.

Used for the discovery probe budgets (per peer and per node), the join agent's punch budget and the
signal server's message and per-key limits."""

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
