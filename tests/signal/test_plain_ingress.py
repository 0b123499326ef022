"""signal_server.plain_ingress (issue 12): real WireGuard messages from the project's sans-IO core, a "phone" core
(a stock WireGuard app: one fixed Endpoint, the server's plain port) and "node" cores (reached over their relay
sessions), routed through the ingress core only. It never decrypts, so every pass here is WireGuard itself
completing handshakes and accepting transport data that went through it."""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import pathlib
import random
import struct

from hypothesis import given, settings, strategies as st

from meshwg.wg import crypto
from meshwg.wg.constants import INITIATION_MAC1_OFFSET
from meshwg.wg.cookie import CookieGenerator
from meshwg.wg.device import WireGuardCore
from meshwg.wg.events import HandshakeCompleted
from signal_server.plain_ingress import PlainIngress

_spec = importlib.util.spec_from_file_location(
    "_wg_pair", pathlib.Path(__file__).resolve().parents[1] / "wg" / "wg_pair.py")
_wg_pair = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_wg_pair)
ipv4_packet = _wg_pair.ipv4_packet

WALL = 1_700_000_000.0
SERVER = ("203.0.113.1", 51820)  # the server's plain-WireGuard address, the phone's Endpoint
PHONE_WIFI, PHONE_LTE = ("198.51.100.7", 40000), ("192.0.2.99", 61000)
ATTACKER = ("203.0.113.66", 6666)


class Relay:
    """The node's endpoint for its plain peers: the relay session (an opaque object to the core)."""

    def __repr__(self) -> str:
        return "Relay()"


RELAY = Relay()


