"""STUN as a client and the server's responder see it on the wire (issue 18 item 3): requests built by hand
per RFC 5389/3489/5780, each parsed or answered exactly (which socket answers, which attributes the answer
carries, which counter moves), and the parser's edges (size cap, padding, CHANGE-REQUEST's length,
attributes after MESSAGE-INTEGRITY)."""

from __future__ import annotations

import struct
import zlib

import pytest

from meshwg.disco import stun
from signal_server.stun_responder import StunResponder, StunSocket

COOKIE = struct.pack("!I", 0x2112A442)
TXID = bytes(range(12))
A1, A2, A3 = "203.0.113.10", "203.0.113.11", "203.0.113.12"
V6A, V6B = "2001:db8::10", "2001:db8::11"
LAYOUT = [StunSocket((A1, 3478), False), StunSocket((A2, 3478), False),
          StunSocket((A1, 3479), True), StunSocket((A2, 3479), True)]
SRC = ("192.0.2.50", 4000)


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + b"\0" * (-len(value) % 4)


def request(*attrs: bytes, mtype: int = 1, fingerprint: bool = False) -> bytes:
    body = b"".join(attrs)
    if fingerprint:
        head = struct.pack("!HH", mtype, len(body) + 8) + COOKIE + TXID
        body += struct.pack("!HHI", 0x8028, 4, (zlib.crc32(head + body) & 0xFFFFFFFF) ^ 0x5354554E)
    return struct.pack("!HH", mtype, len(body)) + COOKIE + TXID + body


def classic(change: int | None = None, txid16: bytes = b"\x01" * 16) -> bytes:
    body = b"" if change is None else attr(3, struct.pack("!I", change))
    return struct.pack("!HH", 1, len(body)) + txid16 + body


def attr_types(msg: bytes) -> list[int]:
    out, off = [], 20
    while off < len(msg):
        t, n = struct.unpack_from("!HH", msg, off)
        out.append(t)
        off += 4 + n + (-n % 4)
    return out


# --- the parser


def test_size_cap_is_1500_bytes():
    pad = attr(0x8022, b"s" * (1500 - 20 - 4))
    assert len(request(pad)) == 1500
    assert stun.parse_any_binding_request_untrusted(request(pad)).txid == TXID
    assert stun.parse_any_binding_request_untrusted(request(attr(0x8022, b"s" * (1500 - 20 - 4 + 4)))) is None


@pytest.mark.parametrize("data", [
    request()[:19],  # shorter than a header
    b"\x40" + request()[1:],  # a top bit set
    b"\x80" + request()[1:],
    struct.pack("!HH", 1, 4) + COOKIE + TXID + b"\0\0",  # length says more than there is
    struct.pack("!HH", 1, 2) + COOKIE + TXID + b"\0\0",  # length not a multiple of 4
    request() + b"\0\0\0\0",  # trailing bytes beyond the length
    request(mtype=0x0101),  # a response is not a request
    request(mtype=0x0011),
])
def test_malformed_requests_are_not_requests(data):
    assert stun.parse_any_binding_request_untrusted(data) is None
    assert stun.parse_binding_request_untrusted(data) is None


def test_change_request_flags_read_past_padded_attributes_and_masked():
    got = stun.parse_any_binding_request_untrusted(request(attr(6, b"user5"), attr(3, struct.pack("!I", 0xFFFFFFFF))))
    assert got == stun.BindingRequest(TXID, False, 0x6, ())
    assert stun.parse_any_binding_request_untrusted(request(attr(3, struct.pack("!I", 4)))).change == 4
    assert stun.parse_any_binding_request_untrusted(request(attr(3, struct.pack("!I", 2)))).change == 2
    # A CHANGE-REQUEST that is not 4 bytes asks for nothing; the first well-formed one counts.
    assert stun.parse_any_binding_request_untrusted(request(attr(3, b"\0\0\0\0\x06"))).change == 0
    assert stun.parse_any_binding_request_untrusted(
        request(attr(3, b"\0\0"), attr(3, struct.pack("!I", 6)), attr(3, struct.pack("!I", 2)))).change == 6


def test_a_truncated_attribute_ends_the_block():
    body = attr(6, b"abcd") + struct.pack("!HH", 3, 8) + struct.pack("!I", 6)  # claims 8, has 4
    data = struct.pack("!HH", 1, len(body)) + COOKIE + TXID + body
    assert stun.parse_any_binding_request_untrusted(data) == stun.BindingRequest(TXID, False, 0, ())


def test_unknown_required_attributes_listed_once_in_order_and_not_after_message_integrity():
    data = request(attr(0x0027, b"\0\0\0\0"), attr(0x8001, b""), attr(0x0030, b""), attr(0x0027, b"\0\0\0\0"),
                   attr(0x0006, b"u"), attr(0x0008, b"m" * 20), attr(0x0031, b""))
    assert stun.parse_any_binding_request_untrusted(data).unknown == (0x0027, 0x0030)
    assert stun.parse_any_binding_request_untrusted(request(attr(0x7FFF, b""))).unknown == (0x7FFF,)
    known = request(*(attr(t, b"\0\0\0\0") for t in (3, 6, 0x14, 0x15)), attr(0x8000, b""))
    assert stun.parse_any_binding_request_untrusted(known).unknown == ()


