"""The "offers" field of a directory entry under a policy (issue 13, item 4): what the RECIPIENT may send the peer,
in the accept list's format with the peer's own addresses, so `meshwg status` can say both directions. Absent
without a policy; kept in step with policy changes (a change of what R may send P alone still reaches R); packed
once per (peer, template), so a snapshot costs one template evaluation per class pair as before."""

from __future__ import annotations

import msgpack

from signal_server import policy as P
from signal_server.directory import Directory, Node


def unpack(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


def key(i: int) -> bytes:
    return bytes([i]) * 32


def directory(*names, tags=None, routes=None) -> Directory:
    d = Directory()
    for i, name in enumerate(names):
        d.put(Node(i + 1, key(i + 1), name, f"100.64.0.{i + 1}", f"fd00::{i + 1}",
                   tags=tuple((tags or {}).get(name, ())), routes=tuple((routes or {}).get(name, ()))))
    return d


def pol(text: str):
    return P.parse(text, "p.toml")


AB = "[[rule]]\nfrom = ['a']\nto = ['b']\nports = ['tcp:22', 'icmp']\n"
BA_DNS = "[[rule]]\nfrom = ['b']\nto = ['a']\nports = ['udp:53']\n"


def by_name(entries) -> dict:
    return {e["name"]: e for e in map(unpack, entries)}


def test_each_side_is_told_what_it_may_send_the_other():
    d = directory("a", "b", "c")
    d.set_policy(pol(AB))
    a, b = by_name(d.subscribe(key(1))), by_name(d.subscribe(key(2)))
    # a's entry for b: a may send b tcp/22 and icmp, to b's addresses; b may send a nothing new
    assert a["b"]["offers"] == [[1, 0, 65535, "100.64.0.2/32"], [1, 0, 65535, "fd00::2/128"],
                                [6, 22, 22, "100.64.0.2/32"], [6, 22, 22, "fd00::2/128"]]
    assert a["b"]["accept"] == []
    # b's entry for a: the mirror image
    assert b["a"]["offers"] == [] and b["a"]["accept"] == a["b"]["offers"]
    assert d.subscribe(key(3)) == []


def test_offers_name_the_peers_routes_and_a_punch_entry_carries_them():
    d = directory("a", "b", routes={"b": ("192.168.1.0/24",)})
    d.set_policy(pol("[[rule]]\nfrom = ['a']\nto = ['192.168.1.0/24']\nports = ['tcp:80']\n"))
    d.subscribe(key(1))
    assert unpack(d.entry_for(key(1), d.nodes[key(2)]))["offers"] == [[6, 80, 80, "192.168.1.0/24"]]


def test_no_policy_no_offers():
    d = directory("a", "b")
    assert all("offers" not in e and "accept" not in e for e in map(unpack, d.subscribe(key(1))))
    d.set_policy(pol(AB))
    d.set_policy(None)
    ups, _ = d.take_pending(key(1))
    assert ups and all("offers" not in unpack(u) for u in ups)


def test_a_change_of_what_the_recipient_may_send_reaches_it():
    d = directory("a", "b", "c")
    d.set_policy(pol(AB))
    d.subscribe(key(1)), d.subscribe(key(2))
    d.set_policy(pol(AB + BA_DNS))  # a's accept list from b grows: a hears; b's offers to a grow: b hears
    (ua,), _ = d.take_pending(key(1))
    assert unpack(ua)["accept"] == [[17, 53, 53, "100.64.0.1/32"], [17, 53, 53, "fd00::1/128"]]
    (ub,), _ = d.take_pending(key(2))
    assert unpack(ub)["offers"] == [[17, 53, 53, "100.64.0.1/32"], [17, 53, 53, "fd00::1/128"]]
    assert unpack(ub)["accept"] == [[1, 0, 65535, "100.64.0.2/32"], [1, 0, 65535, "fd00::2/128"],
                                    [6, 22, 22, "100.64.0.2/32"], [6, 22, 22, "fd00::2/128"]]


def test_a_peers_address_change_refreshes_its_offers():
    d = directory("a", "b")
    d.set_policy(pol(AB))
    d.subscribe(key(1))
    d.update(key(2), ipv4="100.64.0.22")
    (u,), _ = d.take_pending(key(1))
    assert [1, 0, 65535, "100.64.0.22/32"] in unpack(u)["offers"]
    assert not any(r[3] == "100.64.0.2/32" for r in unpack(u)["offers"])


def test_a_full_entry_still_unpacks_with_both_fields():
    """An entry with every optional field (routes, exit, tags) and both lists: the splice keeps the map valid."""
    d = Directory()
    d.put(Node(1, key(1), "a", "100.64.0.1", "fd00::1", tags=("x",)))
    d.put(Node(2, key(2), "b", "100.64.0.2", "fd00::2", tags=("y",), routes=("10.0.0.0/8",), is_exit=True))
    d.set_policy(pol("[[rule]]\nfrom = ['*']\nto = ['*']\n"))
    e = by_name(d.subscribe(key(1)))["b"]
    assert e["exit"] is True and e["tags"] == ["y"] and e["routes"] == ["10.0.0.0/8"]
    assert [0, 0, 65535, "0.0.0.0/0"] in e["offers"] and e["accept"] == [[0, 0, 65535, "100.64.0.1/32"],
                                                                       [0, 0, 65535, "fd00::1/128"]]


def test_offers_keep_the_64_cap_and_cost_one_template_per_class_pair(monkeypatch):
    ports = ", ".join(f"'tcp:{p}'" for p in range(1000, 1200, 2))  # 100 ranges that do not touch
    d = Directory()
    for i in range(60):
        d.put(Node(i + 1, (i + 1).to_bytes(2, "big") * 16, f"n{i}", f"100.64.0.{i + 1}", f"fd00::{i + 1:x}",
                   tags=("ab"[i % 2],)))
    calls, real = [], P._template
    monkeypatch.setattr(P, "_template", lambda *a: calls.append(1) or real(*a))
    d.set_policy(pol(f"[[rule]]\nfrom = ['tag:a']\nto = ['tag:b']\nports = [{ports}]\n"))
    snaps = [list(map(unpack, d.subscribe(k))) for k in list(d.nodes)]
    assert len(calls) == 4  # two classes: four pairs, whatever the number of nodes
    offers = [e["offers"] for snap in snaps for e in snap]
    assert any(len(o) == 64 for o in offers) and all(len(o) <= 64 for o in offers)

