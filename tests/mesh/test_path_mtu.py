"""The relayed peers' route MTU (issue 16): which mesh routes carry a reduced MTU, decided by meshwg.mesh.path_mtu and
the agent core on explicit time. A relayed datagram carries the relay's 45 B SEND header on top of WireGuard's, so
at the default interface MTU 1420 the routes to a peer reached through the relay carry mtu 1375; direct peers keep
the interface's (no SetRouteMtus entry)."""

from __future__ import annotations

import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, DirectoryReset, PeerInfo, PeerRemoved
from meshwg.mesh import agent_core as A
from meshwg.mesh import path_mtu
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.node import MeshNode, RelayEndpoint
from meshwg.wg.device import WireGuardCore
from mesh_sim import Sim

WELCOME = A.Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                    (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb))


def mtu_actions(actions: list) -> list[dict]:
    return [dict(a.mtus) for a in actions if isinstance(a, A.SetRouteMtus)]


# ---- the pure decision ---------------------------------------------------------------------------
def test_route_mtus_reduce_only_the_relayed_peers_routes():
    specs = {key(1): PeerSpec.make(key(1), "relayed", ["100.64.0.1/32", "fd00::1/128", "192.168.5.0/24"]),
             key(2): PeerSpec.make(key(2), "direct", ["100.64.0.2/32", "fd00::2/128"]),
             key(3): PeerSpec.make(key(3), "exit", ["100.64.0.3/32", "0.0.0.0/0", "::/0"])}
    assert path_mtu.route_mtus(specs, {key(1), key(3), key(9)}, 1420) == {
        "100.64.0.1/32": 1375, "fd00::1/128": 1375, "192.168.5.0/24": 1375, "100.64.0.3/32": 1375}
    assert path_mtu.route_mtus(specs, set(), 1420) == {}
    # IPv6 refuses a route MTU under 1280: such a prefix keeps the interface's.
    assert path_mtu.route_mtus(specs, {key(1)}, 1300) == {"100.64.0.1/32": 1255, "192.168.5.0/24": 1255}


def test_relayed_keys_are_those_on_a_relay_endpoint_or_none_yet():
    specs = {key(n): None for n in (1, 2, 3)}
    eps = {key(1): RelayEndpoint(key(1)), key(2): ("198.51.100.2", 4000)}
    assert path_mtu.relayed_keys(specs, eps.get, RelayEndpoint) == {key(1), key(3)}


# ---- the agent core: path, plain peers, removal, interface MTU --------------------------------------
def test_a_relayed_peer_gets_1375_then_none_once_direct_then_1375_again_when_the_direct_path_is_cut():
    sim = Sim()
    a = sim.add_host("a", lan_ip="10.0.0.1", mesh_ip="100.64.0.1")
    b = sim.add_host("b", lan_ip="10.0.0.2", mesh_ip="100.64.0.2")
    sim.join_all()
    core = A.AgentCore(a.node)
    b_key = b.node.public_key
    assert isinstance(a.node.endpoint_of(b_key), RelayEndpoint)            # every peer starts on the relay
    assert mtu_actions(core.apply([A.Tick()], sim.now)) == [{"100.64.0.2/32": 1375}]
    assert mtu_actions(core.apply([A.Tick()], sim.now)) == []              # unchanged: nothing again

    sim.ping_stream("a", "b", 1.0, 100.0, every=0.1)                     # traffic: a direct path is sought
    sim.run(10.0)
    assert sim.is_direct("a", "b")
    assert mtu_actions(core.apply([A.Tick()], sim.now)) == [{}]            # direct: the full MTU back
    assert core.route_mtus == {}

    sim.blocked.add(frozenset({"a", "b"}))                                 # the direct path is cut
    sim.run(sim.now + 10.0)
    assert not sim.is_direct("a", "b")
    assert mtu_actions(core.apply([A.Tick()], sim.now)) == [{"100.64.0.2/32": 1375}]

    a.node.apply_netmap({}, sim.now)                                       # the peer is removed
    assert mtu_actions(core.apply([A.Tick()], sim.now)) == [{}]


def test_directory_peers_relayed_and_plain_are_reduced_with_their_subnet_routes_and_removed_with_them():
    core = new_core()
    node_peer = PeerInfo(key(1), 1, "home", "100.64.0.1", "fd00::1", (), True, routes=("192.168.5.0/24",))
    phone = PeerInfo(key(2), 2, "phone", "100.64.0.2", "fd00::2", (), True, kind="plain")
    acts = core.apply([Connected(WELCOME), DirectoryReset({key(1): node_peer, key(2): phone})], 0.0)
    assert mtu_actions(acts) == [{"100.64.0.1/32": 1375, "fd00::1/128": 1375, "192.168.5.0/24": 1375,
                                  "100.64.0.2/32": 1375, "fd00::2/128": 1375}]
    acts = core.apply([PeerRemoved(key(1))], 0.1)
    assert mtu_actions(acts) == [{"100.64.0.2/32": 1375, "fd00::2/128": 1375}]
    # A plain peer that reaches us directly (`plain add --direct`: WireGuard roams to its address) keeps 1420.
    core.node.core.set_endpoint(core.node.core.peers[key(2)], ("198.51.100.9", 51820))
    assert mtu_actions(core.apply([A.Tick()], 0.2)) == [{}]


def test_the_reduced_mtu_follows_the_interface_mtu():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): PeerInfo(key(1), 1, "p", "100.64.0.1", "fd00::1", (),
                                                                   True)})], 0.0)
    core.node.core.mtu = 1500                                              # `ip link set mtu 1500`, followed
    assert mtu_actions(core.apply([A.Tick()], 0.1)) == [{"100.64.0.1/32": 1455, "fd00::1/128": 1455}]
