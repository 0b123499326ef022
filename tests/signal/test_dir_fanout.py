"""Fan-out of directory changes (issue 14 item 4): one change to N subscribers is packed once, not once per
subscriber, and a joiner's snapshot does not pack the whole directory again. Pure (signal_server.directory)."""

from __future__ import annotations

import msgpack

from meshwg.signaling import protocol as P
from signal_server import directory as D
from signal_server.directory import Directory, Node


def node(i: int) -> Node:
    key = i.to_bytes(32, "big")
    return Node(i, key, f"n{i}", f"10.1.{i >> 8}.{i & 255}", f"fd00::{i:x}")


def mesh(n: int) -> Directory:
    d = Directory()
    for i in range(1, n + 1):
        d.put(node(i))
        d.subscribe(node(i).key)
        d.update(node(i).key, online=True)
    d.seal()
    for i in range(1, n + 1):  # everyone caught up
        while d.take_pending_body(node(i).key) is not None:
            pass
    return d


class Count:
    def __init__(self, monkeypatch, name: str) -> None:
        self.n = 0
        real = getattr(D, name)

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(D, name, counted)


def test_one_change_to_200_subscribers_is_packed_once(monkeypatch):
    d = mesh(200)
    entries, bodies = Count(monkeypatch, "pack_entry"), Count(monkeypatch, "dir_update_body")
    d.update(node(7).key, candidates=[("192.0.2.7", 51820, "local")])
    d.seal()  # the flusher's window
    got = [d.take_pending_body(node(i).key) for i in range(1, 201) if i != 7]
    assert all(b is not None for b in got) and len(got) == 199
    assert entries.n == 1  # the entry
    assert bodies.n == 1  # the update message: the same bytes for all 199
    assert len({id(b) for b in got}) == 1
    m = msgpack.unpackb(got[0], raw=False)
    assert m["type"] == P.T_DIR_UPDATE and m["remove"] == []
    [e] = [msgpack.unpackb(x, raw=False) for x in m["upsert"]]
    assert e["key"] == node(7).key and e["cand"] == [["192.0.2.7", 51820, "local"]]
    assert d.take_pending_body(node(7).key) is None  # never its own entry
    assert all(d.take_pending_body(node(i).key) is None for i in range(1, 201))


def test_a_burst_of_joins_costs_packing_per_join_not_per_subscriber(monkeypatch):
    """100 nodes join a mesh of 1000 (each subscribes: a snapshot of everything): the entries packed for their
    snapshots and the updates to everyone stay a few per join (100,000 when each snapshot packs every entry)."""
    d = mesh(1000)
    d.subscribe_bodies(node(1).key)  # the shared snapshot exists (built once)
    entries = Count(monkeypatch, "pack_entry")
    calls = {"packed": 0}
    real_packed = Node.packed

    def packed(self):
        calls["packed"] += 1
        return real_packed(self)

    monkeypatch.setattr(Node, "packed", packed)
    for i in range(1001, 1101):
        n = node(i)
        d.put(n)
        full = [msgpack.unpackb(b, raw=False) for b in d.subscribe_bodies(n.key)]
        d.update(n.key, online=True)
        keys = {msgpack.unpackb(e, raw=False)["key"] for m in full for e in m["peers"]}
        assert len(keys) == i - 1 and n.key not in keys  # everyone but itself
        assert full[0]["first"] and full[-1]["last"] and not any(m["last"] for m in full[:-1])
        if i % 10 == 0:  # a flusher window: everyone takes what changed
            d.seal()
            for j in range(1, i + 1):
                while d.take_pending_body(node(j).key) is not None:
                    pass
    assert entries.n <= 300  # 200 changes (put, online) of 100 nodes
    assert calls["packed"] <= 100 * 2 * 256 + 10_000


def test_snapshot_is_current_and_without_the_joiner():
    d = mesh(300)
    d.subscribe_bodies(node(1).key)
    d.update(node(5).key, candidates=[("192.0.2.5", 1, "local")])
    d.remove(node(6).key)
    d.put(node(301))
    full = [msgpack.unpackb(b, raw=False) for b in d.subscribe_bodies(node(301).key)]
    entries = {e["key"]: e for m in full for e in map(lambda x: msgpack.unpackb(x, raw=False), m["peers"])}
    assert node(6).key not in entries and node(301).key not in entries and len(entries) == 299
    assert entries[node(5).key]["cand"] == [["192.0.2.5", 1, "local"]]
    assert entries == {k: msgpack.unpackb(n.packed(), raw=False) for k, n in d.nodes.items() if k != node(301).key}


def test_a_subscriber_far_behind_still_gets_every_change():
    d = mesh(20)
    slow = node(3).key
    for r in range(D.SEG_MAX + 10):  # more windows than segments kept
        d.update(node(4 + r % 10).key, candidates=[("192.0.2.1", 1000 + r, "local")])
        d.seal()
        for i in range(1, 21):
            if node(i).key != slow:
                while d.take_pending_body(node(i).key) is not None:
                    pass
    seen = {}
    while (b := d.take_pending_body(slow)) is not None:
        for x in msgpack.unpackb(b, raw=False)["upsert"]:
            e = msgpack.unpackb(x, raw=False)
            seen[e["key"]] = e["cand"]
    assert set(seen) == {node(i).key for i in range(4, 14)}
    assert seen[node(4 + (D.SEG_MAX + 9) % 10).key] == [["192.0.2.1", 1000 + D.SEG_MAX + 9, "local"]]
    assert len(d._segs) <= D.SEG_MAX
