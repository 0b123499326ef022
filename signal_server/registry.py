"""Join rules of the signal server. Pure: the store reads the rows, asks here, then writes what was decided.

Everything a join decides lives here: a live node reconnects on its key; without an invite a removed key
hears `key_removed` (even when the removal happened while it was offline), an expired node `node_expired`,
an unknown key `not_registered`; with one the invite must be valid now (invites.check_invite) and newer
than the key's removal; an expired node comes back with its id and addresses, a new node gets addresses
derived from its key and a unique name. Lookups the rules need ("is this address or name taken?") are
passed in as functions so the store can answer them inside its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from signal_server import ipam
from signal_server.invites import InviteRow, JoinRefused, check_invite, normalize_name

PLAIN = "plain"  # store_api.PLAIN (the row kind of a plain WireGuard peer)


class KnownNode(Protocol):
    """What the rules read of a registered node (store.NodeRow has it)."""
    node_id: int
    expires: float | None
    kind: str  # "node", or "plain": a stock WireGuard device the server manages, which never joins


def live(expires: float | None, wall: float) -> bool:
    """Not expired at wall-clock time `wall`."""
    return expires is None or expires > wall


@dataclass(frozen=True)
class Reconnect:
    """The key is a live node: hand back its row, change nothing."""


@dataclass(frozen=True)
class Readmit:
    """An expired node with a valid invite: same id and addresses, no longer expiring; the invite is used."""
    node_id: int


@dataclass(frozen=True)
class Admit:
    """A new node; the invite is used, the key's removal (if any) is forgotten, the node inherits `tag`."""
    tag: str


@dataclass(frozen=True)
class Refuse:
    code: str
    message: str

    def error(self) -> JoinRefused:
        return JoinRefused(self.code, self.message)


Decision = Reconnect | Readmit | Admit | Refuse


def decide_join(existing: KnownNode | None, removed_at: float | None, invite_id: str | None,
                secret: bytes | None, invite: InviteRow | None, wall: float) -> Decision:
    """The outcome of `key` asking to join at `wall`.

    existing: the key's node row or None; removed_at: when the key was last removed (None if never or since
    readmitted); invite_id/secret: what the node presented (either may be missing); invite: the row of
    invite_id, None if unknown."""
    if existing is not None and existing.kind == PLAIN:
        # Its private key may be in a phone's config (or the server's database): holding it must not make a
        # session, a relay binding or an online entry of it.
        return Refuse("plain_peer", "this key is a plain WireGuard peer; it cannot join over the control channel")
    if existing is not None and live(existing.expires, wall):
        return Reconnect()
    if not invite_id or secret is None:
        # A registered node rejoins on its key alone: it must hear that it was removed (and
        # stop) even when the removal happened while it was offline and its GONE never came.
        if removed_at is not None:
            return Refuse("key_removed", "this node was removed from the mesh")
        if existing is not None:
            return Refuse("node_expired", "this node has expired; join again with a new invite")
        return Refuse("not_registered", "this key is not registered; join with an invite")
    try:
        check_invite(invite, secret, wall)
    except JoinRefused as exc:
        return Refuse(exc.code, exc.message)
    assert invite is not None  # check_invite refuses a missing row
    if removed_at is not None and invite.created <= removed_at:
        # An invite the administrator wrote before removing the key must not undo the removal.
        return Refuse("key_removed", "this key was removed; it needs an invite created after the removal")
    if existing is not None:
        return Readmit(existing.node_id)
    return Admit(invite.tag)


def addresses(key: bytes, n_nodes: int, prefix4, prefix6, taken4: Callable, taken6: Callable):
    """(IPv4, IPv6) for a new node, or Refuse("pool_full"). A full pool is the administrator's to fix, so
    the join is refused with a code the node stops on (not a server error it would retry forever)."""
    try:
        return ipam.allocate(prefix4, key, taken4, n_nodes), ipam.allocate(prefix6, key, taken6, n_nodes)
    except ipam.PoolExhausted as exc:
        return Refuse("pool_full", f"no free mesh address ({exc}); ask the administrator to "
                                   "remove unused nodes or choose a larger prefix")


def first_name(asked: str | None, key: bytes, taken: Callable[[str], bool]) -> tuple[str, bool]:
    """(name to insert, whether it is a placeholder to replace by default_name once the id is known).

    A placeholder carries the key so it cannot collide with another node's before the id exists."""
    base = normalize_name(asked or "")
    if base:
        return free_name(base, taken), False
    return "pending-" + key.hex(), True


def default_name(node_id: int, taken: Callable[[str], bool]) -> str:
    """Default names carry the id so they are unique and stable."""
    return free_name(f"node-{node_id}", taken)


def free_name(base: str, taken: Callable[[str], bool]) -> str:
    """`base`, else `base-2`, `base-3`, ... (kept within 63 characters) until one is free."""
    name, i = base, 2
    while taken(name):
        name, i = f"{base[:58]}-{i}", i + 1
    return name
