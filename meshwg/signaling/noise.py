"""Noise_IK_25519_ChaChaPoly_BLAKE2s for the control channel. Pure: no I/O, randomness injected.

The node is the initiator with its WireGuard static key; the server's static key is pinned from the
invite (the IK pre-message). Completing the handshake proves to the server that the node holds the
private key of the public key it presents, and proves to the node that it talks to the pinned server.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from meshwg.wg import crypto as P  # the sole wrapper of primitives
from meshwg.wg.constants import TAG_LEN

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"meshwg control v1"
MAX_NONCE = 2**64 - 1


class HandshakeError(Exception):
    """The peer's handshake message did not authenticate (bad key, tampering, wrong pinned key)."""


class _Symmetric:
    def __init__(self, prologue: bytes) -> None:
        name = PROTOCOL_NAME
        self.h = name.ljust(32, b"\x00") if len(name) <= 32 else P.hash(name)
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = P.hash(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = P.kdf2(self.ck, ikm)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            out = plaintext
        else:
            out = P.new_aead(self.k).encrypt(P.aead_nonce(self.n), plaintext, self.h)
            self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.k is None:
            out = ciphertext
        else:
            try:
                out = P.new_aead(self.k).decrypt(P.aead_nonce(self.n), ciphertext, self.h)
            except InvalidTag:
                raise HandshakeError("handshake message did not authenticate") from None
            self.n += 1
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[bytes, bytes]:
        return P.kdf2(self.ck, b"")


class CipherState:
    """One direction of transport encryption; counter nonces (the transport is an ordered stream)."""

    def __init__(self, key: bytes) -> None:
        self._aead = P.new_aead(key)
        self.n = 0

    def encrypt(self, plaintext: bytes) -> bytes:
        if self.n >= MAX_NONCE:
            raise RuntimeError("nonce space exhausted; reconnect")
        out = self._aead.encrypt(P.aead_nonce(self.n), plaintext, None)
        self.n += 1
        return out

    def decrypt_untrusted(self, ciphertext: bytes) -> bytes | None:
        """Plaintext, or None when the frame does not authenticate (the caller closes the channel)."""
        try:
            out = self._aead.decrypt(P.aead_nonce(self.n), ciphertext, None)
        except InvalidTag:
            return None
        self.n += 1
        return out


class Initiator:
    """Node side. `write_message1(payload)` -> bytes; `read_message2_untrusted(msg)` -> payload."""

    def __init__(self, static_private: bytes, responder_static: bytes, random_bytes, prologue: bytes = PROLOGUE):
        self.s = P.clamp(static_private)
        self.s_pub = P.dh_pub(self.s)
        self.rs = responder_static
        self._sym = _Symmetric(prologue)
        self._sym.mix_hash(responder_static)
        self._e = P.clamp(random_bytes(32))
        self.send: CipherState | None = None
        self.recv: CipherState | None = None
        self.handshake_hash = b""

    def write_message1(self, payload: bytes) -> bytes:
        sym = self._sym
        e_pub = P.dh_pub(self._e)
        sym.mix_hash(e_pub)
        sym.mix_key(P.dh(self._e, self.rs))  # es
        enc_s = sym.encrypt_and_hash(self.s_pub)
        sym.mix_key(P.dh(self.s, self.rs))  # ss
        return e_pub + enc_s + sym.encrypt_and_hash(payload)

    def read_message2_untrusted(self, msg: bytes) -> bytes:
        if len(msg) < 32 + TAG_LEN:
            raise HandshakeError("handshake response too short")
        sym = self._sym
        re = msg[:32]
        sym.mix_hash(re)
        try:
            sym.mix_key(P.dh(self._e, re))  # ee
            sym.mix_key(P.dh(self.s, re))  # se
        except P.InvalidKey:
            raise HandshakeError("invalid ephemeral key") from None
        payload = sym.decrypt_and_hash(msg[32:])
        k1, k2 = sym.split()
        self.send, self.recv = CipherState(k1), CipherState(k2)
        self.handshake_hash = sym.h
        return payload


class Responder:
    """Server side. `read_message1_untrusted(msg)` -> (initiator_static, payload); `write_message2(payload)`."""

    def __init__(self, static_private: bytes, random_bytes, prologue: bytes = PROLOGUE):
        self.s = P.clamp(static_private)
        self.s_pub = P.dh_pub(self.s)
        self._sym = _Symmetric(prologue)
        self._sym.mix_hash(self.s_pub)
        self._random = random_bytes
        self.re = b""
        self.rs = b""
        self.send: CipherState | None = None
        self.recv: CipherState | None = None
        self.handshake_hash = b""

    def read_message1_untrusted(self, msg: bytes) -> tuple[bytes, bytes]:
        if len(msg) < 32 + 32 + TAG_LEN + TAG_LEN:
            raise HandshakeError("handshake message too short")
        sym = self._sym
        self.re = msg[:32]
        sym.mix_hash(self.re)
        try:
            sym.mix_key(P.dh(self.s, self.re))  # es
            self.rs = sym.decrypt_and_hash(msg[32:80])
            sym.mix_key(P.dh(self.s, self.rs))  # ss
        except P.InvalidKey:
            raise HandshakeError("invalid key in handshake") from None
        payload = sym.decrypt_and_hash(msg[80:])
        return self.rs, payload

    def write_message2(self, payload: bytes) -> bytes:
        sym = self._sym
        e = P.clamp(self._random(32))
        e_pub = P.dh_pub(e)
        sym.mix_hash(e_pub)
        sym.mix_key(P.dh(e, self.re))  # ee
        sym.mix_key(P.dh(e, self.rs))  # se
        out = e_pub + sym.encrypt_and_hash(payload)
        k1, k2 = sym.split()
        self.recv, self.send = CipherState(k1), CipherState(k2)
        self.handshake_hash = sym.h
        return out
