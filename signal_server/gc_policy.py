"""Garbage collection for a server holding thousands of sessions (issue 14 item 4).

Each session keeps ~120 objects the cyclic collector tracks (tasks, cancel scopes, channels, directory state): at
8,000 sessions a full collection walked ~1 M objects (0.7 s) and ran every few seconds while nodes joined, 29-55 %
of the server's CPU. Objects that survived a full collection are long-lived here (sessions last hours), so they
are frozen (gc.freeze: later collections skip them); the cycles of sessions that end meanwhile are not collected
while frozen, so once the sessions ended since the freeze reach a quarter of those alive at it (at least
MIN_CHURN), everything is unfrozen for the next full collection. The garbage held is bounded by that churn.
"""

from __future__ import annotations

import gc

MIN_CHURN = 256  # ended sessions that always allow an unfreeze (a small server frees promptly)
CHURN_FRACTION = 0.25


class FreezePolicy:
    def __init__(self) -> None:
        self.want_freeze = False
        self.live_at_freeze = 0
        self.ended = 0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "stop" and info.get("generation") == 2:
            self.want_freeze = True  # frozen from the event loop, not inside the collector

    def tick(self, live_sessions: int) -> None:
        """Called by the server's loop (the flusher, every window)."""
        if self.want_freeze:
            self.want_freeze = False
            gc.freeze()
            self.live_at_freeze, self.ended = live_sessions, 0

    def session_ended(self) -> None:
        self.ended += 1
        if gc.get_freeze_count() and self.ended >= max(MIN_CHURN, CHURN_FRACTION * self.live_at_freeze):
            gc.unfreeze()  # the next full collection frees the ended sessions' cycles
            self.ended = 0


_POLICY: FreezePolicy | None = None


def policy() -> FreezePolicy:
    """The process's one policy (its collector callback installed once, however many servers a test runs)."""
    global _POLICY
    if _POLICY is None:
        _POLICY = FreezePolicy()
        gc.callbacks.append(_POLICY._callback)
    return _POLICY