def test_classic_requests_carry_a_16_byte_txid_and_their_change_flags():
    assert stun.parse_any_binding_request_untrusted(classic(6, b"\x07" * 16)) == stun.BindingRequest(b"\x07" * 16, True, 6)
    assert stun.parse_any_binding_request_untrusted(classic()) == stun.BindingRequest(b"\x01" * 16, True, 0)
    assert stun.parse_classic_binding_request_untrusted(request()) is None  # the cookie: not classic


def test_the_fingerprint_is_the_rfc_5389_crc():
    built = stun.build_binding_request(TXID, fingerprint=True)
    assert built == request(fingerprint=True)
    resp = stun.build_binding_response(TXID, SRC, software=False, fingerprint=True, mapped=False)
    head, fp = resp[:-8], resp[-8:]
    assert fp[:4] == struct.pack("!HH", 0x8028, 4)
    assert struct.unpack("!I", fp[4:])[0] == (zlib.crc32(head) & 0xFFFFFFFF) ^ 0x5354554E
    assert struct.unpack_from("!H", resp, 2)[0] == len(resp) - 20
    assert stun.parse_binding_response_untrusted(resp) == (TXID, SRC)
    broken = resp[:-1] + bytes([resp[-1] ^ 1])
    assert stun.parse_binding_response_untrusted(broken) is None


# --- the responder


def test_plain_request_is_answered_from_where_it_came_with_other_address_and_no_origin():
    r = StunResponder(LAYOUT)
    reply, counters = r.handle_untrusted(2, request(), SRC, 0.0)
    assert reply.sock == 2 and counters == ("stun_requests",)
    resp = stun.parse_binding_response_full_untrusted(reply.data)
    assert resp == stun.BindingResponse(TXID, SRC, (A2, 3478), None)
    assert attr_types(reply.data) == [0x0020, 0x802C]  # XOR-MAPPED-ADDRESS, OTHER-ADDRESS; no fingerprint


@pytest.mark.parametrize("idx, change, out", [
    (0, 6, 3), (0, 4, 1), (0, 2, 2), (1, 6, 2), (1, 4, 0), (3, 2, 1), (3, 4, 2), (2, 6, 1),
])
def test_a_change_request_is_answered_from_the_changed_socket_which_names_itself(idx, change, out):
    r = StunResponder(LAYOUT)
    reply, counters = r.handle_untrusted(idx, request(attr(3, struct.pack("!I", change)), fingerprint=True), SRC, 0.0)
    assert reply.sock == out and counters == ("stun_requests", "stun_change_requests")
    resp = stun.parse_binding_response_full_untrusted(reply.data)
    assert resp.mapped == SRC and resp.response_origin == LAYOUT[out].addr
    assert resp.other_address == LAYOUT[3 - idx].addr  # idx's other IP and other port
    assert attr_types(reply.data)[-1] == 0x8028  # the request carried a fingerprint: so does the answer


def test_a_change_the_layout_cannot_honour_is_dropped_not_answered_from_here():
    one = StunResponder([StunSocket((A1, 3478), False), StunSocket((A1, 3479), True)])
    for change in (4, 6):
        assert one.handle_untrusted(0, request(attr(3, struct.pack("!I", change))), SRC, 0.0) == (
            None, ("stun_change_unsupported",))
    reply, _ = one.handle_untrusted(0, request(attr(3, struct.pack("!I", 2))), SRC, 0.0)
    assert reply.sock == 1
    assert stun.parse_binding_response_full_untrusted(reply.data).other_address is None  # no other IP
    wild = StunResponder([StunSocket(("0.0.0.0", 3478), False), StunSocket(("0.0.0.0", 3479), True)])
    reply, counters = wild.handle_untrusted(0, request(attr(3, struct.pack("!I", 2))), SRC, 0.0)
    assert reply.sock == 1 and counters == ("stun_requests", "stun_change_requests")
    assert stun.parse_binding_response_full_untrusted(reply.data).response_origin is None  # kernel-chosen
    assert wild.handle_untrusted(0, request(attr(3, struct.pack("!I", 4))), SRC, 0.0)[0] is None


def test_other_ip_cycles_through_each_familys_addresses():
    r = StunResponder([StunSocket((A1, 1), False), StunSocket((V6A, 1), False), StunSocket((A2, 1), False),
                       StunSocket((A1, 2), True), StunSocket((A3, 1), False), StunSocket((V6B, 1), False),
                       StunSocket(("0.0.0.0", 9), False)])
    assert [r.other_ip(ip) for ip in (A1, A2, A3)] == [A2, A3, A1]
    assert [r.other_ip(ip) for ip in (V6A, V6B)] == [V6B, V6A]
    assert r.other_ip("0.0.0.0") is None and r.other_ip("::") is None and r.other_ip("198.51.100.9") is None
    single = StunResponder([StunSocket((A1, 1), False), StunSocket((V6A, 1), False)])
    assert single.other_ip(A1) is None and single.other_ip(V6A) is None


