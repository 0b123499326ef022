"""A peer that goes idle after a direct path is reported idle with that address, not as unanswered probes
(issue 15: users read "relay (probes unanswered since ...)" on an idle laptop as NAT traversal failing)."""

from test_hostile_claims import honest_pair


def two():
    return honest_pair(seed=1)   # a and b, each behind a port-restricted NAT


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
