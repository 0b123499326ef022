"""No peer's claim makes honest nodes send traffic elsewhere (issue 10 items 4 and 15), in the simulator.

Seen before: one registration naming a victim as its "observed"/"stun-edm" candidate made every honest
node start a birthday burst there (1,066 packets each), loopback 127.0.0.1:53 included. Bounds used here
(node.py's docstring): 2 pings a second to one (ip, port) after a burst of 30; birthday probes 2,048 a
minute to one IP.
"""

from __future__ import annotations

import ipaddress

from meshwg.control.client import PeerInfo, Welcome, _peer_untrusted
from meshwg.disco.messages import CallMeMaybe, Ping
from meshwg.mesh.node import RelayEndpoint
from meshwg.mesh.peer_entry import entry_policy, peer_spec
from mesh_sim import Sim, ipv4_packet
from signal_server.directory import Directory, Node

WELCOME = Welcome(1, "a", "100.64.0.1", "fd00::1", "100.64.0.0/10", "fd00::/48",
                  (("198.51.100.1", 3478),), (("198.51.100.1", 3478),), (), 10.0, bytes(32))
POLICY = entry_policy(WELCOME)
VICTIM = "203.0.113.99"


def honest_pair(seed: int = 1) -> Sim:
    """a (port-restricted cone: EIM, the "easy" birthday side towards a symmetric peer) and b."""
    sim = Sim(seed=seed)
    sim.add_nat("na", "203.0.113.1", "port-restricted")
    sim.add_nat("nb", "203.0.113.2", "port-restricted")
    sim.add_host("a", lan_ip="192.168.1.2", nat="na", mesh_ip="100.64.0.1")
    sim.add_host("b", lan_ip="192.168.2.2", nat="nb", mesh_ip="100.64.0.2")
    sim.join_all()
    return sim


def add_entries(sim: Sim, entries) -> dict:
    """Hand every honest node the directory plus `entries` (PeerInfo, as the agent would: via peer_spec)."""
    specs = {p.key: peer_spec(p, POLICY) for p in entries}
    for h in sim.hosts.values():
        nm = sim.netmap()
        nm.update(specs)
        h.node.apply_netmap(nm, sim.now)
    sim.flush()
    return specs


def traffic(sim: Sim, src: str, dst_ips, start: float, stop: float, every: float = 1.0) -> None:
    """src sends an IP packet to each of dst_ips every `every` seconds (the peers are active)."""
    h = sim.hosts[src]

    def tick(t=start):
        if t >= stop:
            return
        for ip in dst_ips:
            h.node.send_ip_packet(ipv4_packet(h.mesh_ip, ip), sim.now)
        sim.at(t + every, lambda: tick(t + every))
    sim.at(start, tick)


def sent_to(sim: Sim, pred) -> list:
    return [(t, n, d) for t, n, d in sim.sent_log if n in sim.hosts and pred(d)]


def in_net(net: str):
    net = ipaddress.ip_network(net)
    return lambda d: ipaddress.ip_address(d[0]) in net


def test_loopback_claims_in_an_entry_send_nothing_there():
    """An entry (a compromised server, a corrupted cache) claiming 127.0.0.1:53 as "observed" or
    "stun-edm": no honest node sends anything to loopback (the old code pinged it and started a
    birthday burst at 127.0.0.1)."""
    sim = honest_pair()
    evil = PeerInfo(b"\xee" * 32, 9, "evil", "100.64.0.9", "",
                    (("127.0.0.1", 53, "observed"), ("127.0.0.1", 53, "stun-edm")), True)
    add_entries(sim, [evil])
    traffic(sim, "a", ["100.64.0.9"], 1.0, 60.0)
    traffic(sim, "b", ["100.64.0.9"], 1.0, 60.0)
    sim.run(60.0)
    assert sent_to(sim, in_net("127.0.0.0/8")) == []
    assert all(h.node.paths[evil.key].birthday is None and h.node.paths[evil.key].counters["attempt_birthday"] == 0
               for h in sim.hosts.values())


