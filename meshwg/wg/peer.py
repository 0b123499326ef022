"""Per-peer state of the WireGuard core. The device owns the logic; a Peer is mostly data."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .constants import MAX_STAGED_PACKETS
from .cookie import CookieGenerator
from .keypair import Keypairs
from .timers import PeerTimers

if TYPE_CHECKING:
    from .allowed_ips import AllowedIPs, Network
    from .noise import InitiatorState


class Peer:
    def __init__(self, public_key: bytes, allowed_ips_table: AllowedIPs):
        self.public_key = public_key
        self.preshared_key: bytes | None = None
        self.endpoint: object = None
        self.roaming = True
        self.last_rx_addr: object = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall: float | None = None
        self.persistent_keepalive = 0
        self.keypairs = Keypairs()
        self.timers = PeerTimers()
        self.cookie = CookieGenerator(public_key)
        self.staged: deque[bytes] = deque(maxlen=MAX_STAGED_PACKETS)
        self.static_static: bytes | None = None  # DH(our static, peer static); None = unusable
        self.acl = None  # its inbound filter (meshwg.wg.acl.PeerFilter); None: no policy, everything passes
        # Initiator handshake in flight.
        self.handshake_state: InitiatorState | None = None
        self.handshake_index: int | None = None
        # Responder-side replay/flood protection for initiations.
        self.last_timestamp = bytes(12)
        self.last_initiation_consumed = float("-inf")
        self.last_sent_handshake = float("-inf")
        self._table = allowed_ips_table

    @property
    def allowed_ips(self) -> list[Network]:
        return self._table.networks_of(self)

    def __repr__(self) -> str:
        return f"<Peer {self.public_key[:4].hex()}… endpoint={self.endpoint!r}>"
