"""`meshwg-signal backup` / `restore` across backends.

A SQLite database backs up to a SQLite file (store.write_copy, unchanged). A PostgreSQL database backs up to a
portable dump: one JSON file (0600) of the Store's own tables, read in one snapshot. Why not pg_dump: its output
restores only into PostgreSQL, of a version at least the dumping one's, and carries the whole database's objects;
the dump here holds exactly the server's rows, is read by the same code for both backends, and so also moves a
mesh from SQLite to PostgreSQL and back (`restore` reads either kind of file into either kind of --db).

The change feed is not dumped: a restored database starts a new one (servers re-read every row at start). The
highest node id ever given is ("sequences"): a removed node's id is never given to another node."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile

from signal_server import store_rows
from signal_server.store_api import NoIdentity, StoreError

FORMAT = "meshwg-signal-dump"
SCHEMA = 5  # the schema the dumped rows follow (both backends' SCHEMA_VERSION; checked in tests)
# (table, columns, order) of every table but meta and changes; the same names on both backends.
TABLES = (
    ("invites", store_rows.INVITE_COLS, "id"),
    ("nodes", store_rows.NODE_COLS, "id"),
    ("removed_keys", "pubkey, removed_at", "pubkey"),
    ("routes", "node_id, prefix, advertised, approved", "node_id, prefix"),
)
LOCAL_META = frozenset({"schema_version", "changes_pruned"})  # describe one database, not the mesh
SQLITE_MAGIC = b"SQLite format 3\0"
# What each column of a dump may hold (a backup file is untrusted: checked before anything is created). "key": a
# 32-byte blob; "?": NULL allowed; "any": meta's values (text, blob, number or NULL).
CELLS = {
    "meta": ("text", "any"),
    "sequences": ("text", "int"),
    "invites": ("text", "blob", "int", "real?", "text", "real", "int", "int", "text?"),
    "nodes": ("int", "key", "text", "text", "text", "real", "real?", "real?", "text?", "text", "text", "key?",
              "text?", "int?", "text?"),
    "removed_keys": ("key", "real"),
    "routes": ("int", "text", "int", "int?"),
}
# Columns (by index) whose values a table holds once, each a tuple of column indexes (its unique keys).
UNIQUE = {"meta": ((0,),), "sequences": ((0,),), "invites": ((0,),), "nodes": ((0,), (1,), (2,), (3,), (4,)),
          "removed_keys": ((0,),), "routes": ((0, 1),)}


def _enc(v):
    return {"b64": base64.b64encode(bytes(v)).decode()} if isinstance(v, (bytes, bytearray, memoryview)) else v


def _dec(v):
    """A cell of a dump: {"b64": text} is a blob (strict base64), anything else must be a JSON scalar."""
    if isinstance(v, dict):
        if set(v) != {"b64"} or not isinstance(v["b64"], str):
            raise ValueError
        return base64.b64decode(v["b64"], validate=True)
    if isinstance(v, list) or (isinstance(v, float) and not _finite(v)):
        raise ValueError
    return v


def _finite(v) -> bool:
    return isinstance(v, float) and v == v and abs(v) != float("inf")


def _cell_ok(kind: str, v) -> bool:
    if v is None:
        return kind.endswith("?") or kind == "any"
    kind = kind.rstrip("?")
    if kind == "any":
        return isinstance(v, (str, bytes)) or _cell_ok("real", v)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63
    if kind == "real":
        return _cell_ok("int", v) or _finite(v)
    if kind == "key":
        return isinstance(v, bytes) and len(v) == 32
    return isinstance(v, {"text": str, "blob": bytes}[kind])


def check_tables(tables: dict, name: str) -> None:
    """StoreError (one line) unless every row has its table's width and cell types, no unique value twice, and
    one 32-byte server identity: what a restore would otherwise fail on half-way, or restore and serve die of."""
    for t, kinds in CELLS.items():
        rows = tables[t]
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(kinds):
                raise StoreError(f"{name}: not a meshwg-signal backup ({t} row {i + 1}: wrong width)")
            bad = next((c for c, (k, v) in enumerate(zip(kinds, row)) if not _cell_ok(k, v)), None)
            if bad is not None:
                raise StoreError(f"{name}: not a meshwg-signal backup ({t} row {i + 1}: bad value in column {bad + 1})")
        for cols in UNIQUE[t]:
            seen = set()
            for row in rows:
                v = tuple(row[c] for c in cols)
                if v in seen:
                    raise StoreError(f"{name}: not a meshwg-signal backup ({t}: a duplicate row)")
                seen.add(v)
    keys = [v for k, v in tables["meta"] if k == "server_private_key"]
    if not keys or not isinstance(keys[0], bytes):
        raise StoreError(f"{name}: not a meshwg-signal backup (no server identity)")
    if len(keys[0]) != 32:
        raise StoreError(f"{name}: not a meshwg-signal backup (the server identity is not a 32-byte key)")


def _list(v) -> list:
    if not isinstance(v, list):
        raise TypeError
    return v


def encode(tables: dict) -> bytes:
    body = {t: [[_enc(v) for v in row] for row in rows] for t, rows in tables.items()}
    return json.dumps({"format": FORMAT, "schema": SCHEMA, "tables": body}, indent=1).encode()


def decode(data: bytes, name: str) -> dict:
    """The tables of a dump; StoreError (one line) for anything else."""
    try:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError
        raw = doc["tables"]
        tables = {t: [[_dec(v) for v in _list(row)] for row in _list(raw[t])] for t in CELLS}
    except (ValueError, KeyError, TypeError, AttributeError):  # binascii.Error is a ValueError
        raise StoreError(f"{name}: not a meshwg-signal backup") from None
    if doc["schema"] != SCHEMA:
        raise StoreError(f"{name}: a dump of schema {doc['schema']}; this meshwg-signal reads schema {SCHEMA}")
    check_tables(tables, name)
    return tables


def write_dump(store, dest: str) -> None:
    """store.dump_tables() into the new file `dest` (0600; FileExistsError if it exists)."""
    data = encode(store.dump_tables())
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(dest)
        raise


# --- SQLite's side (its rows through its own connection; store.py stays as it was)

def sqlite_tables(st) -> dict:
    """The rows of a SqliteStore, in one read transaction."""
    st.db.execute("BEGIN")
    try:
        out = {t: [list(r) for r in st.db.execute(f"SELECT {cols} FROM {t} ORDER BY {order}")] for t, cols, order in TABLES}
        out["meta"] = [[k, v] for k, v in st.db.execute("SELECT k, v FROM meta ORDER BY k") if k not in LOCAL_META]
        out["sequences"] = [list(r) for r in st.db.execute("SELECT name, seq FROM sqlite_sequence WHERE name='nodes'")]
    finally:
        st.db.execute("COMMIT")
    return out


def sqlite_load(st, tables: dict) -> None:
    with st._tx():
        st.db.execute("DELETE FROM meta WHERE k != 'schema_version'")
        st.db.executemany("INSERT INTO meta(k, v) VALUES(?, ?)", tables["meta"])
        for t, cols, _ in TABLES:
            st.db.execute(f"DELETE FROM {t}")
            marks = ",".join("?" * len(cols.split(",")))
            st.db.executemany(f"INSERT INTO {t}({cols}) VALUES({marks})", tables[t])
        # AUTOINCREMENT's memory of the highest id given, so a removed node's id is never given again
        given = dict(tables["sequences"]).get("nodes", 0)
        st.db.execute("UPDATE sqlite_sequence SET seq=max(seq, ?) WHERE name='nodes'", (given,))
        st.db.execute("INSERT INTO sqlite_sequence(name, seq) SELECT 'nodes', ? WHERE NOT EXISTS "
                      "(SELECT 1 FROM sqlite_sequence WHERE name='nodes')", (given,))


def read_backup(path: str) -> dict:
    """The tables of a backup file of either kind. A SQLite backup is copied to a temporary directory and
    opened there (which upgrades an older schema), never written in place."""
    from signal_server import store

    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
            data = head + f.read() if head != SQLITE_MAGIC else b""
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the backup: {exc.strerror}") from None
    if head != SQLITE_MAGIC:
        return decode(data, path)
    tmp = tempfile.mkdtemp(prefix="meshwg-restore-")
    try:
        copy = os.path.join(tmp, "signal.db")
        store.restore_copy(path, copy)  # checks integrity and identity
        st = store.SqliteStore(copy)
        try:
            tables = sqlite_tables(st)
        finally:
            st.close()
        check_tables(tables, path)  # a SQLite file's cells can be of any type too
        return tables
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(path: str, db: str) -> None:
    """Restore the backup file `path` (either kind) as the database `db` (a SQLite path that must not exist,
    or a PostgreSQL database that holds no server identity yet). Raises StoreError; a restore that fails leaves
    no new SQLite file, and no identity in the PostgreSQL database."""
    from signal_server import store, store_pg

    if not store_pg.is_url(db):
        if _is_sqlite(path):
            if os.path.isfile(path):
                read_backup(path)  # its rows checked as a dump's are
            store.restore_copy(path, db)  # byte-for-byte as before
            return
        tables = read_backup(path)
        for name in (db, *(db + s for s in store.SIDE_FILES)):
            if os.path.lexists(name):
                raise StoreError(f"{name} exists; move the old database and its -wal/-shm files away first")
        try:
            st = store.SqliteStore(db, init=True)
            try:
                sqlite_load(st, tables)
            finally:
                st.close()
        except (StoreError, sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            for name in (db, *(db + s for s in store.SIDE_FILES)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            raise StoreError(f"{path}: cannot restore: {' '.join(str(exc).split())}") from None
        return
    tables = read_backup(path)
    try:
        store_pg.PgStore(db).close()
    except NoIdentity:
        pass
    else:
        raise StoreError(f"{store_pg.redact(db)} already holds a server identity; restore into an empty database")
    # The schema, the identity and the rows in one transaction: a load that fails leaves nothing behind.
    store_pg.PgStore(db, restore=tables).close()


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return True  # restore_copy says what is wrong with it
