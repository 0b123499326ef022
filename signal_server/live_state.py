"""Several servers on one database (issue 14 item 2): what of a node's live state goes through the database and
how another server's rows enter this one's directory. Pure.

The database (nodes, routes, invites) is shared already; what a node's own server alone knows is its live state:
online, the candidates it reported, where this server's relay saw it ("observed"). A node connected to server A
must reach the directories of B, C... within a second, so each server writes its connected nodes' live state
(store set_live: a row per node saying which server has it, and a LIVE change in the feed) and reads the rows the
feed names of nodes connected elsewhere. Writes are batched per interval (multi_server.py), so a node that keeps
changing its candidates costs at most one row write per interval.

Who owns a row: the server the node is connected to. A session that ends writes "offline" only while the row is
still its own (the node may already be on another server); a server that holds a session for a node whose row names
another server writes its own row again (reclaim) when that row is older than its session (a stale session there
wrote last), and closes its session (yield) when the row is newer: the node connected there since, as a second
connection to one server replaces the first. Rows carry their write time (`at`); without it, or at a tie, the
server with the greater id yields. So one side yields and the writes stop (two servers reclaiming from each other
wrote a row each, every interval, forever).
"""

from __future__ import annotations

from collections.abc import Container

from signal_server.directory import PLAIN, Directory

LIVE_FIELDS = frozenset({"online", "candidates", "observed"})
BEAT = 2.0  # a server records itself in the database this often
STALE = 10.0  # a server without a record this recent is gone (killed): not offered in invites, its nodes offline
APPLY, RECLAIM, SKIP, YIELD = "apply", "reclaim", "skip", "yield"


class SharedDirectory(Directory):
    """A Directory that remembers whose live state changed here (`live_dirty`, when `tracking`), for the writer to
    put in the database; rows from other servers go in through apply_remote and are not remembered."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.tracking = False  # True with a store several servers share
        self.live_dirty: set[bytes] = set()
        # Nodes whose live state is another server's row: a session here must claim them even when it reports
        # the same (a node moving from a killed server brings its candidates unchanged).
        self.remote: set[bytes] = set()

    def update(self, key: bytes, **changes) -> bool:
        changed = super().update(key, **changes)
        if self.tracking and not LIVE_FIELDS.isdisjoint(changes) and (changed or key in self.remote):
            self.remote.discard(key)
            self.live_dirty.add(key)
        return changed

    def remove(self, key: bytes):
        self.remote.discard(key)
        return super().remove(key)

    def apply_remote(self, key: bytes, online: bool, candidates: list, observed: list) -> bool:
        """Another server's row for a node not connected here; True when its entry changed."""
        changed = super().update(key, online=online, candidates=list(candidates), observed=list(observed))
        if key in self.nodes:
            self.remote.add(key)
        return changed


def take_entries(directory: Directory, local: Container, dirty) -> list[tuple]:
    """(key, online, candidates, observed) to write for each dirty key: a node with a session here as the directory
    has it, one without (its session ended) offline; removed nodes and plain peers not at all."""
    out = []
    for key in dirty:
        node = directory.nodes.get(key)
        if node is None or node.kind == PLAIN:
            continue
        if key in local and node.online:
            out.append((key, True, [list(c) for c in node.candidates], [list(c) for c in node.observed]))
        else:
            out.append((key, False, [], []))
    return out


class LiveRow(tuple):
    """A live row (key, server, online, candidates, observed) that also knows when it was written (`at`, wall
    clock; not part of the tuple: it compares and unpacks as the 5-tuple)."""
    at: float | None = None

    @classmethod
    def make(cls, fields, at: float | None) -> LiveRow:
        row = cls(fields)
        row.at = at
        return row


def remote_action(row: tuple, local: Container, me: str, since=None) -> str:
    """What to do with a live row (key, server, online, candidates, observed) the feed named: APPLY it to the
    directory, SKIP it (ours already), or, the node's session being here while the row says elsewhere, RECLAIM the
    row (it is older than our session, or offline) or YIELD (close our session: the node connected there since).
    since(key): when our session of the node began (wall clock), None if unknown."""
    key, server, online = row[0], row[1], row[2]
    if key not in local:
        return APPLY
    if server == me:
        return SKIP
    if not online:
        return RECLAIM  # the other session ended: the node is ours
    at, started = getattr(row, "at", None), None if since is None else since(key)
    if at is not None and started is not None and at != started:
        return RECLAIM if at < started else YIELD
    return RECLAIM if server > me else YIELD
