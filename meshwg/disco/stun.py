"""STUN Binding codec (RFC 5389, with RFC 3489 "classic" compatibility). Pure: no I/O.

Shared by the signal server's responder and the node's endpoint discovery. Parsers of network bytes
say `_untrusted` in their name: they return None on anything malformed and never raise.
Addresses are (ip_text, port) tuples; IPv6 text is compressed (ipaddress form).
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LEN = 20

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_SOURCE_ADDRESS = 0x0004  # RFC 3489 only
ATTR_CHANGED_ADDRESS = 0x0005  # RFC 3489 only
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_PADDING = 0x0026  # RFC 5780; not implemented here (so a request carrying it gets 420)
ATTR_RESPONSE_PORT = 0x0027  # RFC 5780; not implemented here (so a request carrying it gets 420)
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_OLD = 0x8020  # pre-RFC drafts; some servers still send it
ATTR_SOFTWARE = 0x8022
ATTR_RESPONSE_ORIGIN = 0x802B  # RFC 5780
ATTR_OTHER_ADDRESS = 0x802C  # RFC 5780 (the successor of CHANGED-ADDRESS)
ATTR_FINGERPRINT = 0x8028

# CHANGE-REQUEST flags (RFC 3489 11.2.4, RFC 5780 7.2).
CHANGE_IP = 0x4
CHANGE_PORT = 0x2
_FINGERPRINT_XOR = 0x5354554E

# Comprehension-required attributes (0x0000-0x7FFF) a Binding request may carry that this codec
# understands: CHANGE-REQUEST (RFC 5780), and the RFC 5389 authentication attributes, which a server
# without authentication receives and ignores. Any other one earns a 420 (RFC 5389 7.3.1).
KNOWN_REQUEST_ATTRS = frozenset({ATTR_CHANGE_REQUEST, ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_REALM, ATTR_NONCE})
ERROR_UNKNOWN_ATTRIBUTE = 420

SOFTWARE = b"meshwg-signal"
MAX_STUN_LEN = 1500  # a Binding message never needs more; bigger is junk


def is_stun_untrusted(data: bytes) -> bool:
    """True when data looks like an RFC 5389 STUN message (top two bits zero, magic cookie at 4)."""
    return (
        len(data) >= HEADER_LEN
        and data[0] & 0xC0 == 0
        and data[4:8] == _COOKIE_BYTES
        and len(data) % 4 == 0
    )


def build_binding_request(txid: bytes, *, software: bool = False, fingerprint: bool = False, change: int = 0) -> bytes:
    """Binding request; change = CHANGE_IP | CHANGE_PORT asks for the answer from the server's other
    address/port (RFC 5780 filtering tests)."""
    if len(txid) != 12:
        raise ValueError("STUN transaction id is 12 bytes")
    if change & ~(CHANGE_IP | CHANGE_PORT):
        raise ValueError("change takes CHANGE_IP and CHANGE_PORT only")
    attrs = _attr(ATTR_CHANGE_REQUEST, struct.pack("!I", change)) if change else b""
    if software:
        attrs += _attr(ATTR_SOFTWARE, SOFTWARE)
    return _finish(BINDING_REQUEST, txid, attrs, fingerprint)


def build_classic_binding_request(txid16: bytes, change: int = 0) -> bytes:
    """RFC 3489 Binding request (16-byte transaction id, no cookie), for tests and old servers."""
    if len(txid16) != 16 or txid16[:4] == _COOKIE_BYTES:
        raise ValueError("classic STUN transaction id is 16 bytes, not starting with the magic cookie")
    attrs = _attr(ATTR_CHANGE_REQUEST, struct.pack("!I", change & (CHANGE_IP | CHANGE_PORT))) if change else b""
    return struct.pack("!HH", BINDING_REQUEST, len(attrs)) + txid16 + attrs


def _attr(atype: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("!HH", atype, len(value)) + value + b"\x00" * pad


def _finish(mtype: int, txid: bytes, attrs: bytes, fingerprint: bool) -> bytes:
    if fingerprint:
        # FINGERPRINT covers the header with the length already counting the fingerprint attribute.
        head = struct.pack("!HHI", mtype, len(attrs) + 8, MAGIC_COOKIE) + txid
        crc = (zlib.crc32(head + attrs) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR
        attrs += struct.pack("!HHI", ATTR_FINGERPRINT, 4, crc)
    return struct.pack("!HHI", mtype, len(attrs), MAGIC_COOKIE) + txid + attrs


def _iter_attrs_untrusted(body: bytes):
    """Yield (type, value) of a STUN attribute block; stops silently at a truncated attribute."""
    off = 0
    while off + 4 <= len(body):
        atype, alen = struct.unpack_from("!HH", body, off)
        off += 4
        if off + alen > len(body):
            return
        yield atype, body[off : off + alen]
        off += alen + ((-alen) % 4)


def _header_untrusted(data: bytes, *, classic: bool = False):
    """(type, txid, attrs) of a well-formed STUN message, else None. RFC 5389 (default): the magic
    cookie, 12-byte txid. classic (RFC 3489): no cookie, the 16 bytes after the length are the txid."""
    # The classic parsers never took a memoryview; keep their input types as they were.
    if not isinstance(data, (bytes, bytearray) if classic else (bytes, bytearray, memoryview)):
        return None
    if len(data) > MAX_STUN_LEN:   # bounds the copy below
        return None
    data = bytes(data)
    if len(data) < HEADER_LEN or data[0] & 0xC0 or (data[4:8] == _COOKIE_BYTES) == classic:
        return None
    mtype, mlen = struct.unpack_from("!HH", data, 0)
    if mlen % 4 or HEADER_LEN + mlen != len(data):
        return None
    return mtype, data[4 if classic else 8:20], data[20:]


def parse_binding_request_untrusted(data: bytes) -> bytes | None:
    """Transaction id (12 bytes) of an RFC 5389 Binding request, else None."""
    head = _header_untrusted(data)
    if head is None or head[0] != BINDING_REQUEST:
        return None
    return head[1]


@dataclass(frozen=True)
class BindingRequest:
    txid: bytes        # 12 bytes (RFC 5389) or 16 (classic RFC 3489: no cookie)
    classic: bool
    change: int        # CHANGE_IP | CHANGE_PORT flags asked for (0: answer from where it came)
    # Comprehension-required attribute types not in KNOWN_REQUEST_ATTRS, first-seen order, no repeats
    # (RFC 5389 only; always empty for classic requests). Non-empty: answer 420, never a Binding.
    unknown: tuple[int, ...] = ()


def parse_any_binding_request_untrusted(data: bytes) -> BindingRequest | None:
    """An RFC 5389 or RFC 3489 Binding request with its CHANGE-REQUEST flags (and, RFC 5389 only,
    its unknown comprehension-required attributes), else None."""
    head = _header_untrusted(data)
    if head is not None:
        if head[0] != BINDING_REQUEST:
            return None
        return BindingRequest(head[1], False, _change_flags(head[2]), _unknown_required_untrusted(head[2]))
    classic = parse_classic_binding_request_untrusted(data)
    if classic is None:
        return None
    return BindingRequest(classic[0], True, classic[1])


def _change_flags(body: bytes) -> int:
    for atype, value in _iter_attrs_untrusted(body):
        if atype == ATTR_CHANGE_REQUEST and len(value) == 4:
            return struct.unpack("!I", value)[0] & (CHANGE_IP | CHANGE_PORT)
    return 0


def _unknown_required_untrusted(body: bytes) -> tuple[int, ...]:
    """Comprehension-required (< 0x8000) attribute types of a request body that are not understood.
    Attributes after MESSAGE-INTEGRITY are ignored (RFC 5389 15.4: only FINGERPRINT, which is
    comprehension-optional, may follow it)."""
    unknown: list[int] = []
    for atype, _ in _iter_attrs_untrusted(body):
        if atype == ATTR_MESSAGE_INTEGRITY:
            break
        if atype < 0x8000 and atype not in KNOWN_REQUEST_ATTRS and atype not in unknown:
            unknown.append(atype)
    return tuple(unknown)


def _pack_addr(atype: int, addr, xor_key: bytes | None) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = int(addr[1])
    raw = ip.packed
    family = 0x01 if ip.version == 4 else 0x02
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key))
    return _attr(atype, struct.pack("!BBH", 0, family, port) + raw)


def _unpack_addr_untrusted(value: bytes, xor_key: bytes | None):
    if len(value) < 4:
        return None
    _, family, port = struct.unpack_from("!BBH", value, 0)
    raw = value[4:]
    if family == 0x01 and len(raw) == 4:
        pass
    elif family == 0x02 and len(raw) == 16:
        pass
    else:
        return None
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key))
    return (str(ipaddress.ip_address(raw)), port)


def build_binding_response(txid: bytes, addr, *, software: bool = True, fingerprint: bool = True,
                           response_origin=None, other_address=None, mapped: bool = True) -> bytes:
    """Binding success response carrying XOR-MAPPED-ADDRESS and (mapped=True) MAPPED-ADDRESS for
    addr=(ip, port), plus RFC 5780 RESPONSE-ORIGIN (where this answer leaves from) and OTHER-ADDRESS
    (the server's other IP and port) when given."""
    if len(txid) != 12:
        raise ValueError("STUN transaction id is 12 bytes")
    xor_key = _COOKIE_BYTES + txid
    attrs = _pack_addr(ATTR_XOR_MAPPED_ADDRESS, addr, xor_key)
    if mapped:
        attrs += _pack_addr(ATTR_MAPPED_ADDRESS, addr, None)
    if response_origin is not None:
        attrs += _pack_addr(ATTR_RESPONSE_ORIGIN, response_origin, None)
    if other_address is not None:
        attrs += _pack_addr(ATTR_OTHER_ADDRESS, other_address, None)
    if software:
        attrs += _attr(ATTR_SOFTWARE, SOFTWARE)
    return _finish(BINDING_SUCCESS, txid, attrs, fingerprint)


def build_unknown_attribute_error(txid: bytes, unknown, *, software: bool = True, fingerprint: bool = True) -> bytes:
    """Binding error response (RFC 5389 7.3.1): ERROR-CODE 420 "Unknown Attribute" and UNKNOWN-ATTRIBUTES
    listing the 16-bit types in `unknown` (normal zero padding, not RFC 3489's repeat-the-last)."""
    if len(txid) != 12:
        raise ValueError("STUN transaction id is 12 bytes")
    types = list(unknown)
    if not types or any(not 0 <= t <= 0xFFFF for t in types):
        raise ValueError("UNKNOWN-ATTRIBUTES lists one or more 16-bit attribute types")
    code = ERROR_UNKNOWN_ATTRIBUTE
    attrs = _attr(ATTR_ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + b"Unknown Attribute")
    attrs += _attr(ATTR_UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(types)}H", *types))
    if software:
        attrs += _attr(ATTR_SOFTWARE, SOFTWARE)
    return _finish(BINDING_ERROR, txid, attrs, fingerprint)


def parse_binding_response_untrusted(data: bytes):
    """(txid, (ip, port)) of a Binding success response, else None.

    XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS (NATs that rewrite payload addresses cannot touch the
    XORed form). A bad FINGERPRINT, when present, rejects the message.
    """
    resp = parse_binding_response_full_untrusted(data)
    if resp is None:
        return None
    return resp.txid, resp.mapped


@dataclass(frozen=True)
class BindingResponse:
    txid: bytes
    mapped: tuple                 # reflexive (ip, port)
    other_address: tuple | None   # OTHER-ADDRESS (RFC 5780), else CHANGED-ADDRESS (RFC 3489)
    response_origin: tuple | None  # RESPONSE-ORIGIN (RFC 5780), else SOURCE-ADDRESS (RFC 3489)


def parse_binding_response_full_untrusted(data: bytes) -> BindingResponse | None:
    """An RFC 5389 Binding success response with the RFC 5780 attributes, else None (same rules as
    parse_binding_response_untrusted)."""
    head = _header_untrusted(data)
    if head is None or head[0] != BINDING_SUCCESS:
        return None
    _, txid, body = head
    xor_key = _COOKIE_BYTES + txid
    mapped = xmapped = None
    found_addrs: dict[int, tuple] = {}
    off = 0
    for atype, value in _iter_attrs_untrusted(body):
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_OLD) and xmapped is None:
            xmapped = _unpack_addr_untrusted(value, xor_key)
        elif atype == ATTR_MAPPED_ADDRESS and mapped is None:
            mapped = _unpack_addr_untrusted(value, None)
        elif atype in (ATTR_OTHER_ADDRESS, ATTR_CHANGED_ADDRESS, ATTR_RESPONSE_ORIGIN, ATTR_SOURCE_ADDRESS):
            if atype not in found_addrs:
                addr = _unpack_addr_untrusted(value, None)
                if addr is not None:
                    found_addrs[atype] = addr
        elif atype == ATTR_FINGERPRINT:
            if len(value) != 4:
                return None
            covered = bytes(data[: HEADER_LEN + off])
            crc = (zlib.crc32(covered) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR
            if struct.unpack("!I", value)[0] != crc:
                return None
        off += 4 + len(value) + ((-len(value)) % 4)
    found = xmapped or mapped
    if found is None:
        return None
    other = found_addrs.get(ATTR_OTHER_ADDRESS) or found_addrs.get(ATTR_CHANGED_ADDRESS)
    origin = found_addrs.get(ATTR_RESPONSE_ORIGIN) or found_addrs.get(ATTR_SOURCE_ADDRESS)
    return BindingResponse(txid, found, other, origin)


# --- RFC 3489 ("classic") Binding: 16-byte transaction id, no cookie; old clients such as stun-client use it.


def parse_classic_binding_request_untrusted(data: bytes):
    """(txid16, change_flags) of an RFC 3489 Binding request (no magic cookie), else None."""
    head = _header_untrusted(data, classic=True)
    if head is None or head[0] != BINDING_REQUEST:
        return None
    return head[1], _change_flags(head[2])


def build_classic_binding_response(txid16: bytes, addr, server_addr, changed_address=None) -> bytes:
    """RFC 3489 Binding response: MAPPED-ADDRESS, SOURCE-ADDRESS (server_addr: where the answer leaves
    from) and CHANGED-ADDRESS (the server's other IP and port; 3489 makes it mandatory, so a server
    with one address names itself). IPv4 only in 3489."""
    if len(txid16) != 16:
        raise ValueError("classic STUN transaction id is 16 bytes")
    attrs = (
        _pack_addr(ATTR_MAPPED_ADDRESS, addr, None)
        + _pack_addr(ATTR_SOURCE_ADDRESS, server_addr, None)
        + _pack_addr(ATTR_CHANGED_ADDRESS, changed_address or server_addr, None)
    )
    return struct.pack("!HH", BINDING_SUCCESS, len(attrs)) + txid16 + attrs


def parse_classic_binding_response_untrusted(data: bytes) -> BindingResponse | None:
    """An RFC 3489 Binding response (16-byte transaction id in BindingResponse.txid), else None."""
    head = _header_untrusted(data, classic=True)
    if head is None or head[0] != BINDING_SUCCESS:
        return None
    _, txid16, body = head
    found: dict[int, tuple] = {}
    for atype, value in _iter_attrs_untrusted(body):
        if atype in (ATTR_MAPPED_ADDRESS, ATTR_SOURCE_ADDRESS, ATTR_CHANGED_ADDRESS) and atype not in found:
            addr = _unpack_addr_untrusted(value, None)
            if addr is not None:
                found[atype] = addr
    if ATTR_MAPPED_ADDRESS not in found:
        return None
    return BindingResponse(txid16, found[ATTR_MAPPED_ADDRESS], found.get(ATTR_CHANGED_ADDRESS),
                           found.get(ATTR_SOURCE_ADDRESS))
