"""Discovery messages (ping / pong / call-me-maybe) sealed with NaCl boxes. Sans-IO.

Wire format (all on the node's shared UDP socket, or carried through the relay):

    MAGIC (6) | sender X25519 public key (32) | nonce (24) | Box(sender_sk, receiver_pk)(plaintext)
    plaintext = type (1) | version (1) | sender wall clock, ms, u64 BE (8) | payload

MAGIC starts with b"MWD": byte 0 is 0x4D, so it is never a WireGuard type 1-4 and never a STUN
message (STUN's two top bits are zero); byte 4 is not 0x21 (the STUN cookie's first byte); the relay
uses b"\xffMWR". Boxes use the nodes' WireGuard X25519 keys, so a valid box proves the sender holds its key.

Payloads:
    Ping        0x01  txid (12) | sender key (32) | zero padding (path MTU probing)
    Pong        0x02  txid (12) | observed source address (18: 16 B IPv6 or v4-mapped, 2 B BE port)
    CallMeMaybe 0x03  N x 18 B endpoints, N <= MAX_CMM_ENDPOINTS
"""

from __future__ import annotations

import collections
import ipaddress
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from meshwg.nonce_cache import NonceCache

MAGIC = b"MWDsco"
VERSION = 1
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62
BOX_OVERHEAD = 16
TXID_LEN = 12
ADDR_LEN = 18
MAX_CMM_ENDPOINTS = 32
MAX_PADDING = 1400
# Largest datagram we accept; more is malformed (and would only waste a decryption).
MAX_MESSAGE_LEN = HEADER_LEN + BOX_OVERHEAD + 10 + TXID_LEN + KEY_LEN + MAX_PADDING

TYPE_PING = 0x01
TYPE_PONG = 0x02
TYPE_CALL_ME_MAYBE = 0x03

# Replay: a message older/newer than this (by the sender's wall clock) is refused, and every
# accepted (sender, nonce) is remembered for at least this long, so a replay is caught either way.
DEFAULT_MAX_AGE = 120.0
DEFAULT_NONCE_CACHE = 8192

Addr = tuple  # (ip_str, port)


@dataclass(frozen=True)
class Ping:
    txid: bytes
    node_key: bytes
    padding: int = 0


@dataclass(frozen=True)
class Pong:
    txid: bytes
    src: Addr


@dataclass(frozen=True)
class CallMeMaybe:
    endpoints: tuple


DiscoMessage = Ping | Pong | CallMeMaybe


def encode_addr(addr: Addr) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    if ip.version == 4:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed + struct.pack(">H", addr[1])


def decode_addr(b: bytes) -> Addr:
    ip = ipaddress.IPv6Address(b[:16])
    port = struct.unpack(">H", b[16:18])[0]
    mapped = ip.ipv4_mapped
    return (str(mapped) if mapped is not None else str(ip), port)


def encode_payload(msg: DiscoMessage) -> tuple[int, bytes]:
    if isinstance(msg, Ping):
        if len(msg.txid) != TXID_LEN or len(msg.node_key) != KEY_LEN:
            raise ValueError("ping txid must be 12 bytes and node key 32 bytes")
        if not 0 <= msg.padding <= MAX_PADDING:
            raise ValueError("padding out of range")
        return TYPE_PING, msg.txid + msg.node_key + b"\0" * msg.padding
    if isinstance(msg, Pong):
        if len(msg.txid) != TXID_LEN:
            raise ValueError("pong txid must be 12 bytes")
        return TYPE_PONG, msg.txid + encode_addr(msg.src)
    if isinstance(msg, CallMeMaybe):
        if len(msg.endpoints) > MAX_CMM_ENDPOINTS:
            raise ValueError("too many call-me-maybe endpoints")
        return TYPE_CALL_ME_MAYBE, b"".join(encode_addr(a) for a in msg.endpoints)
    raise TypeError(f"not a disco message: {msg!r}")


def decode_payload_untrusted(mtype: int, payload: bytes) -> DiscoMessage | None:
    """Payload of an authenticated box: still untrusted content (a peer may be malicious)."""
    if mtype == TYPE_PING:
        if len(payload) < TXID_LEN + KEY_LEN:
            return None
        return Ping(payload[:TXID_LEN], payload[TXID_LEN:TXID_LEN + KEY_LEN],
                    len(payload) - TXID_LEN - KEY_LEN)
    if mtype == TYPE_PONG:
        if len(payload) != TXID_LEN + ADDR_LEN:
            return None
        return Pong(payload[:TXID_LEN], decode_addr(payload[TXID_LEN:]))
    if mtype == TYPE_CALL_ME_MAYBE:
        n, rest = divmod(len(payload), ADDR_LEN)
        if rest or n > MAX_CMM_ENDPOINTS:
            return None
        return CallMeMaybe(tuple(decode_addr(payload[i * ADDR_LEN:(i + 1) * ADDR_LEN]) for i in range(n)))
    return None


