import ipaddress

from meshwg.mesh.netmap import AddPeer, ChangePeer, PeerSpec, RemovePeer, diff, route_changes


def spec(k, addr, cands=(), name=""):
    return PeerSpec.make(bytes([k]) * 32, name or f"n{k}", [addr], cands)


def test_diff_add_remove_change_and_routes():
    cur = {s.key: s for s in [spec(1, "100.64.0.1/32"), spec(2, "100.64.0.2/32")]}
    new = {s.key: s for s in [spec(1, "100.64.0.9/32"), spec(3, "100.64.0.3/32", [("192.0.2.1", 5)])]}
    ops = diff(cur, new)
    assert isinstance(ops[0], RemovePeer) and ops[0].key == bytes([2]) * 32
    assert isinstance(ops[1], ChangePeer) and ops[1].fields == ("addresses",)
    assert isinstance(ops[2], AddPeer) and ops[2].spec.candidates == (("192.0.2.1", 5),)
    rc = route_changes(cur, new)
    n = ipaddress.ip_network
    assert rc.add == [n("100.64.0.3/32"), n("100.64.0.9/32")]
    assert rc.remove == [n("100.64.0.1/32"), n("100.64.0.2/32")]
    assert diff(new, new) == [] and not route_changes(new, new)


def test_make_normalises():
    a = PeerSpec.make(b"k" * 32, "x", ["100.64.0.1", "100.64.0.1/32", "fd00::1/128"], [["1.2.3.4", 5], ("1.2.3.4", 5)])
    assert len(a.addresses) == 2 and a.candidates == (("1.2.3.4", 5),)
