"""Two/three MeshNodes (real WireGuard cores) over a simulated network with NATs and a relay."""

from meshwg.mesh.node import PathChanged
from mesh_sim import Sim


def handshakes(h):
    return sum(1 for _, e in h.events if type(e).__name__ == "HandshakeCompleted")


def two(kind_a, kind_b, seed=1, **kw):
    sim = Sim(seed=seed, **kw)
    sim.add_nat("na", "203.0.113.1", kind_a)
    sim.add_nat("nb", "203.0.113.2", kind_b)
    sim.add_host("a", lan_ip="192.168.1.2", nat="na", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="192.168.2.2", nat="nb", mesh_ip="100.64.0.2")
    sim.join_all()
    return sim


def first_direct_time(h, key):
    for t, e in h.events:
        if isinstance(e, PathChanged) and e.peer_key == key and not type(e.endpoint).__name__ == "RelayEndpoint":
            return t
    return None


def test_port_restricted_cones_go_direct_and_relay_stops_carrying_data():
    sim = two("port-restricted", "port-restricted")
    sim.ping_stream("a", "b", 1.0, 20.0)
    sim.run(1.5)
    assert sim.delivered("b") >= 1          # relay from the first packet
    sim.run(3.0)
    assert sim.is_direct("a", "b") and sim.is_direct("b", "a")
    t = first_direct_time(sim.hosts["a"], sim.hosts["b"].node.public_key)
    assert t is not None and t - 1.0 < 0.5
    relay_before = sim.relay_data_packets
    sim.run(20.0)
    assert sim.relay_data_packets == relay_before  # no data through the relay after the switch
    assert sim.delivered("b") >= 90 and sim.delivered("a") >= 90
    assert handshakes(sim.hosts["a"]) + handshakes(sim.hosts["b"]) == 2   # one session, kept across the switch
    st = sim.hosts["a"].node.status(sim.now)[0]
    assert st["path"] == "direct" and st["latency"] < 0.05 and st["name"] == "b"


def test_full_cone_and_port_restricted_direct():
    sim = two("full", "port-restricted")
    sim.ping_stream("b", "a", 1.0, 5.0)
    sim.run(5.0)
    assert sim.is_direct("a", "b") and sim.is_direct("b", "a")


def test_symmetric_both_sides_uses_relay_and_says_why():
    sim = two("symmetric", "symmetric")
    sim.ping_stream("a", "b", 1.0, 30.0)
    sim.run(3.0)
    assert sim.delivered("b") >= 8 and sim.delivered("a") >= 8   # works within 2 s, via relay
    sim.run(30.0)
    assert not sim.is_direct("a", "b")
    assert sim.hosts["a"].node.status(sim.now)[0]["reason"] == "symmetric NAT on both sides"
    pings = sum(1 for t, n, d in sim.sent_log if n == "a")
    assert pings <= 20    # probe rounds back off: 5, 10, 20 s...


def test_unanswered_reason_without_nat_info():
    sim = Sim(seed=3)
    sim.add_nat("na", "203.0.113.1", "symmetric")
    sim.add_nat("nb", "203.0.113.2", "symmetric")
    sim.add_host("a", lan_ip="192.168.1.2", nat="na", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="192.168.2.2", nat="nb", mesh_ip="100.64.0.2")
    sim.join_all(with_nat=False)
    sim.ping_stream("a", "b", 1.0, 30.0)
    sim.run(20.0)
    assert sim.hosts["a"].node.status(sim.now)[0]["reason"].startswith("probes unanswered since ")


def test_direct_cut_falls_back_within_5s_and_returns_without_new_session():
    sim = two("port-restricted", "port-restricted")
    sim.ping_stream("a", "b", 1.0, 200.0, every=0.1)
    sim.run(10.0)
    assert sim.is_direct("a", "b")
    hs = handshakes(sim.hosts["a"]) + handshakes(sim.hosts["b"])
    sim.blocked.add(frozenset(("a", "b")))
    cut = sim.now
    recv_at_cut = sim.delivered("b")
    sim.run(cut + 5.0)
    assert not sim.is_direct("a", "b") and not sim.is_direct("b", "a")
    back = [t for t, e in sim.hosts["a"].events if isinstance(e, PathChanged) and t > cut]
    assert back and back[0] - cut <= 5.0
    sim.run(cut + 15.0)
    assert sim.delivered("b") - recv_at_cut >= 80      # traffic flows through the relay
    sim.blocked.clear()
    sim.run(cut + 15.0 + 62.0)                          # re-probe within the 60 s upgrade interval
    assert sim.is_direct("a", "b") and sim.is_direct("b", "a")
    # the WireGuard session survived both moves (rekey after 120 s is not reached in this window)
    assert handshakes(sim.hosts["a"]) + handshakes(sim.hosts["b"]) == hs