class Lab:
    """Phones with a [Peer] per node; each node holds each phone as an ordinary peer whose endpoint is the relay.
    Phone k's datagrams reach the ingress from addrs[k] (its NAT mapping); a node datagram the ingress sends to an
    address no phone has is lost (recorded in `misrouted`). `phone`, `phone_addr`, `phone_peers`, `tun_phone` and
    `events_phone` are phone 0's."""

    def __init__(self, seed: int = 1, nodes: int = 1, targets: list[int] | None = None, phones: int = 1):
        rng = random.Random(seed)
        self.phones = [WireGuardCore(crypto.clamp(rng.randbytes(32)), rng.randbytes, wall_offset=WALL)
                       for _ in range(phones)]
        self.phone = self.phones[0]
        self.phone_ips = [f"10.77.0.{9 + k}" for k in range(phones)]
        self.nodes = [WireGuardCore(crypto.clamp(rng.randbytes(32)), rng.randbytes, wall_offset=WALL,
                                    index_tag=0x1200 + i) for i in range(nodes)]
        self.node_ips = [f"10.77.1.{i + 1}" for i in range(nodes)]
        self.peers_of = [[] for _ in range(phones)]  # peers_of[k][i]: phone k's peer for node i
        for k, phone in enumerate(self.phones):
            for node, ip in zip(self.nodes, self.node_ips):
                pp = phone.add_peer(node.public_key)
                phone.set_endpoint(pp, SERVER)
                phone.set_allowed_ips(pp, [ipaddress.ip_network(ip + "/32")])
                self.peers_of[k].append(pp)
                np_ = node.add_peer(phone.public_key)
                node.set_endpoint(np_, RELAY)
                node.set_allowed_ips(np_, [ipaddress.ip_network(self.phone_ips[k] + "/32")])
        self.phone_peers = self.peers_of[0]
        self.ingress = PlainIngress()
        self.ingress.set_targets({self.nodes[i].public_key for i in (range(nodes) if targets is None else targets)})
        self.addrs = [PHONE_WIFI] + [(f"198.51.100.{50 + k}", 40000 + k) for k in range(1, phones)]
        self.now = 0.0
        self.tun_phones: list[list[bytes]] = [[] for _ in range(phones)]
        self.tun_phone = self.tun_phones[0]
        self.events_phone: list = []
        self.tun_nodes: list[list[bytes]] = [[] for _ in range(nodes)]
        self.events_nodes: list[list] = [[] for _ in range(nodes)]
        self.misrouted: list[tuple[object, bytes]] = []
        self.node_received: list[list[bytes]] = [[] for _ in range(nodes)]
        self.from_phone: list[bytes] = []  # every datagram the phones sent (what an on-path observer sees)
        self.from_nodes: list[bytes] = []

    @property
    def phone_addr(self):
        return self.addrs[0]

    @phone_addr.setter
    def phone_addr(self, addr) -> None:
        self.addrs[0] = addr

    def node_by_key(self, key):
        for i, node in enumerate(self.nodes):
            if node.public_key == key:
                return i
        return None

    def deliver(self) -> None:
        for _ in range(1000):
            moved = False
            for k, phone in enumerate(self.phones):
                for data, addr in phone.datagrams_to_send():
                    moved = True
                    assert addr == SERVER
                    self.from_phone.append(data)
                    key = self.ingress.route_from_plain(data, self.addrs[k], self.now)
                    i = self.node_by_key(key)
                    if i is not None:
                        self.node_received[i].append(data)
                        self.nodes[i].receive_datagram(data, RELAY, self.now)
            for node in self.nodes:
                for data, addr in node.datagrams_to_send():
                    moved = True
                    assert addr is RELAY
                    self.from_nodes.append(data)
                    dst = self.ingress.route_from_node(node.public_key, data, self.now)
                    if dst in self.addrs:
                        self.phones[self.addrs.index(dst)].receive_datagram(data, SERVER, self.now)
                    elif dst is not None:
                        self.misrouted.append((dst, data))
            for k, phone in enumerate(self.phones):
                self.tun_phones[k] += phone.tun_packets_to_write()
            self.events_phone += self.phone.pop_events()
            for i, node in enumerate(self.nodes):
                self.tun_nodes[i] += node.tun_packets_to_write()
                self.events_nodes[i] += node.pop_events()
            if not moved:
                return
        raise AssertionError("datagram ping-pong did not settle")

    def run_until(self, t_end: float) -> None:
        self.deliver()
        cores = [*self.phones, *self.nodes]
        while True:
            nxt = min(c.get_timer() for c in cores)
            if nxt > t_end:
                break
            self.now = max(self.now, nxt)
            for c in cores:
                c.handle_timer(self.now)
            self.deliver()
        self.now = t_end
        self.deliver()

    def phone_sends(self, i: int = 0, payload: bytes = b"p" * 64, k: int = 0) -> bytes:
        pkt = ipv4_packet(self.phone_ips[k], self.node_ips[i], payload)
        self.phones[k].send_ip_packet(pkt, self.now)
        self.deliver()
        return pkt

    def node_sends(self, i: int = 0, payload: bytes = b"n" * 64, k: int = 0) -> bytes:
        pkt = ipv4_packet(self.node_ips[i], self.phone_ips[k], payload)
        self.nodes[i].send_ip_packet(pkt, self.now)
        self.deliver()
        return pkt

    def phone_index_for(self, i: int = 0, k: int = 0) -> int:
        """Phone k's receiver index of its current session with node i (what the node's data carries)."""
        return self.peers_of[k][i].keypairs.current.local_index

    def node_index_for(self, i: int = 0, k: int = 0) -> int:
        return self.peers_of[k][i].keypairs.current.remote_index


def fake_initiation(node_key: bytes, sender: int, seed: int = 0) -> bytes:
    """An initiation with a valid mac1 for node_key and garbage inside (anyone who knows the node's public key
    can make these: it is what a flood looks like)."""
    body = struct.pack("<II", 1, sender) + random.Random(seed).randbytes(INITIATION_MAC1_OFFSET - 8)
    return CookieGenerator(node_key).add_macs(body, 0.0)


def fake_response(sender: int, receiver: int) -> bytes:
    return struct.pack("<III", 2, sender, receiver) + bytes(92 - 12)


