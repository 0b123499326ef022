"""STUN parsers against a reference model, on structured messages with hostile contents (issue 18).

The generator builds messages header by header and attribute by attribute (a real Binding type or another
class, the cookie or not, a length field that matches or lies, attributes whose declared length overruns
the body, addresses of the wrong family or size, good and bad FINGERPRINTs, padding, trailing bytes), so
each check of meshwg/disco/stun.py is reached with inputs on both sides of it. The model below is written
from RFC 5389/3489, not from the code; every `_untrusted` parser must agree with it exactly and never raise.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib

import pytest
from hypothesis import example, given, settings, strategies as st

from meshwg.disco import stun

COOKIE = b"\x21\x12\xa4\x42"
FP_XOR = 0x5354554E
XOR_MAPPED, XOR_MAPPED_OLD, MAPPED = 0x0020, 0x8020, 0x0001
OTHER, CHANGED, ORIGIN, SOURCE = 0x802C, 0x0005, 0x802B, 0x0004
FINGERPRINT, CHANGE_REQUEST, MESSAGE_INTEGRITY = 0x8028, 0x0003, 0x0008
KNOWN_REQUEST = {0x0003, 0x0006, 0x0008, 0x0014, 0x0015}
ADDRESS_ATTRS = (XOR_MAPPED, XOR_MAPPED_OLD, MAPPED, OTHER, CHANGED, ORIGIN, SOURCE)

# --- the reference model (RFC 5389 6 and 15, RFC 3489 11)


def ref_header(data: bytes, classic: bool):
    if not 20 <= len(data) <= 1500 or data[0] >> 6:   # top two bits of a STUN type are zero
        return None
    if (data[4:8] == COOKIE) == classic:                # RFC 5389 has the cookie; a 3489 txid must not start with it
        return None
    mtype, mlen = struct.unpack_from("!HH", data)
    if mlen % 4 or mlen != len(data) - 20:              # the length counts the body exactly, in whole words
        return None
    return mtype, data[4:20] if classic else data[8:20], data[20:]


def ref_attrs(body: bytes):
    """(offset, type, value) while each attribute fits; the first that overruns ends the walk."""
    out, off = [], 0
    while len(body) - off >= 4:
        atype, alen = struct.unpack_from("!HH", body, off)
        if off + 4 + alen > len(body):
            break
        out.append((off, atype, body[off + 4:off + 4 + alen]))
        off += 4 + alen + (-alen % 4)
    return out


def ref_addr(value: bytes, xor_key: bytes | None):
    """Family 1 is exactly 4 address bytes, family 2 exactly 16; anything else is no address."""
    if len(value) not in (8, 20) or value[1] != (1 if len(value) == 8 else 2):
        return None
    port, raw = struct.unpack_from("!H", value, 2)[0], value[4:]
    if xor_key is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, xor_key))
    return str(ipaddress.ip_address(raw)), port


def ref_response(data: bytes):
    head = ref_header(data, False)
    if head is None or head[0] != 0x0101:   # a success response, nothing else (not an error, request or indication)
        return None
    _, txid, body = head
    key = COOKIE + txid
    xmapped = mapped = None
    addrs: dict = {}
    for off, atype, value in ref_attrs(body):
        if atype in (XOR_MAPPED, XOR_MAPPED_OLD) and xmapped is None:
            xmapped = ref_addr(value, key)
        elif atype == MAPPED and mapped is None:
            mapped = ref_addr(value, None)
        elif atype in (OTHER, CHANGED, ORIGIN, SOURCE) and atype not in addrs:
            if ref_addr(value, None) is not None:
                addrs[atype] = ref_addr(value, None)
        elif atype == FINGERPRINT:
            crc = (zlib.crc32(data[:20 + off]) & 0xFFFFFFFF) ^ FP_XOR
            if value != struct.pack("!I", crc):
                return None
    if (xmapped or mapped) is None:
        return None
    return stun.BindingResponse(txid, xmapped or mapped, addrs.get(OTHER) or addrs.get(CHANGED),
                                addrs.get(ORIGIN) or addrs.get(SOURCE))


def ref_classic_response(data: bytes):
    head = ref_header(data, True)
    if head is None or head[0] != 0x0101:
        return None
    addrs: dict = {}
    for _, atype, value in ref_attrs(head[2]):
        if atype in (MAPPED, SOURCE, CHANGED) and atype not in addrs and ref_addr(value, None) is not None:
            addrs[atype] = ref_addr(value, None)
    if MAPPED not in addrs:
        return None
    return stun.BindingResponse(head[1], addrs[MAPPED], addrs.get(CHANGED), addrs.get(SOURCE))


def ref_change(body: bytes) -> int:
    for _, atype, value in ref_attrs(body):
        if atype == CHANGE_REQUEST and len(value) == 4:
            return struct.unpack("!I", value)[0] & 0x6
    return 0


def ref_unknown(body: bytes) -> tuple:
    out: list = []
    for _, atype, _ in ref_attrs(body):
        if atype == MESSAGE_INTEGRITY:
            break
        if atype < 0x8000 and atype not in KNOWN_REQUEST and atype not in out:
            out.append(atype)
    return tuple(out)


def ref_any_request(data: bytes):
    head = ref_header(data, False)
    if head is not None:
        if head[0] != 0x0001:
            return None
        return stun.BindingRequest(head[1], False, ref_change(head[2]), ref_unknown(head[2]))
    head = ref_header(data, True)
    if head is None or head[0] != 0x0001:
        return None
    return stun.BindingRequest(head[1], True, ref_change(head[2]))


# --- structured messages with hostile contents

def mostly(good, bad):
    """Well-formed four times in five: a hostile detail must reach the checks behind the first one."""
    return st.integers(0, 9).flatmap(lambda i: bad if i < 2 else good)


TYPES = st.one_of(st.sampled_from([0x0001, 0x0101]),
                  st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x0100, 0x0110, 0x0010]),
                  st.integers(0, 0xFFFF))


@st.composite
def address_value(draw) -> bytes:
    family = draw(mostly(st.sampled_from([1, 2]), st.integers(0, 255)))
    natural = 4 if family == 1 else 16 if family == 2 else draw(st.sampled_from([4, 16]))
    size = draw(mostly(st.just(natural), st.one_of(st.sampled_from([0, 3, 5, 15, 17, 20 - natural]),
                                                   st.integers(0, 24))))
    return bytes([draw(st.integers(0, 255)) if draw(st.booleans()) else 0, family]) + \
        draw(st.binary(min_size=2, max_size=2)) + draw(st.binary(min_size=size, max_size=size))


@st.composite
def attribute(draw, misalign: bool):
    """(type, value, declared length, padding, good fingerprint?). Contents are hostile often (wrong
    families and sizes, lengths that overrun the body); the padding breaks alignment only if misalign."""
    kind = draw(st.sampled_from(["addr", "addr", "addr", "addr", "fingerprint", "change", "other"]))
    fp_good = False
    if kind == "addr":
        atype = draw(mostly(st.sampled_from([XOR_MAPPED, MAPPED]), st.sampled_from(ADDRESS_ATTRS)))
        value = draw(address_value())
    elif kind == "fingerprint":
        atype, fp_good = FINGERPRINT, draw(mostly(st.just(True), st.just(False)))
        value = draw(mostly(st.binary(min_size=4, max_size=4), st.binary(max_size=8)))
    elif kind == "change":
        atype, value = CHANGE_REQUEST, draw(mostly(st.binary(min_size=4, max_size=4), st.binary(max_size=8)))
    else:
        atype = draw(st.one_of(st.sampled_from([0x0006, 0x0008, 0x0009, 0x0026, 0x0027, 0x7FFF, 0x8022]),
                               st.integers(0, 0xFFFF)))
        value = draw(st.binary(max_size=12))
    declared = len(value) + draw(mostly(st.just(0), st.integers(-4, 40)))
    declared = min(max(declared, 0), 0xFFFF)
    pad = (-len(value)) % 4
    padding = draw(st.one_of(st.just(b"\0" * pad), st.binary(min_size=pad, max_size=pad)))
    if misalign:
        padding = draw(st.binary(max_size=6))
    return atype, value, declared, padding, fp_good and len(value) == 4


FAULTS = ["cookie", "length", "trailing", "top_bits", "misalign", "oversize"]


@st.composite
def message(draw, classic: bool = False):
    """A STUN message with at most one header fault (FAULTS) and hostile attribute contents."""
    fault = draw(mostly(st.just("none"), st.sampled_from(FAULTS)))
    mtype = draw(TYPES)
    txid = draw(st.binary(min_size=16 if classic else 12, max_size=16 if classic else 12))
    magic = b"" if classic else COOKIE
    if fault == "cookie":
        if classic:
            txid = COOKIE + txid[4:]   # a 3489 txid that looks like the cookie: not classic
        else:
            magic = draw(st.binary(min_size=4, max_size=4))
    attrs = draw(st.lists(attribute(fault == "misalign"), max_size=7))
    if fault == "oversize":
        attrs.append((0x8022, b"x" * 1480, 1480, b"", False))
    body, fps = b"", []
    for atype, value, declared, padding, fp_good in attrs:
        if fp_good:
            fps.append(len(body))
        body += struct.pack("!HH", atype, declared) + value + padding
    length = len(body)
    if fault == "trailing":   # whole words beyond the declared length
        body += draw(st.binary(min_size=1, max_size=2)) * 4
    if fault == "length":
        length = min(max(length + draw(st.integers(-8, 8)), 0), 0xFFFF)
    data = bytearray(struct.pack("!HH", mtype, length) + magic + txid + body)
    for off in fps:   # FINGERPRINTs computed over everything before them, as a sender would
        crc = (zlib.crc32(bytes(data[:20 + off])) & 0xFFFFFFFF) ^ FP_XOR
        data[20 + off + 4:20 + off + 8] = struct.pack("!I", crc)
    if fault == "top_bits":
        data[0] |= draw(st.sampled_from([0x40, 0x80, 0xC0]))
    return bytes(data)


# Crafted cases the model and the parsers must agree on even if the generator misses them.
_V4_TOO_LONG = (struct.pack("!HHI", 0x0101, 12, 0x2112A442) + bytes(12)
                + struct.pack("!HH", MAPPED, 8) + b"\0\x01\x12\x34" + b"\x01\x02\x03\x04")
_V4_WITH_JUNK = (struct.pack("!HHI", 0x0101, 16, 0x2112A442) + bytes(12)
                 + struct.pack("!HH", MAPPED, 9) + b"\0\x01\x12\x34\x01\x02\x03\x04\x05" + b"\0\0\0")
_OVERRUN = (struct.pack("!HHI", 0x0101, 12, 0x2112A442) + bytes(12)
            + struct.pack("!HH", MAPPED, 12) + b"\0\x01\x12\x34\x01\x02\x03\x04")
_ERROR_WITH_ADDR = (struct.pack("!HHI", 0x0111, 12, 0x2112A442) + bytes(12)
                    + struct.pack("!HH", MAPPED, 8) + b"\0\x01\x12\x34\x01\x02\x03\x04")
_UNALIGNED = (struct.pack("!HHI", 0x0101, 14, 0x2112A442) + bytes(12)
              + struct.pack("!HH", MAPPED, 8) + b"\0\x01\x12\x34\x01\x02\x03\x04" + b"\0\0")


@given(message())
@example(_V4_TOO_LONG).via("IPv4 MAPPED-ADDRESS: 4 bytes in an 8-byte attribute")
@example(_V4_WITH_JUNK).via("IPv4 MAPPED-ADDRESS with a fifth address byte")
@example(_OVERRUN).via("an attribute longer than the body")
@example(_ERROR_WITH_ADDR).via("an error response carrying an address")
@example(_UNALIGNED).via("a length that is not a whole number of words")
def test_binding_response_parsers_agree_with_the_model(data):
    want = ref_response(data)
    assert stun.parse_binding_response_full_untrusted(data) == want
    assert stun.parse_binding_response_untrusted(data) == (None if want is None else (want.txid, want.mapped))
    assert stun.parse_binding_response_full_untrusted(memoryview(data)) == want


@given(message(classic=True))
def test_classic_response_parser_agrees_with_the_model(data):
    assert stun.parse_classic_binding_response_untrusted(data) == ref_classic_response(data)


@given(st.one_of(message(), message(classic=True)))
def test_request_parsers_agree_with_the_model(data):
    want = ref_any_request(data)
    assert stun.parse_any_binding_request_untrusted(data) == want
    plain = want.txid if want is not None and not want.classic else None
    assert stun.parse_binding_request_untrusted(data) == plain
    classic = (want.txid, want.change) if want is not None and want.classic else None
    assert stun.parse_classic_binding_request_untrusted(data) == classic


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(1, 65535),
       st.binary(min_size=12, max_size=12), st.booleans(), st.booleans())
def test_built_responses_round_trip(ip, port, txid, software, fingerprint):
    addr = (str(ip), port)
    data = stun.build_binding_response(txid, addr, software=software, fingerprint=fingerprint,
                                       response_origin=("192.0.2.1", 3478), other_address=("192.0.2.2", 3479))
    assert ref_response(data) == stun.parse_binding_response_full_untrusted(data) == stun.BindingResponse(
        txid, addr, ("192.0.2.2", 3479), ("192.0.2.1", 3478))


def test_the_generator_reaches_every_outcome():
    """The property above is only as good as its inputs: check that hostile-but-valid-looking messages
    come out both accepted and refused, with each kind of refusal represented."""
    from hypothesis import find

    def find(strategy, cond, _find=find):
        return _find(strategy, cond, settings=settings(max_examples=5000, derandomize=True, database=None))

    def header_ok(d):
        return ref_header(d, False) is not None

    find(message(), lambda d: ref_response(d) is not None and len(ref_attrs(d[20:])) >= 2)
    find(message(), lambda d: header_ok(d) and d[0:2] == b"\x01\x11")                 # error class
    find(message(), lambda d: not header_ok(d) and len(d) == 20 + struct.unpack_from("!H", d, 2)[0]
         and struct.unpack_from("!H", d, 2)[0] % 4 == 0 and d[0] >> 6 == 0)           # bad cookie only
    find(message(), lambda d: header_ok(d) and any(a[1] in ADDRESS_ATTRS and len(a[2]) not in (8, 20)
                                                  for a in ref_attrs(d[20:])))        # wrong-sized address
    find(message(), lambda d: header_ok(d) and any(a[1] == FINGERPRINT for a in ref_attrs(d[20:]))
         and ref_response(d) is not None)                                              # a good fingerprint


# --- one fault in an otherwise good response: each check of the parser, alone


@st.composite
def good_response(draw):
    """(txid, attribute list) of a response the model accepts: a good XOR-MAPPED and/or MAPPED address,
    maybe RFC 5780 addresses, SOFTWARE and unknown comprehension-optional attributes."""
    txid = draw(st.binary(min_size=12, max_size=12))
    addr = (str(draw(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))), draw(st.integers(1, 65535)))
    attrs = []
    if draw(st.booleans()):
        attrs.append(stun._pack_addr(XOR_MAPPED, addr, COOKIE + txid))
    if not attrs or draw(st.booleans()):
        attrs.append(stun._pack_addr(MAPPED, addr, None))
    if draw(st.booleans()):
        attrs.append(stun._pack_addr(OTHER, ("192.0.2.2", 3479), None))
    for atype, value in draw(st.lists(st.tuples(st.sampled_from([0x8022, 0x8000, 0xC001]), st.binary(max_size=9)),
                                      max_size=2)):
        attrs.insert(draw(st.integers(0, len(attrs))), stun._attr(atype, value))
    return txid, attrs


def _assemble(mtype, txid, body, length=None, cookie=COOKIE):
    return struct.pack("!HH", mtype, len(body) if length is None else length) + cookie + txid + body


def _with_fingerprint(mtype, txid, body, corrupt=False):
    head = struct.pack("!HH", mtype, len(body) + 8) + COOKIE + txid
    crc = (zlib.crc32(head + body) & 0xFFFFFFFF) ^ FP_XOR ^ (1 if corrupt else 0)
    return head + body + struct.pack("!HHI", FINGERPRINT, 4, crc)


def _lone_address(value: bytes, declared=None) -> bytes:
    """A body whose only MAPPED-ADDRESS is `value` (declared length `declared`), padded to a word."""
    return struct.pack("!HH", MAPPED, len(value) if declared is None else declared) + value + b"\0" * (-len(value) % 4)


FAULTY = {
    # header
    "cookie": lambda d, t, b: _assemble(0x0101, t, b, cookie=bytes(x ^ d(st.integers(1, 255)) for x in COOKIE)),
    "length_short": lambda d, t, b: _assemble(0x0101, t, b + b"\0" * 4, length=len(b)),   # a word past the length
    "length_long": lambda d, t, b: _assemble(0x0101, t, b, length=len(b) + 4 * d(st.integers(1, 4))),
    "unaligned": lambda d, t, b: _assemble(0x0101, t, b + b"\0" * (n := d(st.integers(1, 3)))),
    "top_bits": lambda d, t, b: _assemble(0x0101 | d(st.sampled_from([0x4000, 0x8000, 0xC000])), t, b),
    "oversize": lambda d, t, b: _assemble(0x0101, t, b + stun._attr(0x8022, b"x" * 1480)),
    # message class: an error response, a request, an indication, another method's success
    "class": lambda d, t, b: _assemble(d(st.sampled_from([0x0111, 0x0001, 0x0011, 0x0102, 0x0103])), t, b),
    "fingerprint": lambda d, t, b: _with_fingerprint(0x0101, t, b, corrupt=True),
}
# The only address is malformed in one way (the attribute walk and the address checks).
V4, V6 = b"\0\x01\x12\x34" + bytes([192, 0, 2, 7]), b"\0\x02\x12\x34" + bytes(16)
LONE = {
    "overrun": lambda d: _lone_address(V4, declared=12),                   # claims 12 bytes, the body has 8
    "v4_long": lambda d: _lone_address(V4 + d(st.binary(min_size=1, max_size=12))),
    "v4_short": lambda d: _lone_address(V4[:d(st.integers(0, 7))]),
    "v6_long": lambda d: _lone_address(V6 + d(st.binary(min_size=1, max_size=12))),
    "v6_short": lambda d: _lone_address(V6[:d(st.integers(4, 19))]),
    "family": lambda d: _lone_address(bytes([0, d(st.integers(3, 255).filter(lambda f: f != 2))]) + V4[2:]),
    "family_swap": lambda d: _lone_address(bytes([0, 2]) + V4[2:]),         # family 2 with 4 address bytes
}


@pytest.mark.parametrize("fault", sorted(FAULTY))
@settings(max_examples=max(20, settings().max_examples // 5))   # per fault: a fifth of the profile's count
@given(st.data(), good_response())
def test_one_header_fault_makes_a_good_response_refused(fault, data, good):
    txid, attrs = good
    body = b"".join(attrs)
    assert stun.parse_binding_response_full_untrusted(_assemble(0x0101, txid, body)) is not None
    assert stun.parse_binding_response_full_untrusted(_with_fingerprint(0x0101, txid, body)) is not None
    bad = FAULTY[fault](data.draw, txid, body)
    assert ref_response(bad) is None
    assert stun.parse_binding_response_full_untrusted(bad) is None, fault
    assert stun.parse_binding_response_untrusted(bad) is None


@pytest.mark.parametrize("fault", sorted(LONE))
@settings(max_examples=max(20, settings().max_examples // 5))
@given(st.data(), st.binary(min_size=12, max_size=12), st.booleans())
def test_a_malformed_lone_address_makes_a_response_refused(fault, data, txid, fingerprint):
    body = LONE[fault](data.draw)
    bad = _with_fingerprint(0x0101, txid, body) if fingerprint else _assemble(0x0101, txid, body)
    assert ref_response(bad) is None
    assert stun.parse_binding_response_full_untrusted(bad) is None, fault
    classic = struct.pack("!HH", 0x0101, len(body)) + b"\x01" + txid + b"\x02\x03\x04" + body
    assert stun.parse_classic_binding_response_untrusted(classic) is None, fault


@pytest.mark.parametrize("fault", ["cookie", "length_short", "length_long", "unaligned", "top_bits", "oversize"])
@settings(max_examples=max(20, settings().max_examples // 5))
@given(st.data(), st.binary(min_size=12, max_size=12))
def test_one_header_fault_makes_a_request_refused(fault, data, txid):
    body = stun._attr(CHANGE_REQUEST, struct.pack("!I", 6))
    assert stun.parse_binding_request_untrusted(_assemble(0x0001, txid, body)) == txid
    bad = FAULTY[fault](data.draw, txid, body)
    bad = bytes([bad[0] & 0xFE]) + bad[1:]   # the request type (0x0001), keeping the fault's top bits
    assert stun.parse_binding_request_untrusted(bad) is None
    # without the cookie it is an RFC 3489 request (the cookie's place is part of its txid)
    want = stun.BindingRequest(bad[4:20], True, 6) if fault == "cookie" else None
    assert stun.parse_any_binding_request_untrusted(bad) == want
