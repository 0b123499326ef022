"""Birthday-paradox punching, when exactly one side's NAT maps per destination. Pure (see the package docstring).

The "hard" side (its NAT maps per destination, EDM) opens SOCKETS extra sockets and pings the peer's observed
address from each, HARD_ROUNDS times a second apart: SOCKETS random mappings on its NAT. The "easy" side (a
stable mapping, EIM) pings the peer's public IP on PROBES distinct random ports at PROBE_RATE a second from its
main socket; each probe opens the easy side's filter towards that port, so a hit on one of the hard side's
mappings is answered. Tailscale's numbers: 256 ports x 1024 probes ~ 98 %.

An attempt starts DELAY after a normal round failed to connect, at most one every MIN_INTERVAL per peer, and
ends when a direct path is chosen, the peer goes idle, or its time is up (the hard side then closes the sockets
that carried nothing). The node bounds these probes per target IP (IP_BURST a minute, one attempt's worth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshwg.disco.netcheck import EDM, EIM
from meshwg.disco.techniques import CloseSockets, OpenSockets, PeerView, Probe, Started, Technique

SOCKETS = 256
PROBES = 1024
PROBE_RATE = 200.0            # probes per second from the easy side
PROBE_BATCH = 0.05            # ...sent in batches this far apart
HARD_ROUNDS = 8               # pings per extra socket (one per second) from the hard side
OPEN_LEAD = 0.05              # the shell opens the sockets before their first ping
DELAY = 2.0                   # start after a normal round had this long to succeed
MIN_INTERVAL = 60.0           # at most one attempt per minute per peer
IP_BURST = 2048.0             # birthday probes to any one IP: one attempt (256 sockets x 8 rounds)...
IP_RATE = IP_BURST / 60.0     # ...a minute


@dataclass(frozen=True)
class BirthdayPlan:
    """What a birthday-paradox attempt does (for status/tests; the actions are emitted over time).

    role "hard": we map per destination. Open `sockets` extra sockets, each pings the peer's observed
    address `rounds` times (1/s): this creates `sockets` random mappings on our NAT.
    role "easy": our mapping is stable. Ping the peer's public IP on `probes` distinct random ports at
    `rate`/s from the main socket; each hit lands on one of the hard side's mappings, which the easy
    side's own probe has just opened in its filter, so the pong comes back.
    """
    role: str
    target_ip: str
    sockets: int = 0
    probes: int = 0
    rate: float = 0.0
    rounds: int = 0


def role_for(local_nat: str | None, peer_nat: str | None) -> str | None:
    """Our side of an attempt, or None when it does not apply (both NATs alike, or one unknown)."""
    if local_nat == EDM and peer_nat == EIM:
        return "hard"
    if local_nat == EIM and peer_nat == EDM:
        return "easy"
    return None


def random_ports(random_bytes, n: int) -> list[int]:
    """n distinct ports in 1024..65535 drawn from random_bytes."""
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < n:
        raw = random_bytes(2 * (n - len(out)) + 8)
        for i in range(0, len(raw) - 1, 2):
            p = 1024 + int.from_bytes(raw[i:i + 2], "big") % (65536 - 1024)
            if p not in seen:
                seen.add(p)
                out.append(p)
                if len(out) == n:
                    break
    return out


class Birthday(Technique):
    name = "birthday"
    ip_rate = IP_RATE
    ip_burst = IP_BURST
    max_outstanding = PROBES       # many outstanding txids are expected

    def __init__(self, random_bytes):
        super().__init__(random_bytes)
        self.plan: BirthdayPlan | None = None
        self._start_at = math.inf
        self._next = math.inf
        self._end = math.inf
        self._last_attempt = -math.inf
        self._sent = 0
        self._ports: list[int] = []
        self._live_vias: set[int] = set()

    @property
    def running(self) -> bool:
        return self.plan is not None

    @property
    def holds_sockets(self) -> bool:
        return self.plan is not None and self.plan.role == "hard"

    @property
    def role(self) -> str | None:
        return self.plan.role if self.plan else None

    def arm(self, peer: PeerView, now: float) -> None:
        if (self.plan is None and role_for(peer.local_nat, peer.peer_nat) and not peer.direct(now)
                and now - self._last_attempt >= MIN_INTERVAL and peer.observed_addr()):
            self._start_at = now + DELAY

    def poll(self, peer: PeerView, now: float, budget) -> list:
        out: list = []
        if now >= self._start_at:
            self._start(peer, now, out)
        if self.plan is not None:
            if now >= self._end or peer.direct(now):
                out += self.stop()
            elif now >= self._next:
                self._step(peer, now, budget, out)
        return out

    def _start(self, peer: PeerView, now: float, out: list) -> None:
        self._start_at = math.inf
        role, observed = role_for(peer.local_nat, peer.peer_nat), peer.observed_addr()
        if peer.direct(now) or role is None or observed is None:
            return
        ip = observed[0]
        self._last_attempt = now
        out.append(Started())
        self._sent = 0
        if role == "hard":
            self._live_vias = set()
            self.plan = BirthdayPlan("hard", ip, sockets=SOCKETS, rounds=HARD_ROUNDS)
            out.append(OpenSockets(SOCKETS))
            self._next = now + OPEN_LEAD
            self._end = now + HARD_ROUNDS + 2.0
        else:
            self.plan = BirthdayPlan("easy", ip, probes=PROBES, rate=PROBE_RATE)
            self._ports = random_ports(self._random, PROBES)
            self._next = now
            self._end = now + PROBES / PROBE_RATE + 3.0

    def _step(self, peer: PeerView, now: float, budget, out: list) -> None:
        plan = self.plan
        if plan.role == "hard":
            target = peer.observed_addr()
            if target is None or self._sent >= plan.rounds:
                self._next = math.inf
                return
            for i in range(1, plan.sockets + 1):
                if budget is not None and not budget(1):
                    break
                out.append(Probe(target, i))
            self._sent += 1
            self._next = now + 1.0
            return
        due = int(min(len(self._ports), max(1, PROBE_RATE * PROBE_BATCH)))
        for _ in range(due):
            if not self._ports or (budget is not None and not budget(1)):
                break
            out.append(Probe((plan.target_ip, self._ports.pop())))
        self._next = now + PROBE_BATCH if self._ports else math.inf

    def stop(self) -> list:
        out = [CloseSockets(tuple(sorted(self._live_vias)))] if self.holds_sockets else []
        self.plan = None
        self._ports = []
        self._next = self._end = math.inf
        return out

    def socket_alive(self, via: int) -> None:
        self._live_vias.add(via)

    def deadline(self) -> float:
        return min(self._start_at, self._next, self._end if self.plan else math.inf)