def transport(receiver: int, counter: int = 0, size: int = 32) -> bytes:
    return struct.pack("<IIQ", 4, receiver, counter) + bytes(size - 16)


def established(**kw) -> Lab:
    lab = Lab(**kw)
    lab.phone_sends()
    lab.node_sends()
    return lab


# ---------------------------------------------------------------- end to end


def test_handshake_completes_and_data_flows_both_ways():
    lab = Lab()
    sent = lab.phone_sends()
    assert lab.tun_nodes[0] == [sent]
    back = lab.node_sends()
    assert lab.tun_phone == [back]
    assert HandshakeCompleted(lab.nodes[0].public_key) in lab.events_phone
    assert HandshakeCompleted(lab.phone.public_key) in lab.events_nodes[0]
    c = lab.ingress.counters
    assert c["forward_initiation"] == 1 and c["forward_response"] == 1
    # one each way: the phone's staged packet is its key confirmation, no extra keepalive
    assert c["forward_transport_to_node"] == 1 and c["forward_transport_to_plain"] == 1
    assert lab.misrouted == []
    assert not [k for k in c if k.startswith("drop_")]
    # the node's view: the phone is behind the relay, and its replies went there
    assert lab.nodes[0].peers[lab.phone.public_key].endpoint is RELAY


def test_many_packets_both_ways_over_ten_minutes_with_rekeys():
    """Sessions end after 180 s; the phone re-handshakes every 120 s: traffic never stops through the ingress."""
    lab = established()
    got_node, got_phone = len(lab.tun_nodes[0]), len(lab.tun_phone)
    for step in range(120):
        lab.run_until(lab.now + 5.0)
        lab.phone_sends(payload=b"%d" % step)
        lab.node_sends(payload=b"%d" % step)
    assert len(lab.tun_nodes[0]) == got_node + 120
    assert len(lab.tun_phone) == got_phone + 120
    assert lab.ingress.counters["forward_response"] >= 5  # 600 s: several handshakes
    assert lab.ingress.pair_count <= 3  # old pairs expired (2 live sessions at most, + one replaced)
    assert lab.misrouted == []


def test_the_phone_roams_to_a_new_address_and_keeps_working():
    lab = established()
    lab.phone_addr = PHONE_LTE  # Wi-Fi -> mobile data: a new NAT mapping, the old one is gone
    sent = lab.phone_sends(payload=b"after roaming")
    assert lab.tun_nodes[0][-1] == sent
    back = lab.node_sends(payload=b"to the new address")
    assert lab.tun_phone[-1] == back
    assert lab.misrouted == []
    assert lab.ingress.counters["roam"] == 1
    assert lab.ingress.phone_address(lab.nodes[0].public_key, lab.phone_index_for()) == PHONE_LTE


def test_phones_behind_one_address_and_a_phone_with_two_nodes_each_get_their_own_traffic():
    lab = Lab(nodes=2, phones=3)
    lab.addrs[1] = (PHONE_WIFI[0], PHONE_WIFI[1] + 1)  # phones 0 and 1 share a carrier-grade NAT address
    for k in range(3):
        for i in range(2):
            sent = lab.phone_sends(i=i, k=k, payload=b"from %d to %d" % (k, i))
            assert lab.tun_nodes[i][-1] == sent
            back = lab.node_sends(i=i, k=k, payload=b"from %d to %d" % (i, k))
            assert lab.tun_phones[k][-1] == back
    assert [len(t) for t in lab.tun_phones] == [2, 2, 2]
    assert [len(t) for t in lab.tun_nodes] == [3, 3]
    assert lab.ingress.pair_count == 6 and lab.misrouted == []
    assert lab.ingress.counters["roam"] == 0


def test_only_transport_data_moves_the_phone():
    """A cookie reply (or initiation) for a known index from elsewhere does not roam the pair."""
    lab = established()
    node_idx = lab.node_index_for()
    cookie = struct.pack("<II", 3, node_idx) + bytes(56)
    assert lab.ingress.route_from_plain(cookie, ATTACKER, lab.now) == lab.nodes[0].public_key
    assert lab.ingress.phone_address(lab.nodes[0].public_key, lab.phone_index_for()) == PHONE_WIFI
    assert lab.ingress.counters["roam"] == 0