def test_a_registered_node_cannot_aim_birthday_bursts_at_a_victim():
    """The whole path: the node reports VICTIM as "observed" and "stun-edm"; the server's directory, the
    packed entry, the control client's parser and peer_spec hand honest nodes a peer whose birthday
    target is where the server saw it, not VICTIM. VICTIM gets ordinary probes of one candidate only."""
    d = Directory(mesh_nets=("100.64.0.0/10", "fd00::/48"))
    key = b"\xee" * 32
    d.put(Node(9, key, "evil", "100.64.0.9", "fd00::9"))
    claimed = [(VICTIM, 53, "observed"), (VICTIM, 53, "stun-edm")]
    d.update(key, candidates=d.reported(claimed)[0], online=True)
    d.set_observed(key, ("198.51.100.66", 40000))            # where the server saw its relay traffic
    evil = _peer_untrusted(d.nodes[key].packed())
    sim = honest_pair()
    add_entries(sim, [evil])
    for h in sim.hosts.values():
        assert h.node.paths[key].birthday_role() == "easy"   # the EDM hint still counts, as a hint
    traffic(sim, "a", ["100.64.0.9"], 1.0, 60.0)
    traffic(sim, "b", ["100.64.0.9"], 1.0, 60.0)
    sim.run(60.0)
    at_victim = sent_to(sim, lambda dest: dest[0] == VICTIM)
    assert {dest for _, _, dest in at_victim} <= {(VICTIM, 53)}   # no spray over its ports
    assert len(at_victim) <= 2 * 20                                # probe rounds, per honest node
    assert all(h.node.paths[key].counters["attempt_birthday"] >= 1 for h in sim.hosts.values())
    assert all(h.node.paths[key].birthday is None or h.node.paths[key].birthday.target_ip == "198.51.100.66"
               for h in sim.hosts.values())


def test_probing_one_address_is_bounded_whatever_the_directory_says():
    """100 entries all naming one address as their candidate: 150 pings at most in the first minute
    (a burst of 30, then 2 a second), however many peers claim it."""
    sim = honest_pair()
    target = ("203.0.113.9", 53)
    entries = [PeerInfo(bytes([7, i]) + bytes(30), 100 + i, f"e{i}", f"100.64.1.{i}", "", (target + ("local",),), True)
               for i in range(100)]
    add_entries(sim, entries)
    traffic(sim, "a", [p.ipv4 for p in entries], 1.0, 61.0)
    sim.run(61.0)
    assert len(sent_to(sim, lambda dest: dest == target)) <= 150
    assert sim.hosts["a"].node.counters["limit_probe_addr"] > 0


def test_birthday_probes_at_one_ip_are_bounded():
    """A directory (compromised server) giving twenty symmetric-NAT peers the same observed IP, each
    becoming active 3 s after the previous: an easy side would send 1,024 probes per peer there; at most
    2,048 + 2,048 a minute, so 4,096 in the first minute."""
    sim = honest_pair()
    entries = [PeerInfo(bytes([8, i]) + bytes(30), 200 + i, f"s{i}", f"100.64.2.{i}", "",
                        ((VICTIM, 40000 + i, "observed"), (VICTIM, 40000 + i, "stun-edm")), True) for i in range(20)]
    add_entries(sim, entries)
    for i, p in enumerate(entries):
        traffic(sim, "a", [p.ipv4], 1.0 + 3 * i, 61.0)
    sim.run(61.0)
    claimed = {(VICTIM, 40000 + i) for i in range(20)}     # also ordinary candidates: probed as such
    assert len(sent_to(sim, lambda dest: dest[0] == VICTIM and dest not in claimed)) <= 4096
    assert len(sent_to(sim, lambda dest: dest in claimed)) <= 20 * 10


def test_a_ping_from_an_unverified_source_is_no_candidate_until_it_answers():
    """A sealed ping from b arriving from a spoofed source: a answers it (pong) and pings it once to
    verify, but it is no candidate, no path and not probed again (the old code kept probing it)."""
    sim = honest_pair()
    traffic(sim, "a", ["100.64.0.2"], 1.0, 40.0)
    sim.run(10.0)
    a, b = sim.hosts["a"].node, sim.hosts["b"].node
    spoofed = ("203.0.113.77", 9)
    ping = b.codec.seal(a.public_key, Ping(b"s" * 12, b.public_key), b._wall(sim.now))
    a.receive_datagram(ping, spoofed, sim.now)
    sim.flush()
    assert spoofed not in a.paths[b.public_key].candidates
    assert a.endpoint_of(b.public_key) != spoofed
    sim.run(40.0)
    assert spoofed not in a.paths[b.public_key].candidates
    assert len(sent_to(sim, lambda dest: dest == spoofed)) <= 2      # the pong and one verification ping
    assert not isinstance(a.endpoint_of(b.public_key), RelayEndpoint)   # the real path is untouched


def test_call_me_maybe_endpoints_inside_the_mesh_are_dropped():
    sim = honest_pair()
    a, b = sim.hosts["a"].node, sim.hosts["b"].node
    cmm = b.codec.seal(a.public_key, CallMeMaybe((("100.64.0.2", 41641), ("203.0.113.2", 41641))), b._wall(sim.now))
    a.receive_relay(b.public_key, cmm, sim.now)
    cands = a.paths[b.public_key].candidates
    assert ("203.0.113.2", 41641) in cands and ("100.64.0.2", 41641) not in cands
