"""Restoring an untrusted backup (review 14 item 3): every cell's type, 32-byte keys, strict base64 and unique
values are checked before anything is created; a failure is one line (StoreError) and leaves no new SQLite file,
and no server identity in a PostgreSQL database."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sqlite3

import pytest

from signal_server import store_dump
from signal_server.store import SqliteStore
from signal_server.store_api import NoIdentity, StoreError

from pg_cluster import pg_cluster, pg_url  # noqa: F401 (fixtures)

SECRET = b"s" * 32
P4 = ipaddress.ip_network("100.64.0.0/10")
P6 = ipaddress.ip_network("fd00:1::/48")


@pytest.fixture
def good(tmp_path) -> dict:
    """The JSON body of a real dump (a SQLite mesh with an invite, two nodes, a removed one and a route)."""
    st = SqliteStore(str(tmp_path / "src.db"), init=True)
    st.prefixes(os.urandom)
    st.create_invite("inv", SECRET, True, None, "home", 500.0, ("exit",))
    home, _ = st.join(os.urandom(32), "inv", SECRET, "home", 1000.0, P4, P6)
    st.advertise_routes(home.key, ("192.168.1.0/24",), True, lambda p: None)
    st.join(os.urandom(32), "inv", SECRET, "laptop", 1000.0, P4, P6)
    gone, _ = st.join(os.urandom(32), "inv", SECRET, "gone", 1000.0, P4, P6)
    st.remove(gone.node_id, 1200.0)
    body = json.loads(store_dump.encode(store_dump.sqlite_tables(st)))
    st.close()
    return body


def _write(tmp_path, body) -> str:
    path = tmp_path / "mesh.dump"
    path.write_text(json.dumps(body))
    return str(path)


def _b64(n: int) -> dict:
    return {"b64": base64.b64encode(os.urandom(n)).decode()}


def _set(table, row, col, value):
    def edit(body):
        body["tables"][table][row][col] = value(body) if callable(value) else value
    return edit


def _dup(table, row):
    def edit(body):
        body["tables"][table].append(list(body["tables"][table][row]))
    return edit


def _dup_col(table, col):
    def edit(body):
        body["tables"][table][1][col] = body["tables"][table][0][col]
    return edit


BAD = {
    "node-key-31-bytes": _set("nodes", 0, 1, _b64(31)),
    "removed-key-33-bytes": _set("removed_keys", 0, 0, _b64(33)),
    "plain-private-key-short": _set("nodes", 0, 11, _b64(16)),
    "name-not-text": _set("nodes", 0, 2, 7),
    "id-not-int": _set("nodes", 0, 0, "1"),
    "id-bool": _set("nodes", 0, 0, True),
    "created-null": _set("nodes", 0, 5, None),
    "created-nan": _set("nodes", 0, 5, float("nan")),
    "reusable-text": _set("invites", 0, 2, "yes"),
    "secret-hash-text": _set("invites", 0, 1, "abc"),
    "cell-a-list": _set("routes", 0, 1, ["192.168.1.0/24"]),
    "cell-dict-extra-key": _set("nodes", 0, 1, lambda b: {**b["tables"]["nodes"][0][1], "x": 1}),
    "base64-not-strict": _set("nodes", 0, 1, lambda b: {"b64": b["tables"]["nodes"][0][1]["b64"][:-1] + "*"}),
    "base64-not-text": _set("nodes", 0, 1, {"b64": 5}),
    "duplicate-node": _dup("nodes", 0),
    "duplicate-pubkey": _dup_col("nodes", 1),
    "duplicate-name": _dup_col("nodes", 2),
    "duplicate-route": _dup("routes", 0),
    "duplicate-removed-key": _dup("removed_keys", 0),
    "sequence-not-int": _set("sequences", 0, 1, "9"),
}


def _row_not_a_list(body):
    body["tables"]["routes"][0] = "192.168.1.0/24"


BAD["row-not-a-list"] = _row_not_a_list


def test_a_good_dump_restores(good, tmp_path):
    db = str(tmp_path / "signal.db")
    store_dump.restore(_write(tmp_path, good), db)
    st = SqliteStore(db)
    assert sorted(n.name for n in st.list_nodes()) == ["home", "laptop"]
    st.close()


@pytest.mark.parametrize("edit", BAD.values(), ids=BAD.keys())
def test_a_bad_cell_is_a_one_line_error_and_no_database(good, tmp_path, edit):
    edit(good)
    db = str(tmp_path / "signal.db")
    with pytest.raises(StoreError) as err:
        store_dump.restore(_write(tmp_path, good), db)
    assert "\n" not in str(err.value) and "not a meshwg-signal backup" in str(err.value)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("signal.db")]


def test_a_load_that_fails_anyway_leaves_no_sqlite_file(good, tmp_path, monkeypatch):
    def fail(st, tables):
        raise sqlite3.IntegrityError("UNIQUE constraint failed: nodes.ipv4")

    monkeypatch.setattr(store_dump, "sqlite_load", fail)
    db = str(tmp_path / "signal.db")
    with pytest.raises(StoreError, match="cannot restore: UNIQUE constraint failed"):
        store_dump.restore(_write(tmp_path, good), db)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("signal.db")]


def test_a_sqlite_backup_with_a_short_identity_is_refused(tmp_path):
    src = str(tmp_path / "src.db")
    SqliteStore(src, init=True).close()
    with sqlite3.connect(src) as c:
        c.execute("UPDATE meta SET v=? WHERE k='server_private_key'", (b"abc",))
    c.close()
    db = str(tmp_path / "signal.db")
    with pytest.raises(StoreError, match="32-byte"):
        store_dump.restore(src, db)
    assert not os.path.exists(db)


def test_a_postgresql_restore_that_fails_leaves_no_identity(good, pg_url, tmp_path):
    from signal_server.store_pg import PgStore

    good["tables"]["nodes"][0][2] = "ho\x00me"   # PostgreSQL text holds no NUL: the load fails half-way
    with pytest.raises(StoreError):
        store_dump.restore(_write(tmp_path, good), pg_url)
    with pytest.raises(NoIdentity):
        PgStore(pg_url)
    good["tables"]["nodes"][0][2] = "home"      # and the database takes a good dump after it
    store_dump.restore(_write(tmp_path, good), pg_url)
    st = PgStore(pg_url)
    assert sorted(n.name for n in st.list_nodes()) == ["home", "laptop"]
    st.close()
