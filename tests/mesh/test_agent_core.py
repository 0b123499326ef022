"""The join agent's decisions (meshwg/mesh/agent_core.py) on explicit time, with a real MeshNode and no trio.

Each test names what it pins; the figures (1 s between punch requests for one peer, 2 s between cache
writes, a tick every 0.1 s) are the agent's documented behaviour.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from nacl.public import PrivateKey

from meshwg.control.events import (Connected, DirectoryReset, Disconnected, PeerChanged, PeerInfo, PeerRemoved,
                                   PunchFailed, PunchNotice, Removed, SealedMessage, Welcome)
from meshwg.mesh import agent_core as A
from meshwg.mesh.node import LocalEndpointsChanged, MeshNode
from meshwg.mesh.peer_entry import entry_policy, peer_spec
from meshwg.wg.device import WireGuardCore
from mesh_sim import ipv4_packet

CONTROL = ("100.64.9.9:7300", "192.0.2.1:7300")   # a control address inside the mesh prefix, and one outside
WELCOME = Welcome(7, "me", "100.64.0.7", "fd00::7", "100.64.0.0/10", "fd00::/48", (("192.0.2.1", 3478),),
                  (("192.0.2.1", 3478),), (("192.0.2.1", 7301),), 10.0, bytes(32))


def key(n: int) -> bytes:
    return bytes(PrivateKey(bytes([n]) * 32).public_key)


def peer(n: int, *, port: int | None = 4000, online: bool = True) -> PeerInfo:
    cands = () if port is None else ((f"198.51.100.{n}", port, "stun-eim"),)
    return PeerInfo(key(n), n, f"p{n}", f"100.64.0.{n}", f"fd00::{n}", cands, online)


def new_core() -> A.AgentCore:
    r = random.Random(1)
    rb = lambda n: r.getrandbits(8 * n).to_bytes(n, "big")  # noqa: E731
    sk = bytes(PrivateKey(rb(32)))
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), CONTROL)


def of(actions: list, kind) -> list:
    return [a for a in actions if isinstance(a, kind)]


def reset(*peers: PeerInfo) -> DirectoryReset:
    return DirectoryReset({p.key: p for p in peers})


def traffic_to(core: A.AgentCore, n: int, now: float) -> None:
    """An IP packet from the TUN to peer n: the node starts a handshake through the relay."""
    core.node.send_ip_packet(ipv4_packet("100.64.0.7", f"100.64.0.{n}"), now)
    core.node.datagrams_to_send()


# ---- punching ------------------------------------------------------------------------------------
def test_punch_requested_when_a_relayed_peer_gets_traffic():
    core = new_core()
    core.apply([Connected(WELCOME), reset(peer(1, port=None))], 0.0)
    assert of(core.apply([A.Tick()], 0.1), A.RequestPunch) == []     # idle: nothing to punch for
    traffic_to(core, 1, 0.15)
    assert of(core.apply([A.Tick()], 0.2), A.RequestPunch) == [A.RequestPunch(key(1))]
    assert of(core.apply([A.Tick()], 0.3), A.RequestPunch) == []     # asked once, not every tick


def test_punch_requested_when_candidates_appear_at_most_once_a_second():
    core = new_core()
    core.apply([Connected(WELCOME), reset(peer(1, port=None))], 0.0)
    assert of(core.apply([A.Tick()], 0.1), A.RequestPunch) == []
    core.apply([PeerChanged(peer(1, port=4000))], 0.15)              # candidates appear
    assert of(core.apply([A.Tick()], 0.2), A.RequestPunch) == [A.RequestPunch(key(1))]
    core.apply([PeerChanged(peer(1, port=5000))], 0.5)               # changed again within the second
    assert of(core.apply([A.Tick()], 0.6), A.RequestPunch) == []
    core.apply([PeerChanged(peer(1, port=6000))], 1.25)              # and a second later
    assert of(core.apply([A.Tick()], 1.3), A.RequestPunch) == [A.RequestPunch(key(1))]


def test_no_punch_request_while_disconnected_and_the_pending_one_waits():
    core = new_core()
    core.apply([Connected(WELCOME), reset(peer(1, port=None)), Disconnected("broken")], 0.0)
    core.apply([PeerChanged(peer(1))], 0.1)
    assert of(core.apply([A.Tick()], 0.2), A.RequestPunch) == []
    core.apply([Connected(WELCOME)], 0.3)
    assert of(core.apply([A.Tick()], 0.4), A.RequestPunch) == [A.RequestPunch(key(1))]


def test_a_punch_notice_sets_the_freshest_candidates_then_punches():
    core = new_core()
    core.apply([Connected(WELCOME), reset(peer(1, port=4000))], 0.0)
    core.node.datagrams_to_send()
    core.apply([PunchNotice(peer(1, port=5000), "responder")], 1.0)
    probed = {dest for _, dest in core.node.datagrams_to_send() if isinstance(dest, tuple)}
    assert ("198.51.100.1", 5000) in probed and ("198.51.100.1", 4000) not in probed
    assert core.peers[key(1)].candidates == (("198.51.100.1", 5000, "stun-eim"),)
    # the server's punch counts as ours: no request of ours for that peer within the second
    core.apply([PeerChanged(peer(1, port=6000))], 1.1)
    assert of(core.apply([A.Tick()], 1.2), A.RequestPunch) == []


# ---- candidates ----------------------------------------------------------------------------------
C1 = (("192.168.1.5", 5000, "local"),)
C2 = (("192.168.1.5", 5000, "local"), ("192.168.1.6", 5000, "local"))


def test_candidates_registered_then_reported_once_and_again_after_a_lost_connection():
    core = new_core()
    acts = core.apply([A.LocalAddresses(("192.168.1.5",), 5000)], 0.0)
    assert of(acts, A.RegisterCandidates) == [A.RegisterCandidates(C1)] and not of(acts, A.ReportCandidates)
    assert of(core.apply([Connected(WELCOME)], 1.0), A.ReportCandidates) == [A.ReportCandidates(C1)]
    # on its way: more news does not send it twice
    again = core.apply([A.Tick(), LocalEndpointsChanged((), None), A.LocalAddresses(("192.168.1.5",), 5000)], 1.1)
    assert not of(again, A.ReportCandidates) and not of(again, A.RegisterCandidates)
    # the connection broke before it went out: the next connection sends it again
    core.apply([Disconnected("broken")], 2.0)
    assert of(core.apply([Connected(WELCOME)], 3.0), A.ReportCandidates) == [A.ReportCandidates(C1)]
    assert not of(core.apply([A.CandidatesAccepted(C1), A.Tick()], 3.1), A.ReportCandidates)
    # taken: a reconnect registers with them, no report repeats them
    assert not of(core.apply([Disconnected("broken"), Connected(WELCOME)], 4.0), A.ReportCandidates)
    acts = core.apply([A.LocalAddresses(("192.168.1.5", "192.168.1.6"), 5000)], 5.0)
    assert of(acts, A.RegisterCandidates) == [A.RegisterCandidates(C2)]
    assert of(acts, A.ReportCandidates) == [A.ReportCandidates(C2)]


def test_a_new_local_address_restuns_once_a_welcome_named_stun_servers():
    core = new_core()
    core.apply([A.LocalAddresses(("192.168.1.5",), 5000)], 0.0)
    core.apply([Connected(WELCOME)], 0.0)
    core.node.handle_timer(0.0)
    core.node.datagrams_to_send()                      # the first STUN round
    assert not core.apply([A.LocalAddresses(("192.168.1.5",), 5000)], 1.0)  # same: nothing
    acts = core.apply([A.LocalAddresses(("192.168.1.7",), 5000)], 1.0)
    assert A.Log("info", "local addresses changed: re-STUN") in acts
    core.node.handle_timer(1.0)
    assert [d for _, d in core.node.datagrams_to_send() if d == ("192.0.2.1", 3478)]


# ---- the control channel -------------------------------------------------------------------------
def test_a_reconnect_asks_for_a_relay_hello_and_the_first_connect_does_not():
    core = new_core()
    first = core.apply([Connected(WELCOME)], 0.0)
    assert not of(first, A.RelayServerRestarted)
    assert of(first, A.ConfigureRelay) == [A.ConfigureRelay(bytes(32), WELCOME.relay_udp, WELCOME.relay_tcp)]
    assert of(first, A.SetAddresses) == [A.SetAddresses(("100.64.0.7/32", "fd00::7/128"))]
    assert not of(core.apply([Disconnected("silent")], 1.0), A.RelayServerRestarted)
    back = core.apply([Connected(WELCOME)], 2.0)
    assert of(back, A.RelayServerRestarted) == [A.RelayServerRestarted()]
    assert not of(back, A.ConfigureRelay) and not of(back, A.SetAddresses)   # same welcome: nothing to redo
    # a node up from its cache has talked to the relay already: the server's answer is a reconnect too
    cached = new_core()
    cached.apply([A.CacheLoaded(WELCOME, ())], 0.0)
    assert of(cached.apply([Connected(WELCOME)], 1.0), A.RelayServerRestarted) == [A.RelayServerRestarted()]


def test_removal_stops_the_agent_and_other_events_are_harmless():
    core = new_core()
    acts = core.apply([Connected(WELCOME), SealedMessage(key(1), b"hi"), PunchFailed(key(1), "offline"),
                       Removed("expired")], 0.0)
    assert of(acts, A.Stop) == [A.Stop("this node was removed from the mesh (expired)")]
    with pytest.raises(TypeError):
        core.apply(["not an input"], 0.0)


# ---- the directory -------------------------------------------------------------------------------
def test_a_removed_peer_leaves_the_node():
    core = new_core()
    core.apply([Connected(WELCOME), reset(peer(1), peer(2))], 0.0)
    assert set(core.node.specs) == set(core.node.core.peers) == {key(1), key(2)}
    core.apply([PeerRemoved(key(1))], 1.0)
    for held in (core.peers, core.specs, core.node.specs, core.node.paths, core.node.core.peers):
        assert set(held) == {key(2)}
    core.apply([PeerRemoved(key(9))], 2.0)              # unknown: nothing to drop
    assert set(core.node.core.peers) == {key(2)}


def test_every_directory_event_hands_the_node_what_a_full_rebuild_gives():
    """Specs are kept per event, not rebuilt: the node must still get exactly what a full rebuild gives."""
    core = new_core()
    core.apply([Connected(WELCOME)], 0.0)
    events = [reset(peer(1), peer(2), peer(3)), PeerChanged(peer(4)), PeerChanged(peer(2, port=5000)),
              PeerRemoved(key(1)), PeerRemoved(bytes(32)), PunchNotice(peer(3, port=6000), "initiator"),
              PeerChanged(peer(1)), reset(peer(5), peer(2)), PeerChanged(peer(6))]
    for i, ev in enumerate(events):
        core.apply([ev], float(i))
        full = {k: peer_spec(p, entry_policy(WELCOME, CONTROL)) for k, p in core.peers.items()}
        assert core.specs == core.node.specs == full and all(s.addresses for s in full.values())
    assert list(core.specs) == [key(5), key(2), key(6)]


def test_the_cached_netmap_brings_peers_up_before_the_server_answers():
    core = new_core()
    acts = core.apply([A.LocalAddresses(("192.168.1.5",), 5000), A.CacheLoaded(WELCOME, (peer(1), peer(2)), 5000)],
                      0.0)
    assert set(core.node.core.peers) == {key(1), key(2)}
    assert {str(n) for s in core.node.specs.values() for n in s.addresses} == {
        "100.64.0.1/32", "fd00::1/128", "100.64.0.2/32", "fd00::2/128"}
    assert of(acts, A.SetAddresses) and of(acts, A.ConfigureRelay)
    assert set(core.node.mesh_nets) == {ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00::/48")}
    assert core.node.stun_servers == (("192.0.2.1", 3478),)
    # nothing is said to a server that has not answered, and the cache holds all this already
    assert not of(acts, A.ReportCandidates) and not of(acts, A.WriteCache)
    traffic_to(core, 1, 0.05)
    assert not of(core.apply([A.Tick()], 0.1), A.RequestPunch)


def test_entries_outside_the_mesh_or_naming_a_server_are_never_routed():
    """A corrupted entry (from the server or the cache) naming the server's address, or an address outside
    the mesh prefixes, as a peer's must not be routed: every node lost its server that way, for good."""
    evil = PeerInfo(key(1), 1, "evil", "192.0.2.1", "2001:db8::1", (("127.0.0.1", 53, "observed"),), True)
    in_mesh = PeerInfo(key(3), 3, "control", "100.64.9.9", "", (), True)   # the control server's address
    ok = PeerInfo(key(2), 2, "ok", "100.64.0.2", "fd00::2", (), True)
    for first in ([A.CacheLoaded(WELCOME, (evil, in_mesh, ok))], [Connected(WELCOME), reset(evil, in_mesh, ok)]):
        core = new_core()
        core.apply(first, 0.0)
        routed = {str(n) for s in core.node.specs.values() for n in s.addresses}
        assert routed == {"100.64.0.2/32", "fd00::2/128"}
        assert all(not s.observed and not s.candidates for s in core.node.specs.values())
        drops = core.node.counters
        assert drops["drop_peer_addr_server"] == 2 and drops["drop_peer_addr_outside_mesh"] == 1
        assert drops["drop_peer_candidate_addr"] == 1


