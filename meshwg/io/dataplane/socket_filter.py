"""A kernel filter for the shared UDP socket: junk is dropped before Python pays for it.

A classic BPF program (SO_ATTACH_FILTER) accepts only what `meshwg.mesh.demux.classify` would
accept (WireGuard messages with their type's size rule, STUN, discovery and relay frames), but for
handshake sizes, checked as minimums (see GRO below). With an
index tag (the core puts it in bytes 2-3 of every receiver index it hands out, see
`WireGuardCore(index_tag=...)`) it also drops responses, cookie replies and transport messages that
name an index this device never gave out, so a blind flood of well-formed WireGuard headers costs
kernel cycles, not interpreter ones. The tag is visible on the wire: it only filters blind junk and is
no security boundary (the core still authenticates everything).

For a UDP socket the program sees the packet from the UDP header on: the payload starts at offset 8
and the length includes the 8 header bytes. A load past the end makes the program return 0 (drop).
With UDP GRO the program sees a coalesced read whole: its first datagram's header, and the length of
all of them (the kernel coalesces a run of equal sizes whose last may be shorter, whatever the bytes:
an initiation then a discovery ping from one peer, say). So a handshake message's size is checked as
a minimum, not exactly: an exact check dropped such a pair whole. The demultiplexer and the core
check exact sizes after the split, so only initiation-shaped junk longer than 148 bytes gets further
than before, and it still dies at mac1.
"""

from __future__ import annotations

import os
import socket
import struct

from meshwg.signaling.relay_wire import MAGIC as RELAY_MAGIC
from meshwg.disco.messages import MAGIC as DISCO_MAGIC
from meshwg.disco.stun import HEADER_LEN as STUN_HEADER_LEN
from meshwg.disco.stun import MAGIC_COOKIE as STUN_COOKIE
from meshwg.mesh.demux import WIREGUARD_EXACT_SIZES as HANDSHAKE_SIZES
from meshwg.wg.constants import KEEPALIVE_SIZE, MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
# MESHWG_SOCKET_FILTER=0 leaves the sockets unfiltered (diagnosis).
ENABLED = os.environ.get("MESHWG_SOCKET_FILTER", "1") != "0"

UDP_HEADER = 8
# Where the receiver index sits in the messages that name one of ours.
RECEIVER_INDEX_OFFSETS = {MSG_RESPONSE: 8, MSG_COOKIE_REPLY: 4, MSG_TRANSPORT: 4}

# Classic BPF opcodes (linux/filter.h).
_LD_LEN = 0x80       # A = packet length
_LD_W = 0x20         # A = 32-bit big-endian word at k
_LD_H = 0x28         # A = 16-bit big-endian half-word at k
_LD_B = 0x30         # A = byte at k
_ALU_AND = 0x54      # A &= k
_JEQ = 0x15
_JGE = 0x35
_RET = 0x06
_ACCEPT = 0xFFFFFFFF


class _Program:
    """A tiny assembler: jumps name labels, resolved to cBPF's relative offsets on `build`."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0) -> None:
        self.code.append((code, None, None, k))

    def jump(self, code: int, k: int, if_true: str | None, if_false: str | None) -> None:
        """None falls through to the next instruction."""
        self.code.append((code, if_true, if_false, k))

    def build(self) -> bytes:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            rel = [0 if target is None else self.labels[target] - pc - 1 for target in (jt, jf)]
            if any(not 0 <= r <= 255 for r in rel):
                raise ValueError("BPF jump out of range")
            out.append(struct.pack("HBBI", code, rel[0], rel[1], k & 0xFFFFFFFF))
        return b"".join(out)


def _tag_half_word(index_tag: int) -> int:
    """The tag as the filter's 16-bit big-endian load sees bytes 2-3 of a little-endian index."""
    return int.from_bytes(index_tag.to_bytes(2, "little"), "big")


def program(index_tag: int | None = None) -> bytes:
    """The filter's instructions (struct sock_filter[]), for `attach`."""
    p = _Program()
    payload = UDP_HEADER

    def check_tag(kind: int) -> None:
        """Accept if the receiver index carries our tag (or there is no tag), else drop."""
        if index_tag is None:
            p.op(_RET, _ACCEPT)
        else:
            p.op(_LD_H, payload + RECEIVER_INDEX_OFFSETS[kind] + 2)
            p.jump(_JEQ, _tag_half_word(index_tag), "accept", "drop")

    p.op(_LD_LEN)
    p.jump(_JGE, payload + 4, None, "drop")
    p.op(_LD_W, payload)
    for kind in (MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY, MSG_TRANSPORT):
        p.jump(_JEQ, kind << 24, f"wg{kind}", None)  # type byte, then three zero bytes
    p.jump(_JEQ, int.from_bytes(RELAY_MAGIC, "big"), "accept", None)
    p.jump(_JEQ, int.from_bytes(DISCO_MAGIC[:4], "big"), "disco", None)
    # STUN: top two bits of the type zero, the magic cookie at offset 4, a 20-byte header.
    p.op(_LD_LEN)
    p.jump(_JGE, payload + STUN_HEADER_LEN, None, "drop")
    p.op(_LD_W, payload + 4)
    p.jump(_JEQ, STUN_COOKIE, None, "drop")
    p.op(_LD_B, payload)
    p.op(_ALU_AND, 0xC0)
    p.jump(_JEQ, 0, "accept", "drop")

    p.label("disco")
    p.op(_LD_H, payload + 4)
    p.jump(_JEQ, int.from_bytes(DISCO_MAGIC[4:6], "big"), "accept", "drop")

    for kind, size in HANDSHAKE_SIZES.items():
        p.label(f"wg{kind}")
        p.op(_LD_LEN)
        if kind == MSG_INITIATION:
            p.jump(_JGE, payload + size, "accept", "drop")  # it names no index of ours
        else:
            p.jump(_JGE, payload + size, None, "drop")
            check_tag(kind)
    p.label(f"wg{MSG_TRANSPORT}")
    p.op(_LD_LEN)
    # No multiple-of-16 rule: padding stops at the sender's MTU (1420 is not a multiple of 16).
    p.jump(_JGE, payload + KEEPALIVE_SIZE, None, "drop")
    check_tag(MSG_TRANSPORT)

    p.label("accept")
    p.op(_RET, _ACCEPT)
    p.label("drop")
    p.op(_RET, 0)
    return p.build()


def attach(sock: socket.socket, instructions: bytes) -> None:
    """Install the program on `sock` (struct sock_fprog: length, then a pointer to the array)."""
    import ctypes

    buf = ctypes.create_string_buffer(instructions)
    fprog = struct.pack("HL", len(instructions) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies the program

