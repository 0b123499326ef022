"""Relay frame format (DERP-like), shared by the node and the relay. Pure: no I/O.

Relay frames share the node's UDP socket with WireGuard (types 1-4 then three zero bytes), STUN (top two
bits zero, cookie 0x2112A442 at offset 4) and discovery, so they start with MAGIC, whose first byte 0xFF
can be neither. Layout (after MAGIC + 1 type byte):
  HELLO     client_pub32 | nacl Box(client_sk -> server_pk)(wall_ms u64 | random 8)   (nonce inside box)
  HELLO_OK  nacl Box(server_sk -> client_pk)(token8 | ttl u16 | observed addr: fam u8, ip, port u16)
  SEND      token8 | dst_pub32 | opaque packet
  RECV      src_pub32 | opaque packet
  NOTICE    code u8 | key32      (unauthenticated hint: re-hello, peer absent, refused, rate limited)
  HELLO_CRED  client_pub32 | credential72 | box as HELLO's   (a HELLO carrying the control plane's signed
            credential: a regional relay with no database admits by it, signal_server/relay_auth.py; a relay
            with the database checks its node list as for HELLO)
  PING      nonce8             PONG  nonce8 (the same): a node's latency and liveness probe, no session needed
On TCP every frame is preceded by a 2-byte big-endian length; the token is still present (ignored).
The relay never sees WireGuard keys' private halves and cannot decrypt or forge the WireGuard payload.
"""

from __future__ import annotations

import ipaddress
import struct

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"\xffMWR"
T_HELLO, T_HELLO_OK, T_SEND, T_RECV, T_NOTICE = 1, 2, 3, 4, 5
T_HELLO_CRED, T_PING, T_PONG = 6, 7, 8
CRED_LEN = 72  # relay_auth.CRED_LEN: expires u64 | Ed25519 signature
PING_LEN = 4 + 1 + 8
N_REHELLO, N_NOT_REGISTERED, N_PEER_ABSENT, N_RATE_LIMITED, N_STALE_HELLO = 1, 2, 3, 4, 5
TOKEN_LEN = 8
MAX_PACKET = 65535 - 64
HELLO_LEN = 4 + 1 + 32 + 24 + 16 + 16
HELLO_INTERVAL = 25.0  # the node re-hellos this often: keeps the NAT mapping and binding fresh
SESSION_TTL = 90.0
# An empty SEND to this key forwards nothing: a node sends one after each HELLO_OK to prove it receives at
# the HELLO's source, which the relay then publishes as its "observed" address.
CONFIRM_DST = bytes(32)
# The source key of a RECV carrying a plain WireGuard peer's datagram (a phone reaching the server's plain port):
# the relay cannot know its key (it is encrypted in the handshake), so the node's WireGuard identifies the peer.
PLAIN_SOURCE = bytes(32)


def is_relay_untrusted(data: bytes) -> bool:
    return len(data) >= 6 and data[:4] == MAGIC


def encode_hello(client_private: bytes, server_public: bytes, wall: float, rand8: bytes, nonce24: bytes) -> bytes:
    box = Box(PrivateKey(client_private), PublicKey(server_public))
    plain = struct.pack("!Q", int(wall * 1000)) + rand8
    pub = bytes(PrivateKey(client_private).public_key)
    return MAGIC + bytes([T_HELLO]) + pub + bytes(box.encrypt(plain, nonce24))


def parse_hello_untrusted(data: bytes):
    """(client_pub, boxed) of a HELLO frame; the relay opens boxed with the client's key."""
    if len(data) != HELLO_LEN or data[:4] != MAGIC or data[4] != T_HELLO:
        return None
    return data[5:37], data[37:]


def encode_hello_cred(hello: bytes, cred: bytes) -> bytes:
    """A HELLO frame (encode_hello's) as a HELLO_CRED carrying `cred`."""
    return MAGIC + bytes([T_HELLO_CRED]) + hello[5:37] + cred + hello[37:]


def parse_hello_cred_untrusted(data: bytes):
    """(client_pub, credential, boxed) of a HELLO_CRED frame, else None."""
    if len(data) != HELLO_LEN + CRED_LEN or data[:4] != MAGIC or data[4] != T_HELLO_CRED:
        return None
    return data[5:37], data[37 : 37 + CRED_LEN], data[37 + CRED_LEN :]