# ---- the cache -----------------------------------------------------------------------------------
def test_the_cache_is_written_only_after_a_change_and_at_most_every_2s():
    core = new_core()
    assert not of(core.apply([A.LocalAddresses((), 5000)], 0.0), A.WriteCache)   # no welcome: nothing to keep
    acts = core.apply([Connected(WELCOME), reset(peer(1))], 1.0)
    assert of(acts, A.WriteCache) == [A.WriteCache(WELCOME, (peer(1),), 5000)]
    same = [reset(peer(1)), PeerChanged(peer(1)), PeerRemoved(key(9)), Connected(WELCOME), A.Tick()]
    assert not of(core.apply(same, 5.0), A.WriteCache)
    assert of(core.apply([PeerChanged(peer(2))], 6.0), A.WriteCache) == [A.WriteCache(WELCOME, (peer(1), peer(2)), 5000)]
    assert not of(core.apply([PeerRemoved(key(1))], 6.5), A.WriteCache)            # too soon: kept for later
    assert not of(core.apply([A.Tick()], 7.9), A.WriteCache)
    assert of(core.apply([A.Tick()], 8.0), A.WriteCache) == [A.WriteCache(WELCOME, (peer(2),), 5000)]
    assert not of(core.apply([A.Tick()], 20.0), A.WriteCache)


def test_a_cache_the_server_confirms_is_not_rewritten_unless_the_port_moved():
    core = new_core()
    assert not of(core.apply([A.LocalAddresses((), 5000), A.CacheLoaded(WELCOME, (peer(1),), 5000)], 0.0),
                  A.WriteCache)
    assert not of(core.apply([Connected(WELCOME), reset(peer(1)), A.Tick()], 1.0), A.WriteCache)
    moved = new_core()
    acts = moved.apply([A.LocalAddresses((), 5001), A.CacheLoaded(WELCOME, (peer(1),), 5000)], 0.0)
    assert of(acts, A.WriteCache) == [A.WriteCache(WELCOME, (peer(1),), 5001)]