class DiscoCodec:
    """Seals and opens disco messages for one node; knows which peer keys are acceptable.

    Boxes are cached per peer (a Box precomputes the X25519 shared key, the expensive part).
    """

    def __init__(self, private_key: bytes, random_bytes: Callable[[int], bytes], *,
                 max_age: float = DEFAULT_MAX_AGE, nonce_cache: int = DEFAULT_NONCE_CACHE):
        self._sk = PrivateKey(private_key)
        self.public_key = bytes(self._sk.public_key)
        self._random = random_bytes
        self._boxes: dict[bytes, Box] = {}
        self.max_age = max_age
        # (sender, nonce) until the end of the window in which its timestamp would still be accepted.
        self._seen = NonceCache(nonce_cache)
        self.drops: collections.Counter = collections.Counter()

    # peers -------------------------------------------------------------------------------
    def add_peer(self, public_key: bytes) -> None:
        if len(public_key) != KEY_LEN:
            raise ValueError("public key must be 32 bytes")
        if public_key not in self._boxes:
            self._boxes[public_key] = Box(self._sk, PublicKey(public_key))

    def remove_peer(self, public_key: bytes) -> None:
        self._boxes.pop(public_key, None)

    def knows(self, public_key: bytes) -> bool:
        return public_key in self._boxes

    # seal / open -------------------------------------------------------------------------
    def seal(self, peer_key: bytes, msg: DiscoMessage, wall: float) -> bytes:
        box = self._boxes.get(peer_key)
        if box is None:
            raise KeyError("unknown peer")
        mtype, payload = encode_payload(msg)
        plaintext = struct.pack(">BBQ", mtype, VERSION, max(0, int(wall * 1000))) + payload
        nonce = self._random(NONCE_LEN)
        return MAGIC + self.public_key + nonce + box.encrypt(plaintext, nonce).ciphertext

    def open_untrusted(self, data: bytes, wall: float) -> tuple[bytes, DiscoMessage] | None:
        """(sender_key, message), or None for forged, foreign, malformed, stale or replayed data."""
        try:
            return self._open(data, wall)
        except Exception:  # noqa: BLE001 - bad network bytes never raise; count them
            self.drops["disco_internal_error"] += 1
            return None

    def _open(self, data: bytes, wall: float):
        if len(data) < HEADER_LEN + BOX_OVERHEAD + 10 or len(data) > MAX_MESSAGE_LEN:
            self.drops["disco_bad_length"] += 1
            return None
        if data[:6] != MAGIC:
            self.drops["disco_bad_magic"] += 1
            return None
        sender = bytes(data[6:38])
        box = self._boxes.get(sender)
        if box is None:
            self.drops["disco_unknown_sender"] += 1
            return None
        nonce = bytes(data[38:62])
        try:
            plaintext = box.decrypt(bytes(data[62:]), nonce)
        except CryptoError:
            self.drops["disco_forged"] += 1
            return None
        mtype, version, ts_ms = struct.unpack(">BBQ", plaintext[:10])
        if version != VERSION:
            self.drops["disco_bad_version"] += 1
            return None
        if abs(wall - ts_ms / 1000.0) > self.max_age:
            self.drops["disco_stale"] += 1
            return None
        key = (sender, nonce)
        if self._seen.seen(key, wall):
            self.drops["disco_replay"] += 1
            return None
        msg = decode_payload_untrusted(mtype, plaintext[10:])
        if msg is None:
            self.drops["disco_malformed"] += 1
            return None
        if isinstance(msg, Ping) and msg.node_key != sender:
            self.drops["disco_key_mismatch"] += 1
            return None
        self._seen.add(key, ts_ms / 1000.0 + self.max_age)
        return sender, msg



def endpoints_bounded(endpoints: Iterable[Addr]) -> tuple:
    """Dedupe and cap a call-me-maybe endpoint list."""
    out: list = []
    for ep in endpoints:
        if ep not in out:
            out.append(ep)
        if len(out) == MAX_CMM_ENDPOINTS:
            break
    return tuple(out)
