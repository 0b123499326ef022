"""What a failed control connection means and when to try again. Pure: randomness is passed in.

A node must never give up its tunnels because the control plane misbehaves. So almost every failure is
retried: a close or reset before the server spoke, a timeout or a BUSY answer are transient (retry with
jittered exponential backoff); a server that fails to prove the pinned key, or that no longer knows a
node it once welcomed, is suspect (a wrong database, a proxy to the wrong backend): the node reports it
and retries slowly. Only what an authenticated server says about this node's membership, or any refusal
of a node that was never admitted, ends the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSIENT = "transient"
SUSPECT = "suspect"
FATAL = "fatal"

SERVER_KEY_MISMATCH = "server_key_mismatch"
# Authenticated refusals that are the administrator's decision about this node: final.
MEMBERSHIP_ENDED = frozenset({"key_removed", "node_expired"})


def classify(code: str, *, authenticated_refusal: bool, registered: bool) -> str:
    """`code`: the failure's code; `authenticated_refusal`: the server proved its key and refused the
    join (a JoinRefused); `registered`: this node was welcomed before (now or in a cached netmap)."""
    if code == SERVER_KEY_MISMATCH or authenticated_refusal:
        if not registered:
            return FATAL  # a first join: nothing to keep running, and the user must hear it now
        return FATAL if code in MEMBERSHIP_ENDED else SUSPECT
    return TRANSIENT


@dataclass
class Backoff:
    """Delays between attempts: exponential for transient failures, `suspect` for suspect ones, a
    server's BUSY hint honoured up to `hint_max`. Jitter of +-20% spreads a herd of reconnects."""

    initial: float = 0.5
    maximum: float = 30.0
    suspect: float = 60.0
    hint_max: float = 120.0
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = self.initial

    def reset(self) -> None:
        self._next = self.initial

    def delay(self, kind: str, rand01: float, hint: float | None = None) -> float:
        """The wait before the next attempt after a failure of `kind`; rand01 in [0, 1)."""
        base = self.suspect if kind == SUSPECT else self._next
        if kind != SUSPECT:
            self._next = min(self._next * 2, self.maximum)
        if hint is not None:
            base = max(base, min(hint, self.hint_max))
        return base * (0.8 + 0.4 * rand01)


def order_addrs(addrs, lost: str | None) -> tuple:
    """The control addresses to try, in order: those of the invite as given, but the one whose connection just
    ended last. Its server may be gone (killed, its host down: a connect timeout each time) while another
    server on the same database takes the node at once (issue 14: several servers)."""
    addrs = tuple(addrs)
    if lost not in addrs:
        return addrs
    return tuple(a for a in addrs if a != lost) + (lost,)


def merge_addrs(invite_addrs, learned, limit: int = 32) -> tuple:
    """The invite's control addresses, then those a welcome listed that it lacks (other servers on the same
    database), at most `limit`: a node whose invite named one server that died still finds the others."""
    return tuple(dict.fromkeys((*invite_addrs, *learned)))[:limit]
