"""SQLite state (stdlib sqlite3, WAL). Every mutation commits before the caller acknowledges it.

The admin CLI opens the same file from another process while the server runs; WAL lets readers and one
writer coexist, busy_timeout waits out short write locks, and the server notices admin writes through
PRAGMA data_version (changes committed by *other* connections).

The file holds the server's private key: the database, its -wal and -shm files are created 0600 (SQLite
gives the -wal and -shm files the main file's mode), and nothing but `serve --init` (init=True) ever
creates a database: a wrong or empty path must not silently become a new server identity.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass

from meshwg.config.keys import generate_private_key, key_to_base64
from signal_server import ipam, registry
from signal_server.invites import InviteRow, hash_secret, normalize_name

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
KEY_META = "server_private_key"
SIDE_FILES = ("-wal", "-shm")


class StoreError(Exception):
    """The database cannot be used as it is (missing, no identity, not SQLite); str() is one line naming it."""


class NoIdentity(StoreError):
    """The path holds no server identity: a missing file, an empty one, or a database without a key."""


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
        return registry.live(self.expires, wall)


_NODE_COLS = "id, pubkey, name, ipv4, ipv6, created, last_seen, expires, invite_id, tag"
_INVITE_COLS = "id, secret_hash, reusable, expires, tag, created, revoked, uses"


class Store:
    """An existing server database, or (init=True) a new one with a new server identity.

    Raises NoIdentity when `path` holds no identity and init is False (nothing is created or written
    then), StoreError when the file is not a usable SQLite database."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL", init: bool = False, random_bytes=os.urandom) -> None:
        self.path = path
        self.created_identity = False
        self.db = None
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
        with self._tx():
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            if not has_key:
                self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?)", (KEY_META, generate_private_key(random_bytes)))
                self.created_identity = True
        if self.created_identity:
            self._tighten_side_files()

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
        """Register key (or reconnect a registered one). Returns (node, created). Raises JoinRefused.

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
                return self.get_node(key), False
            return self._admit(key, d, name, invite_id, wall, prefix4, prefix6), True

    def _admit(self, key: bytes, d: registry.Admit, name: str | None, invite_id: str, wall: float,
               prefix4, prefix6) -> NodeRow:
        """Write a new node (inside join's transaction)."""
        self.db.execute("DELETE FROM removed_keys WHERE pubkey=?", (key,))
        count = self.db.execute("SELECT count(*) FROM nodes").fetchone()[0]
        # Indexed lookups per candidate address: no full-table scan per join.
        addrs = registry.addresses(key, count, prefix4, prefix6,
                                   lambda a: self._exists("ipv4", str(a)), lambda a: self._exists("ipv6", str(a)))
        if isinstance(addrs, registry.Refuse):
            raise addrs.error()
        v4, v6 = addrs
        taken = lambda n: self._exists("name", n)  # noqa: E731
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


def _invite_row(row) -> InviteRow:
    return InviteRow(row[0], bytes(row[1]), bool(row[2]), row[3], row[4], row[5], bool(row[6]), row[7])
