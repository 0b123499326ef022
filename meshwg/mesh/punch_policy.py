"""What the node tells the signal server for NAT traversal, and when. Pure: `now` is an input.

PunchPolicy decides which peers to ask the server to coordinate a punch for:
- a peer with traffic that goes over the relay: when it becomes active, then every PUNCH_RELAYED_INTERVAL
  while it stays active and relayed;
- a peer whose candidates appeared or changed, or that came online (peer_changed);
- never one that is gone, offline or already direct; at most once per PUNCH_MIN_INTERVAL per peer
  (a punch the server started for us counts, punched()); at most PUNCH_GLOBAL_RATE a second over all
  peers, a request refused by that budget waiting for the next tick.

CandidateReport decides what to report as our candidates (local_candidates, public_candidates) and whether a report is due
(the list changed since the last one the server took, none is on its way, and the control channel is up).

The agent core (meshwg.mesh.agent_core) feeds events in, calls tick(now, connected, paths, online) when
next_deadline(...) says (no sooner than PUNCH_WATCH_INTERVAL after the previous tick) and asks for one punch
request per key it returns. Nothing to do, no deadline: an idle node with direct or idle peers is not woken
(issue 15). What needs a tick: a pending request (now; one the budget refused, when a token is back), a peer
whose activity changed since the last tick (now: the shell wakes the tick when the node sees a peer turn active),
an active peer's idle moment (its end of activity is recorded, so its next activity counts as new), and an
active relayed peer's PUNCH_RELAYED_INTERVAL.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

from meshwg.disco import netcheck as NC
from meshwg.signaling.protocol import KIND_PUBLIC
from meshwg.token_bucket import TokenBucket

PUNCH_WATCH_INTERVAL = 0.1
PUNCH_MIN_INTERVAL = 1.0        # per peer, between punch requests we make
PUNCH_RELAYED_INTERVAL = 30.0   # while a peer is active and still relayed, ask again this often
PUNCH_GLOBAL_RATE = 20.0        # punch requests per second, all peers
MAX_CANDIDATES = 16             # what one report carries
NAT_KIND = {NC.EIM: "stun-eim", NC.EDM: "stun-edm"}  # our NAT kind rides on the STUN candidate's kind


class PathState(NamedTuple):
    """A peer's path as the node sees it at `now`."""
    active: bool    # traffic flowed recently
    direct: bool    # a trusted direct path carries it (else the relay)
    idle_at: float = math.inf   # when it turns idle unless traffic flows again (while active)


class PunchPolicy:
    def __init__(self, rate: float = PUNCH_GLOBAL_RATE) -> None:
        self._last: dict[bytes, float] = {}        # when we last asked for (or were told of) a punch per peer
        self._was_active: dict[bytes, bool] = {}
        self._pending: set[bytes] = set()
        self._budget = TokenBucket(rate, rate)
        self._retry_at = -math.inf                 # the budget refused a request: no token before then

    def peer_changed(self, key: bytes, online: bool, candidates, before: tuple[bool, tuple] | None) -> None:
        """A directory entry was set; `before`: its (online, candidates) until now, None for a new peer.
        New candidates are new chances to go direct: punch when they appear, change or come back online."""
        if not (online and candidates):
            return
        if before is None or not before[0] or tuple(before[1]) != tuple(candidates):
            self._pending.add(key)

    def peer_removed(self, key: bytes) -> None:
        self._last.pop(key, None)
        self._was_active.pop(key, None)
        self._pending.discard(key)

    def punched(self, key: bytes, now: float) -> None:
        """The server coordinated a punch with this peer (its notice): no request of ours for a while."""
        self._last[key] = now

    def tick(self, now: float, connected: bool, paths: Mapping[bytes, PathState],
             online: Callable[[bytes], bool]) -> list[bytes]:
        """The peers to request a punch for now, each recorded as asked. Nothing while disconnected (the
        pending ones wait for the connection)."""
        if not connected:
            return []
        want = self._pending
        self._pending = set()
        for key, st in paths.items():
            if st.active and not st.direct:
                became = not self._was_active.get(key, False)
                if became or now - self._last.get(key, -math.inf) >= PUNCH_RELAYED_INTERVAL:
                    want.add(key)
            self._was_active[key] = st.active
        out = []
        for key in want:
            st = paths.get(key)
            if st is None or st.direct or not online(key):
                continue
            if now - self._last.get(key, -math.inf) < PUNCH_MIN_INTERVAL:
                continue
            if not self._budget.take(now):
                self._pending.add(key)
                self._retry_at = now + (1.0 / self._budget.rate if self._budget.rate > 0 else PUNCH_RELAYED_INTERVAL)
                continue
            self._last[key] = now
            out.append(key)
        return out

    def next_deadline(self, now: float, connected: bool, paths: Mapping[bytes, PathState],
                      online: Callable[[bytes], bool]) -> float:
        """When tick() next has something to do (math.inf: nothing until an input changes; `now` or earlier: at
        once). While disconnected tick() does nothing: the Connected input brings the deadline back."""
        if not connected:
            return math.inf
        t = max(now, self._retry_at) if self._pending else math.inf
        for key, st in paths.items():
            if st.active != self._was_active.get(key, False):
                return now
            if st.active:
                t = min(t, st.idle_at)
                if not st.direct and online(key):   # never before a refusing budget has a token again
                    t = min(t, max(self._last.get(key, -math.inf) + PUNCH_RELAYED_INTERVAL, self._retry_at))
        return t


def local_candidates(reflexive, iface_endpoints, local_nat: str | None, public=()) -> list[tuple[str, int, str]]:
    """Our candidates as reported: public ones first (reachable with no punch: what `plain add --direct` gives
    phones), then reflexive ones (they work across NATs), kind naming our NAT, then interface addresses not
    already listed; at most MAX_CANDIDATES. A public address that is also reflexive or local is listed under
    both kinds: a server or node that does not know "public" drops that one entry and keeps the address."""
    kind = NAT_KIND.get(local_nat, "stun")
    out = [(ip, port, KIND_PUBLIC) for ip, port in public]
    out += [(ip, port, kind) for ip, port in reflexive]
    out += [(ip, port, "local") for ip, port in iface_endpoints if (ip, port) not in reflexive]
    return out[:MAX_CANDIDATES]


def public_candidates(configured, open_family: int | None, reflexive) -> list[tuple[str, int]]:
    """Where we are reachable from anywhere with no punch: the port forward the user gave (configured: (ip, port)),
    else, when netcheck saw endpoint-independent mapping and filtering on IP version `open_family` (a full-cone
    NAT or none), our reflexive address of that version (one: the NAT maps the shared socket to one address)."""
    if configured is not None:
        return [tuple(configured)]
    if open_family is None:
        return []
    same = [(ip, port) for ip, port in reflexive if (":" in ip) == (open_family == 6)]
    return same[:1]


class CandidateReport:
    """Reports only what the server has not taken yet, one report at a time (in order, never twice)."""

    def __init__(self) -> None:
        self.last: list | None = None       # the last list the server accepted
        self.sending: list | None = None    # a report on its way

    def due(self, candidates: list, connected: bool) -> bool:
        return connected and self.sending is None and candidates != self.last

    def sent(self, candidates: list) -> None:
        self.sending = list(candidates)

    def accepted(self, candidates: list) -> None:
        self.last, self.sending = list(candidates), None

    def connection_changed(self) -> None:
        """A report on the lost connection is not waited for: the next connection decides afresh."""
        self.sending = None
