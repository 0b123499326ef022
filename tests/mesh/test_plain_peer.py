"""Plain WireGuard peers on the node side (issue 12): a stock WireGuard device (the "phone", here a bare
WireGuardCore) reaches a mesh node through the relay's plain port, or directly at the node's public endpoint
(`plain add --direct`). The relay hands its datagrams to the node as RECVs from PLAIN_SOURCE (it cannot know the
phone's key) and routes the node's SENDs to the phone's key or to PLAIN_SOURCE by receiver index. The node holds
the phone as an ordinary core peer with roaming on: its endpoint follows the phone, (ip, port) when it comes
directly, RelayEndpoint(PLAIN_SOURCE) through the relay (RelayEndpoint(phone key) before it first speaks). The
node runs no discovery for it."""

from __future__ import annotations

import collections
import ipaddress
import random

from nacl.public import PrivateKey

from mesh_sim import ipv4_packet
from meshwg.control.events import Connected, PeerChanged, PeerInfo, PunchNotice, Welcome
from meshwg.disco.messages import DiscoCodec, Ping
from meshwg.disco.peer_paths import PeerPaths
from meshwg.mesh import agent_core as A
from meshwg.mesh import demux
from meshwg.mesh.netmap import ChangePeer, PeerSpec, diff
from meshwg.mesh.node import MeshNode, RelayEndpoint
from meshwg.mesh.peer_entry import entry_policy, peer_spec
from meshwg.signaling.relay_wire import PLAIN_SOURCE
from meshwg.wg.device import WireGuardCore

NODE_IP, PHONE_IP, OTHER_IP = "100.64.0.1", "100.64.0.50", "100.64.0.2"
STUN = ("192.0.2.1", 3478)
SERVER = ("192.0.2.1", 51820)   # the phone's Endpoint: the server's plain port (opaque to the core)
HOME_PUBLIC = ("198.51.100.5", 41641)   # the phone's Endpoint with --direct: the node's port forward
PHONE_ADDR = ("203.0.113.77", 5000)     # where the phone's direct datagrams come from, as the node sees them
WELCOME = Welcome(1, "home", NODE_IP, "fd00::1", "100.64.0.0/10", "fd00::/48", (STUN,), (STUN,),
                  (("192.0.2.1", 7301),), 10.0, bytes(32))


def rng(seed):
    r = random.Random(seed)
    return lambda n: r.getrandbits(8 * n).to_bytes(n, "big")


def keypair(n):
    sk = PrivateKey(bytes([n]) * 32)
    return bytes(sk), bytes(sk.public_key)


class Lab:
    """One node and one phone, joined by a relay that behaves as the server's: SENDs to a plain key or to
    PLAIN_SOURCE reach the phone (routed by index), SENDs to any other key reach no phone."""

    def __init__(self, seed=1, under_load=False):
        rb = rng(seed)
        self.node_sk, self.node_pk = keypair(1)
        self.phone_sk, self.phone_pk = keypair(50)
        self.node = MeshNode(WireGuardCore(private_key=self.node_sk, random_bytes=rb), self.node_sk, rb)
        self.node.set_mesh_prefixes(("100.64.0.0/10", "fd00::/48"))
        self.node.set_stun_servers([STUN], 0.0)
        self.phone = WireGuardCore(private_key=self.phone_sk, random_bytes=rng(seed + 100))
        p = self.phone.add_peer(self.node_pk)
        self.phone.set_allowed_ips(p, [ipaddress.ip_network(f"{NODE_IP}/32")])
        self.phone.set_endpoint(p, SERVER)
        self.sent: list = []          # every (data, dest) the node emitted
        self.plain_keys = {self.phone_pk}
        self.phone_addr = PHONE_ADDR  # the phone's source when it sends to HOME_PUBLIC
        self.now = 0.0

    def phone_endpoint(self, ep):
        """Where the phone sends: SERVER (the relay's plain port) or HOME_PUBLIC (directly)."""
        self.phone.set_endpoint(self.phone.peers[self.node_pk], ep)

    def netmap(self, **extra):
        specs = {self.phone_pk: PeerSpec.make(self.phone_pk, "phone", [f"{PHONE_IP}/32"], plain=True)}
        specs.update(extra)
        self.node.apply_netmap(specs, self.now)

    def node_outputs(self):
        out = self.node.datagrams_to_send()
        self.sent += out
        return out

    def exchange(self):
        """Carry datagrams both ways until both sides are quiet."""
        for _ in range(50):
            moved = False
            for data, ep in self.phone.datagrams_to_send():
                if ep == HOME_PUBLIC:
                    self.node.receive_wireguard(data, self.phone_addr, self.now)
                else:
                    self.node.receive_relay(PLAIN_SOURCE, data, self.now)
                moved = True
            for data, dest in self.node_outputs():
                if isinstance(dest, RelayEndpoint) and (dest.peer_key in self.plain_keys
                                                        or dest.peer_key == PLAIN_SOURCE):
                    self.phone.receive_datagram(data, SERVER, self.now)
                    moved = True
                elif dest == self.phone_addr:
                    self.phone.receive_datagram(data, HOME_PUBLIC, self.now)
                    moved = True
            if not moved:
                return
        raise AssertionError("no quiet point")

    def step(self, until, every=0.5):
        while self.now < until:
            self.now = round(self.now + every, 6)
            self.node.handle_timer(self.now)
            self.phone.handle_timer(self.now)
            self.exchange()

    def to_phone(self):
        return [(d, e) for d, e in self.sent if isinstance(e, RelayEndpoint) and e.peer_key in (self.phone_pk,
                                                                                                 PLAIN_SOURCE)]