def test_an_initiation_for_a_node_plain_peers_may_not_reach_never_leaves():
    lab = Lab(nodes=2, targets=[0])
    lab.phone_sends(i=1)
    assert lab.node_received == [[], []]  # the initiation reached no node at all
    assert lab.tun_nodes[1] == []
    assert lab.ingress.counters["drop_init_no_target"] == 1
    assert lab.ingress.pending_count == 0
    # node 0 is reachable at the same time
    sent = lab.phone_sends(i=0)
    assert lab.tun_nodes[0] == [sent]


def test_a_node_leaving_the_targets_loses_its_pairs_at_once():
    lab = established(nodes=2)
    assert lab.ingress.pair_count == 1
    lab.ingress.set_targets({lab.nodes[1].public_key})
    assert lab.ingress.pair_count == 0
    before = len(lab.tun_nodes[0])
    lab.phone_sends(payload=b"revoked")
    assert len(lab.tun_nodes[0]) == before
    assert lab.ingress.counters["drop_unknown_index"] >= 1


def test_cookie_reply_from_a_node_under_load_reaches_the_phone_and_the_handshake_completes():
    lab = Lab()
    lab.nodes[0].note_handshake_backlog(500, lab.now)  # under load for 1 s: initiations need mac2
    lab.phone_sends()
    assert lab.ingress.counters["forward_cookie_to_plain"] == 1
    assert lab.phone_peers[0].cookie.cookie is not None  # the phone decrypted the node's cookie
    assert lab.tun_nodes[0] == []
    lab.run_until(10.0)  # the phone retries after 5 s with mac2; the node is no longer under load anyway
    assert HandshakeCompleted(lab.nodes[0].public_key) in lab.events_phone
    assert len(lab.tun_nodes[0]) == 1


# ---------------------------------------------------------------- bad input


def test_junk_short_unknown_and_unknown_index_datagrams_are_dropped_and_counted():
    lab = established()
    ing = lab.ingress
    node_key = lab.nodes[0].public_key
    before = ing.counters.copy()
    junk = [
        (b"", "drop_short"), (b"\x04", "drop_short"), (transport(lab.node_index_for())[:31], "drop_short"),
        (b"\x05\0\0\0" + bytes(60), "drop_unknown_type"),
        (b"\x04\0\0\x01" + transport(lab.node_index_for())[4:], "drop_unknown_type"),  # reserved byte set
        (b"\x01\0\0\0" + bytes(143), "drop_malformed"),  # initiation of the wrong size
        (b"\x03\0\0\0" + bytes(63), "drop_malformed"),
        (transport(0xDEADBEEF), "drop_unknown_index"),
        (struct.pack("<II", 3, 0xDEADBEEF) + bytes(56), "drop_unknown_index"),
        (fake_response(1, 2), "drop_unsolicited_response"),
    ]
    for data, reason in junk:
        assert ing.route_from_plain(data, lab.phone_addr, lab.now) is None, reason
    from_node = [
        (b"\x04\0\0\0", "drop_node_short"),
        (transport(0xDEADBEEF), "drop_node_unknown_index"),
        (fake_response(5, 0xDEADBEEF), "drop_node_unknown_index"),  # answers no pending initiation
        (struct.pack("<II", 3, 0xDEADBEEF) + bytes(56), "drop_node_unknown_index"),
        (fake_initiation(lab.phone.public_key, 9), "drop_node_initiation"),
        (b"\x09\0\0\0" + bytes(60), "drop_node_unknown_type"),
    ]
    for data, reason in from_node:
        assert ing.route_from_node(node_key, data, lab.now) is None, reason
    # a node that is not the pair's node cannot send on it
    other = crypto.dh_pub(crypto.clamp(bytes(32 * [7])))
    assert ing.route_from_node(other, transport(lab.phone_index_for()), lab.now) is None
    diff = ing.counters - before
    expected = {}
    for _, reason in junk + from_node + [(None, "drop_node_unknown_index")]:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(diff) == expected
    assert lab.phone_addr == PHONE_WIFI and ing.counters["roam"] == 0


