"""Small local wrapper of the crypto primitives the control plane needs.

Kept here (not meshwg/wg/crypto.py) because that module was being written in parallel; the primitives
are the same ones (X25519 via nacl.bindings, ChaCha20-Poly1305 via cryptography, BLAKE2s via hashlib),
so switching to it later is a one-line import change.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl
from nacl.exceptions import RuntimeError as _NaclRuntimeError

KEY_LEN = 32
TAG_LEN = 16


class InvalidKey(ValueError):
    """An X25519 exchange produced the all-zero output (low-order point)."""


def clamp(sk: bytes) -> bytes:
    b = bytearray(sk)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(sk: bytes) -> bytes:
    return _nacl.crypto_scalarmult_base(sk)


def dh(sk: bytes, pk: bytes) -> bytes:
    try:
        out = _nacl.crypto_scalarmult(sk, pk)
    except _NaclRuntimeError as exc:  # libsodium refuses the all-zero shared secret
        raise InvalidKey("low-order public key") from exc
    if out == bytes(32):
        raise InvalidKey("low-order public key")
    return out


def blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(chaining_key, ikm)
    t1 = hmac_blake2s(prk, b"\x01")
    t2 = hmac_blake2s(prk, t1 + b"\x02")
    return t1, t2


def aead(key: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(key)


def nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
