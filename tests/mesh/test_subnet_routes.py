"""Subnet routes and exit nodes, node side (issue 12), on explicit time: which peer routes this node accepts
(meshwg/mesh/peer_entry.py), what the agent core does with them and with the user's choice
(meshwg/mesh/agent_core.py, meshwg/mesh/routing.py). Bounds are the issue's: routes overlapping the mesh, a
server address or our LAN are never routed; of two peers' overlapping routes the first keeps it; a default
route only through the exit node this node chose."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest
from nacl.public import PrivateKey

from meshwg.control.client import _peer_untrusted, entry_routes_untrusted
from meshwg.control.events import Connected, DirectoryReset, Disconnected, PeerChanged, PeerInfo, PeerRemoved, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh import routing as R
from meshwg.mesh.node import MeshNode, RoutesChanged
from meshwg.mesh.peer_entry import entry_policy, peer_spec
from meshwg.signaling import protocol as P
from meshwg.wg.device import WireGuardCore

N = ipaddress.ip_network
CONTROL = ("192.0.2.1:7300",)
WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))
LAN = ("192.168.1.0/24",)
DEFAULTS = {N("0.0.0.0/0"), N("::/0")}


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, routes=(), exit_node=False, name=None, kind="node") -> PeerInfo:
    return PeerInfo(key(n), n, name or f"p{n}", f"100.64.0.{n}", f"fd00::{n}", (), True, kind, tuple(routes),
                    exit_node)


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), CONTROL)


def of(actions, kind) -> list:
    return [a for a in actions if isinstance(a, kind)]


def allowed(core: A.AgentCore, n: int) -> set:
    """What the WireGuard core really routes to peer n (its AllowedIPs)."""
    return set(core.node.core.peers[key(n)].allowed_ips)


def mesh_of(n: int) -> set:
    return {N(f"100.64.0.{n}/32"), N(f"fd00::{n}/128")}


# ---- the entry policy ------------------------------------------------------------------------------------------
def test_routes_accepted_and_the_forbidden_ones_dropped_and_counted():
    policy = entry_policy(WELCOME, CONTROL, LAN)
    drops = collections.Counter()
    p = peer(1, ["10.77.0.0/24", "fd77::/64",
                 "100.64.0.0/16",      # inside the mesh prefix
                 "100.0.0.0/8",        # covers the mesh prefix
                 "192.0.2.0/24",       # holds the control/STUN/relay server
                 "192.168.0.0/16",     # covers our LAN
                 "192.168.1.128/25",   # inside our LAN
                 "127.0.0.0/8", "fe80::/64",
                 "10.88.0.1/24"])      # not canonical (host bits): a corrupted entry
    spec = peer_spec(p, policy, drops)
    assert set(spec.addresses) == mesh_of(1) | {N("10.77.0.0/24"), N("fd77::/64")}
    assert drops == {"drop_peer_route_mesh": 2, "drop_peer_route_server": 1, "drop_peer_route_lan": 2,
                     "drop_peer_route_special": 2, "drop_peer_route_invalid": 1}


def test_a_default_route_is_never_a_subnet_route_and_a_plain_peer_routes_nothing():
    policy = entry_policy(WELCOME, CONTROL, LAN)
    drops = collections.Counter()
    assert set(peer_spec(peer(1, ["0.0.0.0/0"]), policy, drops).addresses) == mesh_of(1)
    assert set(peer_spec(peer(2, ["10.1.0.0/16"], kind="plain"), policy, drops).addresses) == mesh_of(2)
    assert drops == {"drop_peer_route_default": 1, "drop_peer_route_plain": 1}


def test_exit_routes_only_for_the_chosen_peer_that_is_an_approved_exit_node():
    policy = entry_policy(WELCOME, CONTROL, LAN)
    assert set(peer_spec(peer(1, exit_node=True), policy, exit_node=True).addresses) == mesh_of(1) | DEFAULTS
    assert set(peer_spec(peer(1, exit_node=True), policy, exit_node=False).addresses) == mesh_of(1)  # not chosen
    assert set(peer_spec(peer(1, exit_node=False), policy, exit_node=True).addresses) == mesh_of(1)  # not approved


def test_entry_routes_from_the_wire_drop_bad_prefixes_alone():
    assert entry_routes_untrusted(["10.0.0.0/8", "x", 5, "10.1.0.1/16", "0.0.0.0/0", "fd00:1::/64", "10.0.0.0/8"]) \
        == ("10.0.0.0/8", "fd00:1::/64")
    assert entry_routes_untrusted("10.0.0.0/8") == () and entry_routes_untrusted(None) == ()
    assert entry_routes_untrusted(["10.0.0.0/8"] * 65) == ()
    raw = P.pack_entry({"key": key(1), "id": 1, "name": "home", "ipv4": "100.64.0.1", "ipv6": "", "online": True,
                        "routes": ["10.77.0.0/24", "junk"], "exit": True})
    p = _peer_untrusted(raw)
    assert p.routes == ("10.77.0.0/24",) and p.exit_node is True
    old = _peer_untrusted(P.pack_entry({"key": key(1), "id": 1, "name": "home", "ipv4": "100.64.0.1", "ipv6": "",
                                        "online": True, "exit": 1}))
    assert old.routes == () and old.exit_node is False   # only a real true makes an exit node


# ---- the agent core --------------------------------------------------------------------------------------------
def test_approved_routes_reach_allowed_ips_and_os_routes_and_leave_again():
    core = new_core()
    core.apply([A.LocalAddresses(("192.168.1.5",), 5000, LAN), Connected(WELCOME), DirectoryReset({})], 0.0)
    core.node.pop_events()
    core.apply([PeerChanged(peer(1, ["10.77.0.0/24"]))], 1.0)
    assert allowed(core, 1) == mesh_of(1) | {N("10.77.0.0/24")}
    added = {n for ev in core.node.pop_events() if isinstance(ev, RoutesChanged) for n in ev.add}
    assert N("10.77.0.0/24") in added
    core.apply([PeerChanged(peer(1, []))], 2.0)                 # approval withdrawn
    assert allowed(core, 1) == mesh_of(1)
    removed = {n for ev in core.node.pop_events() if isinstance(ev, RoutesChanged) for n in ev.remove}
    assert removed == {N("10.77.0.0/24")}


def test_overlapping_routes_of_two_peers_the_first_keeps_it_whatever_the_arrival_order():
    for order in ((1, 2), (2, 1)):
        core = new_core()
        core.apply([Connected(WELCOME), DirectoryReset({})], 0.0)
        entries = {1: peer(1, ["10.77.0.0/24"]), 2: peer(2, ["10.77.0.0/16", "10.99.0.0/24"])}
        for t, n in enumerate(order):
            core.apply([PeerChanged(entries[n])], 1.0 + t)
        assert allowed(core, 1) == mesh_of(1) | {N("10.77.0.0/24")}
        assert allowed(core, 2) == mesh_of(2) | {N("10.99.0.0/24")}
        assert core.node.counters["drop_peer_route_overlap"] >= 1
        # the first leaves: the other's route is routed at once
        core.apply([PeerRemoved(key(1))], 5.0)
        assert allowed(core, 2) == mesh_of(2) | {N("10.77.0.0/16"), N("10.99.0.0/24")}


def test_our_lan_appearing_later_drops_a_route_already_routed():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, ["192.168.1.0/24"])})], 0.0)
    assert N("192.168.1.0/24") in allowed(core, 1)
    core.apply([A.LocalAddresses(("192.168.1.5",), 5000, LAN)], 1.0)
    assert allowed(core, 1) == mesh_of(1)


def test_exit_node_only_the_chosen_approved_one_and_follows_changes():
    core = new_core()
    acts = core.apply([A.SetRouting(R.RoutingChoice(exit_node="home")), Connected(WELCOME),
                       DirectoryReset({key(1): peer(1, exit_node=True, name="home"),
                                       key(2): peer(2, exit_node=True, name="other")})], 0.0)
    assert allowed(core, 1) == mesh_of(1) | DEFAULTS and allowed(core, 2) == mesh_of(2)
    assert of(acts, A.UseExitNode) == [A.UseExitNode(key(1), "home")]
    # approval withdrawn: no default route any more, policy routing off
    acts = core.apply([PeerChanged(peer(1, exit_node=False, name="home"))], 1.0)
    assert allowed(core, 1) == mesh_of(1) and of(acts, A.UseExitNode) == [A.UseExitNode(None, None)]
    acts = core.apply([PeerChanged(peer(1, exit_node=True, name="home"))], 2.0)
    assert allowed(core, 1) == mesh_of(1) | DEFAULTS and of(acts, A.UseExitNode) == [A.UseExitNode(key(1), "home")]
    # the user picks another at runtime, then none
    acts = core.apply([A.SetRouting(R.RoutingChoice(exit_node="other"))], 3.0)
    assert allowed(core, 1) == mesh_of(1) and allowed(core, 2) == mesh_of(2) | DEFAULTS
    assert of(acts, A.UseExitNode) == [A.UseExitNode(key(2), "other")]
    acts = core.apply([A.SetRouting(R.RoutingChoice())], 4.0)
    assert allowed(core, 2) == mesh_of(2) and of(acts, A.UseExitNode) == [A.UseExitNode(None, None)]
    # an unrelated peer's change costs no exit action
    assert not of(core.apply([PeerChanged(peer(3))], 5.0), A.UseExitNode)


def test_routes_reported_after_every_welcome_and_on_change_while_connected():
    core = new_core()
    choice = R.RoutingChoice(("10.77.0.0/24",), True)
    acts = core.apply([A.SetRouting(choice)], 0.0)
    assert of(acts, A.Advertise) == [A.Advertise(choice)] and not of(acts, A.ReportRoutes)  # not connected yet
    acts = core.apply([Connected(WELCOME)], 1.0)
    assert of(acts, A.ReportRoutes) == [A.ReportRoutes(("10.77.0.0/24",), True)]
    acts = core.apply([A.SetRouting(R.RoutingChoice(("10.77.0.0/24", "10.78.0.0/24"), False))], 2.0)
    assert of(acts, A.ReportRoutes) == [A.ReportRoutes(("10.77.0.0/24", "10.78.0.0/24"), False)]
    # the exit node we use is no advertisement: nothing to report, nothing to forward
    acts = core.apply([A.SetRouting(core.routing.merged(exit_node="home"))], 3.0)
    assert not of(acts, A.ReportRoutes) and not of(acts, A.Advertise)
    core.apply([Disconnected("broken")], 4.0)
    assert not of(core.apply([A.SetRouting(R.RoutingChoice())], 5.0), A.ReportRoutes)
    assert of(core.apply([Connected(WELCOME)], 6.0), A.ReportRoutes) == [A.ReportRoutes((), False)]


def test_routing_refused_names_the_value():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, name="home")})], 0.0)
    assert core.routing_refused(R.RoutingChoice(("100.64.8.0/24",))) == \
        "route 100.64.8.0/24 overlaps the mesh prefix 100.64.0.0/10"
    assert core.routing_refused(R.RoutingChoice(exit_node="nas")) == "no peer named 'nas'"
    assert core.routing_refused(R.RoutingChoice(exit_node="me")) == "exit node 'me' is this node"
    assert core.routing_refused(R.RoutingChoice(("10.77.0.0/24",), True, "home")) is None


@pytest.mark.parametrize("text, err", [("10.0.0.1/24", "bad CIDR '10.0.0.1/24' (host bits set: did you mean 10.0.0.0/24?)"),
                                       ("10.0.0.0/33", "bad CIDR '10.0.0.0/33'"),
                                       ("10.1.0.0/16,nope", "bad CIDR 'nope'"),
                                       ("0.0.0.0/0", "bad CIDR '0.0.0.0/0' (a default route: use --advertise-exit-node)")])
def test_advertised_routes_parse_errors_name_the_value(text, err):
    with pytest.raises(ValueError) as exc:
        R.parse_advertised(text)
    assert str(exc.value) == err


def test_choice_round_trips_and_a_corrupt_file_is_the_default():
    c = R.RoutingChoice(("10.77.0.0/24",), True, "home", False)
    assert R.choice_from_json_untrusted(c.to_json()) == c
    assert R.choice_from_json_untrusted({"advertise_routes": ["bad"]}) == R.RoutingChoice()
    assert R.choice_from_json_untrusted([1]) == R.RoutingChoice()
