"""Coalesce a burst of "something changed" events into one action. Pure: `now` is an input.

A network switch is a burst (a link goes down, its addresses go, another link comes up, DHCP adds an address):
the action (re-read the addresses, re-STUN) runs once, QUIET seconds after the burst's last event, and no later
than MAX_WAIT after its first (a link that flaps without end still gets its re-read).
"""

from __future__ import annotations

import math

QUIET = 0.2       # no event for this long: the burst is over
MAX_WAIT = 0.5    # the action never waits longer than this after the burst's first event


class Debounce:
    def __init__(self, quiet: float = QUIET, max_wait: float = MAX_WAIT) -> None:
        self.quiet, self.max_wait = quiet, max_wait
        self.first: float | None = None   # the pending burst's first event
        self.last = -math.inf

    def event(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def deadline(self) -> float:
        """When the pending burst's action is due (inf: nothing pending)."""
        if self.first is None:
            return math.inf
        return min(self.last + self.quiet, self.first + self.max_wait)

    def due(self, now: float) -> bool:
        """True once per burst, at or after its deadline: the caller runs the action then."""
        if now < self.deadline():
            return False
        self.first = None
        return True
