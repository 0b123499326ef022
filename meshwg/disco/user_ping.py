"""The user's pings (`meshwg ping`): which paths one ping goes to, which pong answers it, when it times out. Pure.

One user ping is a disco ping to each of the peer's direct candidates and one through the relay, sent at once; the
first pong back answers it (its path and round trip), and a ping with no answer by its deadline times out. Bounded:
at most MAX_OUTSTANDING user pings in flight per node (more are refused, not queued), each to at most
MAX_CANDIDATES + 1 paths. Each path's txid is 12 random bytes, and a pong matches only when it comes from the
pinged peer by the very path the ping took: nobody guesses a txid, nor passes one path's answer off as another's.

The direct pings' pongs also count for path selection exactly as any pong does (the node hands their txids to the
peer's PeerPaths); a pong through the relay never moves a path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELAY = "relay"             # the target of the ping that goes through the relay
MAX_OUTSTANDING = 8         # user pings in flight per node
DEFAULT_TIMEOUT = 5.0       # seconds a user ping waits for its first pong
MAX_TIMEOUT = 10.0          # the most a request may ask for (the status socket answers one request at a time)
TXID_LEN = 12


@dataclass(frozen=True)
class UserPingDone:
    """The node's event: user ping `ref` got its first pong (path, rtt), or none by its deadline (path None)."""
    ref: int
    peer_key: bytes
    path: object            # (ip, port) of a direct candidate, RELAY, or None: no answer
    rtt: float | None


@dataclass
class _Ping:
    peer_key: bytes
    sent_at: float
    deadline: float
    txids: tuple


def ping_targets(candidates) -> list:
    """Where a user ping goes: every candidate path ((addr, via) of each), then the relay."""
    return [(c.addr, c.via) for c in candidates] + [RELAY]


class UserPings:
    def __init__(self, random_bytes, max_outstanding: int = MAX_OUTSTANDING):
        self._random = random_bytes
        self.max_outstanding = max_outstanding
        self._pings: dict[int, _Ping] = {}
        self._by_txid: dict[bytes, tuple[int, object]] = {}   # txid -> (ref, target)

    def full(self) -> bool:
        return len(self._pings) >= self.max_outstanding

    def __len__(self) -> int:
        return len(self._pings)

    def start(self, ref: int, peer_key: bytes, targets, now: float, timeout: float) -> list[tuple[bytes, object]]:
        """Track a new ping to `targets` ((addr, via) or RELAY); the (txid, target) pairs to send. Misuse raises:
        a ref in flight, a full table (check full() first), a timeout that is not a positive finite number."""
        if ref in self._pings:
            raise ValueError(f"user ping {ref} is in flight")
        if self.full():
            raise ValueError("too many user pings in flight")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"bad timeout {timeout!r}")
        pairs = []
        for target in targets:
            txid = self._random(TXID_LEN)
            if txid in self._by_txid:   # a random source that repeats itself: no ambiguous match
                continue
            self._by_txid[txid] = (ref, target)
            pairs.append((txid, target))
        self._pings[ref] = _Ping(peer_key, now, now + timeout, tuple(t for t, _ in pairs))
        return pairs

    def answer(self, peer_key: bytes, txid: bytes, target, now: float) -> UserPingDone | None:
        """A pong from `peer_key` with `txid` that came by `target` ((addr, via) or RELAY): the ping it answers,
        done, if it is the first answer; None when it answers no ping of the user's (nothing changes)."""
        entry = self._by_txid.get(txid)
        if entry is None:
            return None
        ref, sent_to = entry
        ping = self._pings[ref]
        if ping.peer_key != peer_key or sent_to != target:
            return None
        self._forget(ref)
        return UserPingDone(ref, peer_key, target if target == RELAY else target[0], max(0.0, now - ping.sent_at))

    def expire(self, now: float) -> list[UserPingDone]:
        """The pings past their deadline, timed out (and forgotten)."""
        out = []
        for ref in [r for r, p in self._pings.items() if now >= p.deadline]:
            out.append(UserPingDone(ref, self._pings[ref].peer_key, None, None))
            self._forget(ref)
        return out

    def deadline(self) -> float:
        return min((p.deadline for p in self._pings.values()), default=math.inf)

    def _forget(self, ref: int) -> None:
        for txid in self._pings.pop(ref).txids:
            del self._by_txid[txid]
