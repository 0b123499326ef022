"""SQLite state (stdlib sqlite3, WAL). Every mutation commits before the caller acknowledges it.

The admin CLI opens the same file from another process while the server runs; WAL lets readers and one
writer coexist, busy_timeout waits out short write locks, and the server notices admin writes through
PRAGMA data_version (changes committed by *other* connections).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from meshwg.config.keys import generate_private_key, key_to_base64
from signal_server import ipam
from signal_server.invites import InviteRow, JoinRefused, check_invite, hash_secret, normalize_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS invites (
  id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL, reusable INTEGER NOT NULL, expires REAL,
  tag TEXT NOT NULL DEFAULT '', created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
  uses INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS nodes (
  id INTEGER PRIMARY KEY AUTOINCREMENT, pubkey BLOB NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE,
  ipv4 TEXT NOT NULL UNIQUE, ipv6 TEXT NOT NULL UNIQUE, created REAL NOT NULL, last_seen REAL,
  expires REAL, invite_id TEXT, tag TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS removed_keys (pubkey BLOB PRIMARY KEY, removed_at REAL NOT NULL);
"""

DEFAULT_PREFIX4 = "100.64.0.0/10"


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

    def live(self, wall: float) -> bool:
        """Not expired at wall-clock time `wall`."""
        return self.expires is None or self.expires > wall


_NODE_COLS = "id, pubkey, name, ipv4, ipv6, created, last_seen, expires, invite_id, tag"
_INVITE_COLS = "id, secret_hash, reusable, expires, tag, created, revoked, uses"


