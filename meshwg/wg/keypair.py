"""Transport keypairs and a peer's current/previous/next slots (WireGuard whitepaper §5.4.5-§5.4.6)."""

from __future__ import annotations

import struct

from . import crypto
from .constants import MSG_TRANSPORT
from .replay import ReplayWindow

_HEADER_PREFIX = struct.Struct("<II")
_COUNTER = struct.Struct("<Q")


class Keypair:
    """One direction pair of transport keys, the send counter and the receive replay window."""

    __slots__ = ("send_key", "recv_key", "send_counter", "replay", "local_index", "remote_index",
                 "created", "is_initiator", "header_prefix", "peer")

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 created: float, is_initiator: bool, peer: object = None):
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator
        # type 4 + receiver index: the constant first 8 bytes of every message sent with this keypair.
        self.header_prefix = _HEADER_PREFIX.pack(MSG_TRANSPORT, remote_index)
        self.peer = peer

    def seal(self, padded_plaintext: bytes) -> bytes:
        """A complete type-4 message (the device inlines this on its hot path)."""
        counter = self.send_counter
        self.send_counter = counter + 1
        return crypto.transport_seal(self.send_key, self.header_prefix, counter, padded_plaintext,
                                     len(padded_plaintext))

    def open(self, message: bytes) -> bytes | None:
        """Decrypt and replay-check a type-4 message addressed to this keypair; None if rejected."""
        plain = crypto.transport_open(self.recv_key, message)
        if plain is None:
            return None
        if not self.replay.validate(_COUNTER.unpack_from(message, 8)[0]):
            return None
        return plain


class Keypairs:
    """current (sending), previous (still receiving) and next (responder's unconfirmed keypair)."""

    __slots__ = ("current", "previous", "next")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Add a freshly derived keypair (wireguard-go BeginSymmetricSession); returns the discarded ones."""
        dropped = []
        if keypair.is_initiator:
            if self.next is not None:
                # The unconfirmed next keypair is still usable for receiving, so it becomes previous.
                dropped += [kp for kp in (self.previous, self.current) if kp is not None]
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            dropped += [kp for kp in (self.next, self.previous) if kp is not None]
            self.next, self.previous = keypair, None
        return dropped

    def confirm(self, keypair: Keypair) -> list[Keypair] | None:
        """First packet received with `next` promotes it to current (wireguard-go ReceivedWithKeypair).
        Returns the discarded keypairs, or None when `keypair` was not `next` (nothing changed)."""
        if keypair is not self.next:
            return None
        old = self.previous
        self.previous, self.current, self.next = self.current, keypair, None
        return [old] if old is not None else []

    def clear(self) -> list[Keypair]:
        dropped = [kp for kp in (self.current, self.previous, self.next) if kp is not None]
        self.current = self.previous = self.next = None
        return dropped