def ping_both_ways(lab):
    lab.phone.send_ip_packet(ipv4_packet(PHONE_IP, NODE_IP, b"ping" * 10), lab.now)
    lab.exchange()
    got = lab.node.tun_packets_to_write()
    lab.node.send_ip_packet(ipv4_packet(NODE_IP, PHONE_IP, b"pong" * 10), lab.now)
    lab.exchange()
    return got, lab.phone.tun_packets_to_write()


def handshake_and_ping(lab):
    """One step of protocol time, then a ping each way; both arrive. The node's core peer for the phone."""
    lab.step(1.0)
    to_node, to_phone = ping_both_ways(lab)
    assert to_node == [ipv4_packet(PHONE_IP, NODE_IP, b"ping" * 10)]
    assert to_phone == [ipv4_packet(NODE_IP, PHONE_IP, b"pong" * 10)]
    peer = lab.node.core.peers[lab.phone_pk]
    assert peer.last_handshake_wall is not None
    return peer


def test_phone_handshakes_through_the_relay_and_packets_flow_both_ways():
    lab = Lab()
    lab.netmap()
    lab.node.set_local_endpoints([("192.168.1.2", 41641)], 0.0)  # would send call-me-maybes to a mesh peer
    peer = handshake_and_ping(lab)
    assert lab.node.core.lookup_peer_for(PHONE_IP) is peer
    # The response and the data went back the way the phone came: to the relay's PLAIN_SOURCE, routed by index.
    assert peer.endpoint == RelayEndpoint(PLAIN_SOURCE) and lab.node.endpoint_of(lab.phone_pk) == peer.endpoint
    assert peer.roaming and peer.last_rx_addr == RelayEndpoint(PLAIN_SOURCE)
    assert lab.node.counters["recv_relay_plain"] >= 2
    assert all(isinstance(e, RelayEndpoint) for _, e in lab.sent if e != STUN)   # nothing went direct


def test_the_node_runs_no_discovery_for_the_phone():
    lab = Lab()
    lab.netmap()
    lab.node.set_local_endpoints([("192.168.1.2", 41641)], 0.0)
    lab.node.punch(lab.phone_pk, 0.0)                           # a (hostile or confused) punch notice
    lab.step(1.0)
    ping_both_ways(lab)
    lab.step(60.0)                                              # keepalives, STUN rounds, path timers
    ping_both_ways(lab)
    assert lab.to_phone()
    for data, dest in lab.to_phone():                           # WireGuard only, never disco
        assert demux.classify(data) == demux.WIREGUARD
    for data, dest in lab.sent:
        assert demux.classify(data) != demux.DISCO
        assert not isinstance(dest, RelayEndpoint) or dest.peer_key in (lab.phone_pk, PLAIN_SOURCE)
        if not isinstance(dest, RelayEndpoint):
            assert dest == STUN                                 # STUN goes to the server, never to the phone
    c = lab.node.counters
    assert c["send_disco_ping"] == 0 and c["send_disco_cmm"] == 0 and c["switch_path"] == 0
    assert c["ignore_punch_plain_peer"] == 1 and c["ignore_punch_unknown_peer"] == 0
    assert lab.phone_pk not in lab.node.paths and not lab.node.codec.knows(lab.phone_pk)
    assert lab.node.core.peers[lab.phone_pk].endpoint == RelayEndpoint(PLAIN_SOURCE)
    assert not any(type(e).__name__ in ("PathChanged", "OpenBirthdaySockets") for e in lab.node.pop_events())


