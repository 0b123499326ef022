"""Tell apart the protocols sharing the node's UDP socket. Hot path: a few byte comparisons.

WireGuard: type 1-4 then three zero bytes, with the type's size rule (1: 148 B, 2: 92 B, 3: 64 B,
4: >= 32 B). STUN: top two bits zero and the magic cookie 0x2112A442 at offset 4. Discovery: our
b"MWDsco" prefix. Relay frames: b"\xffMWR" prefix (meshwg.signaling.relay_wire.MAGIC).

This is the one place user space decides a datagram's protocol: the driver hands each batch from the
shared socket to `dispatch`, which calls the handler registered for `classify`'s answer, and no handler
tests the bytes for their kind again (the kernel's socket filter, held against `classify` by a
differential test, only drops early what `classify` would call UNKNOWN).
"""

from __future__ import annotations

from meshwg.signaling.relay_wire import MAGIC as _RELAY_MAGIC
from meshwg.disco.messages import MAGIC as _DISCO_MAGIC
from meshwg.disco.stun import HEADER_LEN as _STUN_HEADER_LEN
from meshwg.disco.stun import MAGIC_COOKIE
from meshwg.wg.constants import (COOKIE_REPLY_SIZE, INITIATION_SIZE, KEEPALIVE_SIZE, MSG_COOKIE_REPLY,
                                 MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT, RESPONSE_SIZE)

WIREGUARD = "wireguard"
STUN = "stun"
DISCO = "disco"
RELAY = "relay"
UNKNOWN = "unknown"

_STUN_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_ZERO3 = b"\0\0\0"
WIREGUARD_EXACT_SIZES = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE,
                         MSG_COOKIE_REPLY: COOKIE_REPLY_SIZE}


KINDS = (WIREGUARD, STUN, DISCO, RELAY, UNKNOWN)
_TRANSPORT_HEADER = bytes([MSG_TRANSPORT]) + _ZERO3


def classify(data: bytes) -> str:
    n = len(data)
    if n < 4:
        return UNKNOWN
    t = data[0]
    if 0 < t <= 4 and data[1:4] == _ZERO3:
        if t == MSG_TRANSPORT:
            return WIREGUARD if n >= KEEPALIVE_SIZE else UNKNOWN
        return WIREGUARD if n == WIREGUARD_EXACT_SIZES[t] else UNKNOWN
    if t < 0x40:
        # STUN: top two bits of the message type zero, cookie at offset 4, 20 B header + 4 B-aligned body.
        if n >= _STUN_HEADER_LEN and data[4:8] == _STUN_COOKIE and (n - _STUN_HEADER_LEN) % 4 == 0:
            return STUN
        return UNKNOWN
    if t == 0x4D and data[:6] == _DISCO_MAGIC:  # "M"
        return DISCO
    if t == 0xFF and data[:4] == _RELAY_MAGIC:
        return RELAY
    return UNKNOWN


def dispatch(datagrams, now: float, handlers: dict) -> None:
    """Hand each (data, addr) of `datagrams` to `handlers[classify(data)](data, addr, now)`.

    `handlers` has one entry per kind (KINDS). A loop over the batch here rather than a call per
    datagram: transport data, nearly all of the traffic, is told apart inline with classify's own rule
    for it (header, >= 32 bytes), which costs less than the driver's old WireGuard-header test did."""
    wireguard = handlers[WIREGUARD]
    for data, addr in datagrams:
        if data[:4] == _TRANSPORT_HEADER and len(data) >= KEEPALIVE_SIZE:
            wireguard(data, addr, now)
        else:
            handlers[classify(data)](data, addr, now)
