"""Two cores in memory over explicit time: handshake, timers, rekey, roaming, cookies (WireGuard paper §5-§6)."""

from __future__ import annotations

import ipaddress

from wg_pair import A_ADDR, A_IP, B_ADDR, B_IP, Pair, ipv4_packet

from meshwg.wg import crypto, messages
from meshwg.wg.constants import INITIATION_SIZE, KEEPALIVE_SIZE
from meshwg.wg.events import EndpointChanged, HandshakeCompleted, HandshakeFailed, KeysZeroed


def initiations(pair: Pair, direction: str = "a->b"):
    return [t for t, kind, _ in pair.sent_types(direction) if kind == 1]


def test_handshake_then_staged_packets_flushed_in_order():
    p = Pair(psk=bytes(range(32)))
    pkts = [p.send_a(bytes([i]) * 100) for i in range(3)]  # staged, and the first triggers the handshake
    assert p.tun_b == pkts
    assert HandshakeCompleted(p.b.public_key) in p.events_a
    assert HandshakeCompleted(p.a.public_key) in p.events_b  # responder confirmed by the first data
    assert p.pb.endpoint == A_ADDR and p.pa.last_handshake_wall is not None
    reply = p.send_b(b"pong")
    assert p.tun_a == [reply]
    assert not p.a.drops and not p.b.drops
    assert len(initiations(p)) == 1


def test_psk_mismatch_fails_handshake():
    p = Pair()
    p.b.set_preshared_key(p.pb, bytes(range(32)))
    p.send_a()
    assert p.tun_b == [] and p.a.drops["handshake_auth"] == 1


