"""A database written by the code before schema versioning is upgraded when opened: its rows stay, the
change feed starts working, and the upgrade is recorded; a database newer than the code is refused."""

from __future__ import annotations

import ipaddress
import pathlib
import shutil
import sqlite3

import pytest

from signal_server.store import SqliteStore, StoreError

SERVER_KEY = bytes(range(32))
KEY_A, KEY_B = b"a" * 32, b"b" * 32


# A database as the code before schema versioning wrote it (its schema: meta, invites, nodes, removed_keys), with
# the server key above, prefixes 100.64.0.0/10 and fd00:1::/48, invite "inv" and nodes alpha (KEY_A, 100.64.0.1)
# and bravo (KEY_B, 100.64.0.2). A file, not SQL: it must not follow later edits of the migrations.
V1_DATABASE = pathlib.Path(__file__).parent / "data" / "signal-v1.db"


def old_database(path: str) -> None:
    shutil.copyfile(V1_DATABASE, path)


def test_an_old_database_is_upgraded_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "old.db")
    old_database(path)
    st = SqliteStore(path)
    assert st.schema_version() == 5 and not st.created_identity
    assert st.server_private_key() == SERVER_KEY
    assert [(n.node_id, n.key, n.name) for n in st.list_nodes()] == [(1, KEY_A, "alpha"), (2, KEY_B, "bravo")]
    assert [i.invite_id for i in st.list_invites()] == ["inv"]
    assert st.prefixes(lambda n: b"\0" * n)[1] == ipaddress.ip_network("fd00:1::/48")
    head = st.change_head()
    st.rename(2, "charlie")  # the feed works on the upgraded database
    [change], _ = st.changes_since(head)
    assert (change.kind, change.key, change.node_id) == ("rename", KEY_B, 2)
    st.close()
    again = SqliteStore(path)  # opening again changes nothing
    assert again.schema_version() == 5 and again.get_node(KEY_B).name == "charlie"
    again.close()


def test_a_newer_database_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "new.db")
    SqliteStore(path, init=True).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET v=99 WHERE k='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError) as info:
        SqliteStore(path)
    assert "schema 99 is newer" in str(info.value) and "\n" not in str(info.value)


