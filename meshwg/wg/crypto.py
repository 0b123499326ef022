"""The only module that touches cryptographic primitives (WireGuard whitepaper §5.4,
the list of HASH, MAC, HMAC, KDFn, DH, AEAD, XAEAD and TAI64N).

Everything else in meshwg.wg calls these helpers, so a primitive can be swapped or audited in one place.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import KEY_LEN

__all__ = [
    "InvalidKey", "InvalidTag", "hash", "mac", "hmac", "kdf1", "kdf2", "kdf3", "dh", "dh_pub", "clamp",
    "aead_encrypt", "aead_decrypt", "new_aead", "aead_nonce", "xaead_encrypt", "xaead_decrypt", "tai64n",
    "ZERO_KEY", "ZERO_NONCE_PREFIX", "transport_seal", "transport_open", "TRANSPORT_BACKEND",
]

ZERO_KEY = bytes(KEY_LEN)
ZERO_NONCE_PREFIX = b"\x00\x00\x00\x00"  # the AEAD nonce is 32 zero bits then the LE64 counter
_NONCE = struct.Struct("<4xQ")
_blake2s = hashlib.blake2s


class InvalidKey(ValueError):
    """A Diffie-Hellman input produced the all-zero shared secret (a low-order point)."""


def hash(*parts: bytes) -> bytes:  # noqa: A001 - the protocol calls it HASH
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (a digest_size parameter, not a truncation)."""
    return _blake2s(data, digest_size=16, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    return _hmac.new(key, data, _blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac(key, data)
    return hmac(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac(key, data)
    t1 = hmac(prk, b"\x01")
    return t1, hmac(prk, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac(key, data)
    t1 = hmac(prk, b"\x01")
    t2 = hmac(prk, t1 + b"\x02")
    return t1, t2, hmac(prk, t2 + b"\x03")


def clamp(private_key: bytes) -> bytes:
    if len(private_key) != KEY_LEN:
        raise ValueError("a private key is 32 bytes")
    b = bytearray(private_key)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """X25519; raises InvalidKey when the result is all zero."""
    try:
        out = nacl.bindings.crypto_scalarmult(private_key, public_key)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise InvalidKey("X25519 produced an invalid shared secret") from exc
    if out == ZERO_KEY:
        raise InvalidKey("X25519 produced the all-zero shared secret")
    return out


def dh_pub(private_key: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private_key)


def aead_nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)


def new_aead(key: bytes) -> ChaCha20Poly1305:
    """A reusable ChaCha20-Poly1305 object: build once per keypair direction (construction costs ~1.3 µs)."""
    return ChaCha20Poly1305(key)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes | None:
    """None when authentication fails."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, aad)
    except InvalidTag:
        return None


def _seal_with_cryptography(key: bytes, header_prefix: bytes, counter: int, packet: bytes, padded_len: int) -> bytes:
    nonce = _NONCE.pack(counter)  # the zero prefix, then the counter as the header carries it
    if padded_len != len(packet):
        packet = packet + bytes(padded_len - len(packet))
    return header_prefix + nonce[4:] + ChaCha20Poly1305(key).encrypt(nonce, packet, None)


def _open_with_cryptography(key: bytes, message: bytes) -> bytes | None:
    if len(message) < 32:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(ZERO_NONCE_PREFIX + message[8:16], message[16:], None)
    except InvalidTag:
        return None


# Transport data (type 4) on the hot path: the compiled module when it was built (setup.py), else
# the same two functions on `cryptography`. Same bytes either way (tests/wg/test_transport_crypto.py).
#   transport_seal(key, header_prefix, counter, packet, padded_len) -> the whole message
#   transport_open(key, message) -> the padded plaintext, or None if it does not authenticate
# MESHWG_PURE_PYTHON=1 forces the fallback (as for meshwg.io.dataplane.fastio).
try:
    if os.environ.get("MESHWG_PURE_PYTHON", "") == "1":
        raise ImportError("MESHWG_PURE_PYTHON=1")
    from . import _transport
except ImportError:
    transport_seal, transport_open = _seal_with_cryptography, _open_with_cryptography
    TRANSPORT_BACKEND = "cryptography"
else:
    transport_seal, transport_open = _transport.seal, _transport.open
    TRANSPORT_BACKEND = _transport.BACKEND


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce24, key)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """None when authentication fails."""
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce24, key)
    except nacl.exceptions.CryptoError:
        return None


_TAI64_BASE = 0x400000000000000A
_TAI64N = struct.Struct(">QI")


def tai64n(wall: float) -> bytes:
    """TAI64N of a Unix wall time; nanoseconds whitened to 2^24 ns as wireguard-go and the kernel do."""
    secs = int(wall // 1)
    nsec = int(round((wall - secs) * 1e9))
    if nsec >= 1_000_000_000:
        secs, nsec = secs + 1, nsec - 1_000_000_000
    return _TAI64N.pack(_TAI64_BASE + secs, nsec & ~0xFFFFFF)
