"""Nonces seen recently, for replay guards on sealed messages (pure).

Each nonce is kept until its expiry (a wall time: the end of the window in which its message would
still be accepted) and checked from the oldest, so expiries should grow with insertion order. Bounded:
past `capacity` the oldest is forgotten (a replay of it within its window then gets through once;
callers rate-limit before they open boxes, so reaching the bound takes a flood of valid messages)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class NonceCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: OrderedDict[Hashable, float] = OrderedDict()

    def seen(self, nonce: Hashable, wall: float) -> bool:
        """True if `nonce` was added and has not expired by `wall`. Forgets what expired."""
        expiry = self._expiry
        while expiry:
            oldest, until = next(iter(expiry.items()))
            if until >= wall:
                break
            del expiry[oldest]
        return nonce in expiry

    def add(self, nonce: Hashable, until: float) -> None:
        """Remember `nonce` until `until`; one added again moves to the newest end (expiries stay ordered)."""
        self._expiry.pop(nonce, None)
        self._expiry[nonce] = until
        if len(self._expiry) > self.capacity:
            self._expiry.popitem(last=False)

    def __len__(self) -> int:
        return len(self._expiry)