def test_a_flood_from_one_source_is_limited_and_another_sources_initiation_still_passes():
    lab = Lab()
    node_key = lab.nodes[0].public_key
    forwarded = sum(lab.ingress.route_from_plain(fake_initiation(node_key, i), ATTACKER, 0.5) is not None
                    for i in range(1000))
    assert forwarded <= 20  # a small burst per source, not 1,000 mac1 checks and forwards
    assert lab.ingress.counters["drop_init_ratelimited"] >= 980
    lab.now = 0.5
    sent = lab.phone_sends()
    assert lab.tun_nodes[0] == [sent]


def test_a_flood_from_many_sources_is_bounded_in_all():
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    data = fake_initiation(key, 1)
    forwarded = sum(ing.route_from_plain(data, (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1), 0.0) is not None
                    for i in range(5000))
    assert forwarded <= 2000  # about 2,000 mac1 rounds a second in all
    assert ing.counters["drop_init_global_limit"] >= 3000


def test_one_ipv6_host_cannot_use_its_many_addresses_for_fresh_budgets():
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    forwarded = sum(ing.route_from_plain(fake_initiation(key, i), (f"2001:db8:1:2::{i:x}", 1), 0.0) is not None
                    for i in range(1000))
    assert forwarded <= 20


def test_a_replayed_initiation_from_elsewhere_cannot_take_the_response():
    """The node answers the first copy only; a copy replayed from another address must not redirect the answer."""
    lab = Lab()
    pp = lab.phone_peers[0]
    lab.phone.initiate_handshake(pp, lab.now)
    [(init, _)] = lab.phone.datagrams_to_send()
    key = lab.nodes[0].public_key
    assert lab.ingress.route_from_plain(init, PHONE_WIFI, lab.now) == key
    assert lab.ingress.route_from_plain(init, ATTACKER, lab.now) is None
    assert lab.ingress.counters["drop_init_index_taken"] == 1
    lab.nodes[0].receive_datagram(init, RELAY, lab.now)
    [(resp, _)] = lab.nodes[0].datagrams_to_send()
    assert lab.ingress.route_from_node(key, resp, lab.now) == PHONE_WIFI


def test_a_source_guessing_indexes_cannot_roam_the_phone_away():
    lab = established()
    key, node_idx, phone_idx = lab.nodes[0].public_key, lab.node_index_for(), lab.phone_index_for()
    rng = random.Random(3)
    for _ in range(1000):
        lab.ingress.route_from_plain(transport(rng.getrandbits(32)), ATTACKER, lab.now)
    assert lab.ingress.route_from_plain(transport(node_idx, 99), ATTACKER, lab.now) is None  # the guess that hits
    assert lab.ingress.phone_address(key, phone_idx) == PHONE_WIFI
    assert lab.ingress.counters["drop_roam_refused"] == 1
    # the phone itself still roams
    lab.phone_addr = PHONE_LTE
    sent = lab.phone_sends(payload=b"roamed")
    assert lab.tun_nodes[0][-1] == sent
    assert lab.ingress.phone_address(key, phone_idx) == PHONE_LTE


def test_pairs_and_pending_initiations_expire():
    lab = established()
    key, node_idx = lab.nodes[0].public_key, lab.node_index_for()
    t0 = lab.now
    lab.ingress.route_from_plain(fake_initiation(key, 77), PHONE_WIFI, t0)
    assert lab.ingress.pending_count == 1
    # a response 20 s later (four times REKEY_TIMEOUT) answers no initiation the phone still waits on
    assert lab.ingress.route_from_node(key, fake_response(5, 77), t0 + 20.0) is None
    # the session is usable for 180 s (REJECT_AFTER_TIME) ...
    assert lab.ingress.route_from_plain(transport(node_idx, 10**6), PHONE_WIFI, t0 + 179.0) == key
    # ... and forgotten after 3 x 180 s at the latest
    assert lab.ingress.route_from_plain(transport(node_idx, 10**6 + 1), PHONE_WIFI, t0 + 540.0) is None
    assert lab.ingress.pair_count == 0 and lab.ingress.pending_count == 0


