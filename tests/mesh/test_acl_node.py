"""Access control on the node (issue 13): the accept list travels from the directory entry (PeerInfo) through the
PeerSpec (netmap.diff sees a change) into the peer's filter in the core, at once; a punch notice (which the server
packs without "accept") never lifts a policy."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct

from nacl.public import PrivateKey

from meshwg.control.events import Connected, DirectoryReset, PeerChanged, PeerInfo, PunchNotice, Welcome
from meshwg.mesh import agent_core as A
from meshwg.mesh.netmap import ChangePeer, PeerSpec, diff
from meshwg.mesh.node import MeshNode
from meshwg.wg.device import WireGuardCore

WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32), ("server",))
SSH = ((6, 22, 22, "100.64.0.7/32"),)
WEB = ((6, 443, 443, "100.64.0.7/32"), (1, 0, 65535, "100.64.0.7/32"))


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, accept=None, port: int = 4000) -> PeerInfo:
    return PeerInfo(key(n), n, f"p{n}", f"100.64.0.{n}", f"fd00::{n}", ((f"198.51.100.{n}", port, "stun-eim"),),
                    True, accept=accept, tags=("laptop",))


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), ("192.0.2.1:7300",))


def rules_of(core: A.AgentCore, n: int):
    acl = core.node.core.peers[key(n)].acl
    return None if acl is None else tuple((p, lo, hi, str(net)) for p, lo, hi, net in acl.rules)


def test_netmap_diff_sees_an_accept_change():
    old = PeerSpec.make(key(1), "p1", ["100.64.0.1/32"], accept=SSH)
    [op] = diff({key(1): old}, {key(1): dataclasses.replace(old, accept=WEB)})
    assert isinstance(op, ChangePeer) and op.fields == ("accept",)
    assert diff({key(1): old}, {key(1): PeerSpec.make(key(1), "p1", ["100.64.0.1/32"], accept=SSH[::-1])}) == []


def test_the_directorys_accept_list_is_compiled_into_the_core_and_follows_every_change():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, SSH), key(2): peer(2)})], 0.0)
    assert rules_of(core, 1) == SSH
    assert rules_of(core, 2) is None                                   # no "accept": no policy, no filter
    core.apply([PeerChanged(peer(1, WEB))], 1.0)
    assert set(rules_of(core, 1)) == set(WEB)
    core.apply([PeerChanged(peer(1, ()))], 2.0)
    assert rules_of(core, 1) == ()
    core.apply([PeerChanged(peer(1, None))], 3.0)
    assert rules_of(core, 1) is None


def test_a_punch_notice_keeps_the_directorys_accept_list():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, SSH)})], 0.0)
    core.apply([PunchNotice(peer(1, None, port=5000), "responder")], 1.0)   # the server's packing: no "accept"
    assert rules_of(core, 1) == SSH
    assert core.peers[key(1)].candidates == (("198.51.100.1", 5000, "stun-eim"),)


def test_a_punch_notice_from_an_unknown_peer_under_a_policy_may_open_nothing():
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, SSH)})], 0.0)
    core.apply([PunchNotice(peer(3, None), "responder")], 1.0)
    assert rules_of(core, 3) == ()


def test_bad_rules_in_an_entry_are_counted_on_the_node():
    core = new_core()
    bad = dataclasses.replace(peer(1, SSH), accept_refused=2)
    core.apply([Connected(WELCOME), DirectoryReset({key(1): bad})], 0.0)
    assert core.node.counters["drop_peer_accept_rule"] == 2


def test_the_welcomes_mesh_prefixes_keep_route_entries_off_the_mesh():
    # An exit node's accept list for a guest: the internet (0.0.0.0/0) and tcp/443 on the exit itself. The
    # welcome's prefixes reach the filter, so the route entry does not open port 22 of our own mesh address.
    guest_rules = ((6, 443, 443, "100.64.0.7/32"), (0, 0, 65535, "0.0.0.0/0"))
    core = new_core()
    core.apply([Connected(WELCOME), DirectoryReset({key(1): peer(1, guest_rules)})], 0.0)
    acl = core.node.core.peers[key(1)].acl

    def syn(dst: str, dport: int) -> bytes:
        l4 = struct.pack("!HHIIBBHHH", 40000, dport, 0, 0, 0x50, 0x02, 1000, 0, 0)
        return struct.pack("!BBHHHBB2x4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, 6,
                           ipaddress.IPv4Address("100.64.0.1").packed, ipaddress.IPv4Address(dst).packed) + l4

    assert acl.check_in(syn("100.64.0.7", 443), 1.0) is None
    assert acl.check_in(syn("100.64.0.7", 22), 1.0) == "acl_not_allowed"
    assert acl.check_in(syn("203.0.113.5", 22), 1.0) is None
