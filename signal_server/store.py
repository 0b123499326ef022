"""SQLite state (stdlib sqlite3, WAL): the default `store_api.Store` backend. Every mutation commits before
the caller acknowledges it, and appends its change-feed record (store_api.Change) in the same transaction.

The admin CLI opens the same file from another process while the server runs; WAL lets readers and one
writer coexist, busy_timeout waits out short write locks, and the server notices admin writes through
PRAGMA data_version (changes committed by *other* connections), then reads only changes_since.

The schema is versioned (meta `schema_version`); MIGRATIONS upgrade an older database when it is opened.

The file holds the server's private key: the database, its -wal and -shm files are created 0600 (SQLite
gives the -wal and -shm files the main file's mode), and nothing but `serve --init` (init=True) ever
creates a database: a wrong or empty path must not silently become a new server identity.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from meshwg.config.keys import generate_private_key, key_to_base64
from signal_server import ipam, policy, registry, routes, store_rows
from signal_server import store_api as api
from signal_server.invites import InviteRow, hash_secret, normalize_name
from signal_server.store_api import Change, NodeRow, NoIdentity, RouteRow, StoreError  # noqa: F401 (re-exported)

# Schema version N is MIGRATIONS[N - 1]; a database opened by older code (no schema_version) is version 1.
MIGRATIONS = (
    """
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
""",
    # 2: the change feed (AUTOINCREMENT: a seq is never reused, also after pruning)
    """
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, pubkey BLOB, node_id INTEGER);
""",
    # 3: plain WireGuard peers are node rows of kind 'plain' (issue 12): their private key (NULL when only the
    # public key was given), the node ids they may reach (JSON) and their exit node's id
    """
ALTER TABLE nodes ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN private_key BLOB;
ALTER TABLE nodes ADD COLUMN targets TEXT;
ALTER TABLE nodes ADD COLUMN exit_node INTEGER;
""",
    # 4: subnet routes and exit nodes (issue 12; routes.py): per node and prefix (or 'exit') whether the node
    # advertises it and the administrator's decision (NULL pending, 1 approved, 0 rejected); invites carry the
    # routes they approve at once (JSON list)
    """
CREATE TABLE IF NOT EXISTS routes (
  node_id INTEGER NOT NULL, prefix TEXT NOT NULL, advertised INTEGER NOT NULL DEFAULT 0, approved INTEGER,
  PRIMARY KEY (node_id, prefix));
ALTER TABLE invites ADD COLUMN auto_routes TEXT;
""",
    # 5: tags (issue 13): a node's or plain peer's tags as a JSON list; NULL until first set, read as its
    # invite's tag (the `tag` column, kept as what the node joined with)
    """
ALTER TABLE nodes ADD COLUMN tags TEXT;
""",
)
SCHEMA_VERSION = len(MIGRATIONS)
CHANGES_KEEP = 10_000  # change records kept for readers that lag (a longer lag costs one full re-read)
PRUNE_EVERY = 256  # prune once per this many changes, not per write

DEFAULT_PREFIX4 = "100.64.0.0/10"
KEY_META = "server_private_key"
SIDE_FILES = ("-wal", "-shm")


def _create_private(path: str) -> None:
    """Create `path` 0600 (and its directory 0700) unless it exists; SQLite then creates -wal/-shm alike."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def wide_modes(path: str) -> list[tuple[str, int]]:
    """(file, mode) of the database and its -wal/-shm files that others than the owner may access."""
    found = []
    for name in (path, *(path + suffix for suffix in SIDE_FILES)):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            found.append((name, mode))
    return found


_NODE_COLS, _INVITE_COLS = store_rows.NODE_COLS, store_rows.INVITE_COLS