def test_padding_to_16_and_mtu():
    p = Pair()
    p.send_a()
    for size in (20, 21, 36, 1400, 1419, 1420):
        pkt = ipv4_packet(A_IP, B_IP, bytes(size - 20))
        p.a.send_ip_packet(pkt, p.now)
        [(wire, _)] = p.a.datagrams_to_send()
        assert len(wire) - 32 == min(-(-size // 16) * 16, 1420)
        p.b.receive_datagram(wire, A_ADDR, p.now)
        assert p.b.tun_packets_to_write() == [pkt]  # trimmed back to the IP length


def test_passive_keepalive_after_10s():
    p = Pair()
    p.send_a()
    t0 = p.now
    p.run_until(t0 + 9.9)
    assert [x for x in p.sent_types("b->a", t0 + 0.001)] == []
    p.run_until(t0 + 10.5)
    assert [(round(t - t0, 3), kind, n) for t, kind, n in p.sent_types("b->a", t0 + 0.001)] == [(10.0, 4, KEEPALIVE_SIZE)]


def test_new_handshake_when_peer_goes_quiet():
    p = Pair()
    p.send_a()
    p.block_b_to_a = True  # b's keepalives are lost: a hears nothing back
    t0 = p.now
    p.send_a()
    p.run_until(t0 + 14.9)
    assert initiations(p) == [0.0]
    p.run_until(t0 + 15.5)
    again = initiations(p)[1:]
    assert len(again) == 1 and 15.0 <= again[0] - t0 <= 15.334


def test_persistent_keepalive():
    p = Pair()
    p.send_a()
    p.run_until(20)  # b's passive keepalive (at 10 s) is behind us: it would re-arm a's timer
    p.a.set_persistent_keepalive(p.pa, 25, p.now)  # 0 -> 25 sends one at once
    t0 = p.now
    p.run_until(t0 + 101)
    ka = [round(t - t0) for t, kind, n in p.sent_types("a->b", t0) if kind == 4 and n == KEEPALIVE_SIZE]
    assert ka == [0, 25, 50, 75, 100]
    p.a.set_persistent_keepalive(p.pa, 0, p.now)
    p.run_until(t0 + 200)
    assert [t for t, kind, n in p.sent_types("a->b", t0 + 101) if kind == 4] == []


def test_retransmits_stop_after_20_initiations_then_keys_zeroed():
    p = Pair()
    p.block_a_to_b = True
    p.send_a()
    p.run_until(200)
    times = initiations(p)
    assert len(times) == 20
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(5.0 <= g <= 5.334 for g in gaps)
    assert 90 <= times[-1] <= 19 * 5.334
    assert HandshakeFailed(p.b.public_key) in p.events_a
    assert not p.pa.staged and p.a.drops["staged_handshake_failed"] == 1
    p.run_until(700)
    assert len(initiations(p)) == 20


def test_rekey_over_ten_minutes_with_continuous_traffic():
    p = Pair()
    indices = set()
    for second in range(600):
        p.run_until(float(second))
        p.send_a(second.to_bytes(2, "big"))
        if second % 7 == 0:
            p.send_b()
        indices.add(p.pa.keypairs.current.local_index)
    assert len(p.tun_b) == 600  # nothing lost across rekeys
    completed = [e for e in p.events_a if isinstance(e, HandshakeCompleted)]
    assert 4 <= len(completed) <= 6  # one at start, then every ~120 s
    assert len(indices) == len(completed)
    assert p.b.drops["expired_keypair"] == 0 and not p.a.drops
    # Only the initiator of the current session rekeys on time: b never initiated.
    assert initiations(p, "b->a") == []


def test_old_keys_rejected_after_180s():
    p = Pair()
    p.send_a()
    kp = p.pa.keypairs.current
    stale = kp.seal(ipv4_packet(A_IP, B_IP, b"late") + bytes(8))  # valid, but delivered only after 180 s
    p.run_until(p.now + 179)
    p.b.receive_datagram(stale, A_ADDR, p.now)
    assert p.b.tun_packets_to_write() and p.b.drops["expired_keypair"] == 0
    stale2 = kp.seal(ipv4_packet(A_IP, B_IP, b"later") + bytes(7))
    p.run_until(kp.created + 180.0)
    p.b.receive_datagram(stale2, A_ADDR, p.now)
    assert p.b.drops["expired_keypair"] == 1 and not p.b.tun_packets_to_write()
    # The sender no longer uses it either: new data is staged and triggers a new handshake.
    before = len(initiations(p))
    p.send_a(b"after")
    assert len(initiations(p)) == before + 1 and p.pa.keypairs.current is not kp
    assert p.tun_b[-1] == ipv4_packet(A_IP, B_IP, b"after")


def test_keys_zeroed_after_540s_without_new_session():
    p = Pair()
    p.send_a()
    t0 = p.now
    p.run_until(t0 + 539)
    assert p.pa.keypairs.current is not None
    p.run_until(t0 + 541)
    assert p.pa.keypairs.current is None and p.pb.keypairs.current is None
    assert KeysZeroed(p.b.public_key) in p.events_a and KeysZeroed(p.a.public_key) in p.events_b
    assert not p.a._keypairs_by_index and not p.b._keypairs_by_index


def test_roaming_follows_source_address():
    p = Pair()
    p.send_a()
    new_addr = ("203.0.113.9", 40000)
    p.addr[id(p.a)] = new_addr
    p.send_a()
    assert p.pb.endpoint == new_addr and EndpointChanged(p.a.public_key, new_addr) in p.events_b
    reply = p.send_b()
    assert p.tun_a[-1] == reply  # b's reply went to the new address
    # Unauthenticated bytes from elsewhere do not move the endpoint.
    p.b.receive_datagram(b"\x04\0\0\0" + bytes(60), ("198.18.0.1", 1), p.now)
    assert p.pb.endpoint == new_addr
    # roaming=False: the endpoint stays, last_rx_addr still tracks the source.
    p.pb.roaming = False
    other = ("203.0.113.10", 40001)
    p.addr[id(p.a)] = other
    p.send_a()
    assert p.pb.endpoint == new_addr and p.pb.last_rx_addr == other


def test_source_address_check():
    p = Pair()
    p.send_a()
    spoofed = ipv4_packet("10.0.0.99", B_IP)
    p.a.add_allowed_ip(p.pa, ipaddress.ip_network("10.0.0.0/24"))  # a routes it to b...
    p.a.send_ip_packet(spoofed, p.now)
    p.deliver()
    assert spoofed not in p.tun_b and p.b.drops["source_not_allowed"] == 1  # ...but b does not accept it


def test_staged_queue_is_bounded():
    p = Pair()
    p.block_a_to_b = True
    for i in range(130):
        p.a.send_ip_packet(ipv4_packet(A_IP, B_IP, i.to_bytes(2, "big")), p.now)
    assert len(p.pa.staged) == 128 and p.a.drops["staged_overflow"] == 2
    p.block_a_to_b = False
    p.run_until(6)
    assert len(p.tun_b) == 128 and p.tun_b[0] == ipv4_packet(A_IP, B_IP, (2).to_bytes(2, "big"))


def test_initiation_replay_and_flood_are_dropped():
    p = Pair()
    p.a.initiate_handshake(p.pa, 0.0)
    [(init, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(init, A_ADDR, 0.0)
    assert len(p.b.datagrams_to_send()) == 1
    p.b.receive_datagram(init, A_ADDR, 1.0)
    assert p.b.drops["handshake_replay"] == 1 and not p.b.datagrams_to_send()
    p.a.initiate_handshake(p.pa, 5.5)
    [(init2, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(init2, A_ADDR, 5.5)
    p.a.initiate_handshake(p.pa, 11.0)
    [(init3, _)] = p.a.datagrams_to_send()
    p.b.receive_datagram(init3, A_ADDR, 5.51)  # < 20 ms after the previous one
    assert p.b.drops["handshake_flood"] == 1


def test_cookie_path_under_load():
    p = Pair()
    p.b.note_handshake_backlog(200, 0.0)  # b's handshake queue is full
    assert p.b.is_under_load(0.5)
    p.a.send_ip_packet(ipv4_packet(A_IP, B_IP), 0.0)
    p.deliver()
    assert [kind for _, kind, _ in p.sent_types("b->a")] == [3]  # a cookie reply, no response
    assert p.pa.cookie.cookie is not None and p.b.drops["under_load_cookie_sent"] == 1
    assert initiations(p) == [0.0]  # not resent at once
    # Still under load when the retransmission (with mac2) arrives: it is processed.
    p.b.note_handshake_backlog(200, 4.5)
    p.run_until(5.5)
    assert [kind for _, kind, _ in p.sent_types("b->a")] == [3, 2]
    assert len(p.tun_b) == 1
    # Under load, valid mac2 but the per-source rate limit applies (burst 5).
    init = [d for _, name, d in p.sent if name == "a->b" and d[0] == 1][-1]
    p.b.note_handshake_backlog(200, 6.0)
    for i in range(10):
        p.b.receive_datagram(init, A_ADDR, 6.0)
    # The bucket for a's IP was created at 5.5 s and is full again (5 tokens): 5 pass, 5 are limited.
    assert p.b.drops["ratelimited"] == 5
    p.b.datagrams_to_send()


def test_cookie_reply_with_wrong_mac1_is_ignored():
    p = Pair()
    reply = p.cookie_reply()
    bad = bytearray(reply)
    bad[40] ^= 1
    p.a.receive_datagram(bytes(bad), B_ADDR, 0.0)
    assert p.a.drops["bad_cookie_reply"] == 1 and p.pa.cookie.cookie is None
    p.a.receive_datagram(reply, B_ADDR, 0.0)
    assert p.pa.cookie.cookie is not None


def test_auto_load_detection_from_a_flood():
    p = Pair()
    p.a.initiate_handshake(p.pa, 0.0)
    [(init, _)] = p.a.datagrams_to_send()
    garbage = bytearray(init)
    garbage[50] ^= 1
    for i in range(200):  # not even mac1-valid: still counts as queued handshake work
        p.b.receive_datagram(bytes(garbage), ("198.18.0.1", 1000 + i), 0.01)
    assert p.b.is_under_load(0.02)
    p.b.receive_datagram(init, A_ADDR, 0.02)
    assert [d[0] for d, _ in p.b.datagrams_to_send()] == [3]
    assert not p.b.is_under_load(1.2)


def test_remove_peer_forgets_everything():
    p = Pair()
    p.send_a()
    p.a.remove_peer(p.b.public_key)
    assert not p.a._keypairs_by_index and p.a.lookup_peer_for(B_IP) is None and p.a.get_timer() == float("inf")
    p.a.send_ip_packet(ipv4_packet(A_IP, B_IP), p.now)
    assert p.a.drops["no_route"] == 1


def test_initiation_message_is_wellformed():
    p = Pair()
    p.a.initiate_handshake(p.pa, 0.0)
    [(init, addr)] = p.a.datagrams_to_send()
    assert addr == B_ADDR and len(init) == INITIATION_SIZE
    assert isinstance(messages.parse_untrusted(init), messages.Initiation)


def test_resetting_the_same_unclamped_private_key_keeps_sessions():
    # `wg syncconf` re-sends the key as written (often unclamped): that must not reset every session.
    p = Pair()
    p.send_a()
    kp = p.pa.keypairs.current
    assert kp is not None
    unclamped = bytearray(p.a.private_key)
    unclamped[0] |= 7
    unclamped[31] |= 0x80
    p.a.set_private_key(bytes(unclamped))
    assert p.pa.keypairs.current is kp and p.pb.keypairs.current is not None
    assert p.tun_b[-1] == p.send_a()  # the same session still carries data, no new handshake
    assert len(initiations(p)) == 1
    assert not p.a.drops and not p.b.drops


def test_a_different_private_key_still_drops_sessions():
    p = Pair()
    p.send_a()
    p.a.set_private_key(bytes(range(32)))
    assert p.pa.keypairs.current is None and p.a.private_key == crypto.clamp(bytes(range(32)))
