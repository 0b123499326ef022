"""Events the core reports through WireGuardCore.pop_events()."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session is confirmed (initiator: response consumed; responder: first data on the new keypair)."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """20 initiations went unanswered (REKEY_ATTEMPT_TIME): staged packets were dropped."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """No new session for 540 s: every keypair and the handshake state of this peer were erased."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An authenticated packet arrived from a new source address and the peer roamed to it."""

    public_key: bytes
    endpoint: object


Event = HandshakeCompleted | HandshakeFailed | KeysZeroed | EndpointChanged
