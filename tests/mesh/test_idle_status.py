"""A peer that goes idle after a direct path is reported idle with that address, not as unanswered probes
(issue 15: users read "relay (probes unanswered since ...)" on an idle laptop as NAT traversal failing)."""

from mesh_sim import Sim


def two():
    sim = Sim(seed=1)
    sim.add_nat("na", "203.0.113.1", "port-restricted")
    sim.add_nat("nb", "203.0.113.2", "port-restricted")
    sim.add_host("a", lan_ip="192.168.1.2", nat="na", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="192.168.2.2", nat="nb", mesh_ip="100.64.0.2")
    sim.join_all()
    return sim


def test_an_idle_peer_is_idle_with_its_last_direct_address():
    sim = two()
    sim.ping_stream("a", "b", 1.0, 10.0)
    sim.run(10.0)
    st = sim.hosts["a"].node.status(sim.now)[0]
    assert st["path"] == "direct" and st["active"]
    direct = st["endpoint"]
    sim.run(10.0 + 120.0)   # no traffic for two minutes: no heartbeats, the direct path times out
    st = sim.hosts["a"].node.status(sim.now)[0]
    assert st["path"] == "relay" and not st["active"]
    assert st["reason"] == "idle (not probing)"
    assert st["last_direct"] == direct


def test_a_peer_never_direct_has_no_last_direct_address():
    sim = two()
    st = sim.hosts["a"].node.status(sim.now)[0]
    assert st["last_direct"] is None