def test_the_pending_table_is_bounded():
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    now = 0.0
    for i in range(6000):
        now += 0.001
        ing.route_from_plain(fake_initiation(key, i), (f"10.0.{i >> 8}.{i & 255}", 1), now)
    assert ing.counters["forward_initiation"] >= 5000
    assert ing.pending_count <= 4096
    assert ing.counters["evict_pending"] >= 900
    # the newest is still answered
    assert ing.route_from_node(key, fake_response(1, 5999), now) == ("10.0.23.111", 1)


def test_the_pair_table_is_bounded():
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    now = 0.0
    for i in range(70_000):
        now += 0.001
        src = (f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}", 1)
        assert ing.route_from_plain(fake_initiation(key, i), src, now) == key
        assert ing.route_from_node(key, fake_response(0x10000000 + i, i), now) == src
    assert ing.pair_count <= 65_536
    assert ing.counters["evict_pair"] >= 4000
    assert ing.route_from_plain(transport(0x10000000 + 69_999), ("10.1.17.111", 1), now) == key
    assert ing.route_from_plain(transport(0x10000000), ("10.0.0.0", 1), now) is None  # the oldest went first


def test_a_node_index_collision_keeps_the_existing_pair():
    """Another node's live pair holds the index: the newer response is refused, the older pair keeps working."""
    ing = PlainIngress()
    k1, k2 = (crypto.dh_pub(crypto.clamp(bytes(32 * [b]))) for b in (5, 6))
    ing.set_targets({k1, k2})
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 1)
    assert ing.route_from_plain(fake_initiation(k1, 1), a, 0.0) == k1
    assert ing.route_from_plain(fake_initiation(k2, 2), b, 0.0) == k2
    assert ing.route_from_node(k1, fake_response(42, 1), 0.0) == a
    assert ing.route_from_node(k2, fake_response(42, 2), 0.0) is None  # same node index from another node
    assert ing.route_from_plain(transport(42), a, 0.0) == k1
    assert ing.route_from_node(k1, transport(1), 0.0) == a
    assert ing.pair_count == 1 and ing.counters["drop_node_index_taken"] == 1
    # within one node a repeated response still replaces its own pair
    assert ing.route_from_plain(fake_initiation(k1, 3), a, 0.0) == k1
    assert ing.route_from_node(k1, fake_response(42, 3), 0.0) == a
    assert ing.counters["replace_pair"] == 1 and ing.route_from_node(k1, transport(3), 0.0) == a


def test_a_registered_node_cannot_take_over_another_nodes_phone():
    """Node 1 (a target too) initiates to itself through the plain port, then answers over its own relay session
    with node 0's index for the phone: the phone's traffic must keep going to node 0, and node 0's to the phone."""
    lab = established(nodes=2)
    home, evil = lab.nodes[0].public_key, lab.nodes[1].public_key
    node_idx, phone_idx = lab.node_index_for(), lab.phone_index_for()
    evil_src = ("192.0.2.9", 7000)
    assert lab.ingress.route_from_plain(fake_initiation(evil, 0x51515151), evil_src, lab.now) == evil
    assert lab.ingress.route_from_node(evil, fake_response(node_idx, 0x51515151), lab.now) is None
    assert lab.ingress.counters["drop_node_index_taken"] == 1
    sent = lab.phone_sends(payload=b"still home")
    assert lab.tun_nodes[0][-1] == sent and lab.tun_nodes[1] == []
    back = lab.node_sends(payload=b"still to the phone")
    assert lab.tun_phone[-1] == back
    assert lab.ingress.phone_address(home, phone_idx) == PHONE_WIFI and lab.misrouted == []


