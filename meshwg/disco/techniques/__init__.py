"""NAT traversal techniques: strategies a peer's PeerPaths runs beside its normal probe rounds. Pure.

A technique is one class in one file here, listed in `meshwg.disco.peer_paths.TECHNIQUES`; PeerPaths makes one
per peer, `Technique(random_bytes)`. Time is `now`, randomness the `random_bytes(n)` it was given, and it never
seals, sends or opens anything itself: it returns actions.

What it gets (PeerView, satisfied by PeerPaths itself): both sides' NAT kinds (`local_nat`, `peer_nat`, from
meshwg.disco.netcheck), whether a direct path is trusted now (`direct(now)`), and the peer's address as the
signal server observed it (`observed_addr()`): the only address a technique may aim a burst at, since the
others (reported, pinged from) can name anyone.

When PeerPaths calls it:
- arm(peer, now): a normal round did not connect (punch notice, unanswered probe round, call-me-maybe from an
  active peer). Schedule an attempt if the technique applies; start nothing yet.
- poll(peer, now, budget): every poll while the peer is active. Start when due, emit what is due. `budget(n)`
  takes n probes from the node's global rate limit (None: unbounded, in unit tests); stop at its first refusal.
- stop(): a direct path was chosen or the peer went idle. Returns the clean-up actions (may be none).
- socket_alive(via): extra socket `via` carried the peer's disco (a ping or a pong): keep it open on stop.
- deadline(): the next time poll has something to do (math.inf: nothing).
- running, holds_sockets, role: for status, and for the node when the peer is removed.

What it returns (actions): Probe(addr, via) for PeerPaths to send as a sealed ping (PeerPaths keeps the txid;
the node bounds these probes per target IP with the technique's `ip_rate`/`ip_burst`, counting refusals as
`probe_<name>_limited`), OpenSockets/CloseSockets for the mesh shell's extra sockets, and Started() once per
attempt (PeerPaths counts it as `attempt_<name>`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Probe:
    """Ping `addr` from the main socket (via None) or from extra socket `via` (1-based)."""
    addr: tuple
    via: int | None = None


@dataclass(frozen=True)
class OpenSockets:
    """Open `count` extra UDP sockets (any port) for this peer, feed what they receive to
    node.receive_datagram(..., via=i) with i in 1..count, and send the node's SocketEndpoint(i, addr)
    datagrams from socket i. Close them on CloseSockets."""
    count: int


@dataclass(frozen=True)
class CloseSockets:
    keep: tuple = ()               # socket indexes that carry traffic with the peer (keep them open)


@dataclass(frozen=True)
class Started:
    """An attempt began (counted as `attempt_<name>`)."""


class PeerView(Protocol):
    local_nat: str | None
    peer_nat: str | None

    def direct(self, now: float) -> bool: ...

    def observed_addr(self) -> tuple | None: ...


class Technique:
    """The base shape; see the module docstring for when each hook is called."""
    name = ""
    ip_rate = 0.0              # probes a second to any one IP, all peers together (the node's bound)...
    ip_burst = 0.0             # ...after this burst
    max_outstanding = 0        # probes awaiting a pong on top of the peer's normal pending bound

    def __init__(self, random_bytes):
        self._random = random_bytes

    def arm(self, peer: PeerView, now: float) -> None:
        pass

    def poll(self, peer: PeerView, now: float, budget) -> list:
        return []

    def stop(self) -> list:
        return []

    def socket_alive(self, via: int) -> None:
        pass

    def deadline(self) -> float:
        return math.inf

    @property
    def running(self) -> bool:
        return False

    @property
    def holds_sockets(self) -> bool:
        return False

    @property
    def role(self) -> str | None:
        return None