def test_a_cookie_reply_under_load_reaches_the_phone_and_the_handshake_completes():
    """The one message WireGuard answers to the source rather than to a peer's endpoint: it goes out to
    RelayEndpoint(PLAIN_SOURCE), which the relay routes by receiver index (tests/signal/test_plain_relay.py)."""
    lab = Lab()
    lab.netmap()
    lab.node.core.note_handshake_backlog(200, 0.0)              # under load for 1 s: mac2 needed
    lab.phone.send_ip_packet(ipv4_packet(PHONE_IP, NODE_IP), 0.0)
    lab.exchange()
    assert lab.node.core.drops["under_load_cookie_sent"] == 1
    assert lab.phone.peers[lab.node_pk].cookie.cookie is not None
    assert [e for _, e in lab.sent] == [RelayEndpoint(PLAIN_SOURCE)]
    lab.step(7.0)                                                # the phone's retry carries mac2
    assert lab.node.core.peers[lab.phone_pk].last_handshake_wall is not None
    assert lab.node.core.peers[lab.phone_pk].endpoint == RelayEndpoint(PLAIN_SOURCE)


def test_a_phone_removed_from_the_directory_leaves_the_core_and_gets_no_answer():
    lab = Lab()
    lab.netmap()
    lab.step(1.0)
    assert ping_both_ways(lab)[0]
    lab.node.apply_netmap({}, lab.now)
    assert lab.phone_pk not in lab.node.core.peers and lab.phone_pk not in lab.node.plain
    assert lab.node.core.lookup_peer_for(PHONE_IP) is None
    lab.sent.clear()
    lab.step(lab.now + 130.0)                                    # the session expires; the phone re-handshakes
    lab.phone.send_ip_packet(ipv4_packet(PHONE_IP, NODE_IP), lab.now)
    lab.exchange()
    assert lab.node.tun_packets_to_write() == [] and lab.to_phone() == []
    assert lab.node.core.drops["handshake_auth"] >= 1


def test_disco_and_junk_from_the_plain_source_are_dropped_and_counted():
    lab = Lab()
    lab.netmap()
    other_sk, other_pk = keypair(2)
    lab.node.apply_netmap({
        lab.phone_pk: PeerSpec.make(lab.phone_pk, "phone", [f"{PHONE_IP}/32"], plain=True),
        other_pk: PeerSpec.make(other_pk, "b", [f"{OTHER_IP}/32"], [("203.0.113.7", 41641)])}, 0.0)
    codec = DiscoCodec(other_sk, rng(9))
    codec.add_peer(lab.node_pk)
    ping = codec.seal(lab.node_pk, Ping(b"t" * 12, other_pk), 0.0)
    lab.node.datagrams_to_send()
    lab.node.receive_relay(PLAIN_SOURCE, ping, 0.0)
    lab.node.receive_relay(PLAIN_SOURCE, b"\x00junk-not-anything", 0.0)
    assert lab.node.counters["drop_relay_plain_not_wireguard"] == 2
    assert lab.node.counters["drop_disco"] == 0 and lab.node.counters["drop_disco_relay_sender_mismatch"] == 0
    assert lab.node.datagrams_to_send() == []


def test_a_plain_spec_has_no_candidates_and_the_node_probes_none():
    key = keypair(50)[1]
    spec = PeerSpec.make(key, "phone", [f"{PHONE_IP}/32"], [("203.0.113.9", 4000)], [("203.0.113.9", 4001)],
                         "endpoint-independent", plain=True)
    assert spec.plain and spec.candidates == () and spec.observed == () and spec.nat is None
    # A spec built around make (a bug elsewhere) still gets no probe: the node keeps no paths for it.
    lab = Lab()
    lab.node.apply_netmap({key: PeerSpec(key, "phone", spec.addresses, (("203.0.113.9", 4000),), plain=True)}, 0.0)
    lab.node.send_ip_packet(ipv4_packet(NODE_IP, PHONE_IP), 0.0)
    lab.step(10.0)
    assert all(isinstance(d, RelayEndpoint) or d == STUN for _, d in lab.sent)


