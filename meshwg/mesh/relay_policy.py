"""Which relay transport the node uses, UDP or TCP, and when to open or close TCP. Pure: `now` and the
jitter (rand01 in [0, 1)) are inputs.

UDP is preferred (it shares the node's socket and NAT mapping). The two are raced: if a UDP hello has gone
RACE_AFTER seconds without an answer the TCP relay is opened too (a firewall that drops UDP costs a third
of a second, not the seconds a timeout would), and sends go where a session is ready, UDP first. While TCP
carries the traffic a UDP hello goes out every UDP_RETRY_WHILE_TCP seconds; once UDP answers, sends move
back to it and TCP is closed TCP_GRACE seconds later (what the relay already wrote to it is still read).
A TCP connection that fails, or closes while UDP is still silent, is retried with jittered exponential
backoff.

The relay keeps one session per node key, bound by the latest HELLO: a TCP session that comes up after
UDP answered has taken the binding away from UDP, so the policy asks for a UDP hello to take it back.

The shell feeds events in (configured, udp_hello_sent, udp_ready, tcp_ready/tcp_failed/tcp_lost,
peer_fell_back), asks transport(now) where a send goes, and calls tick(now, session_hello_at) at
next_deadline(now, session_hello_at); tick returns the actions (OpenTcp, CloseTcp, HelloUdp) to carry out now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshwg.control.reconnect import TRANSIENT, Backoff

RACE_AFTER = 0.3             # a UDP hello unanswered this long: open the TCP relay as well
UDP_RETRY_WHILE_TCP = 20.0   # while TCP carries the traffic, try a UDP hello this often
TCP_GRACE = 2.0              # UDP is back: keep TCP this long for what is already in flight on it
HELLO_GAP = 1.0              # at most one scheduled UDP hello a second (an expired session asks for one always)
TCP_BACKOFF_INITIAL, TCP_BACKOFF_MAX = 0.5, 10.0
REFRESH_GAP = 1.0            # hellos for peers falling back to the relay: at most one a second
TCP_STABLE = 10.0            # a TCP session that lived this long resets the backoff when it closes

UDP, TCP = "udp", "tcp"


@dataclass(frozen=True)
class OpenTcp:
    attempt: int             # report the outcome with this number; outcomes of older attempts are ignored


@dataclass(frozen=True)
class CloseTcp:
    attempt: int


@dataclass(frozen=True)
class HelloUdp:
    pass


class RelayPolicy:
    def __init__(self) -> None:
        self.has_tcp = False
        self.udp_until = -math.inf      # the UDP session is usable until then
        self.waiting_since: float | None = None  # first UDP hello not yet answered while UDP is not ready
        self.last_udp_hello = -math.inf
        self.tcp = "closed"             # "closed" | "opening" | "ready"
        self.attempt = 0
        self.tcp_since = -math.inf      # when the current TCP session became ready
        self.tcp_retry_at = -math.inf   # no TCP attempt before then (backoff)
        self.close_tcp_at = math.inf    # UDP is back: close TCP then
        self.hello_now = False          # a UDP hello is wanted at the next tick
        self.last_refresh = -math.inf
        self.backoff = Backoff(TCP_BACKOFF_INITIAL, TCP_BACKOFF_MAX)

    # ---- inputs ---------------------------------------------------------------------------------
    def configured(self, now: float, has_tcp: bool) -> None:
        """A new UDP session (first configuration, or the relay may have restarted): race again from now."""
        self.has_tcp = has_tcp
        self.udp_until = -math.inf
        self.waiting_since = None
        self.tcp_retry_at = -math.inf
        self.backoff.reset()
        if self.tcp == "ready":
            self.close_tcp_at = math.inf

    def udp_hello_sent(self, now: float) -> None:
        """A UDP hello went out (one the shell sent on its own: a new session's first, a peer's fallback)."""
        self.last_udp_hello = now
        self.hello_now = False
        if not self.udp_ready_at(now) and self.waiting_since is None:
            self.waiting_since = now

    def udp_ready(self, now: float, until: float) -> None:
        """A HELLO_OK over UDP; the session lasts until `until`."""
        self.udp_until = until
        self.waiting_since = None
        self.backoff.reset()
        if self.tcp == "ready" and self.close_tcp_at == math.inf:
            self.close_tcp_at = now + TCP_GRACE

    def tcp_ready(self, now: float, attempt: int) -> None:
        if attempt != self.attempt or self.tcp != "opening":
            return
        self.tcp = "ready"
        self.tcp_since = now
        if self.udp_ready_at(now):
            # The TCP HELLO rebound us at the relay: take the binding back for UDP, then close TCP.
            self.hello_now = True
            self.close_tcp_at = now + TCP_GRACE

    def tcp_failed(self, now: float, attempt: int, rand01: float) -> None:
        """No TCP relay address gave a session."""
        if attempt != self.attempt or self.tcp != "opening":
            return
        self._tcp_closed(now, rand01)

    def tcp_lost(self, now: float, attempt: int, rand01: float) -> None:
        """A ready TCP session closed (not by a CloseTcp of ours)."""
        if attempt != self.attempt or self.tcp != "ready":
            return
        if now - self.tcp_since >= TCP_STABLE:
            self.backoff.reset()
        self._tcp_closed(now, rand01)
        if not self.udp_ready_at(now) and self.waiting_since is None:
            self.waiting_since = now  # UDP was silent all along: race again after the backoff

    def peer_fell_back(self, now: float) -> bool:
        """A peer just fell back to the relay: whether to send a UDP hello now (re-opens our NAT mapping
        towards the relay after a rebinding, instead of at the next periodic hello; at most one a second)."""
        if now - self.last_refresh < REFRESH_GAP:
            return False
        self.last_refresh = now
        return True

    def tcp_current(self, attempt: int) -> bool:
        """Whether `attempt` is the TCP session the policy holds ready (not one it closed or superseded)."""
        return attempt == self.attempt and self.tcp == "ready"

    # ---- outputs --------------------------------------------------------------------------------
    def udp_ready_at(self, now: float) -> bool:
        return now < self.udp_until

    def transport(self, now: float) -> str | None:
        """Where sends go now: UDP, TCP, or None (hold them until a session is ready)."""
        if self.udp_ready_at(now):
            return UDP
        if self.tcp == "ready":
            return TCP
        return None

    def tick(self, now: float, session_hello_at: float) -> list:
        """The actions due at `now`. `session_hello_at`: when the UDP session wants its next hello
        (RelaySession.get_timer(): retry, periodic re-hello, expiry, a notice)."""
        actions: list = []
        if self.tcp == "ready" and now >= self.close_tcp_at:
            if self.udp_ready_at(now):
                actions.append(self._close())
            else:
                self.close_tcp_at = math.inf  # UDP lapsed again during the grace: TCP stays
        if self._open_tcp_at() <= now:
            self.tcp = "opening"
            self.attempt += 1
            actions.append(OpenTcp(self.attempt))
        if self._udp_hello_at(now, session_hello_at) <= now:
            self.udp_hello_sent(now)  # the shell sends it: counted here, so a tick never asks twice
            actions.append(HelloUdp())
        return actions

    def next_deadline(self, now: float, session_hello_at: float) -> float:
        deadlines = [self._open_tcp_at(), self._udp_hello_at(now, session_hello_at)]
        if self.tcp == "ready":
            deadlines.append(self.close_tcp_at)
        return min(deadlines)

    # ---- helpers --------------------------------------------------------------------------------
    def _open_tcp_at(self) -> float:
        if not self.has_tcp or self.tcp != "closed" or self.waiting_since is None:
            return math.inf
        return max(self.waiting_since + RACE_AFTER, self.tcp_retry_at)

    def _udp_hello_at(self, now: float, session_hello_at: float) -> float:
        if self.hello_now:
            return -math.inf
        if self.tcp == "ready" and not self.udp_ready_at(now):
            # TCP carries the traffic: UDP is only probed now and then.
            return self.last_udp_hello + UDP_RETRY_WHILE_TCP
        return max(session_hello_at, self.last_udp_hello + HELLO_GAP)

    def _close(self) -> CloseTcp:
        self.tcp = "closed"
        self.close_tcp_at = math.inf
        return CloseTcp(self.attempt)

    def _tcp_closed(self, now: float, rand01: float) -> None:
        self.tcp = "closed"
        self.close_tcp_at = math.inf
        self.tcp_retry_at = now + self.backoff.delay(TRANSIENT, rand01)
