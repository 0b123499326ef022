"""The running server follows the store's change feed: an admin change made on another connection (the CLI
in another process) reaches connected nodes, and the server reads only the rows the changes name, the whole
node table only when it fell behind the feed's pruning."""

from __future__ import annotations

import time
from collections import Counter

import trio
from sig_helpers import harness, new_key, wait_until  # noqa: F401 (fixture)

from meshwg.control import ControlConnection
from meshwg.control import client as ev
from meshwg.wg.crypto import clamp, dh_pub
from signal_server.store import SqliteStore


class CountingStore:
    """The server's store, counting the reads that matter here (the rest passes through)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: Counter = Counter()
        self.got: list[bytes] = []

    def list_nodes(self):
        self.calls["list_nodes"] += 1
        return self.inner.list_nodes()

    def get_node(self, key):
        self.got.append(key)
        return self.inner.get_node(key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Watcher:
    """A connected node recording its directory events."""

    def __init__(self, conn: ControlConnection) -> None:
        self.conn = conn
        self.names: dict[bytes, str] = {}
        self.removed: set[bytes] = set()
        self.gone: str | None = None

    async def run(self) -> None:
        while self.gone is None:
            try:
                events = await self.conn.receive_events()
            except ev.ConnectionLost:  # the test closed it
                return
            for e in events:
                if isinstance(e, ev.DirectoryReset):
                    self.names = {k: p.name for k, p in e.peers.items()}
                elif isinstance(e, ev.PeerChanged):
                    self.names[e.peer.key] = e.peer.name
                elif isinstance(e, ev.PeerRemoved):
                    self.removed.add(e.key)
                elif isinstance(e, ev.Removed):
                    self.gone = e.reason


async def watcher(harness, nursery, name: str) -> Watcher:
    w = Watcher(await ControlConnection.open(harness.invite(), new_key(), name=name))
    nursery.start_soon(w.run)
    return w


def registered(harness, n: int) -> list:
    """n nodes registered through the admin connection (none connected)."""
    inv = harness.invite(reusable=True)
    srv = harness.server
    return [harness.admin.join(dh_pub(clamp(new_key())), inv.invite_id, inv.secret, f"idle-{i}", time.time(),
                               srv.prefix4, srv.prefix6)[0] for i in range(n)]


async def test_admin_changes_reach_nodes_reading_only_the_changed_rows(harness, nursery):
    server = harness.server
    a, b = await watcher(harness, nursery, "alpha"), await watcher(harness, nursery, "bravo")
    idle = registered(harness, 30)
    await wait_until(lambda: all(r.key in server.directory.nodes for r in idle))
    await wait_until(lambda: len(a.names) == 31)
    bkey = dh_pub(clamp(b.conn.private_key))
    spy = server.store = CountingStore(server.store)

    brow = harness.admin.get_node(bkey)
    harness.admin.rename(brow.node_id, "renamed")
    await wait_until(lambda: a.names.get(bkey) == "renamed", timeout=1.0)
    harness.admin.remove(brow.node_id, time.time())
    with trio.fail_after(1.0):
        while not (bkey in a.removed and b.gone):
            await trio.sleep(0.01)
    assert b.gone == "removed" and bkey not in server.directory.nodes
    assert spy.calls["list_nodes"] == 0, "a change made the server re-read the whole node table"
    assert set(spy.got) == {bkey}, "the server read rows no change named"
    assert server.counters["feed_resyncs"] == 0
    await a.conn.aclose()


async def test_a_server_behind_the_pruned_feed_reads_the_table_once(harness, nursery):
    server = harness.server
    a = await watcher(harness, nursery, "alpha")
    [idle] = registered(harness, 1)
    await wait_until(lambda: idle.key in a.names)
    spy = server.store = CountingStore(server.store)
    admin = SqliteStore(harness.db, changes_keep=4)  # a writer that keeps only 4 changes
    try:
        async with server._db_lock:  # the server reads nothing meanwhile: it falls behind
            for i in range(20):
                admin.rename(idle.node_id, f"name-{i}")
        await wait_until(lambda: a.names.get(idle.key) == "name-19", timeout=1.0)
        assert server.counters["feed_resyncs"] == 1 and spy.calls["list_nodes"] == 1
        admin.rename(idle.node_id, "after")  # and then follows the feed again, row by row
        await wait_until(lambda: a.names.get(idle.key) == "after", timeout=1.0)
        assert server.counters["feed_resyncs"] == 1 and spy.calls["list_nodes"] == 1
    finally:
        admin.close()
    await a.conn.aclose()
