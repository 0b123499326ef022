"""WireGuard message codec (WireGuard whitepaper §5.4.2-§5.4.7). `parse_untrusted` never raises on network bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    COOKIE_REPLY_SIZE, INITIATION_SIZE, KEEPALIVE_SIZE, MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE,
    MSG_TRANSPORT, RESPONSE_SIZE,
)

_ZERO16 = bytes(16)
_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")


@dataclass(slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = _ZERO16
    mac2: bytes = _ZERO16


@dataclass(slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = _ZERO16
    mac2: bytes = _ZERO16


@dataclass(slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


@dataclass(slots=True)
class Transport:
    receiver: int
    counter: int
    encrypted_packet: bytes


Message = Initiation | Response | CookieReply | Transport


def parse_untrusted(data: bytes) -> Message | None:
    """Decode one datagram; None for anything that is not a well-formed WireGuard message.

    The header is read as a LE u32, so non-zero reserved bytes make an unknown type (as in wireguard-go).
    """
    n = len(data)
    if n < 4:
        return None
    kind = int.from_bytes(data[:4], "little")
    if kind == MSG_TRANSPORT:
        if n < KEEPALIVE_SIZE:
            return None
        _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
        return Transport(receiver, counter, bytes(data[16:]))
    if kind == MSG_INITIATION:
        if n != INITIATION_SIZE:
            return None
        _, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(data)
        return Initiation(sender, eph, static, ts, mac1, mac2)
    if kind == MSG_RESPONSE:
        if n != RESPONSE_SIZE:
            return None
        _, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
        return Response(sender, receiver, eph, empty, mac1, mac2)
    if kind == MSG_COOKIE_REPLY:
        if n != COOKIE_REPLY_SIZE:
            return None
        _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
        return CookieReply(receiver, nonce, cookie)
    return None


def encode(msg: Message) -> bytes:
    if isinstance(msg, Initiation):
        return _INITIATION.pack(MSG_INITIATION, msg.sender, msg.ephemeral, msg.encrypted_static,
                                msg.encrypted_timestamp, msg.mac1, msg.mac2)
    if isinstance(msg, Response):
        return _RESPONSE.pack(MSG_RESPONSE, msg.sender, msg.receiver, msg.ephemeral, msg.encrypted_nothing,
                              msg.mac1, msg.mac2)
    if isinstance(msg, CookieReply):
        return _COOKIE_REPLY.pack(MSG_COOKIE_REPLY, msg.receiver, msg.nonce, msg.encrypted_cookie)
    if isinstance(msg, Transport):
        return _TRANSPORT_HEADER.pack(MSG_TRANSPORT, msg.receiver, msg.counter) + msg.encrypted_packet
    raise TypeError(f"not a WireGuard message: {type(msg).__name__}")
