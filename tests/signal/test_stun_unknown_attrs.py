"""RFC 5389 7.3.1: Binding requests with unknown comprehension-required attributes get a 420 error.

Pure layers (codec, responder) first, then the real server on loopback with two addresses.
"""

from __future__ import annotations

import os
import struct
import zlib

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from sig_helpers import start_server

from meshwg.disco import stun
from signal_server.stun_responder import StunResponder, StunSocket

CIP, CPORT = stun.CHANGE_IP, stun.CHANGE_PORT
A1, A2 = "203.0.113.10", "203.0.113.11"
LAYOUT = [StunSocket((A1, 3478), False), StunSocket((A2, 3478), False),
          StunSocket((A1, 3479), True), StunSocket((A2, 3479), True)]
CLIENT = ("198.51.100.7", 40000)
COOKIE = b"\x21\x12\xa4\x42"
RESPONSE_PORT, PADDING = 0x0027, 0x0026
KNOWN = (0x0003, 0x0006, 0x0008, 0x0014, 0x0015)


def attr(atype: int, value: bytes = b"") -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + b"\x00" * ((-len(value)) % 4)


def request(txid: bytes, attrs: bytes, mtype: int = 0x0001) -> bytes:
    return struct.pack("!HH", mtype, len(attrs)) + COOKIE + txid + attrs


def classic_request(txid16: bytes, attrs: bytes) -> bytes:
    return struct.pack("!HH", 0x0001, len(attrs)) + txid16 + attrs


def decode_error(data: bytes):
    """Independent decoding of a 420 reply: checks framing, attribute order, padding and FINGERPRINT.
    Returns (txid, error class, error number, reason, unknown types)."""
    mtype, mlen = struct.unpack_from("!HH", data, 0)
    assert mtype == 0x0111 and data[4:8] == COOKIE and mlen == len(data) - 20 and mlen % 4 == 0
    attrs, off = [], 20
    while off < len(data):
        atype, alen = struct.unpack_from("!HH", data, off)
        padded = alen + (-alen) % 4
        assert off + 4 + padded <= len(data)
        assert data[off + 4 + alen: off + 4 + padded] == b"\x00" * (padded - alen)   # zero padding
        attrs.append((atype, data[off + 4: off + 4 + alen], off))
        off += 4 + padded
    # ERROR-CODE, UNKNOWN-ATTRIBUTES, then SOFTWARE and FINGERPRINT when present (the server's responder
    # adds no SOFTWARE and a FINGERPRINT only when the request had one: answers are kept small)
    types_seen = [a[0] for a in attrs]
    assert types_seen in ([0x0009, 0x000A, 0x8022, 0x8028], [0x0009, 0x000A, 0x8028], [0x0009, 0x000A])
    (_, err, _), (_, unk, _) = attrs[:2]
    assert err[:2] == b"\x00\x00" and err[2] & 0xF8 == 0       # 21 reserved bits are zero
    if 0x8022 in types_seen:
        assert attrs[2][1] == b"meshwg-signal"
    if 0x8028 in types_seen:
        (_, fp, fp_off) = attrs[-1]
        assert len(fp) == 4 and fp_off == len(data) - 8              # FINGERPRINT last
        assert struct.unpack("!I", fp)[0] == (zlib.crc32(data[:fp_off]) & 0xFFFFFFFF) ^ 0x5354554E
    assert len(unk) % 2 == 0
    types = list(struct.unpack(f"!{len(unk) // 2}H", unk))
    return data[8:20], err[2] & 0x07, err[3], err[4:].decode("utf-8"), types


# --- codec


def test_420_reply_fields_and_padding():
    for unknown in ([RESPONSE_PORT], [RESPONSE_PORT, PADDING], [0x7FFF, 0x0000, 0x1234]):
        txid = os.urandom(12)
        data = stun.build_unknown_attribute_error(txid, unknown)
        assert [struct.unpack_from("!H", data, o)[0] for o in (len(data) - 8, len(data) - 28)] == [0x8028, 0x8022]
        got_txid, cls, num, reason, types = decode_error(data)
        assert (got_txid, cls, num, reason, types) == (txid, 4, 20, "Unknown Attribute", unknown)
        # UNKNOWN-ATTRIBUTES: length counts the types only, the value is zero-padded to 4
        off = 20 + 4 + 4 + len("Unknown Attribute") + 3    # past ERROR-CODE (21-byte value padded to 24)
        assert struct.unpack_from("!HH", data, off) == (0x000A, 2 * len(unknown))
        assert data[off + 4 + 2 * len(unknown): off + 4 + 2 * len(unknown) + (-2 * len(unknown)) % 4] \
            == b"\x00" * ((-2 * len(unknown)) % 4)
        # not a Binding success to any of our parsers
        assert stun.parse_binding_response_full_untrusted(data) is None
        assert stun.parse_any_binding_request_untrusted(data) is None


