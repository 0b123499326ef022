"""`wg set` on a mesh interface: the node is its core's one writer (the UAPI hands it the parsed request).

A mesh peer removed by hand stays out until the directory next changes, then comes back whole (it once raised
KeyError out of apply_netmap and ended the agent); a mesh peer's endpoint and AllowedIPs are the directory's
and are refused whole; peers added by hand work as in WireGuard."""

import ipaddress

import pytest
from mesh_sim import Sim

from meshwg.config.uapi import parse_set_request_untrusted
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.node import RoutesChanged


def wg_set(node, now, *lines):
    node.apply_set_request(parse_set_request_untrusted(list(lines)), now)


def two_nodes(seed):
    sim = Sim(seed=seed)
    a = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1")
    b = sim.add_host("b", lan_ip="192.168.1.3", mesh_ip="100.64.0.2")
    sim.join_all()
    return sim, a, b


def test_a_hand_removed_mesh_peer_comes_back_whole_at_the_next_directory_change():
    sim, a, b = two_nodes(11)
    sim.ping_stream("a", "b", start=0.0, stop=2.0)
    sim.run(until=3.0)
    assert sim.delivered("b") > 0
    key = b.node.public_key
    a.node.pop_events()
    wg_set(a.node, sim.now, f"public_key={key.hex()}", "remove=true")
    assert key not in a.node.core.peers and key not in a.node.paths
    assert any(isinstance(e, RoutesChanged) and ipaddress.ip_network("100.64.0.2/32") in e.remove
               for e in a.node.pop_events())

    nm = sim.netmap()
    old = nm[key]
    nm[key] = PeerSpec.make(key, old.name, ["100.64.0.2/32", "100.64.9.0/24"], old.candidates, old.observed, old.nat)
    a.node.apply_netmap(nm, sim.now)
    peer = a.node.core.peers[key]
    assert a.node.core.lookup_peer_for("100.64.9.7") is peer  # the changed AllowedIPs are in force
    before = sim.delivered("b")
    sim.ping_stream("a", "b", start=sim.now, stop=sim.now + 2.0)
    sim.run(until=sim.now + 3.0)
    assert sim.delivered("b") > before  # and traffic flows again


def test_directory_removal_after_a_hand_removal_is_quiet():
    sim, a, b = two_nodes(12)
    key = b.node.public_key
    wg_set(a.node, sim.now, f"public_key={key.hex()}", "remove=true")
    nm = sim.netmap()
    del nm[key]
    a.node.apply_netmap(nm, sim.now)
    assert key not in a.node.core.peers and key not in a.node.paths


@pytest.mark.parametrize("lines", [
    ("endpoint=192.0.2.9:51820",),
    ("allowed_ip=10.9.0.0/16",),
    ("replace_allowed_ips=true",),
])
def test_a_mesh_peers_endpoint_and_allowed_ips_are_refused_and_nothing_changes(lines):
    sim, a, b = two_nodes(13)
    key = b.node.public_key
    hand = bytes(range(1, 33))
    before = list(a.node.core.peers[key].allowed_ips)
    with pytest.raises(ValueError, match="mesh peer"):
        # A hand-added peer first in the same request: a refused request adds it neither.
        wg_set(a.node, sim.now, f"public_key={hand.hex()}", "allowed_ip=10.8.0.0/16",
               f"public_key={key.hex()}", *lines)
    assert a.node.core.peers[key].allowed_ips == before
    assert hand not in a.node.core.peers


def test_a_mesh_peer_takes_a_preshared_key_by_hand():
    sim, a, b = two_nodes(14)
    key = b.node.public_key
    wg_set(a.node, sim.now, f"public_key={key.hex()}", f"preshared_key={bytes(32 * [7]).hex()}")
    assert a.node.core.peers[key].preshared_key == bytes(32 * [7])


def test_the_private_key_is_the_nodes_identity():
    sim, a, b = two_nodes(15)
    own = a.node.core.private_key
    wg_set(a.node, sim.now, f"private_key={own.hex()}")  # `wg setconf` of `wg showconf` says the same key
    with pytest.raises(ValueError, match="identity"):
        wg_set(a.node, sim.now, f"private_key={bytes(32 * [9]).hex()}")
    assert a.node.core.private_key == own


def test_peers_added_by_hand_work_and_replace_peers_keeps_the_mesh():
    sim, a, b = two_nodes(16)
    hand = bytes(range(1, 33))
    wg_set(a.node, sim.now, f"public_key={hand.hex()}", "endpoint=192.0.2.7:51820", "allowed_ip=10.7.0.0/24")
    peer = a.node.core.peers[hand]
    assert peer.endpoint == ("192.0.2.7", 51820)
    assert a.node.core.lookup_peer_for("10.7.0.9") is peer
    wg_set(a.node, sim.now, "replace_peers=true")
    assert hand not in a.node.core.peers
    assert b.node.public_key in a.node.core.peers
