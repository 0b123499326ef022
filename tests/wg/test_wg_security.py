"""The checks WireGuard exists for, each exercised through the whole core (issue 18 item 1).

Each test fails when its check is removed from meshwg/wg: the replay window on the transport path,
cryptokey routing of the inner source address (IPv4 and IPv6, a source that belongs to another peer),
the 120 s cookie secret, the message-count limits, and drop counters that move by exactly one.
Bounds are literals from the WireGuard paper / wireguard-go, never the constants under test.
"""

from __future__ import annotations

import ipaddress
import struct

from wg_pair import A_ADDR, A_IP, B_IP, Pair, ipv4_packet

from meshwg.wg import crypto

C_IP = "10.0.0.3"
A_IP6, B_IP6, C_IP6 = "fd00::1", "fd00::2", "fd00::3"
REKEY_AFTER = 2**60  # WireGuard paper §6.1, Rekey-After-Messages
REJECT_AFTER = 2**64 - 2**13 - 1  # wireguard-go RejectAfterMessages (device/constants.go)


def ipv6_packet(src: str, dst: str, payload: bytes = b"z" * 48) -> bytes:
    """A UDP-protocol IPv6 packet (no checksum to get right at this layer)."""
    return (struct.pack("!IHBB", 0x60000000, len(payload), 17, 64) + ipaddress.IPv6Address(src).packed
            + ipaddress.IPv6Address(dst).packed + payload)


def transport_counters(pair: Pair, direction: str) -> list[int]:
    return [struct.unpack_from("<Q", d, 8)[0] for _, name, d in pair.sent if name == direction and d[0] == 4]


def initiations(pair: Pair, direction: str) -> int:
    return sum(1 for _, name, d in pair.sent if name == direction and d[0] == 1)


def established() -> Pair:
    p = Pair()
    p.send_a()
    p.send_b()
    p.run_until(6.0)  # past the 5 s between handshake messages, so a rekey may start at once
    p.tun_a.clear()
    p.tun_b.clear()
    return p


# ------------------------------------------------------------------ replay on the data path

