"""What the signal server and its admin CLI need of a database: the `Store` protocol, its row types and
its change feed. Every backend (SQLite in store.py, PostgreSQL in store_pg.py) implements it and passes
tests/signal/test_store_conformance.py.

The change feed: every mutation appends a Change (seq, kind, node key and id) in the same transaction as
the mutation itself, so a reader that has seen seq N learns every later change with changes_since(N) and
re-reads only the rows those changes name. Old changes are pruned; a reader whose seq fell behind the
pruned range gets one RESYNC change and re-reads the whole node table once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from signal_server import registry
from signal_server.invites import InviteRow


class StoreError(Exception):
    """The database cannot be used as it is (missing, no identity, not SQLite); str() is one line naming it."""


class NoIdentity(StoreError):
    """The path holds no server identity: a missing file, an empty one, or a database without a key."""


@dataclass
class NodeRow:
    node_id: int
    key: bytes
    name: str
    ipv4: str
    ipv6: str
    created: float
    last_seen: float | None
    expires: float | None
    invite_id: str | None
    tag: str
    # "node" (joins over the control channel) or "plain" (a stock WireGuard device the server manages, issue 12:
    # it never registers; its entry goes only to `targets`, node ids; private_key is None when only its
    # public key was given; exit_node: a node id, or None).
    kind: str = "node"
    private_key: bytes | None = None
    targets: tuple = ()
    exit_node: int | None = None
    # A node's subnet routes that are advertised and approved (canonical CIDR text, sorted; routes.py), and
    # whether it is an advertised and approved exit node: what its peers route through it.
    routes: tuple = ()
    is_exit: bool = False
    # Its tags (issue 13; policy.py): the invite's tag at join, then what `meshwg-signal nodes tag/untag` made them.
    tags: tuple = ()

    def live(self, wall: float) -> bool:
        """Not expired at wall-clock time `wall`."""
        return registry.live(self.expires, wall)


# Change kinds. A node kind names the node whose row changed (re-read it); the others carry no node.
JOIN, READMIT, RENAME, EXPIRE, REMOVE, TOUCH = "join", "readmit", "rename", "expire", "remove", "touch"
INVITE, META = "invite", "meta"
ROUTES = "routes"  # a node's advertised routes or their approval changed (its row's routes/is_exit)
TAGS = "tags"  # a node's or plain peer's tags changed
NODE, PLAIN = "node", "plain"  # NodeRow.kind
RESYNC = "resync"  # the reader missed pruned changes: re-read every node once
# A node's live state (online, candidates, observed) changed on the server it is connected to: other servers on
# the same database re-read its live row (PostgreSQL only: PgStore.set_live; signal_server/multi_server.py).
LIVE = "live"
NODE_KINDS = frozenset({JOIN, READMIT, RENAME, EXPIRE, REMOVE, ROUTES, TAGS})  # what peers or the relay see changed
KINDS = NODE_KINDS | {TOUCH, INVITE, META, RESYNC, LIVE}


@dataclass(frozen=True)
class Change:
    seq: int
    kind: str
    key: bytes | None = None
    node_id: int | None = None


@dataclass(frozen=True)
class RouteRow:
    """One (node, prefix) of the routes table: prefix is canonical CIDR text or routes.EXIT; advertised: the node
    advertises it now; decision: None (pending), True (approved) or False (rejected)."""
    node_id: int
    prefix: str
    advertised: bool
    decision: bool | None


@runtime_checkable
class Store(Protocol):
    """A server database. Mutations commit before they return; each appends its Change in its transaction."""

    created_identity: bool  # this open created the server identity (serve --init on an empty database)
    multi_server: bool      # several serve processes may share it (PostgreSQL): server records, live rows, NOTIFY

    # --- identity and meta
    def server_private_key(self, random_bytes=None) -> bytes: ...
    def meta_get(self, k: str): ...
    def meta_set(self, k: str, v) -> None: ...
    def meta_get_or_create(self, k: str, make: Callable): ...
    def prefixes(self, random_bytes, prefix4: str | None = None, prefix6: str | None = None): ...
    def schema_version(self) -> int: ...

    # --- invites
    def create_invite(self, invite_id: str, secret: bytes, reusable: bool, expires: float | None, tag: str,
                      wall: float, auto_routes: tuple = ()) -> None: ...
    def list_invites(self) -> list[InviteRow]: ...
    def revoke_invite(self, invite_id: str) -> bool: ...

    # --- nodes (registry.decide_join holds the join rules; the store reads and writes for them)
    def get_node(self, key: bytes) -> NodeRow | None: ...
    def list_nodes(self) -> list[NodeRow]: ...
    def find_node(self, ident: str) -> NodeRow | None: ...
    def join(self, key: bytes, invite_id: str | None, secret: bytes | None, name: str | None, wall: float,
             prefix4, prefix6, reserved: frozenset = frozenset()) -> tuple[NodeRow, bool]: ...
    def rename(self, node_id: int, name: str) -> str: ...
    def expire(self, node_id: int, when: float) -> None: ...
    def remove(self, node_id: int, wall: float) -> bool: ...
    def touch(self, key: bytes, wall: float) -> None: ...
    def set_tags(self, node_id: int, tags: tuple) -> NodeRow: ...

    # --- plain WireGuard peers (rows of the node table with kind PLAIN; remove() removes them too)
    def add_plain(self, name: str, public_key: bytes, private_key: bytes | None, targets: list[int],
                  exit_node: int | None, wall: float, prefix4=None, prefix6=None, tags: tuple = ()) -> NodeRow: ...
    def list_plain(self) -> list[NodeRow]: ...
    def set_plain_key(self, node_id: int, public_key: bytes, private_key: bytes | None) -> NodeRow: ...

    # --- subnet routes and exit nodes (routes.py holds the rules; every change appends a ROUTES change)
    def advertise_routes(self, key: bytes, prefixes: tuple, exit_node: bool, forbidden: Callable): ...
    def list_routes(self) -> list[RouteRow]: ...
    def approve_route(self, node_id: int, prefix: str) -> RouteRow: ...
    def reject_route(self, node_id: int, prefix: str) -> RouteRow: ...

    # --- change feed
    def change_head(self) -> int: ...
    def changes_since(self, seq: int) -> tuple[list[Change], int]: ...
    def may_have_changes(self) -> bool: ...

    # --- several servers on one database: only a backend whose `multi_server` is True has these (PgStore):
    # server_beat, server_gone, servers, set_live, live_rows (store_pg.py; signal_server/multi_server.py uses them)

    # --- maintenance
    def backup_to(self, dest: str) -> None: ...
    def integrity_ok(self) -> bool: ...
    def close(self) -> None: ...


def open_store(db: str, **kw) -> Store:
    """The backend for `db`: a postgresql:// (or postgres://) URL picks PostgreSQL (store_pg), anything else is
    a SQLite file path (store)."""
    if db.startswith(("postgresql://", "postgres://")):
        from signal_server.store_pg import PgStore

        return PgStore(db, **kw)
    from signal_server.store import SqliteStore

    return SqliteStore(db, **kw)


def db_label(db: str) -> str:
    """`db` for logs and messages: a SQLite file's absolute path, a URL without its password (user info or
    ?password=)."""
    import os
    import re

    if not db.startswith(("postgresql://", "postgres://")):
        return os.path.abspath(db)
    scheme, rest = db.split("://", 1)
    userinfo = max(_userinfos(rest), key=len, default="")
    if ":" in userinfo:
        rest = userinfo.split(":", 1)[0] + ":***" + rest[len(userinfo):]
    return scheme + "://" + re.sub(r"([?&]password=)[^&]*", r"\1***", rest)


def _userinfos(rest: str) -> list[str]:
    """The user info ("user:password") of a URL after its scheme, as libpq reads it (up to the first '@' met
    before any '/') and as its writer may have meant it (up to the last '@' before any '?': a '/' left
    unencoded in the password)."""
    out = []
    stop = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=-1)
    if stop >= 0 and rest[stop] == "@":
        out.append(rest[:stop])
    last = rest.split("?", 1)[0].rfind("@")
    if last >= 0:
        out.append(rest[:last])
    return out


def db_secrets(db: str) -> set[str]:
    """The passwords a database URL may hold (each as written and percent-decoded)."""
    import re
    from urllib.parse import unquote

    if not db.startswith(("postgresql://", "postgres://")):
        return set()
    rest = db.split("://", 1)[1]
    found = [u.split(":", 1)[1] for u in _userinfos(rest) if ":" in u]
    found += re.findall(r"[?&]password=([^&]*)", rest)
    return {s for raw in found for s in (raw, unquote(raw)) if s}


def redact_db_error(db: str, text: str) -> str:
    """`text` (a database error about `db`) with nothing of its password: libpq quotes the URL, or the token it
    could not parse, which may be the password or a piece of it. A quoted token sharing two characters in a row
    with the password goes whole (over-redacting a host name costs little: the label shows it)."""
    import re

    secrets = db_secrets(db)
    if not secrets:
        return text
    text = text.replace(db, db_label(db))

    def shares(token: str) -> bool:
        return any(token in s or s in token or any(s[i:i + 2] in token for i in range(len(s) - 1))
                   for s in secrets)

    text = re.sub(r'"([^"]*)"|\'([^\']*)\'',
                  lambda m: m.group(0) if not shares(m.group(1) if m.group(1) is not None else m.group(2))
                  else m.group(0)[0] + "***" + m.group(0)[0], text)
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) > 1:
            text = text.replace(s, "***")
    return text