def test_parser_lists_unknown_required_attributes_in_order():
    txid = os.urandom(12)
    body = (attr(RESPONSE_PORT, b"\x12\x34\x00\x00") + attr(0x8123, b"opt") + attr(0x7FFF, b"x")
            + attr(0x0003, struct.pack("!I", CIP)) + attr(RESPONSE_PORT, b"\x00\x01\x00\x00")
            + attr(PADDING, b"\x00" * 8))
    req = stun.parse_any_binding_request_untrusted(request(txid, body))
    # first-seen order, each type once; 0x8123 is comprehension-optional and never listed
    assert req == stun.BindingRequest(txid, False, CIP, (RESPONSE_PORT, 0x7FFF, PADDING))
    # what our own builder sends carries nothing unknown
    for kw in ({}, {"software": True, "fingerprint": True}, {"change": CIP | CPORT, "fingerprint": True}):
        assert stun.parse_any_binding_request_untrusted(stun.build_binding_request(txid, **kw)).unknown == ()
    # RFC 5389 15.4: attributes after MESSAGE-INTEGRITY are ignored
    after_mi = attr(0x0008, b"\x00" * 20) + attr(RESPONSE_PORT, b"\x00" * 4)
    assert stun.parse_any_binding_request_untrusted(request(txid, after_mi)).unknown == ()
    # classic requests never carry a list
    t16 = b"\x07" + os.urandom(15)
    assert stun.parse_any_binding_request_untrusted(classic_request(t16, attr(RESPONSE_PORT, b"\x00" * 4))) \
        == stun.BindingRequest(t16, True, 0)


# --- the responder


def test_unknown_attribute_gets_420_from_the_receiving_socket():
    r = StunResponder(LAYOUT)
    for idx in range(len(LAYOUT)):
        txid = os.urandom(12)
        reply, counters = r.handle_untrusted(idx, request(txid, attr(RESPONSE_PORT, b"\x00\x50\x00\x00")), CLIENT, 0.0)
        assert reply.sock == idx and counters == ("stun_unknown_attribute",)
        assert decode_error(reply.data) == (txid, 4, 20, "Unknown Attribute", [RESPONSE_PORT])


def test_unknown_attribute_with_change_request_is_not_redirected():
    r = StunResponder(LAYOUT)
    for flags in (CIP, CPORT, CIP | CPORT):
        txid = os.urandom(12)
        body = attr(0x0003, struct.pack("!I", flags)) + attr(PADDING, b"\x00" * 16)
        reply, counters = r.handle_untrusted(1, request(txid, body), CLIENT, 0.0)
        assert reply.sock == 1 and counters == ("stun_unknown_attribute",)
        assert decode_error(reply.data)[0] == txid and decode_error(reply.data)[4] == [PADDING]
    # a change the layout cannot honour is still answered with 420 (the check comes first), not dropped
    lone = StunResponder([StunSocket((A1, 3478), False)])
    reply, counters = lone.handle_untrusted(0, request(os.urandom(12), attr(0x0003, struct.pack("!I", CIP))
                                                       + attr(0x0042, b"?")), CLIENT, 0.0)
    assert reply.sock == 0 and counters == ("stun_unknown_attribute",) and decode_error(reply.data)[4] == [0x0042]