def test_unknown_required_attribute_gets_420_from_the_receiving_socket_even_with_a_change_request():
    r = StunResponder(LAYOUT)
    data = request(attr(3, struct.pack("!I", 6)), attr(0x0027, b"\0\0\0\0"), fingerprint=True)
    reply, counters = r.handle_untrusted(1, data, SRC, 0.0)
    assert reply.sock == 1 and counters == ("stun_unknown_attribute",)
    assert reply.data[:2] == b"\x01\x11" and reply.data[8:20] == TXID
    types = attr_types(reply.data)
    assert types == [0x0009, 0x000A, 0x8028]  # ERROR-CODE, UNKNOWN-ATTRIBUTES, FINGERPRINT (the request had one)
    assert reply.data[20 + 4 + 2:20 + 4 + 4] == bytes([4, 20])  # class 4, number 20
    reply, _ = r.handle_untrusted(1, request(attr(0x0027, b"\0\0\0\0")), SRC, 0.0)
    assert attr_types(reply.data) == [0x0009, 0x000A]


def test_classic_requests_get_the_three_rfc_3489_addresses_and_ipv6_sources_get_nothing():
    r = StunResponder(LAYOUT)
    reply, counters = r.handle_untrusted(0, classic(6), SRC, 0.0)
    assert reply.sock == 3 and counters == ("stun_classic_requests", "stun_change_requests")
    resp = stun.parse_classic_binding_response_untrusted(reply.data)
    assert resp == stun.BindingResponse(b"\x01" * 16, SRC, (A2, 3479), (A2, 3479))
    reply, counters = r.handle_untrusted(0, classic(), SRC, 0.0)
    assert reply.sock == 0 and counters == ("stun_classic_requests",)
    assert r.handle_untrusted(0, classic(), ("2001:db8::5", 4000), 0.0) == (None, ("stun_classic_v6_dropped",))
    reply, counters = r.handle_untrusted(0, request(), ("2001:db8::5", 4000), 0.0)  # RFC 5389 over v6: fine
    assert counters == ("stun_requests",)


@pytest.mark.parametrize("data", [b"", b"\x00" * 20, request(mtype=0x0101), b"\xffMWR\x03" + b"\0" * 40])
def test_what_is_not_a_binding_request_is_counted_and_dropped(data):
    assert StunResponder(LAYOUT).handle_untrusted(0, data, SRC, 0.0) == (None, ("udp_dropped_unknown",))


@pytest.mark.parametrize("make", [lambda: request(), lambda: classic(),
                                  lambda: request(attr(0x0027, b"\0\0\0\0"))])
def test_every_answer_kind_is_limited_to_50_at_once_then_20_a_second_per_source_ip(make):
    r = StunResponder(LAYOUT)
    results = [r.handle_untrusted(0, make(), SRC, 0.0) for _ in range(51)]
    assert all(rep is not None for rep, _ in results[:50])
    assert results[50] == (None, ("stun_rate_limited",))
    assert r.handle_untrusted(0, make(), (SRC[0], 9999), 0.0)[0] is None  # the IP, whatever the port
    assert r.handle_untrusted(0, make(), ("192.0.2.51", 4000), 0.0)[0] is not None
    assert r.handle_untrusted(0, make(), SRC, 0.05)[0] is not None  # 20/s: one back after 50 ms
    assert r.handle_untrusted(0, make(), SRC, 0.05)[0] is None


def test_an_unhonourable_change_spends_no_answer_budget():
    r = StunResponder([StunSocket((A1, 3478), False)])
    for _ in range(60):
        assert r.handle_untrusted(0, request(attr(3, struct.pack("!I", 4))), SRC, 0.0)[1] == ("stun_change_unsupported",)
    assert r.handle_untrusted(0, request(), SRC, 0.0)[0] is not None


def test_xor_mapped_address_is_laid_out_as_rfc_5389_says():
    resp = stun.build_binding_response(TXID, ("192.0.2.1", 32853), software=False, fingerprint=False, mapped=False)
    # type 0x0020, length 8, reserved 0, family 1, port ^ 0x2112, address ^ the cookie
    assert resp[20:] == struct.pack("!HHBBH", 0x0020, 8, 0, 1, 32853 ^ 0x2112) + bytes(
        a ^ b for a, b in zip(bytes([192, 0, 2, 1]), COOKIE))


def test_classic_requests_are_built_as_rfc_3489_says():
    txid = b"\x05" * 16
    assert stun.build_classic_binding_request(txid) == struct.pack("!HH", 1, 0) + txid
    for change in (2, 4, 6):
        assert stun.build_classic_binding_request(txid, change) == classic(change, txid)
    assert stun.build_binding_request(TXID, change=2) == request(attr(3, struct.pack("!I", 2)))
    assert stun.build_binding_request(TXID) == request()
