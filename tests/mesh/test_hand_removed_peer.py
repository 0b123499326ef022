"""A mesh peer removed by hand (`wg set meshwg0 peer K remove` on the agent's UAPI socket) and then changed
by the directory: the node, owner of its mesh peers, puts the peer back with the directory's view instead
of raising KeyError out of apply_netmap (which would end the agent and its tunnels)."""

from mesh_sim import Sim

from meshwg.mesh.netmap import PeerSpec


def test_directory_change_after_a_hand_removal_restores_the_peer():
    sim = Sim(seed=11)
    a = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1")
    b = sim.add_host("b", lan_ip="192.168.1.3", mesh_ip="100.64.0.2")
    sim.join_all()
    sim.ping_stream("a", "b", start=0.0, stop=2.0)
    sim.run(until=3.0)
    assert sim.delivered("b") > 0
    key = b.node.public_key
    a.node.core.remove_peer(key)  # what the UAPI server does for `peer K remove`
    assert key not in a.node.core.peers

    nm = sim.netmap()
    old = nm[key]
    nm[key] = PeerSpec.make(key, old.name, ["100.64.0.2/32", "100.64.9.0/24"], old.candidates, old.observed, old.nat)
    a.node.apply_netmap(nm, sim.now)  # raised KeyError
    peer = a.node.core.peers[key]
    assert a.node.core.lookup_peer_for("100.64.9.7") is peer  # the changed AllowedIPs are in force
    before = sim.delivered("b")
    sim.ping_stream("a", "b", start=sim.now, stop=sim.now + 2.0)
    sim.run(until=sim.now + 3.0)
    assert sim.delivered("b") > before  # and traffic flows again


def test_directory_removal_after_a_hand_removal_is_quiet():
    sim = Sim(seed=12)
    a = sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1")
    b = sim.add_host("b", lan_ip="192.168.1.3", mesh_ip="100.64.0.2")
    sim.join_all()
    key = b.node.public_key
    a.node.core.remove_peer(key)
    nm = sim.netmap()
    del nm[key]
    a.node.apply_netmap(nm, sim.now)
    assert key not in a.node.core.peers and key not in a.node.paths
