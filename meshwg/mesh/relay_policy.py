"""Which relay transport the node uses, UDP or TCP, and when to open or close TCP. Pure: `now` and the
jitter (rand01 in [0, 1)) are inputs.

UDP is preferred (it shares the node's socket and NAT mapping). The two are raced: if a UDP hello has gone
RACE_AFTER seconds without an answer the TCP relay is opened too (a firewall that drops UDP costs a third
of a second, not the seconds a timeout would), and sends go where a session is ready, UDP first. While TCP
carries the traffic a UDP hello goes out every UDP_RETRY_WHILE_TCP seconds; once UDP answers, sends move
back to it and TCP is closed TCP_GRACE seconds later (what the relay already wrote to it is still read).
A TCP connection that fails, or closes while UDP is still silent, is retried with jittered exponential
backoff.

The relay may listen for TCP on several addresses (e.g. 7301 and 443, which port-based firewalls let out). A
round of TCP attempts starts with the address that last gave a session (the first listed at first); the next
address is tried as soon as an attempt fails, or NEXT_ADDR_AFTER seconds after the previous attempt started
while none has answered (a firewall that drops SYNs costs a quarter of a second, not a connect timeout). The
first attempt to give a session wins; the others are closed. Only a round in which every address failed backs
off.

The relay keeps one session per node key, bound by the latest HELLO: a TCP session that comes up after
UDP answered has taken the binding away from UDP, so the policy asks for a UDP hello to take it back.

The shell feeds events in (configured, udp_hello_sent, udp_ready, tcp_ready/tcp_failed/tcp_lost,
peer_fell_back), asks transport(now) where a send goes, and calls tick(now, session_hello_at) at
next_deadline(now, session_hello_at); tick returns the actions (OpenTcp, CloseTcp, HelloUdp) to carry out now.
OpenTcp names the attempt (its outcome is reported with that number) and the index of the TCP address to try.
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
NEXT_ADDR_AFTER = 0.25       # no TCP attempt answered this long: try the next relay TCP address as well

UDP, TCP = "udp", "tcp"


@dataclass(frozen=True)
class OpenTcp:
    attempt: int             # report the outcome with this number; outcomes of older attempts are ignored
    index: int = 0           # which of the relay's TCP addresses (the welcome's order)


@dataclass(frozen=True)
class CloseTcp:
    attempt: int
    superseded: bool = False  # an attempt another one beat (never carried traffic), not the session


@dataclass(frozen=True)
class HelloUdp:
    pass


class RelayPolicy:
    def __init__(self) -> None:
        self.tcp_count = 0              # how many TCP relay addresses there are
        self.udp_until = -math.inf      # the UDP session is usable until then
        self.waiting_since: float | None = None  # first UDP hello not yet answered while UDP is not ready
        self.last_udp_hello = -math.inf
        self.tcp = "closed"             # "closed" | "opening" | "ready"
        self.attempt = 0                # the ready session's attempt (while "ready"), else the latest given out
        self.attempts = 0               # attempt numbers given out
        self.opening: dict[int, int] = {}  # attempt -> address index: connects under way in this round
        self.untried: list[int] = []    # address indices this round has not tried yet
        self.last_try_at = -math.inf    # when this round's latest attempt started
        self.good = 0                   # the address that last gave a session: a round starts with it
        self.superseded: list[int] = []  # attempts to close (another one won the round)
        self.tcp_since = -math.inf      # when the current TCP session became ready
        self.tcp_retry_at = -math.inf   # no TCP attempt before then (backoff)
        self.close_tcp_at = math.inf    # UDP is back: close TCP then
        self.hello_now = False          # a UDP hello is wanted at the next tick
        self.last_refresh = -math.inf
        self.backoff = Backoff(TCP_BACKOFF_INITIAL, TCP_BACKOFF_MAX)

    # ---- inputs ---------------------------------------------------------------------------------
    def configured(self, now: float, tcp_count: int) -> None:
        """A new UDP session (first configuration, or the relay may have restarted): race again from now.
        tcp_count: how many TCP relay addresses there are (a bool works: True is one)."""
        if int(tcp_count) != self.tcp_count:
            self.good = 0
        self.tcp_count = int(tcp_count)
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
        index = self.opening.pop(attempt, None)
        if index is None or self.tcp != "opening":
            return  # a late or beaten attempt: tcp_current() tells the shell to close it
        self.tcp = "ready"
        self.attempt, self.good = attempt, index
        self.superseded += list(self.opening)  # the round is won: close the other attempts
        self.opening.clear()
        self.untried = []
        self.tcp_since = now
        if self.udp_ready_at(now):
            # The TCP HELLO rebound us at the relay: take the binding back for UDP, then close TCP.
            self.hello_now = True
            self.close_tcp_at = now + TCP_GRACE

    def tcp_failed(self, now: float, attempt: int, rand01: float) -> None:
        """This attempt gave no session (refused, unreachable, timed out, the relay refused our key)."""
        if self.opening.pop(attempt, None) is None or self.tcp != "opening":
            return
        if self.untried and self.waiting_since is not None:
            self.last_try_at = -math.inf  # the next address now, not after NEXT_ADDR_AFTER
        elif not self.opening and self.untried:
            self.tcp, self.untried = "closed", []  # UDP answered meanwhile: the round is moot
        elif not self.opening:
            self._tcp_closed(now, rand01)  # every address failed in this round: back off

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
        actions += [CloseTcp(a, superseded=True) for a in self.superseded]
        self.superseded = []
        if self._open_tcp_at() <= now:
            actions.append(self._open(now))
        if self._udp_hello_at(now, session_hello_at) <= now:
            self.udp_hello_sent(now)  # the shell sends it: counted here, so a tick never asks twice
            actions.append(HelloUdp())
        return actions

    def next_deadline(self, now: float, session_hello_at: float) -> float:
        deadlines = [self._open_tcp_at(), self._udp_hello_at(now, session_hello_at)]
        if self.tcp == "ready":
            deadlines.append(self.close_tcp_at)
        if self.superseded:
            deadlines.append(now)
        return min(deadlines)

    # ---- helpers --------------------------------------------------------------------------------
    def _open_tcp_at(self) -> float:
        if not self.tcp_count or self.waiting_since is None:
            return math.inf
        if self.tcp == "closed":
            return max(self.waiting_since + RACE_AFTER, self.tcp_retry_at)
        if self.tcp == "opening" and self.untried:
            return self.last_try_at + NEXT_ADDR_AFTER
        return math.inf

    def _open(self, now: float) -> OpenTcp:
        """The next attempt of the round (a new round starts with the address that last worked)."""
        if self.tcp == "closed":
            self.tcp = "opening"
            first = self.good if self.good < self.tcp_count else 0
            self.untried = [(first + i) % self.tcp_count for i in range(self.tcp_count)]
        self.attempts += 1
        self.attempt = self.attempts
        index = self.untried.pop(0)
        self.opening[self.attempt] = index
        self.last_try_at = now
        return OpenTcp(self.attempt, index)

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
        self.untried = []
        self.close_tcp_at = math.inf
        self.tcp_retry_at = now + self.backoff.delay(TRANSIENT, rand01)


# ---- relays in regions (issue 14.3): which relay is home ----------------------------------------------------------
# Every relay of the welcome is probed (a PING frame, answered by a PONG: its round trip is the relay's latency). The
# home relay is probed every HOME_PROBE_ACTIVE while relayed traffic flows (HOME_PROBE_IDLE otherwise: an idle node
# wakes for nothing); the others every OTHER_PROBE. Home is the relay with the lowest latency; the node moves when
# another is nearer by SWITCH_RATIO and SWITCH_MARGIN (no flapping between two alike: each latency is the least of
# the relay's last RTT_SAMPLES answers), or at once when the home relay
# left a probe unanswered DEAD_AFTER while another relay answers (a node whose own UDP is cut moves nowhere).
HOME_PROBE_ACTIVE = 0.5
HOME_PROBE_IDLE = 25.0
OTHER_PROBE = 10.0
ACTIVE_FOR = 60.0            # relayed traffic keeps the home relay's probe fast this long
DEAD_AFTER = 1.6             # a probe unanswered this long: that relay is down (three fast probes)
SWITCH_RATIO, SWITCH_MARGIN = 0.7, 0.005
RTT_SAMPLES = 8              # a relay's latency: the least of its last answers (one slow answer moves nothing)


class HomePolicy:
    def __init__(self, regions) -> None:
        """regions: the relays' region names in the welcome's order (the first is home until one is measured)."""
        self.regions: tuple = tuple(regions)
        self.home: str | None = self.regions[0] if self.regions else None
        self.rtt: dict[str, float] = {}
        self._samples: dict[str, list] = {}
        self.last_probe: dict[str, float] = {}
        self.unanswered_since: dict[str, float] = {}  # region -> when its oldest unanswered probe went out
        self.active_until = -math.inf

    def set_regions(self, regions) -> None:
        """A new welcome's relays: measurements of the regions that stay are kept."""
        self.regions = tuple(regions)
        for d in (self.rtt, self._samples, self.last_probe, self.unanswered_since):
            for r in [r for r in d if r not in self.regions]:
                del d[r]
        if self.home not in self.regions:
            self.home = self.regions[0] if self.regions else None

    # ---- inputs
    def traffic(self, now: float) -> None:
        self.active_until = now + ACTIVE_FOR

    def probed(self, region: str, now: float) -> None:
        self.last_probe[region] = now
        self.unanswered_since.setdefault(region, now)

    def answered(self, region: str, rtt: float) -> None:
        if region in self.regions:
            samples = self._samples.setdefault(region, [])
            samples.append(rtt)
            del samples[:-RTT_SAMPLES]
            self.rtt[region] = min(samples)
            self.unanswered_since.pop(region, None)

    # ---- outputs
    def down(self, region: str, now: float) -> bool:
        since = self.unanswered_since.get(region)
        return since is not None and now - since >= DEAD_AFTER

    def _interval(self, region: str, now: float) -> float:
        if region == self.home:
            return HOME_PROBE_ACTIVE if now < self.active_until else HOME_PROBE_IDLE
        return OTHER_PROBE

    def probes_due(self, now: float) -> list[str]:
        """The regions to probe now (each then reported with probed())."""
        return [r for r in self.regions if now >= self.last_probe.get(r, -math.inf) + self._interval(r, now)]

    def next_deadline(self, now: float) -> float:
        times = [self.last_probe.get(r, -math.inf) + self._interval(r, now) for r in self.regions]
        # The home going down is worth a wake-up (choose() may move); once down, it is not: nothing clears that
        # time while no relay answers (our own UDP cut), and a deadline left in the past made the caller spin.
        times += [s + DEAD_AFTER for r, s in self.unanswered_since.items() if r == self.home and s + DEAD_AFTER > now]
        return min(times, default=math.inf)

    def choose(self, now: float) -> str | None:
        """The new home region when the node should move now, else None (updates `home`)."""
        alive = {r: t for r, t in self.rtt.items() if not self.down(r, now)}
        if not alive:
            return None  # nothing answers: our own network is down, or UDP is blocked: stay
        best = min(alive, key=lambda r: (alive[r], self.regions.index(r)))
        home = self.home
        if best == home:
            return None
        if home in alive and alive[best] > alive[home] * SWITCH_RATIO - SWITCH_MARGIN:
            return None
        if home not in alive and not self.down(home, now) and home not in self.rtt:
            return None  # home not measured yet: its first answer is on the way
        self.home = best
        return best
