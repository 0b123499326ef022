"""What the driver (meshwg.io.dataplane.driver) calls on the core it drives: the contract, pure and typed.

Two cores implement it: `meshwg.wg.device.WireGuardCore` (`meshwg up`, meshwg-tun) and
`meshwg.mesh.node.MeshNode` (`meshwg join`, wrapping a WireGuardCore). The driver calls every member
unconditionally, and its methods positionally; it probes for nothing, so a core that lacks a member fails
when the driver starts instead of being read as None (as the socket filter's index tag once was). The
socket filter's index tag is not part of it: the owner of the WireGuardCore passes it to the driver.

Structural (no core inherits from it): an inherited `...` body would be exactly the silent no-op this
contract exists to rule out. tests/device/test_core_contract.py checks both cores member by member.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class DrivenCore(Protocol):
    # Set by the driver when it starts: the core calls it with a timer deadline a packet input made
    # earlier than get_timer() said, since the driver flushes packet inputs without re-reading the
    # O(peers) timer. A core whose packet inputs create no deadline under 1 s ahead never calls it.
    on_earlier_deadline: Callable[[float], None] | None

    # inputs; bad bytes never raise (dropped and counted)
    def receive_datagram(self, data: bytes, addr: object, now: float) -> None:
        """Any datagram from the UDP sockets, unclassified (every one, when the driver has no datagram handlers)."""

    def receive_wireguard(self, data: bytes, addr: object, now: float) -> None:
        """A datagram meshwg.mesh.demux classified as WireGuard (the driver's handler for that kind)."""

    def send_ip_packet(self, packet: bytes, now: float) -> None:
        """An IP packet read from the TUN."""

    def handle_timer(self, now: float) -> None:
        """The deadline get_timer() returned has passed."""

    # outputs; each call takes and clears
    def datagrams_to_send(self) -> list[tuple[bytes, object]]: ...

    def tun_packets_to_write(self) -> list[bytes]: ...

    def pop_events(self) -> list: ...

    def get_timer(self) -> float:
        """The next deadline (math.inf if none); O(peers), so the driver does not call it per packet."""