def test_peer_entry_ignores_a_plain_entrys_candidates_and_keeps_the_address_rules():
    drops = collections.Counter()
    policy = entry_policy(WELCOME, ("192.0.2.1:7300",))
    info = PeerInfo(keypair(50)[1], 50, "phone", PHONE_IP, "192.0.2.1", (("203.0.113.9", 4000, "stun"),), True,
                    "plain")
    spec = peer_spec(info, policy, drops)
    assert spec.plain and spec.candidates == () and spec.observed == ()
    assert [str(a) for a in spec.addresses] == [f"{PHONE_IP}/32"]   # the server's address is never routed
    assert drops["drop_peer_candidate_plain"] == 1 and drops["drop_peer_addr_server"] == 1


def test_a_kind_change_is_a_netmap_change_and_the_node_follows_it():
    lab = Lab()
    k = lab.phone_pk
    node_spec = PeerSpec.make(k, "phone", [f"{PHONE_IP}/32"], [("203.0.113.9", 4000)])
    plain_spec = PeerSpec.make(k, "phone", [f"{PHONE_IP}/32"], plain=True)
    ops = diff({k: node_spec}, {k: plain_spec})
    assert len(ops) == 1 and isinstance(ops[0], ChangePeer) and "plain" in ops[0].fields
    lab.node.apply_netmap({k: node_spec}, 0.0)
    assert k in lab.node.paths and lab.node.codec.knows(k)
    lab.node.apply_netmap({k: plain_spec}, 0.0)
    assert k not in lab.node.paths and not lab.node.codec.knows(k) and k in lab.node.plain
    assert lab.node.core.peers[k].endpoint == RelayEndpoint(k)
    assert lab.node.core.lookup_peer_for(PHONE_IP) is lab.node.core.peers[k]
    lab.node.apply_netmap({k: node_spec}, 0.0)
    assert k in lab.node.paths and k not in lab.node.plain


def test_status_marks_the_plain_peer():
    lab = Lab()
    other_pk = keypair(2)[1]
    lab.netmap()
    lab.node.apply_netmap({**lab.node.specs, other_pk: PeerSpec.make(other_pk, "b", [f"{OTHER_IP}/32"])}, 0.0)
    lab.step(1.0)
    ping_both_ways(lab)
    st = {s["name"]: s for s in lab.node.status(lab.now)}
    assert st["phone"]["plain"] is True and st["phone"]["path"] == "relay" and st["phone"]["candidates"] == []
    assert st["phone"]["last_handshake"] is not None and st["phone"]["rx_bytes"] > 0
    assert st["b"]["plain"] is False


# ---- a phone that reaches the node directly (`plain add --direct`) --------------------------------------
def test_a_phone_at_the_public_endpoint_is_answered_directly_and_never_through_the_relay():
    lab = Lab()
    lab.netmap()
    lab.phone_endpoint(HOME_PUBLIC)
    peer = handshake_and_ping(lab)
    assert peer.endpoint == PHONE_ADDR and lab.node.endpoint_of(lab.phone_pk) == PHONE_ADDR
    assert lab.to_phone() == []                                   # the response and the data went direct
    assert any(e == PHONE_ADDR for _, e in lab.sent)
    assert lab.node.counters["recv_relay_plain"] == 0
    st = {s["name"]: s for s in lab.node.status(lab.now)}["phone"]
    assert st["plain"] and st["path"] == "direct" and st["endpoint"] == PHONE_ADDR
    # no path bookkeeping of the mesh peers' for it: nothing keyed on its endpoint, no discovery
    assert PHONE_ADDR not in lab.node._ep_to_key and lab.phone_pk not in lab.node._endpoint
    assert lab.phone_pk not in lab.node.paths


def test_the_endpoint_follows_the_phone_between_direct_and_the_relay():
    """Wi-Fi at home (direct) -> mobile data, through the relay -> direct again from a new address: the node
    answers where the phone's last authenticated datagram came from, the session kept."""
    lab = Lab()
    lab.netmap()
    lab.phone_endpoint(HOME_PUBLIC)
    lab.step(1.0)
    assert ping_both_ways(lab)[1]
    peer = lab.node.core.peers[lab.phone_pk]
    assert peer.endpoint == PHONE_ADDR
    handshake = peer.last_handshake_wall

    lab.phone_endpoint(SERVER)
    lab.sent.clear()
    to_node, to_phone = ping_both_ways(lab)
    assert to_node and to_phone
    assert peer.endpoint == RelayEndpoint(PLAIN_SOURCE)
    assert lab.to_phone() and not any(e == PHONE_ADDR for _, e in lab.sent)
    assert {s["name"]: s for s in lab.node.status(lab.now)}["phone"]["path"] == "relay"

    lab.phone_endpoint(HOME_PUBLIC)
    lab.phone_addr = ("203.0.113.88", 6000)
    lab.sent.clear()
    to_node, to_phone = ping_both_ways(lab)
    assert to_node and to_phone
    assert peer.endpoint == ("203.0.113.88", 6000) and lab.to_phone() == []
    assert peer.last_handshake_wall == handshake                   # one session throughout