def test_a_node_filling_the_pair_table_does_not_push_out_another_nodes_pairs():
    ing = PlainIngress(max_pairs=100)
    home, evil = (crypto.dh_pub(crypto.clamp(bytes(32 * [b]))) for b in (5, 6))
    ing.set_targets({home, evil})
    phone = ("198.51.100.7", 40000)
    assert ing.route_from_plain(fake_initiation(home, 1), phone, 0.0) == home
    assert ing.route_from_node(home, fake_response(0x12340001, 1), 0.0) == phone
    for i in range(300):
        src = (f"10.0.{i >> 8}.{i & 255}", 1)
        assert ing.route_from_plain(fake_initiation(evil, 1000 + i), src, 0.01) == evil
        assert ing.route_from_node(evil, fake_response(0x66660000 + i, 1000 + i), 0.01) == src
    assert ing.pair_count <= 100
    assert ing.route_from_plain(transport(0x12340001), phone, 0.02) == home
    assert ing.route_from_plain(transport(0x66660000 + 299), ("10.0.1.43", 1), 0.02) == evil  # its newest


def test_one_node_holds_a_bounded_number_of_pairs():
    ing = PlainIngress(max_pairs_per_node=50)
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    for i in range(80):
        src = (f"10.0.0.{i}", 1)
        assert ing.route_from_plain(fake_initiation(key, i), src, 0.0) == key
        assert ing.route_from_node(key, fake_response(0x10000000 + i, i), 0.0) == src
    assert ing.pair_count == 50 and ing.counters["evict_pair"] == 30
    assert ing.route_from_plain(transport(0x10000000), ("10.0.0.0", 1), 0.0) is None  # its oldest went first


def junk_initiation() -> bytes:
    return struct.pack("<II", 1, 0) + bytes(140)  # the right type and size, no valid mac1: costs nothing to make


def test_junk_initiations_from_many_sources_do_not_block_phones():
    """20,000 junk initiations a second from 4,000 IPv6 /64s (5 a second each, within the per-source budget):
    every phone initiation among them still reaches its node."""
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    junk = junk_initiation()
    passed = tries = 0
    for k in range(40_000):  # 2 s
        t = k / 20_000
        ing.route_from_plain(junk, (f"2001:db8:0:{k % 4000:x}::1", 1), t)
        if k % 400 == 399:
            tries += 1
            passed += ing.route_from_plain(fake_initiation(key, k), (f"198.51.100.{tries}", 4), t) == key
    assert tries == 100 and passed == 100
    assert ing.counters["drop_init_no_target"] == 40_000 and ing.counters["drop_init_global_limit"] == 0


def test_mac1_checks_are_bounded_in_all():
    """At most about 200,000 mac1 checks a second (50,000 at once) whatever the number of sources."""
    ing = PlainIngress()
    key = crypto.dh_pub(crypto.clamp(bytes(32 * [5])))
    ing.set_targets({key})
    junk = junk_initiation()
    for i in range(60_000):
        ing.route_from_plain(junk, (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1), 0.0)
    assert ing.counters["drop_init_no_target"] <= 50_000
    assert ing.counters["drop_init_check_limit"] >= 10_000


def test_a_phone_with_a_live_session_rekeys_through_a_flood_of_valid_initiations():
    """Anyone with the node's public key can make initiations with a valid mac1 and spend the forward budget;
    the phone re-keying from the address its session is at still gets through."""
    lab = established()
    key = lab.nodes[0].public_key
    lab.now += 10.0  # past REKEY_TIMEOUT: the phone may initiate again
    for i in range(3000):
        lab.ingress.route_from_plain(fake_initiation(key, 10_000 + i), (f"10.1.{i >> 8}.{i & 255}", 1), lab.now)
    assert lab.ingress.counters["drop_init_global_limit"] >= 900
    assert lab.ingress.route_from_plain(fake_initiation(key, 1, seed=1), ("192.0.2.200", 1), lab.now) is None
    lab.phone.initiate_handshake(lab.phone_peers[0], lab.now)
    lab.deliver()
    assert lab.ingress.counters["forward_response"] == 2


