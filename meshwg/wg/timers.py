"""Per-peer timers as deadlines (WireGuard whitepaper §6; wireguard-go device/timers.go hook names).

Each attribute is an absolute deadline in monotonic seconds, math.inf when not armed. The hooks only move
deadlines; the device acts when handle_timer(now) finds one due. The device's hot paths inline the few
data sent/received checks rather than calling these methods (data received has no method at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .constants import NEW_HANDSHAKE_TIMEOUT, REKEY_TIMEOUT, ZERO_KEYS_AFTER

INF = math.inf


class PeerTimers:
    __slots__ = ("retransmit_handshake", "send_keepalive", "new_handshake", "zero_keys", "persistent_keepalive",
                 "handshake_attempts", "need_another_keepalive", "sent_lastminute_handshake")

    def __init__(self) -> None:
        self.retransmit_handshake = INF
        self.send_keepalive = INF
        self.new_handshake = INF
        self.zero_keys = INF
        self.persistent_keepalive = INF
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_lastminute_handshake = False

    def next_deadline(self) -> float:
        return min(self.retransmit_handshake, self.send_keepalive, self.new_handshake, self.zero_keys,
                   self.persistent_keepalive)

    def stop(self) -> None:
        self.retransmit_handshake = self.send_keepalive = self.new_handshake = INF
        self.zero_keys = self.persistent_keepalive = INF

    # Hooks, named as wireguard-go's timers.go; each comment says which rule it serves.

    def data_sent(self, now: float, jitter: Callable[[], float]) -> None:  # no answer in 15 s + jitter: handshake
        if self.new_handshake == INF:
            self.new_handshake = now + NEW_HANDSHAKE_TIMEOUT + jitter()

    def any_authenticated_packet_sent(self) -> None:  # passive keepalive: a sent packet suffices
        self.send_keepalive = INF

    def any_authenticated_packet_received(self) -> None:  # the peer answered: no handshake
        self.new_handshake = INF

    def any_authenticated_packet_traversal(self, now: float, persistent_interval: int) -> None:  # persistent keepalive
        if persistent_interval:
            self.persistent_keepalive = now + persistent_interval

    def handshake_initiated(self, now: float, jitter: Callable[[], float]) -> None:  # retry in 5 s + jitter
        self.retransmit_handshake = now + REKEY_TIMEOUT + jitter()

    def handshake_complete(self) -> None:  # stop retrying
        self.retransmit_handshake = INF
        self.handshake_attempts = 0
        self.sent_lastminute_handshake = False

    def session_derived(self, now: float) -> None:  # erase the keys 540 s later
        self.zero_keys = now + ZERO_KEYS_AFTER
