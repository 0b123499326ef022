"""Directory entry -> PeerSpec (issue 10 items 4 and 9): nothing outside the mesh is routed into it, no
entry aims our probes at loopback, a server or the mesh, only the server's observation is a birthday target."""

from __future__ import annotations

import collections
import ipaddress

from meshwg.control.client import PeerInfo, Welcome
from meshwg.disco.netcheck import EDM
from meshwg.mesh.peer_entry import entry_policy, host_cidr, peer_spec
from meshwg.mesh.node import RoutesChanged
from mesh_sim import Sim

WELCOME = Welcome(1, "me", "100.64.0.1", "fd00::1", "100.64.0.0/10", "fd00::/48",
                  (("192.0.2.10", 3478), ("192.0.2.11", 3478)), (("192.0.2.10", 3478),), (("192.0.2.12", 7301),),
                  10.0, bytes(32))
POLICY = entry_policy(WELCOME, ("192.0.2.13:7300", "signal.example.org:7300"))


def entry(n: int, ipv4: str, ipv6: str = "", cands=()) -> PeerInfo:
    return PeerInfo(bytes([n]) * 32, n, f"p{n}", ipv4, ipv6, tuple(cands), True)


def test_addresses_outside_the_mesh_or_of_the_servers_are_dropped_and_counted():
    drops = collections.Counter()
    cases = {
        "192.0.2.13": "drop_peer_addr_server",       # control
        "192.0.2.10": "drop_peer_addr_server",       # STUN and relay UDP
        "192.0.2.12": "drop_peer_addr_server",       # relay TCP
        "8.8.8.8": "drop_peer_addr_outside_mesh",
        "10.0.0.1": "drop_peer_addr_outside_mesh",
        "127.0.0.1": "drop_peer_addr_special",
        "224.0.0.1": "drop_peer_addr_special",
        "0.0.0.0": "drop_peer_addr_special",
        "100.64.0.1": "drop_peer_addr_own",
        "not an address": "drop_peer_addr_invalid",
    }
    for i, (addr, reason) in enumerate(cases.items()):
        before = drops[reason]
        spec = peer_spec(entry(i + 2, addr), POLICY, drops)
        assert spec.addresses == () and drops[reason] == before + 1, addr
    spec = peer_spec(entry(40, "100.64.0.40", "2001:db8::40"), POLICY, drops)
    assert spec.addresses == (ipaddress.ip_network("100.64.0.40/32"),)
    assert drops["drop_peer_addr_outside_mesh"] == 3
    # no welcome yet (nothing to trust): nothing is routed
    assert peer_spec(entry(41, "100.64.0.41"), entry_policy(None)).addresses == ()


def test_the_node_never_routes_them():
    """Whatever the directory says, the node's AllowedIPs and routes hold mesh addresses only."""
    sim = Sim()
    sim.add_host("a", lan_ip="192.168.1.2", mesh_ip="100.64.0.1")
    node = sim.hosts["a"].node
    hostile = [entry(2, "192.0.2.13", "fd00::2"), entry(3, "0.0.0.0"), entry(4, "100.64.0.4", "::1"),
               entry(5, "192.0.2.10"), entry(6, "100.64.0.6", "2001:db8::6")]
    node.apply_netmap({p.key: peer_spec(p, POLICY) for p in hostile}, 0.0)
    allowed = {str(n) for peer in node.core.peers.values() for n in peer.allowed_ips}
    assert allowed == {"fd00::2/128", "100.64.0.4/32", "100.64.0.6/32"}
    routes = {str(n) for ev in node.pop_events() if isinstance(ev, RoutesChanged) for n in ev.add}
    assert routes == allowed
    for ip in ("192.0.2.13", "192.0.2.10", "0.0.0.0", "::1", "2001:db8::6"):
        assert node.core.lookup_peer_for(ip) is None, ip


def test_candidates_a_peer_may_not_make_us_probe():
    drops = collections.Counter()
    cands = [("127.0.0.1", 53, "observed"), ("127.0.0.1", 53, "stun-edm"), ("::1", 53, "local"),
             ("0.0.0.0", 9, "local"), ("255.255.255.255", 9, "local"), ("224.0.0.251", 5353, "local"),
             ("ff02::1", 9, "local"), ("100.64.0.9", 41641, "local"), ("fd00::9", 41641, "stun"),
             ("192.0.2.10", 3478, "stun"), ("192.0.2.12", 7301, "local"),   # the server's STUN/relay
             ("198.51.100.9", 4000, "relay?"), ("198.51.100.9", 4001, 7)]
    spec = peer_spec(entry(2, "100.64.0.2", cands=cands), POLICY, drops)
    assert spec.candidates == () and spec.observed == () and spec.nat is None
    assert sum(drops.values()) == len(cands)
    assert drops["drop_peer_candidate_server"] == 2 and drops["drop_peer_candidate_kind"] == 2
    # the same host's other ports stay (a node may run on the server's machine)
    ok = peer_spec(entry(3, "100.64.0.3", cands=[("192.0.2.10", 41641, "stun")]), POLICY)
    assert ok.candidates == (("192.0.2.10", 41641),)


def test_only_the_servers_observation_is_a_birthday_target():
    cands = [("198.51.100.7", 5000, "observed"), ("203.0.113.9", 4000, "stun-edm"), ("192.168.1.5", 4000, "local"),
             ("203.0.113.10", 4000, "observed")]
    spec = peer_spec(entry(2, "100.64.0.2", cands=cands), POLICY)
    assert spec.observed == (("198.51.100.7", 5000),)       # the server sets one: the first
    assert spec.candidates == (("203.0.113.9", 4000), ("192.168.1.5", 4000))
    assert spec.nat == EDM                                   # a hint about the peer's own NAT, nothing more


def test_host_cidr():
    assert host_cidr("100.64.0.3") == "100.64.0.3/32" and host_cidr("fd00::3/48") == "fd00::3/128"
    assert host_cidr("") is None and host_cidr("junk") is None and host_cidr(None) is None
