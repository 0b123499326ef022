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
import json
import os
import shutil
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


def _enc(v):
    return {"b64": base64.b64encode(bytes(v)).decode()} if isinstance(v, (bytes, bytearray, memoryview)) else v


def _dec(v):
    return base64.b64decode(v["b64"]) if isinstance(v, dict) else v


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
        tables = {t: [[_dec(v) for v in row] for row in raw[t]]
                  for t in ["meta", "sequences", *(t for t, _, _ in TABLES)]}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StoreError(f"{name}: not a meshwg-signal backup") from None
    if doc["schema"] != SCHEMA:
        raise StoreError(f"{name}: a dump of schema {doc['schema']}; this meshwg-signal reads schema {SCHEMA}")
    widths = {t: len(cols.split(",")) for t, cols, _ in TABLES} | {"meta": 2, "sequences": 2}
    if any(len(row) != widths[t] for t, rows in tables.items() for row in rows):
        raise StoreError(f"{name}: not a meshwg-signal backup (rows of the wrong width)")
    if not any(k == "server_private_key" and isinstance(v, bytes) for k, v in tables["meta"]):
        raise StoreError(f"{name}: not a meshwg-signal backup (no server identity)")
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
            return sqlite_tables(st)
        finally:
            st.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(path: str, db: str) -> None:
    """Restore the backup file `path` (either kind) as the database `db` (a SQLite path that must not exist,
    or a PostgreSQL database that holds no server identity yet). Raises StoreError."""
    from signal_server import store, store_pg

    if not store_pg.is_url(db):
        if _is_sqlite(path):
            store.restore_copy(path, db)  # byte-for-byte as before
            return
        tables = read_backup(path)
        for name in (db, *(db + s for s in store.SIDE_FILES)):
            if os.path.lexists(name):
                raise StoreError(f"{name} exists; move the old database and its -wal/-shm files away first")
        st = store.SqliteStore(db, init=True)
        try:
            sqlite_load(st, tables)
        finally:
            st.close()
        return
    tables = read_backup(path)
    try:
        store_pg.PgStore(db).close()
    except NoIdentity:
        pass
    else:
        raise StoreError(f"{store_pg.redact(db)} already holds a server identity; restore into an empty database")
    st = store_pg.PgStore(db, init=True)
    try:
        st.load_tables(tables)
    finally:
        st.close()


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return True  # restore_copy says what is wrong with it