class SqliteStore:
    """An existing server database, or (init=True) a new one with a new server identity (a store_api.Store).

    Raises NoIdentity when `path` holds no identity and init is False (nothing is created or written
    then), StoreError when the file is not a usable SQLite database or its schema is newer than this code.
    changes_keep: change records kept for lagging readers (tests make it small)."""

    multi_server = False  # one serve process per file

    def __init__(self, path: str, *, synchronous: str = "NORMAL", init: bool = False, random_bytes=os.urandom,
                 changes_keep: int = CHANGES_KEEP) -> None:
        self.path = path
        self.created_identity = False
        self.changes_keep = changes_keep
        self.db = None
        self._data_version = None
        try:
            self._open(init, synchronous, random_bytes)
        except (sqlite3.Error, StoreError) as exc:
            if self.db is not None:
                self.db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{path}: cannot use the database: {exc}") from None

    def _open(self, init: bool, synchronous: str, random_bytes) -> None:
        if init:
            _create_private(self.path)
        elif not os.path.exists(self.path):  # mode=rw below would fail too, but less clearly
            raise NoIdentity(f"{self.path}: no such database")
        # mode=rw: never create the file here; isolation_level=None: we issue BEGIN IMMEDIATE ourselves,
        # so read-check-write is atomic.
        uri = "file:" + _uri_path(self.path) + "?mode=rw"
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
        # Read before anything writes: a database without an identity stays untouched unless init.
        has_key = self._has_identity()
        if not has_key and not init:
            raise NoIdentity(f"{self.path}: empty database (no server identity)")
        # WAL + NORMAL: a commit is in the WAL file (OS page cache) before it returns, which survives
        # kill -9 of the server; FULL also fsyncs every commit (survives power loss, ~2x slower joins).
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA secure_delete=ON")  # removed peers' private keys must not linger in free pages/WAL
        with self._tx():
            self._migrate(has_key)
            if not has_key:
                self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?)", (KEY_META, generate_private_key(random_bytes)))
                self.created_identity = True
        if self.created_identity:
            self._tighten_side_files()

    def _migrate(self, has_key: bool) -> None:
        """Bring the schema to SCHEMA_VERSION (inside open's transaction: all steps or none)."""
        version = self.schema_version() if has_key else 0
        for stmt in store_rows.migration_statements(self.path, version, MIGRATIONS):
            self.db.execute(stmt)
        if version < SCHEMA_VERSION:
            self.db.execute("INSERT INTO meta(k, v) VALUES('schema_version', ?) "
                            "ON CONFLICT(k) DO UPDATE SET v=excluded.v", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        """The database's schema version; one made before versioning (it has a meta table) is 1."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return 0
        row = self.db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
        return 1 if row is None else int(row[0])

    def _has_identity(self) -> bool:
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is None:
            return False
        return self.db.execute("SELECT 1 FROM meta WHERE k=?", (KEY_META,)).fetchone() is not None

    def _tighten_side_files(self) -> None:
        """-wal/-shm left over from an older, wider-moded file would keep their mode: 0600 them (an
        existing identity's files are only warned about, see wide_modes)."""
        for suffix in SIDE_FILES:
            try:
                os.chmod(self.path + suffix, 0o600)
            except FileNotFoundError:
                pass

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
        return SqliteStore._Tx(self.db)

    def data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # --- change feed

    def _log(self, kind: str, key: bytes | None = None, node_id: int | None = None) -> None:
        """Append a change (inside the mutation's transaction); now and then drop the oldest records."""
        seq = self.db.execute("INSERT INTO changes(kind, pubkey, node_id) VALUES(?, ?, ?)",
                              (kind, key, node_id)).lastrowid
        if seq % max(1, min(PRUNE_EVERY, self.changes_keep // 4)) == 0 and seq > self.changes_keep:
            cut = seq - self.changes_keep
            self.db.execute("DELETE FROM changes WHERE seq <= ?", (cut,))
            self.db.execute("INSERT INTO meta(k, v) VALUES('changes_pruned', ?) "
                            "ON CONFLICT(k) DO UPDATE SET v=max(v, excluded.v)", (cut,))

    def change_head(self) -> int:
        """The newest change's seq (0 before any): a reader starting from a full read starts here."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='changes'").fetchone()
        return row[0] if row else 0

    def changes_since(self, seq: int) -> tuple[list[Change], int]:
        """(changes after seq, the seq to ask from next time); [RESYNC] when some were pruned unread."""
        self.db.execute("BEGIN")  # one snapshot: the pruned mark and the rows agree
        try:
            pruned = int(self.meta_get("changes_pruned") or 0)
            head = self.change_head()
            if seq < pruned:
                return [Change(head, api.RESYNC)], head
            rows = self.db.execute("SELECT seq, kind, pubkey, node_id FROM changes WHERE seq > ? ORDER BY seq",
                                   (seq,)).fetchall()
        finally:
            self.db.execute("COMMIT")
        changes = [Change(r[0], r[1], None if r[2] is None else bytes(r[2]), r[3]) for r in rows]
        return changes, (changes[-1].seq if changes else seq)

    def may_have_changes(self) -> bool:
        """Cheap: True when another connection committed since the last call (PRAGMA data_version; our own
        commits do not count, the caller applied those already)."""
        version = self.data_version()
        changed, self._data_version = version != self._data_version, version
        return changed

    # --- meta

    def meta_get(self, k: str):
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return row[0] if row else None

    def meta_set(self, k: str, v) -> None:
        with self._tx():
            self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (k, v))
            self._log(api.META)

    def meta_get_or_create(self, k: str, make):
        with self._tx():
            row = self.db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
            if row:
                return row[0]
            v = make()
            self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?)", (k, v))
            self._log(api.META)
            return v

    def server_private_key(self, random_bytes=None) -> bytes:
        """The server's identity (created only by Store(..., init=True)); random_bytes is unused."""
        key = self.meta_get(KEY_META)
        if key is None:
            raise NoIdentity(f"{self.path}: the server identity is gone from the database")
        return bytes(key)

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

    def create_invite(self, invite_id: str, secret: bytes, reusable: bool, expires: float | None, tag: str, wall: float,
                      auto_routes: tuple = ()):
        with self._tx():
            self.db.execute(
                "INSERT INTO invites(id, secret_hash, reusable, expires, tag, created, auto_routes) VALUES(?,?,?,?,?,?,?)",
                (invite_id, hash_secret(secret), int(reusable), expires, tag, wall,
                 json.dumps(list(auto_routes)) if auto_routes else None),
            )
            self._log(api.INVITE)

    def _invite(self, invite_id) -> InviteRow | None:
        row = self.db.execute(f"SELECT {_INVITE_COLS} FROM invites WHERE id=?", (invite_id,)).fetchone()
        return None if row is None else _invite_row(row)

    def list_invites(self) -> list[InviteRow]:
        rows = self.db.execute(f"SELECT {_INVITE_COLS} FROM invites ORDER BY created")
        return [_invite_row(r) for r in rows]

    def revoke_invite(self, invite_id: str) -> bool:
        with self._tx():
            found = self.db.execute("UPDATE invites SET revoked=1 WHERE id=?", (invite_id,)).rowcount > 0
            if found:
                self._log(api.INVITE)
            return found

    # --- nodes

    def _node(self, row, live_routes=None) -> NodeRow:
        """A NodeRow; live_routes: its advertised and approved prefixes (read here when not given)."""
        if live_routes is None:
            live_routes = [r[0] for r in self.db.execute(
                "SELECT prefix FROM routes WHERE node_id=? AND advertised=1 AND approved=1", (row[0],))]
        return store_rows.node_row(row, live_routes)

    def get_node(self, key: bytes) -> NodeRow | None:
        row = self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE pubkey=?", (key,)).fetchone()
        return self._node(row) if row else None

    def list_nodes(self) -> list[NodeRow]:
        live: dict[int, list] = {}
        for node_id, prefix in self.db.execute("SELECT node_id, prefix FROM routes WHERE advertised=1 AND approved=1"):
            live.setdefault(node_id, []).append(prefix)
        return [self._node(r, live.get(r[0], [])) for r in self.db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id")]

    def find_node(self, ident: str) -> NodeRow | None:
        """By id, name, or (a prefix of) the base64/hex public key."""
        nodes = self.list_nodes()
        for node in nodes:
            if ident in (str(node.node_id), node.name, node.key.hex(), key_to_base64(node.key)):
                return node
        matches = [n for n in nodes if key_to_base64(n.key).startswith(ident) and len(ident) >= 6]
        return matches[0] if len(matches) == 1 else None

    def join(self, key: bytes, invite_id: str | None, secret: bytes | None, name: str | None, wall: float,
             prefix4, prefix6, reserved: frozenset = frozenset()) -> tuple[NodeRow, bool]:
        """Register key (or reconnect a registered one). Returns (node, created). Raises JoinRefused.
        A new node asking for a name in `reserved` (what the access policy names) gets a free variant instead.

        registry.decide_join holds the rules; this reads what they need and writes what they decided,
        all in one transaction so two joins cannot take the same address or name."""
        with self._tx():
            existing = self.get_node(key)
            removed = self.db.execute("SELECT removed_at FROM removed_keys WHERE pubkey=?", (key,)).fetchone()
            invite = self._invite(invite_id) if invite_id and secret is not None else None
            d = registry.decide_join(existing, removed and removed[0], invite_id, secret, invite, wall)
            if isinstance(d, registry.Refuse):
                raise d.error()
            if isinstance(d, registry.Reconnect):
                return existing, False
            self.db.execute("UPDATE invites SET uses=uses+1 WHERE id=?", (invite_id,))
            if isinstance(d, registry.Readmit):
                self.db.execute("UPDATE nodes SET expires=NULL, last_seen=? WHERE id=?", (wall, d.node_id))
                self._log(api.READMIT, key, d.node_id)
                return self.get_node(key), False
            row = self._admit(key, d, name, invite_id, wall, prefix4, prefix6, reserved)
            self._log(api.JOIN, key, row.node_id)
            return row, True

    def _admit(self, key: bytes, d: registry.Admit, name: str | None, invite_id: str, wall: float,
               prefix4, prefix6, reserved: frozenset) -> NodeRow:
        """Write a new node (inside join's transaction)."""
        self.db.execute("DELETE FROM removed_keys WHERE pubkey=?", (key,))
        count = self.db.execute("SELECT count(*) FROM nodes").fetchone()[0]
        # Indexed lookups per candidate address: no full-table scan per join.
        addrs = registry.addresses(key, count, prefix4, prefix6,
                                   lambda a: self._exists("ipv4", str(a)), lambda a: self._exists("ipv6", str(a)))
        if isinstance(addrs, registry.Refuse):
            raise addrs.error()
        v4, v6 = addrs
        taken = lambda n: n in reserved or self._exists("name", n)  # noqa: E731
        nm, placeholder = registry.first_name(name, key, taken)
        cur = self.db.execute(
            "INSERT INTO nodes(pubkey, name, ipv4, ipv6, created, last_seen, invite_id, tag) VALUES(?,?,?,?,?,?,?,?)",
            (key, nm, str(v4), str(v6), wall, wall, invite_id, d.tag),
        )
        if placeholder:
            self.db.execute("UPDATE nodes SET name=? WHERE id=?", (registry.default_name(cur.lastrowid, taken), cur.lastrowid))
        return self.get_node(key)

    def _exists(self, column: str, value: str) -> bool:
        return self.db.execute(f"SELECT 1 FROM nodes WHERE {column}=?", (value,)).fetchone() is not None

    def rename(self, node_id: int, name: str) -> str:
        nm = normalize_name(name)
        if nm is None:
            raise ValueError(f"bad name {name!r} (letters, digits and '-')")
        with self._tx():
            row = self.db.execute("SELECT id FROM nodes WHERE name=?", (nm,)).fetchone()
            if row and row[0] != node_id:
                raise ValueError(f"name {nm!r} is taken")
            self.db.execute("UPDATE nodes SET name=? WHERE id=?", (nm, node_id))
            self._log_node(api.RENAME, node_id)
        return nm

    def _log_node(self, kind: str, node_id: int) -> None:
        row = self.db.execute("SELECT pubkey FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is not None:  # nothing changed for an unknown id
            self._log(kind, bytes(row[0]), node_id)

    def expire(self, node_id: int, when: float) -> None:
        with self._tx():
            self.db.execute("UPDATE nodes SET expires=? WHERE id=?", (when, node_id))
            self._log_node(api.EXPIRE, node_id)

    def remove(self, node_id: int, wall: float) -> bool:
        with self._tx():
            row = self.db.execute("SELECT pubkey FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                return False
            self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
            self.db.execute("DELETE FROM routes WHERE node_id=?", (node_id,))
            self.db.execute(
                "INSERT INTO removed_keys(pubkey, removed_at) VALUES(?, ?) "
                "ON CONFLICT(pubkey) DO UPDATE SET removed_at=excluded.removed_at",
                (row[0], wall),
            )
            self._log(api.REMOVE, bytes(row[0]), node_id)
            return True

    # --- plain WireGuard peers

    def add_plain(self, name: str, public_key: bytes, private_key: bytes | None, targets: list[int],
                  exit_node: int | None, wall: float, prefix4=None, prefix6=None, tags: tuple = ()) -> NodeRow:
        """A new plain peer with mesh addresses from the node pool. Raises ValueError (one line, naming the
        value) for a bad or taken name, a key already in the mesh, a target or exit node that is no node."""
        nm = normalize_name(name)
        if nm is None:
            raise ValueError(f"bad name {name!r} (letters, digits and '-')")
        tags = policy.check_tags(tags)
        with self._tx():
            if self._exists("name", nm):
                raise ValueError(f"name {nm!r} is taken")
            if self.db.execute("SELECT 1 FROM nodes WHERE pubkey=?", (public_key,)).fetchone():
                raise ValueError(f"key {key_to_base64(public_key)} is already in the mesh")
            targets = list(dict.fromkeys(targets))
            for node_id in targets + ([] if exit_node is None else [exit_node]):
                if not self.db.execute("SELECT 1 FROM nodes WHERE id=? AND kind='node'", (node_id,)).fetchone():
                    raise ValueError(f"no node {node_id}")
            if not targets:
                raise ValueError("a plain peer needs at least one node to reach")
            p4 = prefix4 or ipam.parse_prefix(self._meta_or("prefix4"))
            p6 = prefix6 or ipam.parse_prefix(self._meta_or("prefix6"))
            count = self.db.execute("SELECT count(*) FROM nodes").fetchone()[0]
            addrs = registry.addresses(public_key, count, p4, p6, lambda a: self._exists("ipv4", str(a)),
                                       lambda a: self._exists("ipv6", str(a)))
            if isinstance(addrs, registry.Refuse):
                raise ValueError(addrs.message)
            cur = self.db.execute(
                "INSERT INTO nodes(pubkey, name, ipv4, ipv6, created, kind, private_key, targets, exit_node, tags) "
                "VALUES(?,?,?,?,?,?,?,?,?,?)",
                (public_key, nm, str(addrs[0]), str(addrs[1]), wall, api.PLAIN, private_key, json.dumps(targets),
                 exit_node, json.dumps(list(tags))))
            self._log(api.JOIN, public_key, cur.lastrowid)
            return self.get_node(public_key)

    def _meta_or(self, k: str) -> str:
        v = self.meta_get(k)
        if v is None:
            raise ValueError("the server has not run yet (no mesh prefixes); start meshwg-signal serve once")
        return v

    def list_plain(self) -> list[NodeRow]:
        return [self._node(r) for r in self.db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE kind=? ORDER BY id",
                                                       (api.PLAIN,))]

    def set_plain_key(self, node_id: int, public_key: bytes, private_key: bytes | None) -> NodeRow:
        """A plain peer's new key (rotate): its old key leaves the directory, the new one comes in (a REMOVE of
        the old key and a JOIN of the new one, same id and addresses). Raises ValueError."""
        with self._tx():
            row = self.db.execute("SELECT pubkey FROM nodes WHERE id=? AND kind=?", (node_id, api.PLAIN)).fetchone()
            if row is None:
                raise ValueError(f"no plain peer {node_id}")
            if self.db.execute("SELECT 1 FROM nodes WHERE pubkey=?", (public_key,)).fetchone():
                raise ValueError(f"key {key_to_base64(public_key)} is already in the mesh")
            self.db.execute("UPDATE nodes SET pubkey=?, private_key=? WHERE id=?", (public_key, private_key, node_id))
            self._log(api.REMOVE, bytes(row[0]), node_id)
            self._log(api.JOIN, public_key, node_id)
            return self.get_node(public_key)

    # --- subnet routes and exit nodes

    def advertise_routes(self, key: bytes, prefixes: tuple, exit_node: bool, forbidden):
        """The node `key` advertises `prefixes` (canonical CIDR text) and, if exit_node, itself as an exit node:
        its whole advertisement. Routes its invite auto-approves are approved now (routes.plan_advertisement;
        forbidden: routes.Policy.forbidden). Returns (its row, the routes.Plan), (None, None) for no node;
        appends a ROUTES change when something changed."""
        with self._tx():
            row = self.db.execute("SELECT id, invite_id, kind FROM nodes WHERE pubkey=?", (key,)).fetchone()
            if row is None or row[2] != api.NODE:
                return None, None
            node_id, invite_id = row[0], row[1]
            stored = {p: (bool(a), None if d is None else bool(d)) for p, a, d in self.db.execute(
                "SELECT prefix, advertised, approved FROM routes WHERE node_id=?", (node_id,))}
            invite = self._invite(invite_id) if invite_id else None
            auto = invite.auto_routes if invite is not None and not invite.revoked else None
            plan = routes.plan_advertisement(prefixes, exit_node, {p: d for p, (_, d) in stored.items()}, auto,
                                             self._approved_elsewhere(node_id), forbidden)
            if plan.rows != stored:
                self.db.execute("DELETE FROM routes WHERE node_id=?", (node_id,))
                self.db.executemany(
                    "INSERT INTO routes(node_id, prefix, advertised, approved) VALUES(?,?,?,?)",
                    [(node_id, p, int(a), None if d is None else int(d)) for p, (a, d) in plan.rows.items()])
                self._log(api.ROUTES, key, node_id)
            return self.get_node(key), plan

    def _approved_elsewhere(self, node_id: int) -> list[tuple[str, str]]:
        """The (node name, prefix) approved routes of every other node (advertised now or not)."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT nodes.name, routes.prefix FROM routes JOIN nodes ON nodes.id = routes.node_id "
            "WHERE routes.approved=1 AND routes.node_id != ? ORDER BY nodes.id, routes.prefix", (node_id,))]

    def list_routes(self) -> list[RouteRow]:
        rows = self.db.execute("SELECT node_id, prefix, advertised, approved FROM routes ORDER BY node_id, prefix")
        return [RouteRow(n, p, bool(a), None if d is None else bool(d)) for n, p, a, d in rows]

    def _route_node(self, node_id: int) -> bytes:
        row = self.db.execute("SELECT pubkey, kind FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None or row[1] != api.NODE:
            raise ValueError(f"no node {node_id}")
        return bytes(row[0])

    def _decide_route(self, node_id: int, prefix: str, decision: bool) -> RouteRow:
        key = self._route_node(node_id)
        old = self.db.execute("SELECT advertised, approved FROM routes WHERE node_id=? AND prefix=?",
                              (node_id, prefix)).fetchone()
        if old is not None and old[1] is not None and bool(old[1]) == decision:
            return RouteRow(node_id, prefix, bool(old[0]), decision)  # nothing changes, nothing to tell
        self.db.execute("INSERT INTO routes(node_id, prefix, advertised, approved) VALUES(?,?,0,?) "
                        "ON CONFLICT(node_id, prefix) DO UPDATE SET approved=excluded.approved",
                        (node_id, prefix, int(decision)))
        self._log(api.ROUTES, key, node_id)
        return RouteRow(node_id, prefix, bool(old and old[0]), decision)

    def approve_route(self, node_id: int, prefix: str) -> RouteRow:
        """Approve `prefix` (canonical CIDR text or routes.EXIT) for the node, advertised or not yet. Raises
        ValueError (one line) for no such node or an overlap with another node's approved route; the caller
        checks routes.Policy.forbidden first (it knows the mesh prefixes and the server's addresses)."""
        with self._tx():
            self._route_node(node_id)
            reason = routes.overlap(prefix, self._approved_elsewhere(node_id))
            if reason is not None:
                raise ValueError(f"{prefix} {reason}")  # "... overlaps NODE's approved route PREFIX"
            return self._decide_route(node_id, prefix, True)

    def reject_route(self, node_id: int, prefix: str) -> RouteRow:
        """Reject `prefix` for the node: peers lose it, and it is not approved again, by an invite either, until
        approved by hand. Raises ValueError for no such node or a route the node neither advertises nor had."""
        with self._tx():
            self._route_node(node_id)
            if self.db.execute("SELECT 1 FROM routes WHERE node_id=? AND prefix=?", (node_id, prefix)).fetchone() is None:
                raise ValueError(f"node {node_id} has no route {prefix}")
            return self._decide_route(node_id, prefix, False)

    def set_tags(self, node_id: int, tags: tuple) -> NodeRow:
        """A node's or plain peer's tags (checked: policy.check_tags) replace its tags; a TAGS change when they
        changed. Raises ValueError for no such node."""
        tags = policy.check_tags(tags)
        with self._tx():
            row = self.db.execute("SELECT pubkey, tags, tag FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                raise ValueError(f"no node {node_id}")
            if _tags(row[1], row[2]) != tags:
                self.db.execute("UPDATE nodes SET tags=? WHERE id=?", (json.dumps(list(tags)), node_id))
                self._log(api.TAGS, bytes(row[0]), node_id)
            return self.get_node(bytes(row[0]))

    def touch(self, key: bytes, wall: float) -> None:
        with self._tx():
            if self.db.execute("UPDATE nodes SET last_seen=? WHERE pubkey=?", (wall, key)).rowcount:
                self._log(api.TOUCH, key)

    def backup_to(self, dest: str) -> None:
        """A consistent, self-contained copy (WAL content included) in a new file `dest`, created 0600.

        SQLite's backup API reads through this connection, so commits still in the -wal file are copied;
        a plain file copy of the main file would miss them."""
        write_copy(self.db, dest)

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _uri_path(path: str) -> str:
    """`path` for a file: URI ('?' and '#' would start the query or fragment)."""
    return os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def write_copy(src: sqlite3.Connection, dest: str) -> None:
    """Copy the database behind `src` into the new file `dest` (0600, refused if it exists)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            # The copy took the source's WAL mode; one self-contained file is what a backup should be.
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    except BaseException:
        os.unlink(dest)
        raise


def restore_copy(backup: str, dest: str) -> None:
    """Restore the backup file `backup` into the new database `dest` (refused if dest or its -wal/-shm
    exist: a stale -wal next to the restored file would be replayed into it). Raises StoreError."""
    for name in (dest, *(dest + suffix for suffix in SIDE_FILES)):
        if os.path.lexists(name):
            raise StoreError(f"{name} exists; move the old database and its -wal/-shm files away first")
    if not os.path.isfile(backup):
        raise StoreError(f"{backup}: no such backup file")
    try:
        src = sqlite3.connect("file:" + _uri_path(backup) + "?mode=ro", uri=True)
        try:
            ok = src.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            has_key = "meta" in tables and src.execute("SELECT 1 FROM meta WHERE k=?", (KEY_META,)).fetchone()
            if not ok or not has_key:
                raise StoreError(f"{backup}: not a meshwg-signal backup (" +
                                 ("integrity check failed)" if not ok else "no server identity)"))
            os.makedirs(os.path.dirname(os.path.abspath(dest)), mode=0o700, exist_ok=True)
            write_copy(src, dest)
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{backup}: cannot restore: {exc}") from None


_tags, _invite_row = store_rows.tags_of, store_rows.invite_row


Store = SqliteStore  # the name the CLI, tests and older code import
