"""The exit node's default routes' MTU (issue 16): while the exit node in use is reached through the relay, all
internet traffic through it is relayed, so the exit policy table's default routes carry the relayed MTU (1375 at the
interface's 1420: 1420 + 32 + 45 + 28 would be over 1500), and lose it once the exit node goes direct, or is no
longer the one in use. Decided by meshwg.mesh.path_mtu and the agent core (SetExitMtus) on explicit time."""

from __future__ import annotations

import dataclasses
import random

from nacl.public import PrivateKey

from meshwg.control.events import Connected, DirectoryReset, PeerChanged, PeerInfo
from meshwg.mesh import agent_core as A
from meshwg.mesh import path_mtu
from meshwg.mesh.node import MeshNode, RelayEndpoint
from meshwg.mesh.routing import RoutingChoice
from meshwg.wg.device import WireGuardCore

WELCOME = A.Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                    (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))
RELAYED = {"0.0.0.0/0": 1375, "::/0": 1375}


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def exit_peer(n: int, name: str) -> PeerInfo:
    return PeerInfo(key(n), n, name, f"100.64.0.{n}", f"fd00::{n}", (), True, exit_node=True)


def new_core() -> tuple[A.AgentCore, dict]:
    """A core whose node reports the paths in the returned dict (key -> endpoint; absent: the relay)."""
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    core = A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb))
    paths: dict = {}
    core.node.endpoint_of = lambda k: paths.get(k, RelayEndpoint(k))   # the node's path, as the test sets it
    return core, paths


def exit_actions(actions: list) -> list[dict]:
    return [dict(a.mtus) for a in actions if isinstance(a, A.SetExitMtus)]


# ---- the pure decision ---------------------------------------------------------------------------
def test_exit_mtus_only_for_the_exit_node_in_use_while_it_is_relayed():
    assert path_mtu.exit_mtus(key(1), {key(1), key(2)}, 1420) == RELAYED
    assert path_mtu.exit_mtus(key(1), {key(2)}, 1420) == {}             # direct
    assert path_mtu.exit_mtus(None, {key(1)}, 1420) == {}               # no exit node in use
    assert path_mtu.exit_mtus(key(1), {key(1)}, 1500) == {"0.0.0.0/0": 1455, "::/0": 1455}
    # The kernel refuses an IPv6 route MTU under 1280: the IPv6 default keeps the interface's.
    assert path_mtu.exit_mtus(key(1), {key(1)}, 1300) == {"0.0.0.0/0": 1255}


# ---- the agent core ------------------------------------------------------------------------------
def test_relayed_exit_node_gets_1375_after_use_exit_node_then_none_when_direct_and_again_when_relayed():
    core, paths = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): exit_peer(1, "home")})], 0.0)
    acts = core.apply([A.SetRouting(RoutingChoice(exit_node="home"))], 0.1)
    kinds = [type(a) for a in acts]
    assert exit_actions(acts) == [RELAYED]
    assert kinds.index(A.UseExitNode) < kinds.index(A.SetExitMtus)      # the table exists by then
    assert exit_actions(core.apply([A.Tick()], 0.2)) == []              # unchanged: nothing again

    paths[key(1)] = ("198.51.100.1", 41641)                             # the exit node goes direct
    assert exit_actions(core.apply([A.Tick()], 0.3)) == [{}]
    assert core.exit_mtus == {}
    del paths[key(1)]                                                   # back on the relay
    assert exit_actions(core.apply([A.Tick()], 0.4)) == [RELAYED]


def test_exit_node_changed_unset_or_withdrawn_leaves_no_mtu():
    core, paths = new_core()
    peers = {key(1): exit_peer(1, "home"), key(2): exit_peer(2, "office")}
    paths[key(2)] = ("198.51.100.2", 41641)                             # office is direct, home relayed
    core.apply([Connected(WELCOME), DirectoryReset(peers), A.SetRouting(RoutingChoice(exit_node="home"))], 0.0)
    assert core.exit_mtus == RELAYED
    # another exit node, direct: the relayed home is still a peer (its own routes are reduced), not the exit
    acts = core.apply([A.SetRouting(RoutingChoice(exit_node="office"))], 0.1)
    assert exit_actions(acts) == [{}]
    assert "100.64.0.1/32" in core.route_mtus                           # home's mesh routes: still 1375
    assert exit_actions(core.apply([A.SetRouting(RoutingChoice(exit_node="home"))], 0.2)) == [RELAYED]
    assert exit_actions(core.apply([A.SetRouting(RoutingChoice())], 0.3)) == [{}]   # --exit-node none
    core.apply([A.SetRouting(RoutingChoice(exit_node="home"))], 0.4)
    assert core.exit_mtus == RELAYED
    acts = core.apply([PeerChanged(dataclasses.replace(peers[key(1)], exit_node=False))], 0.5)   # not approved
    assert [a.key for a in acts if isinstance(a, A.UseExitNode)] == [None] and exit_actions(acts) == [{}]


def test_the_exit_mtu_follows_the_interface_mtu():
    core, _ = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): exit_peer(1, "home")}),
                A.SetRouting(RoutingChoice(exit_node="home"))], 0.0)
    core.node.core.mtu = 1300                                           # `ip link set mtu 1300`, followed
    assert exit_actions(core.apply([A.Tick()], 0.1)) == [{"0.0.0.0/0": 1255}]