def test_relay_down_changes_nothing_while_direct():
    sim = two("port-restricted", "port-restricted")
    sim.ping_stream("a", "b", 1.0, 40.0)
    sim.run(5.0)
    sim.relay_up = False
    n = sim.delivered("b")
    sim.run(40.0)
    assert sim.is_direct("a", "b") and sim.delivered("b") - n >= 170


def test_lan_peers_behind_same_nat_use_local_addresses_without_flapping():
    sim = Sim(seed=5)
    sim.add_nat("n", "203.0.113.1", "port-restricted")
    sim.add_host("a", lan_ip="192.168.1.2", nat="n", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="192.168.1.3", nat="n", mesh_ip="100.64.0.2", port=41642)
    sim.join_all()
    sim.ping_stream("a", "b", 1.0, 300.0)
    sim.run(300.0)
    assert sim.path("a", "b") == ("192.168.1.3", 41642)
    changes = [e for _, e in sim.hosts["a"].events if isinstance(e, PathChanged)]
    assert len(changes) == 2     # relay at join, LAN once: no flapping


def test_three_nodes_mixed():
    sim = Sim(seed=7)
    sim.add_nat("na", "203.0.113.1", "port-restricted")
    sim.add_nat("nb", "203.0.113.2", "symmetric")
    sim.add_nat("nc", "203.0.113.3", "full")
    for n, ip, nat, mip in [("a", "192.168.1.2", "na", "100.64.0.1"), ("b", "192.168.2.2", "nb", "100.64.0.2"),
                            ("c", "192.168.3.2", "nc", "100.64.0.3")]:
        sim.add_host(n, lan_ip=ip, nat=nat, mesh_ip=mip)
    sim.join_all()
    for x, y in [("a", "b"), ("a", "c"), ("b", "c")]:
        sim.ping_stream(x, y, 1.0, 20.0)
    sim.run(20.0)
    assert sim.is_direct("a", "c") and sim.is_direct("b", "c") and sim.is_direct("c", "b")
    for h in sim.hosts.values():
        assert len(h.received) >= 180


def test_idle_stops_probing_and_traffic_resumes_at_once():
    sim = two("port-restricted", "port-restricted")
    sim.ping_stream("a", "b", 1.0, 10.0)
    sim.run(70.0)
    late = [x for x in sim.sent_log if x[0] > 10.0 + 46.0]
    assert late == []               # idle: no probes, no heartbeats
    assert not sim.hosts["a"].node.status(sim.now)[0]["active"]
    n = sim.delivered("b")
    sim.ping_stream("a", "b", 100.0, 103.0)
    sim.run(100.2)
    assert sim.delivered("b") > n   # first packets through the relay at once
    sim.run(101.0)
    assert sim.is_direct("a", "b")


def test_forged_replayed_foreign_disco_dropped_and_counted():
    from nacl.public import PrivateKey
    from meshwg.disco.messages import DiscoCodec, Ping
    sim = two("port-restricted", "port-restricted")
    a, b = sim.hosts["a"], sim.hosts["b"]
    captured = []
    orig = sim.send

    def spy(src, data, dest):
        if src is a and data[:3] == b"MWD":
            captured.append((data, dest))
        orig(src, data, dest)
    sim.send = spy
    sim.ping_stream("a", "b", 1.0, 3.0)
    sim.run(3.0)
    node = b.node
    for data, _ in captured[:5]:   # some never reached b (NAT-dropped): their first arrival is fresh
        node.receive_datagram(data, ("198.51.100.66", 9), sim.now)
    sim.flush()
    before = node.drops["disco_replay"]
    for data, _ in captured[:5]:
        node.receive_datagram(data, ("198.51.100.66", 9), sim.now)
    assert node.drops["disco_replay"] - before == 5
    forged = bytearray(captured[0][0])
    forged[70] ^= 0xFF
    node.receive_datagram(bytes(forged), ("198.51.100.66", 9), sim.now)
    assert node.drops["disco_forged"] == 1
    stranger = DiscoCodec(bytes(PrivateKey.generate()), lambda n: bytes(n))
    stranger.add_peer(node.public_key)
    node.receive_datagram(stranger.seal(node.public_key, Ping(b"z" * 12, stranger.public_key), sim.now + node.wall_offset),
                          ("198.51.100.66", 9), sim.now)
    assert node.drops["disco_unknown_sender"] == 1
    n_sent = len(sim.sent_log)
    sim.flush()
    assert not [x for x in sim.sent_log[n_sent:] if x[2] == ("198.51.100.66", 9)]   # nothing answered


