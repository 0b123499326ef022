"""Hole-punch coordination (Nebula punch notification / Tailscale call-me-maybe). Pure.

When A asks for B, both get each other's current candidates in the same instant, so they send at the
same moment and each side's outgoing packet opens the NAT mapping the other's packet needs.
"""

from __future__ import annotations

from signal_server.directory import Directory
from signal_server.ratelimit import KeyedLimiter

PUNCH_RATE = 2.0  # per (requester, target) pair per second; a punch is only useful a few times a second
PUNCH_BURST = 4.0


class PunchCoordinator:
    def __init__(self) -> None:
        self.limiter = KeyedLimiter(PUNCH_RATE, PUNCH_BURST)

    def plan(self, directory: Directory, requester: bytes, target: bytes, now: float):
        """(list of (recipient_key, message), error_reason | None)."""
        a = directory.nodes.get(requester)
        b = directory.nodes.get(target)
        if a is None or b is None or requester == target or b.kind != "node" or not directory.visible(requester, b):
            # A plain peer is reached through the relay only, and may be another's; a peer the access policy
            # hides from the requester does not exist for it.
            return [], "unknown_peer"
        if not b.online:
            return [], "peer_offline"
        if not self.limiter.allow((requester, target), now):
            return [], "rate_limited"
        return [
            # Each gets the other's entry as its directory has it ("accept" under a policy): a node reads an
            # entry without one as "no policy" for that peer.
            (requester, {"type": "punch", "peer": directory.entry_for(requester, b), "role": "initiator"}),
            (target, {"type": "punch", "peer": directory.entry_for(target, a), "role": "responder"}),
        ], None
