"""End-to-end sealed peer messages: a PyNaCl Box between two nodes' WireGuard X25519 keys.

The server forwards the blob by public key and cannot read or forge it.
"""

from __future__ import annotations

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey


def seal(my_private: bytes, peer_public: bytes, plaintext: bytes) -> bytes:
    return bytes(Box(PrivateKey(my_private), PublicKey(peer_public)).encrypt(plaintext))


def open_untrusted(my_private: bytes, peer_public: bytes, blob: bytes) -> bytes | None:
    try:
        return Box(PrivateKey(my_private), PublicKey(peer_public)).decrypt(blob)
    except (CryptoError, ValueError, TypeError):
        return None