def encode_ping(nonce8: bytes, pong: bool = False) -> bytes:
    return MAGIC + bytes([T_PONG if pong else T_PING]) + nonce8


def parse_ping_untrusted(data: bytes, kind: int = T_PING):
    """The nonce of a PING (or, kind=T_PONG, a PONG) frame, else None."""
    if len(data) != PING_LEN or data[:4] != MAGIC or data[4] != kind:
        return None
    return data[5:]


def open_hello_untrusted(box: Box, boxed: bytes):
    """(wall_ms, rand8) or None."""
    try:
        plain = box.decrypt(boxed)
    except (CryptoError, ValueError):
        return None
    if len(plain) != 16:
        return None
    return struct.unpack("!Q", plain[:8])[0], plain[8:]


def _pack_addr(addr) -> bytes:
    if addr is None:
        return b"\x00"
    ip = ipaddress.ip_address(addr[0])
    return bytes([ip.version]) + ip.packed + struct.pack("!H", addr[1])


def _unpack_addr(b: bytes):
    if not b or b[0] == 0:
        return None
    n = 4 if b[0] == 4 else 16 if b[0] == 6 else None
    if n is None or len(b) != 1 + n + 2:
        return None
    return str(ipaddress.ip_address(b[1 : 1 + n])), struct.unpack("!H", b[1 + n :])[0]


def encode_hello_ok(box: Box, token: bytes, ttl: int, observed, nonce24: bytes) -> bytes:
    plain = token + struct.pack("!H", ttl) + _pack_addr(observed)
    return MAGIC + bytes([T_HELLO_OK]) + bytes(box.encrypt(plain, nonce24))


def parse_hello_ok_untrusted(client_private: bytes, server_public: bytes, data: bytes):
    """(token, ttl, observed_addr|None) if the server's answer authenticates, else None."""
    if len(data) < 6 or data[:4] != MAGIC or data[4] != T_HELLO_OK:
        return None
    try:
        plain = Box(PrivateKey(client_private), PublicKey(server_public)).decrypt(data[5:])
    except (CryptoError, ValueError):
        return None
    if len(plain) < TOKEN_LEN + 3:
        return None
    ttl = struct.unpack("!H", plain[TOKEN_LEN : TOKEN_LEN + 2])[0]
    return plain[:TOKEN_LEN], ttl, _unpack_addr(plain[TOKEN_LEN + 2 :])


def encode_send(token: bytes, dst: bytes, packet: bytes) -> bytes:
    return MAGIC + bytes([T_SEND]) + token + dst + packet


def parse_send_untrusted(data: bytes):
    """(token, dst, packet) or None."""
    if len(data) < 5 + TOKEN_LEN + 32 or data[:4] != MAGIC or data[4] != T_SEND:
        return None
    return data[5:13], data[13:45], data[45:]


def encode_recv(src: bytes, packet: bytes) -> bytes:
    return MAGIC + bytes([T_RECV]) + src + packet


def parse_recv_untrusted(data: bytes):
    """(src_pub, packet) or None."""
    if len(data) < 5 + 32 or data[:4] != MAGIC or data[4] != T_RECV:
        return None
    return data[5:37], data[37:]


def encode_notice(code: int, key: bytes = bytes(32)) -> bytes:
    return MAGIC + bytes([T_NOTICE, code]) + key


def parse_notice_untrusted(data: bytes):
    """(code, key32) or None."""
    if len(data) != 6 + 32 or data[:4] != MAGIC or data[4] != T_NOTICE:
        return None
    return data[5], data[6:]


def frame_type_untrusted(data: bytes) -> int | None:
    return data[4] if is_relay_untrusted(data) else None


def tcp_frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


class TcpFrameDecoder:
    """2-byte length framing for the relay's TCP fallback."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            n = struct.unpack_from("!H", self._buf, 0)[0]
            if len(self._buf) < 2 + n:
                break
            out.append(bytes(self._buf[2 : 2 + n]))
            del self._buf[: 2 + n]
        return out

    def pending(self) -> bytes:
        """The bytes of the unfinished frame fed so far."""
        return bytes(self._buf)
