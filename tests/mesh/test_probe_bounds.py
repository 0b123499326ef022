"""Probing one host is bounded per IP, not only per (ip, port), and never goes into the mesh (in the simulator).

Seen before: the per-address bound (2 pings a second after a burst of 30) was keyed by (ip, port), so
entries naming a victim's IP at many ports got 30 + 2/s per port: each honest node spent its whole
global budget (600 + 300/s) on one host. Spec (node.py's docstring): at most 10 pings a second to one
IP (an IPv6 /64) after a burst of 60, so 60 + 10 x 60 = 660 in a minute, whatever the ports; an address
that answered the same peer lately is exempt (a victim cannot answer a sealed ping). And a peer's
call-me-maybe naming our own mesh address or an unassigned mesh one was pinged (delivered to local
services, or into the tunnels): addresses in the welcome's prefixes get nothing.
"""

from __future__ import annotations

from meshwg.control.client import PeerInfo
from meshwg.disco.messages import CallMeMaybe, Ping
from mesh_sim import Sim
from test_hostile_claims import add_entries, honest_pair, sent_to, traffic

VICTIM = "203.0.113.99"
MESH = ("100.64.0.0/10", "fd00::/48")


def entries_at(addrs, tag: int, count: int) -> list:
    """`count` hostile entries (compromised server, corrupted cache), each naming all of `addrs`."""
    cands = tuple((ip, port, "local") for ip, port in addrs)
    return [PeerInfo(bytes([tag, n]) + bytes(30), 300 + n, f"h{n}", f"100.64.3.{n}", "", cands, True)
            for n in range(count)]


def test_one_ip_on_many_ports_gets_660_pings_a_minute_at_most():
    """60 entries naming VICTIM at the same 15 ports: before, 30 + 2/s per port (2,250 a minute from each
    honest node); now 660."""
    sim = honest_pair()
    entries = entries_at([(VICTIM, 1000 + p) for p in range(15)], 7, 60)
    add_entries(sim, entries)
    traffic(sim, "a", [p.ipv4 for p in entries], 1.0, 61.0)
    traffic(sim, "b", [p.ipv4 for p in entries], 1.0, 61.0)
    sim.run(61.0)
    at_victim = sent_to(sim, lambda d: d[0] == VICTIM)
    for name in ("a", "b"):
        mine = [t for t, n, _ in at_victim if n == name]
        assert mine and min(mine) >= 1.0 and max(mine) <= 61.0
        assert len(mine) <= 660, (name, len(mine))
        assert sim.hosts[name].node.counters["limit_probe_ip"] > 0


def test_one_ipv6_64_on_many_addresses_is_one_ip():
    """40 entries naming the same 15 addresses of one /64 (a LAN, or one host's many addresses): 660 a
    minute in all, as for one IPv4 address."""
    sim = honest_pair()
    entries = entries_at([(f"2001:db8:5:6::{i:x}", 53) for i in range(1, 16)], 9, 40)
    add_entries(sim, entries)
    traffic(sim, "a", [p.ipv4 for p in entries], 1.0, 61.0)
    sim.run(61.0)
    n = len(sent_to(sim, lambda d: d[0].startswith("2001:db8:5:6:")))
    assert 0 < n <= 660


def test_many_real_peers_behind_one_nat_stay_direct():
    """24 peers behind one office NAT (one public IP), all busy with us: their heartbeats (12 a second at
    that IP) exceed the per-IP bound, but addresses that answer are exempt, so every path stays direct."""
    sim = Sim(seed=3)
    sim.add_nat("office", "203.0.113.50", "full")
    sim.add_nat("home", "203.0.113.1", "port-restricted")
    sim.add_host("a", lan_ip="192.168.1.2", nat="home", mesh_ip="100.64.0.1")
    names = [f"o{i}" for i in range(24)]
    for i, name in enumerate(names):
        sim.add_host(name, lan_ip=f"10.1.0.{i + 2}", port=41641 + i, nat="office", mesh_ip=f"100.64.1.{i + 2}")
    sim.join_all()
    for name in names:
        sim.ping_stream("a", name, 0.5, 90.0, every=0.5)
    sim.run(90.0)
    direct = [name for name in names if sim.is_direct("a", name)]
    assert direct == names
    switches = sum(1 for _, ev in sim.hosts["a"].events
                   if type(ev).__name__ == "PathChanged" and ev.reason != "direct path confirmed by pong")
    assert switches <= 24          # the first relay path each; no fall back to the relay afterwards


def _pair_with_prefixes() -> Sim:
    sim = honest_pair()
    for h in sim.hosts.values():
        h.node.set_mesh_prefixes(MESH)   # as the agent does with the welcome
    return sim


def test_call_me_maybe_naming_our_own_or_an_unassigned_mesh_address_gets_nothing():
    sim = _pair_with_prefixes()
    traffic(sim, "a", ["100.64.0.2"], 1.0, 30.0)
    sim.run(5.0)
    a, b = sim.hosts["a"].node, sim.hosts["b"].node
    inside = [("100.64.0.1", 22), ("100.64.77.7", 53), ("fd00::1", 22), ("fd00::99", 53)]
    cmm = b.codec.seal(a.public_key, CallMeMaybe(tuple(inside) + (("203.0.113.2", 41641),)), b._wall(sim.now))
    a.receive_relay(b.public_key, cmm, sim.now)
    sim.flush()
    sim.run(30.0)
    cands = a.paths[b.public_key].candidates
    assert ("203.0.113.2", 41641) in cands and not set(inside) & set(cands)
    assert sent_to(sim, lambda d: d in inside) == []
    assert a.counters["drop_disco_cmm_mesh_endpoint"] == len(inside)


def test_a_ping_from_a_mesh_source_is_not_answered_nor_learned():
    """A sealed ping from b arriving from a mesh address (through a tunnel, or from this host): no pong,
    no verification ping, no candidate."""
    sim = _pair_with_prefixes()
    traffic(sim, "a", ["100.64.0.2"], 1.0, 30.0)
    sim.run(5.0)
    a, b = sim.hosts["a"].node, sim.hosts["b"].node
    for n, src in enumerate((("100.64.0.1", 5353), ("100.64.9.9", 9), ("fd00::1", 22))):
        ping = b.codec.seal(a.public_key, Ping(bytes([n]) * 12, b.public_key), b._wall(sim.now))
        a.receive_datagram(ping, src, sim.now)
    sim.flush()
    sim.run(30.0)
    assert sent_to(sim, lambda d: d[0] in ("100.64.0.1", "100.64.9.9", "fd00::1")) == []
    assert not {c[0] for c in a.paths[b.public_key].candidates} & {"100.64.0.1", "100.64.9.9", "fd00::1"}
    assert a.counters["drop_disco_ping_mesh_source"] == 3
