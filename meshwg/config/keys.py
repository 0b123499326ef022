"""WireGuard keys: generation, derivation and their text forms (base64 for humans, hex for UAPI).

Pure: randomness is injected (`random_bytes(n) -> bytes`, e.g. os.urandom).
Decoders are strict, like wireguard-tools `key_from_base64`: exactly 44 characters of canonical
base64, so a key that `wg` rejects is rejected here too.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Callable

from meshwg.wg import crypto

from meshwg.errors import UserError

KEY_LEN = 32
ZERO_KEY = bytes(KEY_LEN)

_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")


class KeyFormatError(UserError, ValueError):
    """A key string that is not a valid WireGuard key; str() is the short reason."""


def clamp(private_key: bytes) -> bytes:
    """X25519 clamping as wg does on genkey and on load: clear 3 low bits, set bit 254, clear bit 255."""
    _check_len(private_key)
    return crypto.clamp(private_key)


def generate_private_key(random_bytes: Callable[[int], bytes]) -> bytes:
    """A fresh clamped private key (same bytes `wg genkey` would print for the same randomness)."""
    return clamp(random_bytes(KEY_LEN))


def generate_psk(random_bytes: Callable[[int], bytes]) -> bytes:
    """A fresh preshared key: 32 random bytes, no clamping (like `wg genpsk`)."""
    psk = random_bytes(KEY_LEN)
    _check_len(psk)
    return psk


def public_key(private_key: bytes) -> bytes:
    """X25519 base-point multiplication; clamps internally, so unclamped input gives wg's answer."""
    _check_len(private_key)
    return crypto.dh_pub(private_key)


def nonzero(key: bytes | None) -> bytes | None:
    """None for a missing or all-zero key (UAPI's way of saying "remove"), else the key."""
    return None if key is None or key == ZERO_KEY else key


def key_to_base64(key: bytes) -> str:
    _check_len(key)
    return base64.b64encode(key).decode("ascii")


def key_from_base64(text: str) -> bytes:
    """Decode a 44-character base64 key; raises KeyFormatError("bad base64" / "wrong key length ...")."""
    if not isinstance(text, str) or not _B64_RE.fullmatch(text) or len(text) % 4:
        raise KeyFormatError("bad base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("bad base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        # Non-zero padding bits: wg rejects these, and two spellings of one key would confuse equality.
        raise KeyFormatError("bad base64")
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"wrong key length (got {len(raw)} bytes, want {KEY_LEN})")
    return raw


def key_to_hex(key: bytes) -> str:
    """Lowercase hex, as UAPI `get` prints keys."""
    _check_len(key)
    return key.hex()


def key_from_hex(text: str) -> bytes:
    """Decode a UAPI hex key (either case, exactly 64 digits); raises KeyFormatError."""
    if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
        raise KeyFormatError("bad hex")
    if len(text) != 2 * KEY_LEN:
        raise KeyFormatError(f"wrong key length (got {len(text) / 2:g} bytes, want {KEY_LEN})")
    return bytes.fromhex(text)


def _check_len(key: bytes) -> None:
    # Misuse by the caller (not user input): still a precise message.
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        got = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"key must be {KEY_LEN} bytes, got {got}")