def test_known_attributes_do_not_trigger_420():
    r = StunResponder(LAYOUT)
    txid = os.urandom(12)
    body = (attr(0x0006, b"alice:bob") + attr(0x0014, b"example.org") + attr(0x0015, b"nonce-123")
            + attr(0x8022, b"some client") + attr(0x8123, b"optional, unknown") + attr(0x0008, b"\x00" * 20))
    reply, counters = r.handle_untrusted(0, request(txid, body), CLIENT, 0.0)
    assert reply.sock == 0 and counters == ("stun_requests",)
    assert stun.parse_binding_response_full_untrusted(reply.data).mapped == CLIENT
    # USERNAME + CHANGE-REQUEST: the change is honoured as before
    reply, counters = r.handle_untrusted(0, request(txid, attr(0x0006, b"u") + attr(0x0003, struct.pack("!I", CPORT))),
                                         CLIENT, 0.0)
    assert reply.sock == 2 and counters == ("stun_requests", "stun_change_requests")
    # an unknown attribute after MESSAGE-INTEGRITY is ignored (RFC 5389 15.4)
    reply, counters = r.handle_untrusted(0, request(txid, attr(0x0008, b"\x00" * 20) + attr(0x0042, b"x")), CLIENT, 0.0)
    assert counters == ("stun_requests",)


def test_classic_requests_unaffected():
    r = StunResponder(LAYOUT)
    t16 = b"\x09" + os.urandom(15)
    body = attr(RESPONSE_PORT, b"\x00" * 4) + attr(0x0003, struct.pack("!I", CPORT))
    reply, counters = r.handle_untrusted(0, classic_request(t16, body), CLIENT, 0.0)
    assert reply.sock == 2 and counters == ("stun_classic_requests", "stun_change_requests")
    assert stun.parse_classic_binding_response_untrusted(reply.data).mapped == CLIENT


ATTR_TYPES = st.one_of(st.sampled_from((*KNOWN, RESPONSE_PORT, PADDING, 0x0009, 0x000A, 0x8022, 0x8028, 0x7FFF)),
                       st.integers(0, 0xFFFF))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(ATTR_TYPES, st.binary(max_size=24)), max_size=12), st.binary(max_size=64),
       st.booleans(), st.integers(0, len(LAYOUT) - 1))
def test_any_request_body_never_raises(attrs, junk, classic, idx):
    body = b"".join(attr(t, v) for t, v in attrs)
    r = StunResponder(LAYOUT)
    half = body[:len(body) // 2]
    cases = (("whole", body), ("junk_tail", body + junk), ("junk", junk), ("cut", half + b"\x00" * ((-len(half)) % 4)))
    for kind, raw in cases:
        data = classic_request(b"\x01" * 16, raw) if classic else request(b"\x02" * 12, raw)
        reply, counters = r.handle_untrusted(idx, data, CLIENT, 0.0)
        if counters == ("stun_unknown_attribute",):
            assert not classic and reply.sock == idx
            txid, cls, num, _, types = decode_error(reply.data)
            assert (txid, cls, num) == (b"\x02" * 12, 4, 20) and types
            assert all(t < 0x8000 and t not in KNOWN for t in types) and len(set(types)) == len(types)
        # a well-formed body of whole attributes: 420 exactly when an unknown required one precedes MI
        if kind == "whole":
            seen = []
            for t, _ in attrs:
                if t == 0x0008:
                    break
                if t < 0x8000 and t not in KNOWN and t not in seen:
                    seen.append(t)
            if not classic:
                assert (counters == ("stun_unknown_attribute",)) == bool(seen)
                if seen:
                    assert decode_error(reply.data)[4] == seen


# --- the real server


async def test_server_answers_420_from_the_receiving_socket(nursery, tmp_path):
    from test_stun_filtering import _free_udp_pair

    port = _free_udp_pair("127.0.0.1")
    h = await start_server(nursery, tmp_path, udp=[("127.0.0.1", port), ("127.0.0.2", port)])
    (ip1, p1), (ip2, _) = h.server.bound.udp
    s = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await s.bind(("127.0.0.1", 0))
    for dest, change in (((ip1, p1), CIP | CPORT), ((ip2, p1 + 1), CIP), ((ip1, p1), 0)):
        txid = os.urandom(12)
        body = attr(0x0003, struct.pack("!I", change)) + attr(RESPONSE_PORT, b"\x30\x39\x00\x00")
        await s.sendto(request(txid, body), dest)
        with trio.fail_after(2):
            data, src = await s.recvfrom(2048)
        assert src[:2] == dest
        assert decode_error(data) == (txid, 4, 20, "Unknown Attribute", [RESPONSE_PORT])
    assert h.server.counters["stun_unknown_attribute"] == 3 and h.server.counters["stun_change_requests"] == 0
    s.close()
    h.admin.close()
