"""What only the PostgreSQL backend has to get right (the shared behaviour is in test_store_conformance.py):
migrations from an older schema, the change feed's commit order, race-free joins across Store instances,
cheap change polling, one-line errors, and backup/restore across backends."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import threading

import pytest

from signal_server import cli, store_pg
from signal_server.invites import JoinRefused, hash_secret
from signal_server.store import SqliteStore
from signal_server.store_api import NoIdentity, StoreError, open_store
from signal_server.store_pg import PgStore

from pg_cluster import pg_cluster, pg_url  # noqa: F401 (fixtures)

SECRET = b"s" * 32
P4 = ipaddress.ip_network("100.64.0.0/10")
P6 = ipaddress.ip_network("fd00:1::/48")
SERVER_KEY = bytes(range(32))
KEY_A, KEY_B = b"a" * 32, b"b" * 32
DEADLINE = 30.0  # seconds any thread of these tests may take

# Schema 1 as the first PostgreSQL backend wrote it is MIGRATIONS[0]; its digest (white space folded) is pinned
# here so that the migration test below keeps starting from what databases in the field have.
V1_SHA256 = "370d0ab61e95a184d2497dbcbcf68de62220b3918de0dd51daad6ce0d0306dc3"


def test_schema_1_is_what_the_first_backend_wrote():
    text = " ".join(store_pg.MIGRATIONS[0].split())
    assert hashlib.sha256(text.encode()).hexdigest() == V1_SHA256, "a schema change is a new migration, not an edit"


def raw(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def v1_database(url: str) -> None:
    with raw(url) as c:
        c.execute(store_pg.MIGRATIONS[0])
        c.execute("INSERT INTO meta(k, vb) VALUES('server_private_key', %s)", (SERVER_KEY,))
        c.execute("INSERT INTO meta(k, v) VALUES('prefix4', '100.64.0.0/10'), ('prefix6', 'fd00:1::/48')")
        c.execute("INSERT INTO invites(id, secret_hash, reusable, created) VALUES('inv', %s, 1, 500)",
                  (hash_secret(SECRET),))
        c.execute("INSERT INTO nodes(pubkey, name, ipv4, ipv6, created, invite_id, tag) VALUES"
                  "(%s, 'alpha', '100.64.0.1', 'fd00:1::1', 900, 'inv', 'home'),"
                  "(%s, 'bravo', '100.64.0.2', 'fd00:1::2', 900, 'inv', '')", (KEY_A, KEY_B))


def test_a_v1_database_is_migrated_in_one_step_and_keeps_its_rows(pg_url):
    v1_database(pg_url)
    st = PgStore(pg_url)
    assert st.schema_version() == 6 and not st.created_identity
    assert st.server_private_key() == SERVER_KEY
    nodes = st.list_nodes()
    assert [(n.node_id, n.key, n.name, n.kind, n.tags) for n in nodes] == [
        (1, KEY_A, "alpha", "node", ("home",)), (2, KEY_B, "bravo", "node", ())]
    assert st.prefixes(os.urandom)[1] == P6 and [i.invite_id for i in st.list_invites()] == ["inv"]
    head = st.change_head()
    st.rename(2, "charlie")  # the feed table came with the migration
    [change], _ = st.changes_since(head)
    assert (change.kind, change.key, change.node_id) == ("rename", KEY_B, 2)
    row, created = st.join(os.urandom(32), "inv", SECRET, None, 1000.0, P4, P6)
    assert created and row.node_id == 3  # the id sequence continues after the old rows
    st.close()
    with raw(pg_url) as c:
        assert c.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()[0] == "6"


def test_a_failed_migration_leaves_the_old_schema(pg_url, monkeypatch):
    v1_database(pg_url)
    monkeypatch.setattr(store_pg, "MIGRATIONS", (*store_pg.MIGRATIONS, "ALTER TABLE nosuch ADD COLUMN x TEXT;"))
    monkeypatch.setattr(store_pg, "SCHEMA_VERSION", len(store_pg.MIGRATIONS))
    with pytest.raises(StoreError) as info:
        PgStore(pg_url)
    assert "\n" not in str(info.value)
    with raw(pg_url) as c:  # one transaction: not even step 2 stayed
        assert c.execute("SELECT to_regclass('changes')").fetchone()[0] is None
        assert c.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone() is None


def test_a_newer_schema_is_refused(pg_url):
    PgStore(pg_url, init=True).close()
    with raw(pg_url) as c:
        c.execute("UPDATE meta SET v='99' WHERE k='schema_version'")
    with pytest.raises(StoreError, match="schema 99 is newer"):
        PgStore(pg_url)


def test_an_empty_database_has_no_identity_and_is_left_untouched(pg_url):
    with pytest.raises(NoIdentity):
        PgStore(pg_url)
    with raw(pg_url) as c:
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()[0] == 0


def test_open_store_picks_the_backend_by_url(pg_url, tmp_path):
    PgStore(pg_url, init=True).close()
    st = open_store(pg_url)
    assert isinstance(st, PgStore)
    st.close()
    assert isinstance(open_store(str(tmp_path / "s.db"), init=True), SqliteStore)


@pytest.mark.parametrize("url", ["postgresql://meshwg:hunter2@/nosuchdb?host=/nonexistent-dir&connect_timeout=2",
                                 "postgresql://meshwg:hunter2@127.0.0.1:1/x?connect_timeout=2",
                                 "postgresql://meshwg:hunter2@/x?sslmode=bogus"])
def test_bad_urls_and_unreachable_databases_give_one_line_without_the_password(url):
    with pytest.raises(StoreError) as info:
        PgStore(url)
    msg = str(info.value)
    assert "\n" not in msg and "hunter2" not in msg and "meshwg:***@" in msg


# --- the change feed across connections


def test_a_reader_never_skips_a_lower_seq_committed_later(pg_url):
    """Writer A takes a seq and stalls before its commit; writer B comes later (a higher seq). B must not
    become visible before A: a reader that saw B's seq would move past A's and never read it (without the feed
    lock the reader gets only B's change here, then nothing)."""
    a, b, reader = (PgStore(pg_url, init=(i == 0)) for i in range(3))
    a.create_invite("inv", SECRET, True, None, "", 500.0)
    start = reader.change_head()
    appended, release = threading.Event(), threading.Event()
    original = a._log

    def stalling_log(*args):
        original(*args)
        appended.set()
        assert release.wait(DEADLINE)

    a._log = stalling_log
    ka = os.urandom(32)
    ta = threading.Thread(target=a.join, args=(ka, "inv", SECRET, "a", 1000.0, P4, P6))
    # B touches no row A holds (a join would wait on A's invite row and hide the race): only the feed orders them.
    tb = threading.Thread(target=b.meta_set, args=("elsewhere", "1"))
    ta.start()
    assert appended.wait(DEADLINE)
    tb.start()
    tb.join(1.0)  # B has had time to commit, were it not held back
    seen, seq = reader.changes_since(start)
    release.set()
    ta.join(DEADLINE)
    tb.join(DEADLINE)
    assert not ta.is_alive() and not tb.is_alive()
    more, _ = reader.changes_since(seq)
    assert sorted((c.kind, c.key) for c in seen + more) == [("join", ka), ("meta", None)]
    for st in (a, b, reader):
        st.close()


def test_may_have_changes_reads_an_index_not_the_table(pg_url):
    st = PgStore(pg_url, init=True)
    with raw(pg_url) as c:
        c.execute("INSERT INTO changes(kind) SELECT 'meta' FROM generate_series(1, 20000)")
        c.execute("ANALYZE changes")
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN " + store_pg.HEAD_SQL))
    assert "Index Only Scan" in plan and "Seq Scan" not in plan
    assert st.may_have_changes() and not st.may_have_changes()
    st.close()


def test_an_own_write_after_another_writers_is_still_news(pg_url):
    """may_have_changes ignores our own commits, but not one that came after another writer's."""
    st, other = PgStore(pg_url, init=True), PgStore(pg_url)
    st.may_have_changes()
    other.meta_set("x", "1")
    st.meta_set("y", "2")
    assert st.may_have_changes()
    assert not st.may_have_changes()
    st.close()
    other.close()


# --- joins from several Store instances at once


def run_threads(fns) -> list:
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def test_two_instances_joining_at_once_never_share_an_address_or_name(pg_url):
    stores = [PgStore(pg_url, init=(i == 0)) for i in range(2)]
    stores[0].create_invite("inv", SECRET, True, None, "", 500.0)
    barrier = threading.Barrier(2)

    def joins(st):
        barrier.wait(DEADLINE)
        # The same asked-for names on both sides, and a /28: collisions are certain without the retries.
        return [st.join(os.urandom(32), "inv", SECRET, f"n{i}", 1000.0, ipaddress.ip_network("10.9.0.0/26"), P6)[0]
                for i in range(25)]

    results, errors = run_threads([lambda st=st: joins(st) for st in stores])
    assert errors == []
    rows = results[0] + results[1]
    assert len({r.ipv4 for r in rows}) == len({r.ipv6 for r in rows}) == len({r.name for r in rows}) == 50
    assert len(stores[0].list_nodes()) == 50
    changes, _ = stores[1].changes_since(0)
    assert sorted(c.node_id for c in changes if c.kind == "join") == sorted(r.node_id for r in rows)
    for st in stores:
        st.close()


def test_a_one_time_invite_admits_one_of_two_concurrent_joins(pg_url):
    stores = [PgStore(pg_url, init=(i == 0)) for i in range(2)]
    for round_ in range(5):
        stores[0].create_invite(f"once{round_}", SECRET, False, None, "", 500.0)
        barrier = threading.Barrier(2)

        def one(st, r=round_):
            barrier.wait(DEADLINE)
            return st.join(os.urandom(32), f"once{r}", SECRET, None, 1000.0, P4, P6)

        results, errors = run_threads([lambda st=st: one(st) for st in stores])
        assert len([r for r in results if r]) == 1 and len(errors) == 1
        assert isinstance(errors[0], JoinRefused)
    assert len(stores[0].list_nodes()) == 5
    for st in stores:
        st.close()


# --- backup and restore, across backends


def test_backup_and_restore_postgresql_and_move_to_sqlite_and_back(pg_cluster, tmp_path, capsys):
    src = pg_cluster.create_db()
    st = PgStore(src, init=True)
    st.prefixes(os.urandom)
    st.create_invite("inv", SECRET, True, None, "home", 500.0, ("exit",))
    home, _ = st.join(os.urandom(32), "inv", SECRET, "home", 1000.0, P4, P6)
    st.advertise_routes(home.key, ("192.168.1.0/24",), True, lambda p: None)
    st.approve_route(home.node_id, "192.168.1.0/24")
    phone = st.add_plain("phone", os.urandom(32), os.urandom(32), [home.node_id], home.node_id, 1100.0, P4, P6)
    gone, _ = st.join(os.urandom(32), "inv", SECRET, "gone", 1000.0, P4, P6)
    st.remove(gone.node_id, 1200.0)
    want = (st.server_private_key(), st.list_nodes(), st.list_invites(), st.list_routes(), st.prefixes(os.urandom))
    st.close()

    def state(s):
        got = (s.server_private_key(), s.list_nodes(), s.list_invites(), s.list_routes(), s.prefixes(os.urandom))
        s.close()
        return got

    dump = str(tmp_path / "mesh.dump")
    assert cli.main(["backup", "--db", src, dump]) == 0
    assert oct(os.stat(dump).st_mode & 0o777) == "0o600" and json.load(open(dump))["format"] == "meshwg-signal-dump"
    assert cli.main(["backup", "--db", src, dump]) == 1  # never over an existing file
    # into a new PostgreSQL database
    dst = pg_cluster.create_db()
    assert cli.main(["restore", "--db", dst, dump]) == 0
    assert state(PgStore(dst)) == want
    st = PgStore(dst)  # new ids continue after the restored ones; a removed key stays removed
    assert st.join(os.urandom(32), "inv", SECRET, None, 1300.0, P4, P6)[0].node_id > gone.node_id
    with pytest.raises(JoinRefused):
        st.join(gone.key, "inv", SECRET, None, 1300.0, P4, P6)
    st.close()
    # not over a database that holds a server already
    capsys.readouterr()
    assert cli.main(["restore", "--db", dst, dump]) == 1
    assert "already holds a server identity" in capsys.readouterr().err
    # into SQLite, and from SQLite's own backup file back into PostgreSQL
    path = str(tmp_path / "signal.db")
    assert cli.main(["restore", "--db", path, dump]) == 0
    assert state(SqliteStore(path)) == want
    sqlite_backup = str(tmp_path / "copy.db")
    assert cli.main(["backup", "--db", path, sqlite_backup]) == 0
    again = pg_cluster.create_db()
    assert cli.main(["restore", "--db", again, sqlite_backup]) == 0
    assert state(PgStore(again)) == want
    for restored in (SqliteStore(path), PgStore(again)):  # the removed node's id stays spent on both
        assert restored.join(os.urandom(32), "inv", SECRET, None, 1300.0, P4, P6)[0].node_id > gone.node_id
        restored.close()
    assert phone.node_id in [n.node_id for n in want[1]]


def test_restore_refuses_what_is_not_a_backup(pg_url, tmp_path, capsys):
    bad = tmp_path / "bad.dump"
    for content in (b"{}", b"not json", json.dumps({"format": "meshwg-signal-dump", "schema": 5, "tables": {
            "meta": [], "invites": [], "nodes": [], "removed_keys": [], "routes": []}}).encode()):
        bad.write_bytes(content)
        assert cli.main(["restore", "--db", pg_url, str(bad)]) == 1
        err = capsys.readouterr().err
        assert "not a meshwg-signal backup" in err and err.count("\n") == 1
    with raw(pg_url) as c:  # nothing was created
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname='public'").fetchone()[0] == 0


def test_setup_installs_the_server_the_cluster_fixture_runs():
    import subprocess

    from pg_cluster import pg_bindir
    from test_setup_installs_what_tests_call import setup_packages

    # initdb comes from postgresql-NN, which the `postgresql` package setup installs depends on
    owner = subprocess.run(["dpkg", "-S", pg_bindir() + "/initdb"], capture_output=True, text=True).stdout
    assert owner.startswith("postgresql-") and "postgresql" in setup_packages()