def test_an_unauthenticated_datagram_does_not_move_the_phone():
    """Roaming follows authenticated datagrams only: a forged or replayed one from elsewhere moves nothing."""
    lab = Lab()
    lab.netmap()
    lab.phone_endpoint(HOME_PUBLIC)
    lab.step(1.0)
    ping_both_ways(lab)
    peer = lab.node.core.peers[lab.phone_pk]
    lab.phone.send_ip_packet(ipv4_packet(PHONE_IP, NODE_IP, b"x" * 20), lab.now)
    [(data, _)] = lab.phone.datagrams_to_send()
    lab.node.receive_wireguard(data, PHONE_ADDR, lab.now)        # the real one
    lab.node.receive_wireguard(data, ("192.0.2.66", 1), lab.now)  # replayed from elsewhere
    forged = data[:-1] + bytes([data[-1] ^ 1])
    lab.node.receive_wireguard(forged, ("192.0.2.67", 1), lab.now)
    lab.node.receive_relay(PLAIN_SOURCE, data, lab.now)           # replayed through the relay
    assert peer.endpoint == PHONE_ADDR
    assert lab.node.core.drops["replay"] == 2 and lab.node.core.drops["decrypt"] == 1


def test_mesh_peers_keep_roaming_off_next_to_a_roaming_phone():
    lab = Lab()
    other_pk = keypair(2)[1]
    lab.netmap()
    lab.node.apply_netmap({**lab.node.specs, other_pk: PeerSpec.make(other_pk, "b", [f"{OTHER_IP}/32"],
                                                                     [("203.0.113.7", 41641)])}, 0.0)
    assert lab.node.core.peers[lab.phone_pk].roaming
    assert not lab.node.core.peers[other_pk].roaming
    assert lab.node.endpoint_of(other_pk) == RelayEndpoint(other_pk)


# ---- the agent core --------------------------------------------------------------------------------
def agent():
    rb = rng(3)
    sk = keypair(7)[0]
    return A.AgentCore(MeshNode(WireGuardCore(private_key=sk, random_bytes=rb), sk, rb), ("192.0.2.1:7300",))


def plain_info(n=50, **kw):
    # online and candidates: what no server sends for a plain peer, which must not make it a punch target
    return PeerInfo(keypair(n)[1], n, "phone", f"100.64.0.{n}", "", (("198.51.100.9", 4000, "stun-eim"),), True,
                    "plain")


def test_the_agent_never_requests_a_punch_for_a_plain_peer():
    core = agent()
    p = plain_info()
    core.apply([Connected(WELCOME), PeerChanged(p)], 0.0)
    assert core.specs[p.key].plain and p.key in core.node.core.peers
    core.node.send_ip_packet(ipv4_packet(NODE_IP, "100.64.0.50"), 0.1)
    core.apply([PunchNotice(p, "responder")], 0.2)
    actions = []
    for i in range(1, 40):
        actions += core.apply([A.Tick()], 0.2 + i * 0.1)
    assert not [a for a in actions if isinstance(a, A.RequestPunch)]
    assert core.node.counters["ignore_punch_plain_peer"] == 1


def test_the_agent_leaves_plain_peers_out_of_the_punch_policy_whatever_the_node_holds():
    """Second layer: even if the node kept discovery state for a plain peer, no punch is asked for it."""
    core = agent()
    p = plain_info()
    core.apply([Connected(WELCOME), PeerChanged(p)], 0.0)
    pp = PeerPaths(p.key, rng(4))
    pp.note_activity(0.1)
    core.node.paths[p.key] = pp               # as a node that ran discovery for it would
    actions = []
    for i in range(1, 40):
        actions += core.apply([A.Tick()], 0.1 + i * 0.1)
    assert not [a for a in actions if isinstance(a, A.RequestPunch)]