def test_replayed_data_packet_is_dropped_and_counted():
    p = established()
    pkt = ipv4_packet(A_IP, B_IP, b"once")
    p.a.send_ip_packet(pkt, p.now)
    [(wire, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(wire, A_ADDR, p.now)
    assert p.b.tun_packets_to_write() == [pkt]
    before = dict(p.b.drops)
    p.b.receive_datagram(wire, A_ADDR, p.now + 0.001)
    assert p.b.tun_packets_to_write() == []
    assert p.b.drops["replay"] == before.get("replay", 0) + 1
    assert sum(p.b.drops.values()) == sum(before.values()) + 1


def test_replayed_keepalive_and_out_of_order_packets():
    p = established()
    wires = []
    for i in range(3):
        p.a.send_ip_packet(ipv4_packet(A_IP, B_IP, bytes([i]) * 8), p.now)
        [(wire, _)] = p.a.datagrams_to_send()
        wires.append(wire)
    # Out of order but never seen: accepted; then each one again: dropped.
    for wire in (wires[2], wires[0], wires[1]):
        p.b.receive_datagram(wire, A_ADDR, p.now)
    assert len(p.b.tun_packets_to_write()) == 3
    for wire in wires:
        p.b.receive_datagram(wire, A_ADDR, p.now)
    assert p.b.tun_packets_to_write() == [] and p.b.drops["replay"] == 3


# ------------------------------------------------------------------ cryptokey routing on receive

def three_peers() -> tuple[Pair, object]:
    """a and b established; b also has a peer c (no core needed) owning 10.0.0.3 and fd00::3; a routes
    every mesh address to b so it can send spoofed sources."""
    p = Pair()
    c_key = crypto.dh_pub(crypto.clamp(bytes(range(1, 33))))
    pc = p.b.add_peer(c_key)
    p.b.set_allowed_ips(pc, [ipaddress.ip_network(C_IP + "/32"), ipaddress.ip_network(C_IP6 + "/128")])
    p.b.add_allowed_ip(p.pb, ipaddress.ip_network(A_IP6 + "/128"))
    p.a.set_allowed_ips(p.pa, [ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64")])
    p.send_a()
    p.tun_b.clear()
    return p, pc


def test_inner_ipv4_source_of_another_peer_is_dropped():
    p, _ = three_peers()
    spoofed = ipv4_packet(C_IP, B_IP, b"from a, claiming c")
    p.a.send_ip_packet(spoofed, p.now)
    p.deliver()
    assert p.tun_b == [] and p.b.drops["source_not_allowed"] == 1
    honest = p.send_a(b"from a")
    assert p.tun_b == [honest]


def test_inner_ipv6_source_of_another_peer_is_dropped():
    p, _ = three_peers()
    spoofed = ipv6_packet(C_IP6, B_IP6)
    p.a.send_ip_packet(spoofed, p.now)
    p.deliver()
    assert p.tun_b == [] and p.b.drops["source_not_allowed"] == 1
    unowned = ipv6_packet("fd00::99", B_IP6)
    p.a.send_ip_packet(unowned, p.now)
    p.deliver()
    assert p.tun_b == [] and p.b.drops["source_not_allowed"] == 2
    honest = ipv6_packet(A_IP6, B_IP6)
    p.a.send_ip_packet(honest, p.now)
    p.deliver()
    assert p.tun_b == [honest]
    assert sum(p.b.drops.values()) == 2


def test_ipv6_packet_with_padding_is_trimmed_to_its_length():
    p, _ = three_peers()
    honest = ipv6_packet(A_IP6, B_IP6, b"odd length!")  # sealed with padding to 16
    p.a.send_ip_packet(honest, p.now)
    p.deliver()
    assert p.tun_b == [honest]


def test_inner_source_checked_against_the_peer_that_sent_it():
    # c's address on a packet that really comes from c would pass; from a it must not, even though
    # b knows the address (the old test only spoofed an address no peer owns).
    p, pc = three_peers()
    assert p.b.lookup_peer_for(C_IP) is pc and p.b.lookup_peer_for(C_IP6) is pc
    for spoofed in (ipv4_packet(C_IP, B_IP), ipv6_packet(C_IP6, B_IP6)):
        p.a.send_ip_packet(spoofed, p.now)
    p.deliver()
    assert p.tun_b == [] and p.b.drops["source_not_allowed"] == 2


# ------------------------------------------------------------------ cookie secret lifetime (120 s)

def _initiation_with_mac2(p: Pair, cookie: bytes, now: float) -> bytes:
    """A fresh initiation from a whose mac2 is made with `cookie`, whatever a's cookie timer says."""
    p.a.initiate_handshake(p.pa, now)
    [(init, _)] = p.a.datagrams_to_send()
    with_mac1 = init[:132]
    return with_mac1 + crypto.mac(cookie, with_mac1)


def _cookie_from_b(p: Pair, now: float) -> bytes:
    reply = p.cookie_reply(now)
    assert reply[0] == 3
    p.a.receive_datagram(reply, p.addr[id(p.b)], now)
    assert p.pa.cookie.cookie is not None
    return p.pa.cookie.cookie


def test_mac2_accepted_while_cookie_secret_is_young():
    p = Pair()
    cookie = _cookie_from_b(p, 0.0)
    p.b.note_handshake_backlog(500, 119.0)
    p.b.receive_datagram(_initiation_with_mac2(p, cookie, 119.0), A_ADDR, 119.0)
    assert [d[0] for d, _ in p.b.datagrams_to_send()] == [2]  # a response: mac2 was good


def test_mac2_refused_when_cookie_secret_is_older_than_120s():
    p = Pair()
    cookie = _cookie_from_b(p, 0.0)
    before = p.b.drops["under_load_cookie_sent"]
    p.b.note_handshake_backlog(500, 121.0)
    p.b.receive_datagram(_initiation_with_mac2(p, cookie, 121.0), A_ADDR, 121.0)
    out = p.b.datagrams_to_send()
    assert [d[0] for d, _ in out] == [3]  # a new cookie, no response
    assert p.b.drops["under_load_cookie_sent"] == before + 1
    # The new cookie works: the secret was rotated, not just refused.
    p.a.receive_datagram(out[0][0], p.addr[id(p.b)], 121.0)
    fresh = p.pa.cookie.cookie
    assert fresh != cookie
    p.b.receive_datagram(_initiation_with_mac2(p, fresh, 126.5), A_ADDR, 126.5)
    assert [d[0] for d, _ in p.b.datagrams_to_send()] == [2]


# ------------------------------------------------------------------ message-count limits

def test_rekey_after_2_pow_60_messages():
    p = established()
    kp = p.pb.keypairs.current  # b is the responder: it never rekeys on time, only on count
    assert not kp.is_initiator
    kp.send_counter = REKEY_AFTER - 1
    p.send_b()
    assert initiations(p, "b->a") == 0
    p.send_b()  # the message with counter 2^60
    counters = transport_counters(p, "b->a")
    assert counters[-3:] == [REKEY_AFTER - 1, REKEY_AFTER, 0]  # then the new session's confirmation
    assert initiations(p, "b->a") == 1
    assert p.pb.keypairs.current is not kp  # the new session is in place


def test_rekey_after_2_pow_60_messages_on_the_staged_path():
    p = established()
    kp = p.pb.keypairs.current
    kp.send_counter = REKEY_AFTER + 1
    p.b._send_keepalive(p.pb, p.now)  # the staged-packet path (keepalives, flushed packets)
    p.deliver()
    assert initiations(p, "b->a") == 1


def test_no_message_sent_at_or_past_reject_after_messages():
    p = established()
    kp = p.pb.keypairs.current
    kp.send_counter = REJECT_AFTER - 1
    p.block_b_to_a = True  # keep the old session: the rekey it starts does not arrive
    p.b.send_ip_packet(ipv4_packet(B_IP, A_IP, b"last"), p.now)
    p.b.send_ip_packet(ipv4_packet(B_IP, A_IP, b"over"), p.now)
    p.deliver()
    assert max(transport_counters(p, "b->a")) == REJECT_AFTER - 1
    assert p.pb.keypairs.current is kp and list(p.pb.staged) == [ipv4_packet(B_IP, A_IP, b"over")]
    p.block_b_to_a = False
    p.run_until(p.now + 6)  # the initiation is retried, a new session carries the staged packet
    assert p.tun_a[-1] == ipv4_packet(B_IP, A_IP, b"over")
    assert max(transport_counters(p, "b->a")[-1:]) < 10


def test_no_staged_message_sent_past_reject_after_messages():
    p = established()
    kp = p.pb.keypairs.current
    kp.send_counter = REJECT_AFTER
    p.block_b_to_a = True
    p.b._send_keepalive(p.pb, p.now)
    p.deliver()
    assert all(c < REJECT_AFTER for c in transport_counters(p, "b->a"))
    assert initiations(p, "b->a") == 1


def test_received_counter_at_reject_after_messages_is_dropped():
    p = established()
    kp = p.pa.keypairs.current
    for counter, accepted in ((REJECT_AFTER - 1, True), (REJECT_AFTER, False), (2**64 - 1, False)):
        kp.send_counter = counter
        pkt = ipv4_packet(A_IP, B_IP, b"near the end")
        before = p.b.drops["replay"]
        p.b.receive_datagram(kp.seal(pkt + bytes(4)), A_ADDR, p.now)
        assert (p.b.tun_packets_to_write() == [pkt]) is accepted
        assert p.b.drops["replay"] == before + (not accepted)


# ------------------------------------------------------------------ exact drop counters

def _one_drop(core, counter: str, data: bytes, addr, now: float) -> None:
    before = dict(core.drops)
    core.receive_datagram(data, addr, now)
    after = dict(core.drops)
    assert after.get(counter, 0) == before.get(counter, 0) + 1, (counter, before, after)
    assert sum(after.values()) == sum(before.values()) + 1, (before, after)
    assert core.tun_packets_to_write() == [] and core.datagrams_to_send() == []


def test_each_bad_ciphertext_counts_one_decrypt_drop():
    p = established()
    p.a.send_ip_packet(ipv4_packet(A_IP, B_IP), p.now)
    [(wire, _)] = p.a.datagrams_to_send()
    for pos in (8, 15, 16, 40, len(wire) - 1):  # counter, body, tag
        bad = bytearray(wire)
        bad[pos] ^= 0x40
        _one_drop(p.b, "decrypt", bytes(bad), A_ADDR, p.now)
    p.b.receive_datagram(wire, A_ADDR, p.now)  # the original is still fresh: nothing was burnt
    assert len(p.b.tun_packets_to_write()) == 1


def test_each_bad_mac1_counts_one_bad_mac1_drop():
    p = Pair()
    for i, pos in enumerate((0 + 4, 8, 60, 115, 116, 131)):  # sender index, ephemeral, static, ts, mac1
        p.a.initiate_handshake(p.pa, i * 6.0)
        [(init, _)] = p.a.datagrams_to_send()
        bad = bytearray(init)
        bad[pos] ^= 1
        _one_drop(p.b, "bad_mac1", bytes(bad), A_ADDR, i * 6.0)
    p.a.initiate_handshake(p.pa, 100.0)
    [(resp_trigger, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(resp_trigger, A_ADDR, 100.0)
    [(resp, _)] = p.b.datagrams_to_send()
    bad = bytearray(resp)
    bad[70] ^= 1  # the response's mac1
    _one_drop(p.a, "bad_mac1", bytes(bad), p.addr[id(p.b)], 100.0)
