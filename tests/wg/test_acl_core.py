"""The inbound filter inside the WireGuard core (issue 13): two cores over explicit time (wg_pair). An allowed port
passes, a denied one is dropped and counted, a reply to our own flow passes, and a forged inner source from another
peer's range is stopped by cryptokey routing before the filter ever sees it."""

from __future__ import annotations

import ipaddress
import struct

from wg_pair import A_IP, B_IP, Pair

C_IP = "10.0.0.3"
SYN, SYNACK = 0x02, 0x12


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    l4 = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 1000, 0, 0)
    return struct.pack("!BBHHHBB2x4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, 6, ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + l4


def policy_pair() -> Pair:
    """b accepts tcp/22 from a; a accepts nothing new from b (replies only)."""
    p = Pair()
    p.b.set_peer_accept(p.pb, [(6, 22, 22, f"{B_IP}/32")])
    p.a.set_peer_accept(p.pa, [])
    return p


def send(p: Pair, side: str, pkt: bytes) -> None:
    (p.a if side == "a" else p.b).send_ip_packet(pkt, p.now)
    p.deliver()


def test_an_allowed_port_passes_and_a_denied_one_is_dropped_and_counted():
    p = policy_pair()
    allowed = tcp_packet(A_IP, B_IP, 40000, 22, SYN)
    send(p, "a", allowed)
    assert p.tun_b == [allowed]
    send(p, "a", tcp_packet(A_IP, B_IP, 40000, 23, SYN))
    assert p.tun_b == [allowed]
    assert p.b.drops["acl_not_allowed"] == 1


def test_a_reply_to_our_own_flow_passes_and_an_unsolicited_packet_does_not():
    p = policy_pair()
    send(p, "a", tcp_packet(A_IP, B_IP, 40000, 22, SYN))             # a opens a connection to b:22
    reply = tcp_packet(B_IP, A_IP, 22, 40000, SYNACK)
    send(p, "b", reply)
    assert p.tun_a == [reply]
    assert p.a.acl_counters["open_acl_flow"] == 1
    send(p, "b", tcp_packet(B_IP, A_IP, 41000, 80, SYN))            # b opens nothing at a: a accepts replies only
    assert p.tun_a == [reply] and p.a.drops["acl_not_allowed"] == 1


def test_a_forged_inner_source_is_stopped_by_cryptokey_routing_before_the_filter():
    p = policy_pair()
    other = p.b.add_peer(bytes(range(1, 33)))                        # c: owns 10.0.0.3, and may send b anything
    p.b.set_allowed_ips(other, [ipaddress.ip_network(f"{C_IP}/32")])
    p.b.set_peer_accept(other, [(0, 0, 65535, f"{B_IP}/32")])
    send(p, "a", tcp_packet(C_IP, B_IP, 40000, 23, SYN))             # a claims to be c, to a port a may not reach
    assert p.tun_b == []
    assert p.b.drops["source_not_allowed"] == 1 and p.b.drops["acl_not_allowed"] == 0


def test_no_policy_means_no_filter_and_a_new_list_applies_at_once():
    p = Pair()
    assert p.pb.acl is None
    send(p, "a", tcp_packet(A_IP, B_IP, 40000, 23, SYN))
    assert len(p.tun_b) == 1
    p.b.set_peer_accept(p.pb, [(6, 22, 22, f"{B_IP}/32")])
    send(p, "a", tcp_packet(A_IP, B_IP, 40000, 23, SYN))
    assert len(p.tun_b) == 1 and p.b.drops["acl_not_allowed"] == 1
    p.b.set_peer_accept(p.pb, None)
    send(p, "a", tcp_packet(A_IP, B_IP, 40000, 23, SYN))
    assert len(p.tun_b) == 2
