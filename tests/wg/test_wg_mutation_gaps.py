"""Behaviour of meshwg/wg that mutation testing (scripts/mutation) showed no test pinned down: every drop
reason counted exactly once per bad input under its own name, inner-packet framing, byte accounting, the
configuration errors, handshake re-sends, index tags, timer jitter, keypair slots, the message codec.
Bounds are literals from the WireGuard paper / wireguard-go."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter

import pytest
from wg_pair import A_ADDR, A_IP, B_IP, Pair, ipv4_packet

from meshwg.wg import crypto, messages
from meshwg.wg.allowed_ips import AllowedIPs
from meshwg.wg.cookie import CookieGenerator, RateLimiter, address_bytes, address_host
from meshwg.wg.device import WireGuardCore
from meshwg.wg.keypair import Keypair, Keypairs


def established() -> Pair:
    p = Pair()
    p.send_a()
    p.send_b()
    p.tun_a.clear()
    p.tun_b.clear()
    return p


def drops_delta(core, action) -> Counter:
    before = Counter(core.drops)
    action()
    after = Counter(core.drops)
    after.subtract(before)
    return +after


def twice(core, action) -> Counter:
    """The drops two runs of `action` added: each reason must show 2 (not 1, not 4, not a renamed key)."""
    return drops_delta(core, lambda: (action(), action()))


# ------------------------------------------------------------------ one counter, by name, per bad input

def test_receive_side_drops_are_counted_by_name_once_each():
    p = established()
    b, now = p.b, p.now
    recv = b.receive_datagram
    assert twice(b, lambda: recv(b"\x01\x00", A_ADDR, now)) == {"short": 2}
    assert twice(b, lambda: recv(b"\x04\x00\x00\x00" + bytes(20), A_ADDR, now)) == {"unknown_type": 2}
    assert twice(b, lambda: recv(b"\x05\x00\x00\x00" + bytes(60), A_ADDR, now)) == {"unknown_type": 2}
    assert twice(b, lambda: recv(b"\x01\x00\x00\x00" + bytes(96), A_ADDR, now)) == {"bad_size": 2}
    assert twice(b, lambda: recv(b"\x03\x00\x00\x00" + bytes(36), A_ADDR, now)) == {"bad_size": 2}
    assert twice(b, lambda: recv(b"\x04\x00\x00\x00" + b"\x99" * 4 + bytes(40), A_ADDR, now)) == {"unknown_index": 2}
    assert twice(b, lambda: recv(b"\x03\x00\x00\x00" + b"\x99" * 4 + bytes(56), A_ADDR, now)) == {"unknown_index": 2}
    assert b.tun_packets_to_write() == [] and b.datagrams_to_send() == []


def test_a_response_for_a_finished_handshake_is_an_unknown_index():
    p = Pair()
    p.a.initiate_handshake(p.pa, 0.0)
    [(init, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(init, A_ADDR, 0.0)
    [(resp, _)] = p.b.datagrams_to_send()
    p.a.receive_datagram(resp, p.addr[id(p.b)], 0.0)
    p.a.datagrams_to_send()
    assert twice(p.a, lambda: p.a.receive_datagram(resp, p.addr[id(p.b)], 0.1)) == {"unknown_index": 2}


def test_initiation_from_an_unknown_key_is_a_handshake_auth_drop():
    p = Pair()
    stranger = WireGuardCore(crypto.clamp(bytes(range(2, 34))), random.Random(5).randbytes)
    sp = stranger.add_peer(p.b.public_key)
    stranger.set_endpoint(sp, ("192.0.2.77", 1))
    inits = []
    for t in (0.0, 6.0):
        stranger.initiate_handshake(sp, t)
        inits += [d for d, _ in stranger.datagrams_to_send()]
    delta = drops_delta(p.b, lambda: [p.b.receive_datagram(d, ("192.0.2.77", 1), 6.0) for d in inits])
    assert delta == {"handshake_auth": 2} and p.b.datagrams_to_send() == []


def test_response_with_the_wrong_psk_is_a_handshake_auth_drop_each_time():
    p = Pair()
    p.b.set_preshared_key(p.pb, bytes(range(32)))
    p.block_b_to_a = False
    p.send_a()
    p.run_until(6.0)  # the retransmission fails the same way
    assert p.a.drops["handshake_auth"] == 2 and p.tun_b == []


def test_replayed_and_flooded_initiations_each_counted():
    p = Pair()
    p.a.initiate_handshake(p.pa, 0.0)
    [(init, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(init, A_ADDR, 0.0)
    p.b.datagrams_to_send()
    assert twice(p.b, lambda: p.b.receive_datagram(init, A_ADDR, 1.0)) == {"handshake_replay": 2}
    p.a.initiate_handshake(p.pa, 6.0)
    p.a.initiate_handshake(p.pa, 12.0)
    p.a.initiate_handshake(p.pa, 18.0)
    inits = [d for d, _ in p.a.datagrams_to_send()]
    # 20 ms between consumed initiations of one peer: exactly 20 ms is still a flood.
    p.b.receive_datagram(inits[0], A_ADDR, 6.0)
    p.b.datagrams_to_send()
    delta = drops_delta(p.b, lambda: [p.b.receive_datagram(d, A_ADDR, 6.02) for d in inits[1:]])
    assert delta == {"handshake_flood": 2}


def test_expired_keypair_and_bad_cookie_reply_counted_each_time():
    p = established()
    kp = p.pa.keypairs.current
    wires = [kp.seal(ipv4_packet(A_IP, B_IP)) for _ in range(2)]
    assert twice(p.b, lambda: p.b.receive_datagram(wires.pop(), A_ADDR, kp.created + 180.0)) == {"expired_keypair": 2}
    q = Pair()
    reply = q.cookie_reply()
    bad = reply[:40] + bytes([reply[40] ^ 1]) + reply[41:]
    assert twice(q.a, lambda: q.a.receive_datagram(bad, q.addr[id(q.b)], 0.0)) == {"bad_cookie_reply": 2}


def test_send_side_drops_are_counted_by_name_once_each():
    p = established()
    a, now = p.a, p.now
    assert twice(a, lambda: a.send_ip_packet(ipv4_packet(A_IP, "10.9.9.9"), now)) == {"no_route": 2}
    a.set_endpoint(p.pa, None)
    assert twice(a, lambda: a.send_ip_packet(ipv4_packet(A_IP, B_IP), now)) == {"no_endpoint": 2}
    # The staged path (keepalives, flushed packets) too, and nothing is sealed for nowhere.
    counter = p.pa.keypairs.current.send_counter
    assert twice(a, lambda: a._send_keepalive(p.pa, now)) == {"no_endpoint": 2}
    assert p.pa.keypairs.current.send_counter == counter and a.datagrams_to_send() == []


def test_handshake_without_endpoint_or_key_is_counted():
    p = Pair()  # b does not know a's endpoint
    delta = drops_delta(p.b, lambda: [p.b.initiate_handshake(p.pb, t) for t in (0.0, 6.0)])
    assert delta == {"no_endpoint": 2}
    keyless = WireGuardCore(None)
    peer = keyless.add_peer(p.a.public_key)
    keyless.set_endpoint(peer, A_ADDR)
    delta = drops_delta(keyless, lambda: [keyless.initiate_handshake(peer, t) for t in (0.0, 6.0)])
    assert delta == {"no_key": 2} and keyless.datagrams_to_send() == []


# ------------------------------------------------------------------ inner packets

def ipv6_packet(src: str, dst: str, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 0x60000000, len(payload), 17, 64) + ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed + payload)


def v6_pair() -> Pair:
    p = established()
    p.b.add_allowed_ip(p.pb, ipaddress.ip_network("fd00::1/128"))
    return p


def deliver_plain(p: Pair, plain: bytes) -> list[bytes]:
    """Seal `plain` exactly as given (no IP parsing on the sender) and hand it to b."""
    p.b.receive_datagram(p.pa.keypairs.current.seal(plain), A_ADDR, p.now)
    return p.b.tun_packets_to_write()


@pytest.mark.parametrize("plain", [
    bytes([0x45]) + bytes(10),  # IPv4 shorter than its header
    ipv4_packet(A_IP, B_IP)[:2] + struct.pack("!H", 19) + ipv4_packet(A_IP, B_IP)[4:],  # length < 20
    ipv4_packet(A_IP, B_IP)[:2] + struct.pack("!H", 200) + ipv4_packet(A_IP, B_IP)[4:],  # length > size
    bytes([0x60]) + bytes(30),  # IPv6 shorter than its header
    ipv6_packet("fd00::1", "fd00::2", b"12345")[:-1],  # payload length one more than present
    bytes([0x55]) + bytes(40),  # neither IPv4 nor IPv6
])
def test_malformed_inner_packets_are_bad_inner_packet_drops(plain):
    p = v6_pair()
    assert twice(p.b, lambda: deliver_plain(p, plain) and None) == {"bad_inner_packet": 2}


def test_inner_packets_at_their_exact_lengths_are_delivered_and_trimmed():
    p = v6_pair()
    header_only = ipv4_packet(A_IP, B_IP, b"")
    assert len(header_only) == 20 and deliver_plain(p, header_only) == [header_only]
    assert deliver_plain(p, header_only + bytes(12)) == [header_only]
    bare6 = ipv6_packet("fd00::1", "fd00::2", b"")
    assert len(bare6) == 40 and deliver_plain(p, bare6) == [bare6]
    big6 = ipv6_packet("fd00::1", "fd00::2", bytes(range(256)) * 2)  # payload length > 255: both bytes count
    assert deliver_plain(p, big6 + bytes(7)) == [big6]
    assert not p.b.drops


def test_packets_longer_than_the_mtu_are_padded_from_their_remainder():
    p = established()
    for size in (1421, 1500, 1437):
        pkt = ipv4_packet(A_IP, B_IP, bytes(size - 20))
        p.a.send_ip_packet(pkt, p.now)
        [(wire, _)] = p.a.datagrams_to_send()
        rem = size % 1420
        assert len(wire) - 32 == size + min(-(-rem // 16) * 16, 1420) - rem
        p.b.receive_datagram(wire, A_ADDR, p.now)
        assert p.b.tun_packets_to_write() == [pkt]


def test_staged_packets_are_padded_to_16_too():
    p = Pair()
    p.block_a_to_b = True
    sizes = (20, 21, 36, 1419, 1500)
    for size in sizes:
        p.a.send_ip_packet(ipv4_packet(A_IP, B_IP, bytes(size - 20)), 0.0)
    p.block_a_to_b = False
    p.run_until(6.0)
    lengths = [n - 32 for _, kind, n in p.sent_types("a->b") if kind == 4 and n > 32]
    assert lengths == [32, 32, 48, 1420, 1500 - 80 + 80]
    assert len(p.tun_b) == len(sizes)


def test_bytes_counted_for_every_datagram_each_way():
    p = Pair()
    for i in range(3):
        p.send_a(bytes(10 + i))
        p.send_b(bytes(30 + i))
    sent_ab = [d for _, name, d in p.sent if name == "a->b"]
    sent_ba = [d for _, name, d in p.sent if name == "b->a"]
    assert p.pa.tx_bytes == sum(map(len, sent_ab)) and p.pb.tx_bytes == sum(map(len, sent_ba))
    # Received bytes count authenticated transport messages (handshakes are not data).
    assert p.pb.rx_bytes == sum(len(d) for d in sent_ab if d[0] == 4)
    assert p.pa.rx_bytes == sum(len(d) for d in sent_ba if d[0] == 4)


# ------------------------------------------------------------------ configuration

def test_configuration_errors_say_what_is_wrong():
    core = WireGuardCore(crypto.clamp(bytes(range(32))))
    with pytest.raises(ValueError, match="^a public key is 32 bytes$"):
        core.add_peer(bytes(31))
    with pytest.raises(ValueError, match="^a peer cannot have this device's own public key$"):
        core.add_peer(core.public_key)
    peer = core.add_peer(bytes(range(1, 33)))
    assert core.add_peer(bytes(range(1, 33))) is peer
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match=r"^persistent keepalive is 0\.\.65535 seconds$"):
            core.set_persistent_keepalive(peer, bad, 0.0)
    core.set_persistent_keepalive(peer, 65535, 0.0)
    assert peer.persistent_keepalive == 65535
    with pytest.raises(ValueError, match="^a preshared key is 32 bytes$"):
        core.set_preshared_key(peer, bytes(31))
    core.set_preshared_key(peer, bytes(range(32)))
    assert peer.preshared_key == bytes(range(32))
    core.set_preshared_key(peer, bytes(32))  # all zero means none, as in wg(8)
    assert peer.preshared_key is None
    core.set_preshared_key(peer, None)
    assert peer.preshared_key is None
    with pytest.raises(ValueError, match="^a private key is 32 bytes$"):
        crypto.clamp(bytes(31))
    core.set_private_key(None)
    assert core.private_key is None and core.public_key is None and peer.static_static is None


def test_taking_a_peers_key_removes_that_peer():
    p = established()
    b_private = p.b.private_key
    p.a.set_private_key(b_private)
    assert p.b.public_key not in p.a.peers and p.a.lookup_peer_for(B_IP) is None
    assert p.pa.keypairs.current is None and not p.a._keypairs_by_index


def test_allowed_ips_add_remove():
    p = Pair()
    p.a.add_allowed_ip(p.pa, "10.1.0.7/24")  # host bits are masked off
    assert p.a.lookup_peer_for("10.1.0.200") is p.pa and "10.1.0.0/24" in map(str, p.pa.allowed_ips)
    other = p.a.add_peer(bytes(range(1, 33)))
    p.a.remove_allowed_ip(other, "10.1.0.0/24")  # not other's: nothing happens
    assert p.a.lookup_peer_for("10.1.0.200") is p.pa
    p.a.remove_allowed_ip(p.pa, "10.1.0.0/24")
    assert p.a.lookup_peer_for("10.1.0.200") is None and p.a.lookup_peer_for(B_IP) is p.pa
    p.a.remove_peer(bytes(range(5, 37)))  # unknown: nothing happens
    assert repr(p.pa) == f"<Peer {p.b.public_key[:4].hex()}… endpoint={p.pa.endpoint!r}>"


def test_allowed_ips_destination_lookup_needs_a_whole_header():
    table, peer = AllowedIPs(), object()
    table.insert("10.0.0.0/8", peer)
    table.insert("fd00::/8", peer)
    table.insert("10.2.0.0/16", peer)
    table.insert("10.3.0.0/16", object())
    v4 = ipv4_packet("10.0.0.1", "10.0.0.2", b"")
    v6 = ipv6_packet("fd00::1", "fd00::2", b"")
    assert table.lookup_dst(v4) is peer and table.lookup_dst(v4[:19]) is None
    assert table.lookup_dst(v6) is peer and table.lookup_dst(v6[:39]) is None
    assert table.lookup_dst(b"") is None and table.lookup_dst(bytes(40)) is None
    assert table.remove("10.2.0.0/16", peer)
    assert table.lookup("10.3.0.1") is not None and table.lookup("10.3.0.1") is not peer
    assert table.lookup_v4(bytes([10, 2, 0, 1])) is peer


# ------------------------------------------------------------------ handshake re-send, indices, jitter

def test_resend_handshake():
    p = Pair()
    p.block_a_to_b = True
    assert p.a.resend_handshake(p.pa, 0.0) is None  # nothing pending
    p.send_a()
    first = p.pa.handshake_index
    assert p.a.resend_handshake(p.pa, 0.1) == 0.25  # too soon: try again at 0.25 s
    assert len([1 for _, n, d in p.sent if d[0] == 1]) == 1
    assert p.a.resend_handshake(p.pa, 0.3) == 0.3
    p.deliver()
    assert len([1 for _, n, d in p.sent if d[0] == 1]) == 2 and p.pa.handshake_index != first
    assert p.pa.timers.handshake_attempts == 0  # a re-send is not a timer retry
    assert 5.3 <= p.pa.timers.retransmit_handshake <= 5.3 + 0.334
    p.block_a_to_b = False
    assert p.a.resend_handshake(p.pa, 0.6) == 0.6
    p.deliver()
    assert p.pa.keypairs.current is not None and len(p.tun_b) == 1
    assert p.a.resend_handshake(p.pa, 1.0) is None  # done: nothing pending


def test_index_tag_is_in_the_top_16_bits_of_every_index():
    rng = random.Random(3)
    core = WireGuardCore(crypto.clamp(rng.randbytes(32)), rng.randbytes, index_tag=0xBEEF)
    peer = core.add_peer(crypto.dh_pub(crypto.clamp(rng.randbytes(32))))
    core.set_endpoint(peer, A_ADDR)
    lows = set()
    for t in range(0, 60, 6):
        core.initiate_handshake(peer, float(t))
        [(init, _)] = core.datagrams_to_send()
        index = struct.unpack_from("<I", init, 4)[0]
        assert index >> 16 == 0xBEEF
        lows.add(index & 0xFFFF)
    assert len(lows) == 10  # the low half stays random


def test_retransmit_jitter_comes_from_two_random_bytes_per_draw():
    # Every random_bytes call returns a known pattern: the jitter pool is 64 LE u16 % 334 ms, used from
    # the end (wireguard-go RekeyTimeoutJitterMaxMs: jitter uniform in [0, 333] ms).
    def pattern(n: int) -> bytes:
        return bytes((i * 37 + 11) % 256 for i in range(n))

    core = WireGuardCore(crypto.clamp(bytes(range(32))), pattern)
    peer = core.add_peer(crypto.dh_pub(crypto.clamp(bytes(range(1, 33)))))
    core.set_endpoint(peer, A_ADDR)
    raw = pattern(128)
    pool = [int.from_bytes(raw[i:i + 2], "little") % 334 for i in range(0, 128, 2)]
    for k in range(70):  # past one pool: it is refilled
        now = 10.0 * k
        core.initiate_handshake(peer, now)
        expected = pool[-1 - (k % 64)] / 1000.0
        assert peer.timers.retransmit_handshake == pytest.approx(now + 5.0 + expected, abs=1e-9), k


# ------------------------------------------------------------------ timers

def test_one_passive_keepalive_per_quiet_period():
    p = Pair()
    p.send_a()
    t0 = p.now
    p.run_until(t0 + 60)
    assert [round(t - t0, 3) for t, kind, n in p.sent_types("b->a", t0 + 0.001) if kind == 4] == [10.0]


def test_data_received_while_a_keepalive_is_due_sends_one_more_later():
    p = Pair()
    p.send_a()
    p.run_until(3.0)
    p.send_a()  # b's keepalive timer (10 s) is already armed: one more is owed after it
    p.run_until(40.0)
    assert [round(t, 3) for t, kind, n in p.sent_types("b->a", 0.001) if kind == 4] == [10.0, 20.0]


def test_receiving_rearms_persistent_keepalive():
    p = established()
    p.b.set_persistent_keepalive(p.pb, 25, p.now)
    p.run_until(7.0)
    p.send_a()
    assert p.pb.timers.persistent_keepalive == pytest.approx(7.0 + 25)


def test_initiator_tries_once_more_when_its_key_nears_180s():
    p = Pair()
    p.send_a()
    created = p.pa.keypairs.current.created
    p.block_a_to_b = True  # a's initiations are only counted
    p.run_until(created + 165.0)
    before = len([1 for _, n, d in p.sent if n == "a->b" and d[0] == 1])
    p.send_b()  # received at exactly 165 s: not yet
    assert len([1 for _, n, d in p.sent if n == "a->b" and d[0] == 1]) == before
    p.now = created + 165.5
    p.send_b()
    assert len([1 for _, n, d in p.sent if n == "a->b" and d[0] == 1]) == before + 1
    assert p.pa.timers.sent_lastminute_handshake is True


# ------------------------------------------------------------------ keypair slots

def _kp(i: int, initiator: bool) -> Keypair:
    return Keypair(bytes([i]) * 32, bytes([i]) * 32, i, 100 + i, 0.0, initiator)


def test_keypair_slots_follow_wireguard_go():
    s = Keypairs()
    k1, k2, k3 = _kp(1, True), _kp(2, True), _kp(3, True)
    assert s.install(k1) == [] and (s.current, s.previous, s.next) == (k1, None, None)
    assert s.install(k2) == [] and (s.current, s.previous) == (k2, k1)
    assert s.install(k3) == [k1] and (s.current, s.previous) == (k3, k2)
    r4 = _kp(4, False)
    assert s.install(r4) == [k2] and (s.current, s.previous, s.next) == (k3, None, r4)
    assert s.confirm(k3) is None
    assert s.confirm(r4) == [] and (s.current, s.previous, s.next) == (r4, k3, None)
    r5 = _kp(5, False)
    assert s.install(r5) == [k3] and s.next is r5
    k6 = _kp(6, True)  # an initiator's keypair while next is unconfirmed: next becomes previous
    assert s.install(k6) == [r4] and (s.current, s.previous, s.next) == (k6, r5, None)
    r7 = _kp(7, False)
    assert s.install(r7) == [r5] and s.previous is None  # a responder's install empties previous
    assert s.confirm(r7) == [] and (s.current, s.previous) == (r7, k6)
    assert s.clear() == [r7, k6] and (s.current, s.previous, s.next) == (None, None, None)


def test_keypair_seal_and_open():
    sender, receiver = _kp(1, True), _kp(1, False)
    m0, m1 = sender.seal(b"a" * 16), sender.seal(b"b" * 16)
    assert struct.unpack_from("<IIQ", m0) == (4, 101, 0) and struct.unpack_from("<Q", m1, 8)[0] == 1
    assert receiver.open(m1) == b"b" * 16 and receiver.open(m0) == b"a" * 16
    assert receiver.open(m0) is None  # replayed
    assert receiver.open(m0[:20] + bytes([m0[20] ^ 1]) + m0[21:]) is None


# ------------------------------------------------------------------ cookies and the rate limiter

def test_cookie_source_encoding_and_rate_limit_key():
    assert address_bytes(("10.0.0.1", 0x1234)) == bytes([10, 0, 0, 1, 0x12, 0x34])
    assert address_bytes(("::1", 7)) == bytes(15) + b"\x01\x00\x07"
    assert address_bytes(("not an ip", 7)) == repr(("not an ip", 7)).encode()
    assert address_bytes(("10.0.0.1", "7")) == repr(("10.0.0.1", "7")).encode()
    assert address_bytes(["10.0.0.1", 7]) == repr(["10.0.0.1", 7]).encode()
    assert address_bytes(("10.0.0.1",)) == repr(("10.0.0.1",)).encode()
    relay = object()
    assert address_bytes(relay) == repr(relay).encode()
    assert address_host(("10.0.0.1", 9)) == "10.0.0.1" and address_host(relay) is relay
    assert address_host(("x",)) == ("x",) and address_host("10.0.0.1") == "10.0.0.1"


def test_initiator_sends_mac2_only_with_a_cookie_younger_than_120s():
    gen = CookieGenerator(bytes(range(32)))
    body = bytes(116)
    assert gen.add_macs(body, 0.0)[132:] == bytes(16)
    assert gen.consume_reply(bytes(24), bytes(32), 0.0) is False  # garbage
    gen.cookie, gen.cookie_time = bytes(range(16)), 1000.0
    assert gen.add_macs(body, 1119.0)[132:] == crypto.mac(bytes(range(16)), gen.add_macs(body, 1119.0)[:132])
    assert gen.add_macs(body, 1121.0)[132:] == bytes(16)
    fresh = CookieGenerator(bytes(range(32)))
    assert fresh.consume_reply(bytes(24), bytes(32), 0.0) is False  # no mac1 sent yet


def test_rate_limiter_burst_refill_and_forgetting():
    rl = RateLimiter()
    assert [rl.allow("x", 10.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow("y", 10.0)  # per key
    assert not rl.allow("x", 10.01) and rl.allow("x", 10.11)  # 20 per second: one token per 50 ms
    assert len(rl) == 2
    rl.allow("z", 11.5)  # a second later the idle buckets are forgotten
    assert len(rl) == 1


# ------------------------------------------------------------------ the codec and small primitives

def test_every_message_type_round_trips_with_its_fields():
    p = Pair()
    cookie = p.cookie_reply()
    q = Pair()
    q.send_a()
    init = next(d for _, _, d in q.sent if d[0] == 1)
    resp = next(d for _, _, d in q.sent if d[0] == 2)
    data = next(d for _, _, d in q.sent if d[0] == 4 and len(d) > 32)
    for wire in (init, cookie, resp, data):
        assert messages.encode(messages.parse_untrusted(wire)) == wire
    r = messages.parse_untrusted(resp)
    assert (r.sender, r.receiver) == struct.unpack_from("<II", resp, 4)
    assert (r.ephemeral, r.encrypted_nothing, r.mac1, r.mac2) == (resp[12:44], resp[44:60], resp[60:76], resp[76:92])
    c = messages.parse_untrusted(cookie)
    assert (c.receiver, c.nonce, c.encrypted_cookie) == (struct.unpack_from("<I", cookie, 4)[0], cookie[8:32],
                                                         cookie[32:64])
    t = messages.parse_untrusted(data)
    assert (t.receiver, t.counter, t.encrypted_packet) == (*struct.unpack_from("<IQ", data, 4), data[16:])
    i = messages.parse_untrusted(init)
    assert (i.sender, i.mac1, i.mac2) == (struct.unpack_from("<I", init, 4)[0], init[116:132], init[132:148])
    keepalive = data[:32]
    assert messages.parse_untrusted(keepalive) is not None and messages.parse_untrusted(data[:31]) is None
    assert messages.parse_untrusted(b"\x04\x00\x00\x00") is None and messages.parse_untrusted(b"\x04\x00\x00") is None
    assert messages.parse_untrusted(resp[:-1]) is None and messages.parse_untrusted(cookie + b"x") is None
    with pytest.raises(TypeError, match="^not a WireGuard message: object$"):
        messages.encode(object())


def test_clamp_dh_and_tai64n_details():
    assert crypto.clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"
    # libsodium refuses a low-order point itself (the all-zero branch is a second line of defence).
    with pytest.raises(crypto.InvalidKey, match="^X25519 produced an invalid shared secret$"):
        crypto.dh(crypto.clamp(bytes(range(32))), bytes(32))
    with pytest.raises(crypto.InvalidKey, match="^X25519 produced an invalid shared secret$"):
        crypto.dh(bytes(32), bytes(31))
    # Nanoseconds rounding up to a whole second carry into the seconds.
    assert crypto.tai64n(1_700_000_001.9999999999) == crypto.tai64n(1_700_000_002.0)
    assert crypto.tai64n(1_700_000_000.5)[8:] == struct.pack(">I", 500_000_000 & ~0xFFFFFF)