def test_netmap_updates_live():
    sim = two("port-restricted", "port-restricted")
    a = sim.hosts["a"].node
    nm = sim.netmap()
    key_b = sim.hosts["b"].node.public_key
    from meshwg.mesh.netmap import PeerSpec
    nm[key_b] = PeerSpec.make(key_b, "b", ["100.64.0.22/32"], [("192.168.2.2", 41641)], nm[key_b].observed,
                              nm[key_b].nat)
    ops = a.apply_netmap(nm, sim.now)
    assert [type(o).__name__ for o in ops] == ["ChangePeer"]
    assert [str(n) for n in a.core.peers[key_b].allowed_ips] == ["100.64.0.22/32"]
    del nm[key_b]
    a.apply_netmap(nm, sim.now)
    assert key_b not in a.core.peers and key_b not in a.paths
    rc = [e for _, e in sim.hosts["a"].events if type(e).__name__ == "RoutesChanged"]
    sim.flush()
    rc = [e for _, e in sim.hosts["a"].events if type(e).__name__ == "RoutesChanged"]
    assert [str(n) for n in rc[-1].remove] == ["100.64.0.22/32"]


def test_stun_rounds_learn_reflexive_and_nat_kind():
    sim = two("symmetric", "port-restricted")
    for name in "ab":
        sim.hosts[name].node.set_stun_servers([(ip, sim.stun_port) for ip in sim.stun_ips], sim.now)
    sim.run(1.0)
    a, b = sim.hosts["a"].node, sim.hosts["b"].node
    assert a.local_nat == "endpoint-dependent" and b.local_nat == "endpoint-independent"
    assert b.reflexive == (("203.0.113.2", 41641),)
    assert b.endpoints[0] == ("203.0.113.2", 41641)
    sim.run(60.0)
    assert 2 <= a.counters["send_stun"] // 2 <= 4     # re-STUN every 20-26 s


def test_birthday_paradox_port_restricted_vs_symmetric_bounded():
    runs, direct = 20, 0
    for seed in range(runs):
        sim = two("port-restricted", "symmetric", seed=seed)
        sim.ping_stream("a", "b", 1.0, 12.0)
        sim.run(12.0)
        a, b = sim.hosts["a"], sim.hosts["b"]
        direct += sim.is_direct("a", "b") and sim.is_direct("b", "a")
        assert b.opened_sockets <= 256 and len(b.extra) <= 4       # extra sockets closed after the attempt
        easy_probes = sum(1 for t, n, d in sim.sent_log if n == "a")
        assert easy_probes <= 1024 + 100
        per_s = {}
        for t, n, d in sim.sent_log:
            if n == "a":
                per_s[int(t)] = per_s.get(int(t), 0) + 1
        assert max(per_s.values()) <= 250                           # rate-limited
        assert sim.delivered("b") >= 50                             # relay carried traffic meanwhile
    print(f"birthday-paradox direct in {direct}/{runs} simulated runs")
    assert direct >= 15


def test_nat_rebinding_recovers():
    sim = two("port-restricted", "port-restricted")
    sim.ping_stream("a", "b", 1.0, 100.0)
    sim.run(10.0)
    assert sim.is_direct("a", "b")
    sim.nats["na"].forget()          # a's router loses its mapping
    t0 = sim.now
    n = sim.delivered("b")
    sim.run(t0 + 10.0)
    assert sim.delivered("b") - n >= 40     # traffic keeps flowing (relay or re-punched direct)
    sim.run(t0 + 70.0)
    assert sim.is_direct("a", "b") and sim.is_direct("b", "a")