# Schema 2 (the change feed), as that code created it, copied verbatim.
SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, pubkey BLOB, node_id INTEGER);
"""


def test_a_schema_2_database_gets_plain_peers_and_keeps_its_nodes_and_feed(tmp_path):
    path = str(tmp_path / "v2.db")
    old_database(path)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_2)
    db.execute("INSERT INTO meta(k, v) VALUES('schema_version', 2)")
    db.execute("INSERT INTO changes(kind, pubkey, node_id) VALUES('join', ?, 1)", (KEY_A,))
    db.commit()
    db.close()
    st = SqliteStore(path)
    assert st.schema_version() == 5
    assert [(n.node_id, n.key, n.name, n.kind, n.private_key, n.targets, n.exit_node) for n in st.list_nodes()] == [
        (1, KEY_A, "alpha", "node", None, (), None), (2, KEY_B, "bravo", "node", None, (), None)]
    assert st.list_plain() == [] and st.change_head() == 1
    p4, p6 = st.prefixes(lambda n: b"\0" * n)
    phone = st.add_plain("phone", b"p" * 32, b"s" * 32, [1], None, 30.0, p4, p6)
    assert phone.node_id == 3 and phone.kind == "plain" and phone.targets == (1,)
    changes, _ = st.changes_since(1)
    assert [(c.kind, c.key, c.node_id) for c in changes] == [("join", b"p" * 32, 3)]
    st.close()
    again = SqliteStore(path)  # opening again changes nothing
    assert again.schema_version() == 5 and again.list_plain() == [phone]
    again.close()


# Schema 3 (plain peers), as that code created it, copied verbatim.
SCHEMA_3 = SCHEMA_2 + """
ALTER TABLE nodes ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
ALTER TABLE nodes ADD COLUMN private_key BLOB;
ALTER TABLE nodes ADD COLUMN targets TEXT;
ALTER TABLE nodes ADD COLUMN exit_node INTEGER;
"""


def test_a_schema_3_database_gets_routes_and_keeps_its_nodes_plain_peers_and_invites(tmp_path):
    path = str(tmp_path / "v3.db")
    old_database(path)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_3)
    db.execute("INSERT INTO meta(k, v) VALUES('schema_version', 3)")
    db.execute("INSERT INTO nodes(pubkey, name, ipv4, ipv6, created, kind, targets, exit_node) "
               "VALUES(?, 'phone', '100.64.0.3', 'fd00:1::3', 22.0, 'plain', '[1]', 2)", (b"p" * 32,))
    db.execute("INSERT INTO changes(kind, pubkey, node_id) VALUES('join', ?, 3)", (b"p" * 32,))
    db.commit()
    db.close()
    st = SqliteStore(path)
    assert st.schema_version() == 5
    nodes = st.list_nodes()
    assert [(n.node_id, n.name, n.kind, n.targets, n.exit_node, n.routes, n.is_exit) for n in nodes] == [
        (1, "alpha", "node", (), None, (), False), (2, "bravo", "node", (), None, (), False),
        (3, "phone", "plain", (1,), 2, (), False)]
    assert [(i.invite_id, i.auto_routes) for i in st.list_invites()] == [("inv", ())]
    assert st.list_routes() == [] and st.change_head() == 1
    row, _ = st.advertise_routes(KEY_A, ("192.168.1.0/24",), True, lambda p: None)
    st.approve_route(1, "192.168.1.0/24")
    changes, _ = st.changes_since(1)
    assert [(c.kind, c.key, c.node_id) for c in changes] == [("routes", KEY_A, 1)] * 2
    st.close()
    again = SqliteStore(path)  # opening again changes nothing
    assert again.schema_version() == 5 and again.get_node(KEY_A).routes == ("192.168.1.0/24",)
    again.close()


# Schema 4 (subnet routes), as that code created it, copied verbatim.
SCHEMA_4 = SCHEMA_3 + """
CREATE TABLE IF NOT EXISTS routes (
  node_id INTEGER NOT NULL, prefix TEXT NOT NULL, advertised INTEGER NOT NULL DEFAULT 0, approved INTEGER,
  PRIMARY KEY (node_id, prefix));
ALTER TABLE invites ADD COLUMN auto_routes TEXT;
"""


def test_a_schema_4_database_gets_tags_from_its_invite_tags(tmp_path):
    path = str(tmp_path / "v4.db")
    old_database(path)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_4)
    db.execute("INSERT INTO meta(k, v) VALUES('schema_version', 4)")
    db.execute("UPDATE nodes SET tag='home' WHERE id=1")  # alpha joined with an invite tagged home
    db.execute("UPDATE nodes SET tag='Not A Tag' WHERE id=2")  # free text the old code took: no tag now
    db.commit()
    db.close()
    st = SqliteStore(path)
    assert st.schema_version() == 5
    assert [(n.name, n.tag, n.tags) for n in st.list_nodes()] == [("alpha", "home", ("home",)),
                                                                 ("bravo", "Not A Tag", ())]
    head = st.change_head()
    assert st.set_tags(1, ("home", "server")).tags == ("home", "server")
    assert st.set_tags(1, ("home", "server")).tags == ("home", "server")  # unchanged: no change record
    assert st.set_tags(2, ()).tags == ()
    changes, _ = st.changes_since(head)
    assert [(c.kind, c.key, c.node_id) for c in changes] == [("tags", KEY_A, 1)]
    with pytest.raises(ValueError, match="bad tag"):
        st.set_tags(1, ("UPPER",))
    with pytest.raises(ValueError, match="no node 9"):
        st.set_tags(9, ("x",))
    st.close()
    again = SqliteStore(path)
    assert again.schema_version() == 5 and again.get_node(KEY_A).tags == ("home", "server")
    again.close()