class Store:
    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        # WAL + NORMAL: a commit is in the WAL file (OS page cache) before it returns, which survives
        # kill -9 of the server; FULL also fsyncs every commit (survives power loss, ~2x slower joins).
        self.path = path
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so read-check-write is atomic.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self._tx():
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    self.db.execute(stmt)

    def close(self) -> None:
        self.db.close()

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            return False

    def _tx(self):
        return Store._Tx(self.db)

    def data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # --- meta

    def meta_get(self, k: str):
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return row[0] if row else None

    def meta_set(self, k: str, v) -> None:
        with self._tx():
            self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (k, v))

    def meta_get_or_create(self, k: str, make):
        with self._tx():
            row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
            if row:
                return row[0]
            v = make()
            self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?)", (k, v))
            return v

    def server_private_key(self, random_bytes) -> bytes:
        return bytes(self.meta_get_or_create("server_private_key", lambda: generate_private_key(random_bytes)))

    def prefixes(self, random_bytes, prefix4: str | None = None, prefix6: str | None = None):
        """(IPv4 network, IPv6 network); chosen once (or when configured) and then kept."""
        if prefix4:
            self._set_prefix("prefix4", prefix4)
        if prefix6:
            self._set_prefix("prefix6", prefix6)
        p4 = self.meta_get_or_create("prefix4", lambda: DEFAULT_PREFIX4)
        p6 = self.meta_get_or_create("prefix6", lambda: str(ipam.default_ula48(random_bytes(16))))
        return ipam.parse_prefix(p4), ipam.parse_prefix(p6)

    def _set_prefix(self, k: str, text: str) -> None:
        net = ipam.parse_prefix(text)
        self.meta_set(k, str(net))  # existing nodes keep their addresses; new ones use the new prefix

    # --- invites

    def create_invite(self, invite_id: str, secret: bytes, reusable: bool, expires: float | None, tag: str, wall: float):
        with self._tx():
            self.db.execute(
                "INSERT INTO invites(id, secret_hash, reusable, expires, tag, created) VALUES(?,?,?,?,?,?)",
                (invite_id, hash_secret(secret), int(reusable), expires, tag, wall),
            )

    def _invite(self, invite_id) -> InviteRow | None:
        row = self.db.execute(f"SELECT {_INVITE_COLS} FROM invites WHERE id=?", (invite_id,)).fetchone()
        return None if row is None else _invite_row(row)

    def list_invites(self) -> list[InviteRow]:
        rows = self.db.execute(f"SELECT {_INVITE_COLS} FROM invites ORDER BY created")
        return [_invite_row(r) for r in rows]

    def revoke_invite(self, invite_id: str) -> bool:
        with self._tx():
            return self.db.execute("UPDATE invites SET revoked=1 WHERE id=?", (invite_id,)).rowcount > 0

    # --- nodes

    def _node(self, row) -> NodeRow:
        return NodeRow(row[0], bytes(row[1]), *row[2:])

    def get_node(self, key: bytes) -> NodeRow | None:
        row = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE pubkey=?", (key,)).fetchone()
        return self._node(row) if row else None

    def list_nodes(self) -> list[NodeRow]:
        return [self._node(r) for r in self.db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id")]

    def find_node(self, ident: str) -> NodeRow | None:
        """By id, name, or (a prefix of) the base64/hex public key."""
        nodes = self.list_nodes()
        for node in nodes:
            if ident in (str(node.node_id), node.name, node.key.hex(), key_to_base64(node.key)):
                return node
        matches = [n for n in nodes if key_to_base64(n.key).startswith(ident) and len(ident) >= 6]
        return matches[0] if len(matches) == 1 else None

    def join(self, key: bytes, invite_id: str | None, secret: bytes | None, name: str | None, wall: float,
             prefix4, prefix6) -> tuple[NodeRow, bool]:
        """Register key (or reconnect a registered one). Returns (node, created). Raises JoinRefused."""
        with self._tx():
            existing = self.get_node(key)
            if existing is not None and existing.live(wall):
                return existing, False
            if not invite_id or secret is None:
                if existing is not None:
                    raise JoinRefused("node_expired", "this node has expired; join again with a new invite")
                raise JoinRefused("not_registered", "this key is not registered; join with an invite")
            inv = self._invite(invite_id)
            check_invite(inv, secret, wall)
            removed = self.db.execute("SELECT removed_at FROM removed_keys WHERE pubkey=?", (key,)).fetchone()
            if removed is not None and inv.created <= removed[0]:
                raise JoinRefused("key_removed", "this key was removed; it needs an invite created after the removal")
            self.db.execute("UPDATE invites SET uses=uses+1 WHERE id=?", (invite_id,))
            if existing is not None:  # expired node re-admitted: same id, same addresses
                self.db.execute("UPDATE nodes SET expires=NULL, last_seen=? WHERE id=?", (wall, existing.node_id))
                return self.get_node(key), False
            self.db.execute("DELETE FROM removed_keys WHERE pubkey=?", (key,))
            count = self.db.execute("SELECT count(*) FROM nodes").fetchone()[0]
            # Indexed lookups per candidate address: no full-table scan per join.
            v4 = ipam.allocate(prefix4, key, lambda a: self._exists("ipv4", str(a)), count)
            v6 = ipam.allocate(prefix6, key, lambda a: self._exists("ipv6", str(a)), count)
            base = normalize_name(name or "")
            nm = self._free_name(base) if base else "pending-" + key.hex()
            cur = self.db.execute(
                "INSERT INTO nodes(pubkey, name, ipv4, ipv6, created, last_seen, invite_id, tag) VALUES(?,?,?,?,?,?,?,?)",
                (key, nm, str(v4), str(v6), wall, wall, invite_id, inv.tag),
            )
            if not base:  # default names carry the id so they are unique and stable
                nm = self._free_name(f"node-{cur.lastrowid}")
                self.db.execute("UPDATE nodes SET name=? WHERE id=?", (nm, cur.lastrowid))
            return self.get_node(key), True

    def _exists(self, column: str, value: str) -> bool:
        return self.db.execute(f"SELECT 1 FROM nodes WHERE {column}=?", (value,)).fetchone() is not None

    def _free_name(self, base: str) -> str:
        name, i = base, 2
        while self._exists("name", name):
            name, i = f"{base[:58]}-{i}", i + 1
        return name

    def rename(self, node_id: int, name: str) -> str:
        nm = normalize_name(name)
        if nm is None:
            raise ValueError(f"bad name {name!r} (letters, digits and '-')")
        with self._tx():
            row = self.db.execute("SELECT id FROM nodes WHERE name=?", (nm,)).fetchone()
            if row and row[0] != node_id:
                raise ValueError(f"name {nm!r} is taken")
            self.db.execute("UPDATE nodes SET name=? WHERE id=?", (nm, node_id))
        return nm

    def expire(self, node_id: int, when: float) -> None:
        with self._tx():
            self.db.execute("UPDATE nodes SET expires=? WHERE id=?", (when, node_id))

    def remove(self, node_id: int, wall: float) -> bool:
        with self._tx():
            row = self.db.execute("SELECT pubkey FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                return False
            self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
            self.db.execute(
                "INSERT INTO removed_keys(pubkey, removed_at) VALUES(?, ?) "
                "ON CONFLICT(pubkey) DO UPDATE SET removed_at=excluded.removed_at",
                (row[0], wall),
            )
            return True

    def touch(self, key: bytes, wall: float) -> None:
        with self._tx():
            self.db.execute("UPDATE nodes SET last_seen=? WHERE pubkey=?", (wall, key))

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _invite_row(row) -> InviteRow:
    return InviteRow(row[0], bytes(row[1]), bool(row[2]), row[3], row[4], row[5], bool(row[6]), row[7])
