"""Noise_IKpsk2 handshake, both roles (WireGuard whitepaper §5.4.2-§5.4.5). Pure functions over explicit state.

The prologue and the payloads are parameters so the generic Noise test vector (cacophony) runs through the
same code as WireGuard, whose prologue is IDENTIFIER and whose payloads are TAI64N / empty.
DH failures (all-zero output) raise crypto.InvalidKey; failed authentication returns None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import crypto
from .constants import CONSTRUCTION, IDENTIFIER

INITIAL_CHAIN_KEY = crypto.hash(CONSTRUCTION)
INITIAL_HASH = crypto.hash(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_PSK = bytes(32)


def initial_hash(remote_static_public: bytes, prologue: bytes = IDENTIFIER) -> tuple[bytes, bytes]:
    """(C, H) after the prologue and the responder's static key (the IK pre-message)."""
    h0 = INITIAL_HASH if prologue == IDENTIFIER else crypto.hash(INITIAL_CHAIN_KEY, prologue)
    return INITIAL_CHAIN_KEY, crypto.hash(h0, remote_static_public)


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and consuming the response."""

    chain_key: bytes
    hash: bytes
    ephemeral_private: bytes
    remote_static: bytes


@dataclass(slots=True)
class ConsumedInitiation:
    chain_key: bytes
    hash: bytes
    remote_static: bytes
    remote_ephemeral: bytes
    payload: bytes


@dataclass(slots=True)
class Initiation:
    state: InitiatorState
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_payload: bytes


@dataclass(slots=True)
class Response:
    chain_key: bytes
    hash: bytes
    ephemeral: bytes
    encrypted_payload: bytes


def create_initiation(
    static_private: bytes,
    static_public: bytes,
    remote_static: bytes,
    ephemeral_private: bytes,
    payload: bytes,
    static_static: bytes | None = None,
    prologue: bytes = IDENTIFIER,
) -> Initiation:
    """static_static = DH(static_private, remote_static), precomputed per peer when given."""
    c, h = initial_hash(remote_static, prologue)
    e_pub = crypto.dh_pub(ephemeral_private)
    c = crypto.kdf1(c, e_pub)
    h = crypto.hash(h, e_pub)
    c, k = crypto.kdf2(c, crypto.dh(ephemeral_private, remote_static))
    enc_static = crypto.aead_encrypt(k, 0, static_public, h)
    h = crypto.hash(h, enc_static)
    ss = static_static if static_static is not None else crypto.dh(static_private, remote_static)
    c, k = crypto.kdf2(c, ss)
    enc_payload = crypto.aead_encrypt(k, 0, payload, h)
    h = crypto.hash(h, enc_payload)
    return Initiation(InitiatorState(c, h, ephemeral_private, remote_static), e_pub, enc_static, enc_payload)


def consume_initiation(
    static_private: bytes,
    static_public: bytes,
    ephemeral: bytes,
    encrypted_static: bytes,
    encrypted_payload: bytes,
    static_static_for: Callable[[bytes], bytes | None],
    prologue: bytes = IDENTIFIER,
) -> ConsumedInitiation | None:
    """static_static_for(initiator_static) returns the precomputed DH for a known peer, or None (unknown)."""
    c, h = initial_hash(static_public, prologue)
    c = crypto.kdf1(c, ephemeral)
    h = crypto.hash(h, ephemeral)
    try:
        c, k = crypto.kdf2(c, crypto.dh(static_private, ephemeral))
    except crypto.InvalidKey:
        return None
    remote_static = crypto.aead_decrypt(k, 0, encrypted_static, h)
    if remote_static is None:
        return None
    h = crypto.hash(h, encrypted_static)
    ss = static_static_for(remote_static)
    if ss is None:
        return None
    c, k = crypto.kdf2(c, ss)
    payload = crypto.aead_decrypt(k, 0, encrypted_payload, h)
    if payload is None:
        return None
    h = crypto.hash(h, encrypted_payload)
    return ConsumedInitiation(c, h, remote_static, ephemeral, payload)


def create_response(
    consumed: ConsumedInitiation,
    ephemeral_private: bytes,
    psk: bytes | None,
    payload: bytes = b"",
) -> Response:
    c, h = consumed.chain_key, consumed.hash
    e_pub = crypto.dh_pub(ephemeral_private)
    c = crypto.kdf1(c, e_pub)
    h = crypto.hash(h, e_pub)
    c = crypto.kdf1(c, crypto.dh(ephemeral_private, consumed.remote_ephemeral))
    c = crypto.kdf1(c, crypto.dh(ephemeral_private, consumed.remote_static))
    c, tau, k = crypto.kdf3(c, psk or ZERO_PSK)
    h = crypto.hash(h, tau)
    enc = crypto.aead_encrypt(k, 0, payload, h)
    h = crypto.hash(h, enc)
    return Response(c, h, e_pub, enc)


def consume_response(
    state: InitiatorState,
    static_private: bytes,
    ephemeral: bytes,
    encrypted_payload: bytes,
    psk: bytes | None,
) -> tuple[bytes, bytes, bytes] | None:
    """(chain_key, hash, payload), or None if the response does not authenticate."""
    c = crypto.kdf1(state.chain_key, ephemeral)
    h = crypto.hash(state.hash, ephemeral)
    try:
        c = crypto.kdf1(c, crypto.dh(state.ephemeral_private, ephemeral))
        c = crypto.kdf1(c, crypto.dh(static_private, ephemeral))
    except crypto.InvalidKey:
        return None
    c, tau, k = crypto.kdf3(c, psk or ZERO_PSK)
    h = crypto.hash(h, tau)
    payload = crypto.aead_decrypt(k, 0, encrypted_payload, h)
    if payload is None:
        return None
    h = crypto.hash(h, encrypted_payload)
    return c, h, payload


def transport_keys(chain_key: bytes) -> tuple[bytes, bytes]:
    """(T1, T2): the initiator sends with T1 and receives with T2; the responder the reverse."""
    return crypto.kdf2(chain_key, b"")