def test_a_replayed_or_stale_datagram_never_moves_the_phone():
    lab = established()
    key, node_idx, phone_idx = lab.nodes[0].public_key, lab.node_index_for(), lab.phone_index_for()
    seen = [d for d in lab.from_phone if d[:4] == b"\x04\0\0\0"]
    assert seen
    for data in seen:  # replayed from elsewhere (an observer), or counter 0 from anyone but the handshake's address
        assert lab.ingress.route_from_plain(data, ATTACKER, lab.now) is None
    assert lab.ingress.route_from_plain(transport(node_idx, 0), PHONE_LTE, lab.now) is None
    assert lab.ingress.phone_address(key, phone_idx) == PHONE_WIFI
    assert lab.ingress.counters["drop_roam_stale"] == len(seen) + 1 and lab.ingress.counters["roam"] == 0
    back = lab.node_sends(payload=b"to the phone")
    assert lab.tun_phone[-1] == back


def test_an_attacker_flipping_the_address_cannot_lock_the_phone_out():
    """Even with forged higher counters from fresh sources (an on-path attacker), each of the phone's datagrams
    goes on and takes its address back: its returns cost it no budget."""
    lab = established()
    key, node_idx, phone_idx = lab.nodes[0].public_key, lab.node_index_for(), lab.phone_index_for()
    got = len(lab.tun_nodes[0])
    for k in range(400):
        lab.now += 0.01
        lab.ingress.route_from_plain(transport(node_idx, 1000 + k), (f"203.0.113.{k % 200 + 1}", 6000), lab.now)
        lab.phone_sends(payload=b"%d" % k)
        assert lab.ingress.phone_address(key, phone_idx) == PHONE_WIFI
    assert len(lab.tun_nodes[0]) == got + 400
    assert lab.ingress.counters["roam_return"] >= 100
    assert lab.ingress.counters["drop_roam_refused"] == 0


# ---------------------------------------------------------------- properties


_LAB = established()
_VALID_PLAIN = list(_LAB.from_phone)
_VALID_NODE = list(_LAB.from_nodes)
_INDEXES = [_LAB.node_index_for(), _LAB.phone_index_for(), 0, 0xFFFFFFFF]
_SOURCES = [PHONE_WIFI, PHONE_LTE, ATTACKER, ("2001:db8::1", 5), ("not an ip", 1), ("fe80::1%eth0", 9), (), None,
            "opaque", (1, 2)]


def _moved(before, after):
    return sum(v for k, v in (after - before).items() if k.startswith(("drop_", "forward_")))


datagrams = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, i, rest: struct.pack("<II", t, _INDEXES[i % len(_INDEXES)]) + rest,
              st.integers(0, 6), st.integers(0, 10), st.binary(max_size=160)),
    st.builds(lambda i, pos, x: bytes(b ^ (x if j == pos % len(d) else 0) for j, b in enumerate(d))
              if (d := (_VALID_PLAIN + _VALID_NODE)[i % (len(_VALID_PLAIN) + len(_VALID_NODE))]) else d,
              st.integers(0, 100), st.integers(0, 2000), st.integers(0, 255)),
)


@settings(max_examples=400)
@given(datagrams, st.integers(0, len(_SOURCES) - 1), st.floats(0, 1000, allow_nan=False), st.booleans())
def test_arbitrary_bytes_never_raise_and_move_exactly_one_counter(data, src_i, dt, from_node):
    ing = copy.deepcopy(_LAB.ingress)  # every example starts from the live session
    before = ing.counters.copy()
    node_key = _LAB.nodes[0].public_key
    if from_node:
        out = ing.route_from_node(node_key, data, _LAB.now + dt)
        assert out is None or out in _SOURCES
    else:
        out = ing.route_from_plain(data, _SOURCES[src_i], _LAB.now + dt)
        assert out is None or out == node_key
    assert _moved(before, ing.counters) == 1
