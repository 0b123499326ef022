"""The database misbehaving never takes nodes' sessions down (issue 14 item 2): PostgreSQL stopped under running
servers (a throwaway cluster of this test's own, `pg_ctl stop -m fast`) leaves every session up and its heartbeats
answered; a join meanwhile is refused with a retryable error; what the nodes told their server meanwhile (live
state, route advertisements) is written when the database is back; the feed's LISTEN connection reconnects and a
change made through the other server after the restart reaches the nodes within 1 s. SQLite: another process
holding the write lock does not end sessions either."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio
from sig_helpers import new_key, start_server, wait_until
from test_multi_server import cands, invite, node, sees, start

from meshwg.control import ControlConnection
from meshwg.control.client import ConnectionLost
from signal_server import multi_server
from signal_server.store_pg import PgStore

from pg_cluster import Cluster, pg_cluster, pg_url  # noqa: F401 (fixtures)

X_CAND = ("10.1.2.3", 41641, "local")
Z_CAND = ("10.1.2.5", 41643, "local")
Y_CAND = ("10.1.2.4", 41642, "local")


@pytest.fixture
def own_cluster():
    """A cluster for this test alone: it is stopped and started under the servers."""
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


async def _heartbeats_answered(client, seconds: float) -> None:
    """The connection stays the same and the server keeps answering its heartbeats for `seconds`."""
    conn = client.conn
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        await trio.sleep(0.25)
        assert client.conn is conn and client.reconnects == 0
        assert time.monotonic() - conn.last_rx < 2.5  # heartbeat 1 s: acks keep coming


async def test_postgresql_stopped_under_running_servers_keeps_sessions_and_catches_up(own_cluster, nursery,
                                                                                      monkeypatch):
    # A server silent this long is forgotten: the outage below lasts longer, as every server's beats fail in it.
    monkeypatch.setattr(multi_server, "STALE", 3.0)
    url = own_cluster.create_db()
    a = await start(nursery, url, init=True)
    b = await start(nursery, url)
    st = PgStore(url)
    inv_a = invite(st, a.addr)
    x, fx = await node(nursery, inv_a, "xray", X_CAND)
    z, fz = await node(nursery, inv_a, "zulu", Z_CAND)
    y, fy = await node(nursery, invite(st, b.addr), "yankee", Y_CAND)
    st.close()
    with trio.fail_after(5):
        await wait_until(lambda: sees(fy, x, lambda p: p.online) and sees(fx, y, lambda p: p.online), timeout=5)

    await trio.to_thread.run_sync(own_cluster.halt, "fast")
    # What the nodes tell A while the database is down: a new endpoint, a route advertisement.
    await x.report_candidates([("10.9.9.9", 5555, "local")])
    await x.report_routes(["10.77.0.0/24"], False)
    with trio.fail_after(10):
        await _heartbeats_answered(x, 4.0)  # > 2 server beats, several live/feed rounds
    assert z.conn is not None and z.reconnects == 0 and y.reconnects == 0
    assert set(a.server.sessions) >= {x.public_key, z.public_key}
    assert a.server.counters["db_errors"] >= 1
    # A join meanwhile: refused as retryable (the node tries again), not as a refusal of the node.
    with pytest.raises(ConnectionLost) as refused:
        with trio.fail_after(15):
            await ControlConnection.open(invite_offline(a, x), new_key(), name="late")
    assert refused.value.code == "db_unavailable"

    await trio.to_thread.run_sync(own_cluster.resume)
    # Written when the database is back: X's new endpoint reaches B's node; its routes are stored.
    with trio.fail_after(10):
        await wait_until(lambda: sees(fy, x, lambda p: ("10.9.9.9", 5555) in cands(p)), timeout=10)
    st = PgStore(url)
    with trio.fail_after(10):
        await wait_until(lambda: any(r.prefix == "10.77.0.0/24" for r in st.list_routes()), timeout=10)
    # Both servers were silent longer than STALE, but neither takes the other for dead: X stays online for Y.
    end = trio.current_time() + 3.0
    while trio.current_time() < end:
        assert sees(fy, x, lambda p: p.online) and sees(fx, y, lambda p: p.online)
        await trio.sleep(0.1)
    # A change through B after the restart reaches A's nodes within 1 s (A's LISTEN connection is back).
    row = st.get_node(y.public_key)
    t0 = trio.current_time()
    await b.server._db(b.server.store.rename, row.node_id, "yvonne")
    await b.server._follow_changes(own=True)
    with trio.fail_after(1.0):
        await wait_until(lambda: sees(fx, y, lambda p: p.name == "yvonne") and sees(fz, y, lambda p: p.name == "yvonne"),
                         timeout=1.0)
    print(f"rename through B after the restart reached A's nodes in {trio.current_time() - t0:.3f} s")
    assert x.reconnects == 0 and z.reconnects == 0
    st.close()


def invite_offline(srv, client):
    """An invite for a new node naming srv, built while the database is down (the admin CLI could not)."""
    import dataclasses

    return dataclasses.replace(client.invite, addrs=(srv.addr,), invite_id="x" * 8, secret=b"s" * 16)


async def test_after_a_crash_of_postgresql_a_server_writes_its_nodes_live_rows_again(own_cluster, nursery):
    """A crash (-m immediate) empties the UNLOGGED live table: the server writes its nodes' rows again once the
    database is back, so other servers (and one started later) see them online."""
    url = own_cluster.create_db()
    a = await start(nursery, url, init=True)
    st = PgStore(url)
    x, _ = await node(nursery, invite(st, a.addr), "xray", X_CAND)
    with trio.fail_after(5):
        await wait_until(lambda: any(r[0] == x.public_key for r in st.live_rows()), timeout=5)
    st.conn.execute("CHECKPOINT")  # the test cluster runs with fsync off: what a crash may lose is not the point
    st.close()
    await trio.to_thread.run_sync(own_cluster.halt, "immediate")
    await trio.sleep(1.0)
    await trio.to_thread.run_sync(own_cluster.resume)
    st = PgStore(url)

    def x_online() -> bool:
        return any(k == x.public_key and srv == a.server.multi.id and on for k, srv, on, _, _ in st.live_rows())
    with trio.fail_after(5):
        await wait_until(x_online, timeout=5)
    assert x.reconnects == 0
    st.close()


async def test_a_server_cut_off_from_the_database_forgets_no_other_at_its_first_beat_back(pg_url, nursery):
    a = await start(nursery, pg_url, init=True)
    st = PgStore(pg_url)
    wall = time.time()
    st.server_beat("other", ["10.0.0.9:7300"], wall - 60, wall - 15, 1e9)  # its last beat: 15 s ago
    a.server.multi.last_beat = time.monotonic() - 15  # ours as old: the database was away for both
    await a.server.multi._beat_once()
    assert "other" in [sid for sid, _, _ in st.servers(time.time(), 1e9)]
    await a.server.multi._beat_once()  # ours is recent now: the other's silence is its own
    assert "other" not in [sid for sid, _, _ in st.servers(time.time(), 1e9)]
    st.close()


async def test_sqlite_locked_by_another_process_keeps_sessions_and_writes_later(tmp_path, nursery):
    h = await start_server(nursery, tmp_path)
    h.server.store.db.execute("PRAGMA busy_timeout=300")  # the server's wait for a lock (10 s by default)
    inv = h.invite(reusable=True)
    x, _ = await node(nursery, inv, "xray", X_CAND)
    z, _ = await node(nursery, inv, "zulu", Z_CAND)
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2]))", h.db, "4"],
        stdout=subprocess.PIPE)
    try:
        with trio.fail_after(10):
            assert b"locked" in await holder.stdout.receive_some(64)
        await x.report_routes(["10.77.0.0/24"], False)
        with trio.fail_after(10):
            await _heartbeats_answered(x, 2.0)
        with pytest.raises(ConnectionLost) as refused:
            with trio.fail_after(15):
                await ControlConnection.open(inv, new_key(), name="late")
        assert refused.value.code == "db_unavailable"
        assert z.reconnects == 0 and set(h.server.sessions) >= {x.public_key, z.public_key}
        with trio.fail_after(10):
            await holder.wait()
    finally:
        with trio.CancelScope(shield=True):
            holder.kill()
            await holder.wait()
    # The advertisement made under the lock is written once it is gone.
    with trio.fail_after(5):
        await wait_until(lambda: any(r.prefix == "10.77.0.0/24" for r in h.admin.list_routes()), timeout=5)
    assert x.reconnects == 0 and z.reconnects == 0
