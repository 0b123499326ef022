"""The per-peer inbound filter (meshwg/wg/acl.py, issue 13): the compiled matcher against a straightforward
reference (hypothesis), the flows this node opened (replies pass, unsolicited packets drop, expiry, the bound),
ICMP, fragments and malformed packets. Figures are the module's documented ones: TCP 7440 s, UDP 120 s, ICMP 30 s."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from meshwg.wg.acl import DROP_MALFORMED, DROP_NOT_ALLOWED, PeerFilter, summary

US4, THEM4 = "100.64.0.1", "100.64.0.2"
US6, THEM6 = "fd00::1", "fd00::2"
SYN, ACK, SYNACK = 0x02, 0x10, 0x12


def ip4(src: str, dst: str, proto: int, l4: bytes, *, options: bytes = b"", frag: int = 0) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBB2x4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 0, frag, 64, proto,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + options + l4


def ip6(src: str, dst: str, proto: int, l4: bytes, *, ext: bytes = b"") -> bytes:
    nh = 60 if ext else proto   # a destination options header in front when given
    body = (bytes((proto, len(ext) // 8 - 1)) + ext[2:] if ext else b"") + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + body


def tcp(sport: int, dport: int, flags: int = ACK, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 1000, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"u") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int, ident: int = 7, body: bytes = b"") -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, ident, 1) + body


def pkt(src, dst, proto, l4, **kw) -> bytes:
    return (ip6 if ":" in src else ip4)(src, dst, proto, l4, **kw)


# ---------------------------------------------------------------------------- the matcher vs a reference

def reference_admits(rules, dst: str, proto: int, dport: int) -> bool:
    """The contract read literally: some rule's destination holds dst and its protocol (0 any; 1 icmp and icmpv6)
    and, for tcp/udp, its port range hold the packet."""
    addr = ipaddress.ip_address(dst)
    for rp, lo, hi, cidr in rules:
        net = ipaddress.ip_network(cidr, strict=False)
        if addr.version != net.version or addr not in net:
            continue
        if rp == 0 or (rp == 1 and proto in (1, 58)) or (rp == proto and proto in (6, 17) and lo <= dport <= hi):
            return True
    return False


CIDRS4 = ["100.64.0.1/32", "100.64.0.0/24", "192.168.1.0/24", "192.168.1.128/25", "10.0.0.0/8"]
CIDRS6 = ["fd00::1/128", "fd00::/64", "fd77::/48"]
DSTS = ["100.64.0.1", "100.64.0.9", "192.168.1.5", "192.168.1.200", "10.1.2.3", "8.8.8.8",
        "fd00::1", "fd00::77", "fd77::5", "2001:db8::1"]
PORTS = st.sampled_from([0, 1, 21, 22, 23, 53, 79, 80, 81, 443, 5201, 8000, 8100, 8101, 65534, 65535])


@st.composite
def rule(draw):
    proto = draw(st.sampled_from([0, 1, 6, 17]))
    a, b = draw(PORTS), draw(PORTS)
    return (proto, min(a, b), max(a, b), draw(st.sampled_from(CIDRS4 + CIDRS6)))


@st.composite
def packet(draw):
    dst = draw(st.sampled_from(DSTS))
    src = THEM6 if ":" in dst else THEM4
    proto = draw(st.sampled_from([1, 6, 17, 47, 58]))
    dport = draw(PORTS)
    sport = draw(st.integers(1, 65535))
    if proto == 6:
        l4 = tcp(sport, dport, draw(st.sampled_from([SYN, ACK])))
    elif proto == 17:
        l4 = udp(sport, dport)
    elif proto in (1, 58):
        l4 = icmp(8 if proto == 1 else 128)   # an echo request: never a reply nor an error about a flow
    else:
        l4 = b"\x00" * 8
    ext = b""
    if ":" in dst and draw(st.booleans()):
        ext = b"\x00\x00" + bytes(6)   # 8 bytes of destination options: the slow path follows the chain
    options = b"\x01\x01\x01\x00" if ":" not in dst and draw(st.booleans()) else b""   # IHL 6: the slow path
    p = ip6(src, dst, proto, l4, ext=ext) if ":" in dst else ip4(src, dst, proto, l4, options=options)
    return p, dst, proto, dport


@settings(max_examples=600, deadline=None)
@given(st.lists(rule(), max_size=20), st.lists(packet(), min_size=1, max_size=8))
def test_the_compiled_matcher_gives_the_reference_verdict(rules, packets):
    f = PeerFilter(rules)
    for p, dst, proto, dport in packets:
        expected = reference_admits(rules, dst, proto, dport)
        assert (f.check_in(p, 1.0) is None) == expected, (rules, dst, proto, dport)


@settings(max_examples=200, deadline=None)
@given(st.lists(rule(), max_size=20), st.lists(rule(), max_size=20), packet())
def test_a_recompiled_list_gives_the_new_verdict(first, second, sample):
    p, dst, proto, dport = sample
    f = PeerFilter(first)
    f.check_in(p, 1.0)   # fills the per-destination cache under the old list
    f.set_rules(second)
    assert (f.check_in(p, 2.0) is None) == reference_admits(second, dst, proto, dport)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.lists(rule(), max_size=4))
def test_random_bytes_never_raise(data, rules):
    f = PeerFilter(rules)
    if data:
        assert f.check_in(data, 1.0) in (None, DROP_NOT_ALLOWED, DROP_MALFORMED)
        f.note_out(data, 1.0)


# ---------------------------------------------------------------------------- flows this node opened

def test_a_reply_to_our_tcp_connection_passes_and_an_unsolicited_segment_does_not():
    f = PeerFilter([])   # the peer may open nothing
    f.note_out(pkt(US4, THEM4, 6, tcp(40000, 22, SYN)), 0.0)
    assert f.check_in(pkt(THEM4, US4, 6, tcp(22, 40000, SYNACK)), 0.1) is None
    assert f.check_in(pkt(THEM4, US4, 6, tcp(22, 40001, SYNACK)), 0.1) == DROP_NOT_ALLOWED   # another port of ours
    assert f.check_in(pkt(THEM4, US4, 6, tcp(23, 40000, ACK)), 0.1) == DROP_NOT_ALLOWED      # another port of theirs
    assert f.check_in(pkt(THEM4, US4, 17, udp(22, 40000)), 0.1) == DROP_NOT_ALLOWED          # another protocol
    assert f.check_in(pkt(THEM4, US4, 6, tcp(5000, 22, SYN)), 0.1) == DROP_NOT_ALLOWED


def test_only_our_syn_opens_a_tcp_flow():
    f = PeerFilter([])
    f.note_out(pkt(US4, THEM4, 6, tcp(40000, 22, ACK)), 0.0)       # a segment of a connection we did not open
    f.note_out(pkt(US4, THEM4, 6, tcp(22, 50000, SYNACK)), 0.0)   # our answer to the peer's SYN
    assert f.check_in(pkt(THEM4, US4, 6, tcp(22, 40000, ACK)), 0.1) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM4, US4, 6, tcp(50000, 22, ACK)), 0.1) == DROP_NOT_ALLOWED
    assert f.flow_count == 0


def test_ipv6_and_ip_options_take_the_same_state():
    f = PeerFilter([])
    f.note_out(pkt(US6, THEM6, 6, tcp(40000, 443, SYN)), 0.0)
    assert f.check_in(pkt(THEM6, US6, 6, tcp(443, 40000, SYNACK)), 0.1) is None
    assert f.check_in(ip6(THEM6, US6, 6, tcp(443, 40000, ACK), ext=bytes(8)), 0.1) is None
    f.note_out(ip4(US4, THEM4, 17, udp(5000, 53), options=b"\x01\x01\x01\x00"), 0.0)
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 5000)), 0.1) is None


def test_flows_expire_after_their_protocol_timeout_and_traffic_either_way_refreshes_them():
    f = PeerFilter([])
    f.note_out(pkt(US4, THEM4, 17, udp(5000, 53)), 0.0)
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 5000)), 119.0) is None      # refreshes: 119 + 120
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 5000)), 238.0) is None
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 5000)), 358.5) == DROP_NOT_ALLOWED
    f.note_out(pkt(US4, THEM4, 6, tcp(40000, 22, SYN)), 0.0)
    f.note_out(pkt(US4, THEM4, 6, tcp(40000, 22, ACK)), 7000.0)                # ours refresh it too
    assert f.check_in(pkt(THEM4, US4, 6, tcp(22, 40000)), 14000.0) is None
    assert f.check_in(pkt(THEM4, US4, 6, tcp(22, 40000)), 14000.0 + 7441) == DROP_NOT_ALLOWED
    f.note_out(pkt(US4, THEM4, 1, icmp(8, 9)), 0.0)
    assert f.check_in(pkt(THEM4, US4, 1, icmp(0, 9)), 30.5) == DROP_NOT_ALLOWED


def test_the_table_is_bounded_the_oldest_flow_goes_and_evictions_are_counted():
    f = PeerFilter([], max_flows=8)
    for port in range(20):
        f.note_out(pkt(US4, THEM4, 17, udp(1000 + port, 53)), float(port))
    assert f.flow_count == 8
    assert f.counters["evict_acl_flow"] == 12 and f.counters["open_acl_flow"] == 20
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 1019)), 20.0) is None
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 1012)), 20.0) is None
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 1011)), 20.0) == DROP_NOT_ALLOWED


def test_a_full_table_drops_expired_flows_before_evicting_live_ones():
    f = PeerFilter([], max_flows=4)
    for port in range(3):
        f.note_out(pkt(US4, THEM4, 1, icmp(8, port)), 0.0)       # expire at 30 s
    f.note_out(pkt(US4, THEM4, 17, udp(7000, 53)), 0.0)          # lives to 120 s
    f.note_out(pkt(US4, THEM4, 17, udp(7001, 53)), 60.0)
    assert f.counters["evict_acl_flow"] == 0
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 7000)), 61.0) is None


def test_udp_answering_what_the_rules_admit_opens_nothing():
    f = PeerFilter([(17, 53, 53, "100.64.0.1/32")])
    f.note_out(pkt(US4, THEM4, 17, udp(53, 40000)), 0.0)   # our DNS answer to the peer
    assert f.flow_count == 0
    f.note_out(pkt(US4, THEM4, 17, udp(40000, 53)), 0.0)   # our own query: its reverse is not admitted
    assert f.flow_count == 1


def test_a_policy_change_stops_the_peers_flows_and_keeps_ours():
    f = PeerFilter([(6, 22, 22, "100.64.0.1/32")])
    peers_flow = pkt(THEM4, US4, 6, tcp(50000, 22, ACK))
    assert f.check_in(pkt(THEM4, US4, 6, tcp(50000, 22, SYN)), 0.0) is None
    f.note_out(pkt(US4, THEM4, 6, tcp(22, 50000, SYNACK)), 0.0)
    f.note_out(pkt(US4, THEM4, 6, tcp(41000, 80, SYN)), 0.0)
    f.set_rules([])
    assert f.check_in(peers_flow, 1.0) == DROP_NOT_ALLOWED
    f.note_out(pkt(US4, THEM4, 6, tcp(22, 50000, ACK)), 1.0)   # we keep talking on it: still not ours
    assert f.check_in(peers_flow, 1.1) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM4, US4, 6, tcp(80, 41000, ACK)), 1.0) is None


def test_echo_replies_and_icmp_errors_about_our_flows_pass_others_do_not():
    f = PeerFilter([])
    f.note_out(pkt(US4, THEM4, 1, icmp(8, 77)), 0.0)
    assert f.check_in(pkt(THEM4, US4, 1, icmp(0, 77)), 0.5) is None
    assert f.check_in(pkt(THEM4, US4, 1, icmp(0, 78)), 0.5) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM4, US4, 1, icmp(8, 77)), 0.5) == DROP_NOT_ALLOWED   # their echo request
    ours = pkt(US4, THEM4, 17, udp(6000, 53))
    f.note_out(ours, 0.0)
    unreachable = lambda quoted: pkt(THEM4, US4, 1, struct.pack("!BBHI", 3, 3, 0, 0) + quoted[:28])  # noqa: E731
    assert f.check_in(unreachable(ours), 0.5) is None
    assert f.check_in(unreachable(pkt(US4, THEM4, 17, udp(6001, 53))), 0.5) == DROP_NOT_ALLOWED
    f.note_out(pkt(US6, THEM6, 58, icmp(128, 5)), 0.0)
    assert f.check_in(pkt(THEM6, US6, 58, icmp(129, 5)), 0.5) is None


def test_later_fragments_pass_and_truncated_headers_are_malformed():
    f = PeerFilter([])
    assert f.check_in(ip4(THEM4, US4, 6, b"\x00" * 16, frag=0x0010), 0.0) is None   # offset 128 bytes
    assert f.check_in(ip4(THEM4, US4, 6, b"\x00\x16"), 0.0) == DROP_MALFORMED
    assert f.check_in(pkt(THEM6, US6, 17, b"\x00"), 0.0) == DROP_MALFORMED


def test_an_any_protocol_rule_admits_everything_to_its_destination_only():
    f = PeerFilter([(0, 0, 65535, "192.168.1.0/24")])
    assert f.check_in(pkt(THEM4, "192.168.1.7", 47, bytes(8)), 0.0) is None
    assert f.check_in(pkt(THEM4, US4, 6, tcp(1, 22, SYN)), 0.0) == DROP_NOT_ALLOWED


def test_the_status_line():
    assert summary(None) == "all (no policy)"
    assert summary([]) == "replies only"
    assert summary([(6, 443, 443, "100.64.0.1/32"), (6, 22, 22, "100.64.0.1/32"), (1, 0, 65535, "fd00::1/128"),
                    (17, 53, 53, "100.64.0.1/32"), (6, 8000, 8100, "100.64.0.1/32")]) == "tcp/22,443,8000-8100 udp/53 icmp"
    assert summary([(0, 0, 65535, "100.64.0.1/32")]) == "all"
    assert summary([(6, 22, 22, "192.168.1.0/24")]) == "tcp/22 (to 192.168.1.0/24 too)"


# ---------------------------------------------------------------------------- hostile review (issue 13)

def _error(src: str, dst: str, quoted: bytes, kind: int = 3, code: int = 3) -> bytes:
    return pkt(src, dst, 1, struct.pack("!BBHI", kind, code, 0, 0) + quoted[:28])


def test_an_icmp_error_passes_only_towards_the_source_of_the_packet_it_quotes():
    f = PeerFilter([(6, 443, 443, US4 + "/32")])   # the peer may reach our tcp/443 only
    ours = pkt(US4, THEM4, 17, udp(6000, 53))
    f.note_out(ours, 0.0)
    assert f.check_in(_error(THEM4, US4, ours), 0.1) is None
    # The same quote aimed at a host behind our subnet route (an unreachable, a redirect): not its packet.
    assert f.check_in(_error(THEM4, "192.168.1.5", ours), 0.1) == DROP_NOT_ALLOWED
    assert f.check_in(_error(THEM4, "192.168.1.5", ours, kind=5, code=1), 0.1) == DROP_NOT_ALLOWED
    # A quote forged as our answer from the port the peer may reach, aimed elsewhere.
    forged = pkt(US4, "8.8.8.8", 6, tcp(443, 1234, ACK))
    assert f.check_in(_error(THEM4, US4, forged), 0.1) is None
    assert f.check_in(_error(THEM4, "192.168.1.5", forged), 0.1) == DROP_NOT_ALLOWED


def test_a_source_routed_packet_is_dropped_its_destination_is_not_its_last():
    f = PeerFilter([(6, 22, 22, US4 + "/32"), (6, 22, 22, US6 + "/128")])   # our own ssh only
    lan4, lan6 = bytes((192, 168, 1, 5)), ipaddress.IPv6Address("fd77::5").packed
    for kind in (0x83, 0x89):   # loose, strict: a router with accept_source_route forwards it to the LAN host
        opt = bytes((kind, 7, 4)) + lan4 + b"\x00"
        assert f.check_in(ip4(THEM4, US4, 6, tcp(40000, 22, SYN), options=opt), 0.0) == DROP_NOT_ALLOWED
        assert f.check_in(ip4(THEM4, US4, 6, tcp(40000, 22, SYN), options=b"\x01" + opt[:7]), 0.0) \
            == DROP_NOT_ALLOWED   # behind a no-op
    assert f.check_in(ip4(THEM4, US4, 6, tcp(40000, 22, SYN), options=b"\x01\x01\x01\x00"), 0.0) is None

    def routed(segments_left: int) -> bytes:   # a segment routing header (type 4) naming the LAN host
        body = bytes((6, 2, 4, segments_left, 0, 0, 0, 0)) + lan6 + tcp(40000, 22, SYN)
        return struct.pack("!IHBB16s16s", 0x60000000, len(body), 43, 64, ipaddress.IPv6Address(THEM6).packed,
                           ipaddress.IPv6Address(US6).packed) + body
    assert f.check_in(routed(1), 0.0) == DROP_NOT_ALLOWED
    assert f.check_in(routed(0), 0.0) is None   # no hop left: we are its destination


def test_a_udp_flow_the_peer_opened_stops_when_a_change_no_longer_admits_it_though_we_keep_sending():
    """Issue 13: established flows no longer allowed stop. The peer talks to our udp/443 (QUIC); the policy takes
    it away; our server keeps sending on the flow (retransmissions, a stream) for longer than the UDP timeout."""
    f = PeerFilter([(17, 443, 443, US4 + "/32")])
    theirs, ours = pkt(THEM4, US4, 17, udp(50000, 443)), pkt(US4, THEM4, 17, udp(443, 50000))
    assert f.check_in(theirs, 0.0) is None
    f.note_out(ours, 0.0)
    f.set_rules([])
    for t in range(1, 300, 10):
        f.note_out(ours, float(t))
        assert f.check_in(theirs, t + 0.1) == DROP_NOT_ALLOWED
    assert f.flow_count == 0
    # A flow we open ourselves after the change is still ours: its replies pass.
    f.note_out(pkt(US4, THEM4, 17, udp(40000, 53)), 300.0)
    assert f.check_in(pkt(THEM4, US4, 17, udp(53, 40000)), 300.1) is None
    # Answered long ago (past the UDP timeout of 120 s), then sent on again: an ordinary new flow of ours.
    g = PeerFilter([(17, 443, 443, US4 + "/32")])
    g.note_out(ours, 0.0)
    g.set_rules([])
    g.note_out(ours, 121.0)
    assert g.check_in(theirs, 121.1) is None


def test_the_answered_flows_are_bounded_per_peer():
    f = PeerFilter([(17, 0, 65535, US4 + "/32")], max_flows=8)
    for port in range(20):
        f.note_out(pkt(US4, THEM4, 17, udp(443, 1000 + port)), float(port))
    assert len(f.theirs) == 8


def test_a_route_entry_does_not_open_the_mesh_only_host_entries_do():
    # Review finding: "guest may use the exit node" (0.0.0.0/0) plus "guest may reach the exit on tcp/443" must
    # not let guest reach the exit's own mesh address on port 22, nor other mesh addresses through it.
    mesh = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd00::/64"))
    rules = [(6, 443, 443, US4 + "/32"), (0, 0, 65535, "0.0.0.0/0"), (6, 443, 443, US6 + "/128"),
             (0, 0, 65535, "::/0")]
    f = PeerFilter(rules, mesh_nets=mesh)
    assert f.check_in(pkt(THEM4, US4, 6, tcp(40000, 443, SYN)), 1.0) is None
    assert f.check_in(pkt(THEM4, US4, 6, tcp(40000, 22, SYN)), 1.0) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM4, "100.64.0.9", 6, tcp(40000, 22, SYN)), 1.0) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM4, "8.8.8.8", 6, tcp(40000, 22, SYN)), 1.0) is None   # the internet: the route
    assert f.check_in(pkt(THEM6, US6, 17, udp(40000, 53)), 1.0) == DROP_NOT_ALLOWED
    assert f.check_in(pkt(THEM6, "2001:db8::1", 17, udp(40000, 53)), 1.0) is None
    # without the mesh's prefixes (before the welcome) the route entry covers everything, as it says
    assert PeerFilter(rules).check_in(pkt(THEM4, US4, 6, tcp(40000, 22, SYN)), 1.0) is None
    f2 = PeerFilter(rules)
    f2.set_mesh_nets(mesh)   # the welcome arrives after the list: compiled again
    assert f2.check_in(pkt(THEM4, US4, 6, tcp(40000, 22, SYN)), 1.0) == DROP_NOT_ALLOWED
