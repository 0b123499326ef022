"""Subnet routes never cover where WireGuard is reached (issue 12 review): a peer's approved route holding another
peer's public candidate (its STUN-reflexive or public endpoint) would carry this node's WireGuard UDP to that peer
into the tunnel (the sockets are marked out of it only while an exit node is in use), so the node refuses it and
counts drop_peer_route_candidate; likewise a route over our own reflexive/public address or a server's address.
The check runs again when the set of public candidate addresses changes, and only then."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, DirectoryReset, PeerChanged, PeerInfo, PeerRemoved, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh import peer_entry as PE
from meshwg.mesh import routing as R
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore

N = ipaddress.ip_network
IP = ipaddress.ip_address
CONTROL = ("192.0.2.1:7300",)
WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))
# Global addresses (is_global): the documentation ranges are not, so these stand for the internet. Never sent to.
B_PUBLIC = ("44.1.2.3", 41641, "stun")
ROUTE = "44.1.0.0/16"


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, routes=(), candidates=(), online=True, kind="node") -> PeerInfo:
    return PeerInfo(key(n), n, f"p{n}", f"100.64.0.{n}", f"fd00::{n}", tuple(candidates), online, kind,
                    tuple(routes))


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    core = A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), CONTROL)
    core.apply([Connected(WELCOME), DirectoryReset({})], 0.0)
    return core


def routed(core: A.AgentCore, n: int) -> set:
    """The subnet routes the WireGuard core really routes to peer n (its AllowedIPs less its mesh addresses)."""
    return set(core.node.core.peers[key(n)].allowed_ips) - {N(f"100.64.0.{n}/32"), N(f"fd00::{n}/128")}


def refused(core: A.AgentCore) -> int:
    return core.node.counters["drop_peer_route_candidate"]


# ---- the pure check -------------------------------------------------------------------------------------------
def test_resolve_refuses_a_route_covering_a_protected_address_at_the_edges_too():
    drops = collections.Counter()
    protected = [IP("44.1.2.3"), IP("2606:4700::1")]
    routes = [(b"a", (N("44.1.2.0/30"), N("44.1.2.4/30"), N("44.1.2.3/32"), N("44.1.2.2/32"))),
              (b"b", (N("2606:4700::/32"), N("2606:4701::/32"), N("44.1.2.4/31"), N("44.1.0.0/16")))]
    kept = PE.resolve_routes(routes, drops, protected)
    assert kept == {b"a": (N("44.1.2.4/30"), N("44.1.2.2/32")), b"b": (N("2606:4701::/32"),)}
    # b's 44.1.2.4/31 covers no protected address but a's kept 44.1.2.4/30: an overlap
    assert drops == {"drop_peer_route_candidate": 4, "drop_peer_route_overlap": 1}


def test_a_refused_route_takes_nothing_from_a_later_peer():
    drops = collections.Counter()
    kept = PE.resolve_routes([(b"a", (N("44.0.0.0/8"),)), (b"b", (N("44.7.0.0/16"),))], drops, [IP("44.1.2.3")])
    assert kept == {b"b": (N("44.7.0.0/16"),)} and drops == {"drop_peer_route_candidate": 1}


def test_public_candidate_ips_are_the_global_ones_and_bad_candidates_never_raise():
    p = peer(2, candidates=[B_PUBLIC, ("192.168.50.10", 1, "local"), ("[2606:4700::1]", 2, "public"),
                            ("2001:db8::1", 3, "stun"), ("not-an-ip", 4, "local"), (), 5, None, ("44.1.2.3", 9)])
    assert PE.public_candidate_ips(p) == {IP("44.1.2.3"), IP("2606:4700::1")}
    assert PE.public_candidate_ips(peer(3, candidates=[B_PUBLIC], kind="plain")) == frozenset()


# ---- the agent core -------------------------------------------------------------------------------------------
def test_a_route_covering_peer_bs_reflexive_address_is_refused_and_comes_back_when_b_moves():
    core = new_core()
    core.apply([PeerChanged(peer(1, [ROUTE, "10.77.0.0/24"])), PeerChanged(peer(3, ["10.88.0.0/24"]))], 1.0)
    assert routed(core, 1) == {N(ROUTE), N("10.77.0.0/24")}
    # B appears with its STUN-reflexive address inside A's route: refused at once, the rest stays
    core.apply([PeerChanged(peer(2, candidates=[B_PUBLIC]))], 2.0)
    assert routed(core, 1) == {N("10.77.0.0/24")} and routed(core, 3) == {N("10.88.0.0/24")}
    assert refused(core) >= 1
    # a second node behind the same public address: B moving away keeps the route out
    core.apply([PeerChanged(peer(4, candidates=[("44.1.2.3", 50000, "stun")]))], 3.0)
    core.apply([PeerChanged(peer(2, candidates=[("45.9.9.9", 41641, "stun")]))], 4.0)
    assert routed(core, 1) == {N("10.77.0.0/24")}
    # the last one leaves: the route is routed again
    core.apply([PeerRemoved(key(4))], 5.0)
    assert routed(core, 1) == {N(ROUTE), N("10.77.0.0/24")}
    # B's new address inside the route again, then B's candidate moves away
    core.apply([PeerChanged(peer(2, candidates=[("44.1.200.1", 41641, "public")]))], 6.0)
    assert N(ROUTE) not in routed(core, 1)
    core.apply([PeerChanged(peer(2, candidates=[("45.9.9.9", 41641, "stun")]))], 7.0)
    assert routed(core, 1) == {N(ROUTE), N("10.77.0.0/24")}


def test_the_same_from_a_directory_reset_and_a_route_covering_nothing_passes():
    core = new_core()
    core.apply([DirectoryReset({key(1): peer(1, [ROUTE, "45.0.0.0/24"]),
                                key(2): peer(2, candidates=[B_PUBLIC, ("192.168.1.9", 41641, "local")])})], 1.0)
    assert routed(core, 1) == {N("45.0.0.0/24")} and refused(core) == 1


def test_a_peers_lan_candidate_inside_the_lan_it_advertises_is_no_reason_to_refuse():
    core = new_core()
    core.apply([PeerChanged(peer(1, ["192.168.50.0/24"], candidates=[("192.168.50.10", 41641, "local")]))], 1.0)
    assert routed(core, 1) == {N("192.168.50.0/24")} and refused(core) == 0


def test_our_own_reflexive_and_public_addresses_are_never_covered():
    core = new_core()
    core.apply([PeerChanged(peer(1, [ROUTE, "46.0.0.0/16"]))], 1.0)
    assert routed(core, 1) == {N(ROUTE), N("46.0.0.0/16")}
    core.node.reflexive = (("44.1.9.9", 40000),)     # what a STUN answer sets
    core.apply([], 2.0)
    assert routed(core, 1) == {N("46.0.0.0/16")}
    core.apply([A.SetRouting(R.RoutingChoice(public_endpoint="46.0.1.1:51820"))], 3.0)   # a port forward
    assert routed(core, 1) == set()
    core.node.reflexive = (("47.0.0.1", 40000),)     # our NAT moved
    core.apply([A.SetRouting(R.RoutingChoice())], 4.0)
    assert routed(core, 1) == {N(ROUTE), N("46.0.0.0/16")}


def test_routes_over_a_server_address_are_refused_relay_and_control_too():
    welcome = dataclasses.replace(WELCOME, stun=(("44.5.0.1", 3478),), relay_udp=(("44.6.0.1", 3478),),
                                  relay_tcp=(("44.7.0.1", 443),))
    policy = PE.entry_policy(welcome, ("44.8.0.1:7300",), ())
    drops = collections.Counter()
    routes = PE.peer_routes(peer(1, ["44.5.0.0/16", "44.6.0.0/16", "44.7.0.0/16", "44.8.0.0/16", "44.9.0.0/16"]),
                            policy, drops)
    assert routes == (N("44.9.0.0/16"),) and drops == {"drop_peer_route_server": 4}


def test_a_directory_event_that_moves_no_public_address_resolves_no_route(monkeypatch):
    core = new_core()
    entries = {key(n): peer(n, [f"10.{n}.0.0/16"], candidates=[(f"44.0.0.{n}", 41641, "stun")])
               for n in range(1, 60)}
    core.apply([DirectoryReset(entries)], 1.0)
    calls = collections.Counter()
    real_resolve, real_ips = A.resolve_routes, A.public_candidate_ips

    def resolve(*a, **kw):
        calls["resolve"] += 1
        return real_resolve(*a, **kw)

    def ips(p):
        calls["ips"] += 1
        return real_ips(p)

    monkeypatch.setattr(A, "resolve_routes", resolve)
    monkeypatch.setattr(A, "public_candidate_ips", ips)
    # candidates unchanged (online flips, a private candidate comes and goes), routes unchanged
    core.apply([PeerChanged(peer(7, ["10.7.0.0/16"], [("44.0.0.7", 41641, "stun")], online=False))], 2.0)
    core.apply([PeerChanged(peer(7, ["10.7.0.0/16"], [("44.0.0.7", 41641, "stun"), ("10.1.2.3", 1, "local")]))],
               3.0)
    core.apply([PeerChanged(peer(7, ["10.7.0.0/16"], [("44.0.0.7", 50000, "stun")]))], 4.0)   # same address
    # a new peer behind an address another already names: the set is the same
    core.apply([PeerChanged(peer(80, candidates=[("44.0.0.9", 41641, "stun")]))], 5.0)
    assert calls == {"ips": 4}
    # an address that is new to the set: one resolution
    core.apply([PeerChanged(peer(7, ["10.7.0.0/16"], [("44.0.1.7", 41641, "stun")]))], 6.0)
    assert calls == {"ips": 5, "resolve": 1}
    assert routed(core, 7) == {N("10.7.0.0/16")}
