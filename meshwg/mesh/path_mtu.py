"""Which mesh routes need a smaller MTU: the prefixes of peers reached through the relay. Pure.

A relayed WireGuard datagram carries a relay frame header on top of WireGuard's own 32 bytes: the node's SEND is
MAGIC 4 + type 1 + token 8 + destination key 32 = 45 B (meshwg.signaling.relay_wire), the server's RECV 37 B.
The interface MTU (1420) is sized for WireGuard over IPv6 (1420 + 32 + 8 + 40 = 1500), so a full-size packet to a
relayed peer would leave as 1545 B over IPv6 (1525 over IPv4) and be fragmented, by us and by every NAT on the
way, or dropped. So, as routers do for tunnels, each relayed peer's routes carry `mtu` = interface MTU - 45:
Linux then sizes TCP segments to it (open connections too) and answers forwarded traffic with "fragmentation
needed" / "packet too big". Direct peers keep the full MTU.

    mtus = route_mtus(specs, relayed, iface_mtu)   # {prefix text: mtu} for the relayed peers' routes
    relayed = relayed_keys(node)                   # which peers the node reaches through the relay now
    exits = exit_mtus(exit_key, relayed, iface_mtu)   # {"0.0.0.0/0": mtu, "::/0": mtu} while the exit node
                                                      # in use is relayed, else {}

The exit node's default routes live in the policy table (meshwg.io.oscfg.subnet_routes), not among the mesh
routes: while the exit node in use is relayed, all internet traffic through it is relayed, so they carry the
reduced MTU too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SEND_OVERHEAD = 4 + 1 + 8 + 32   # relay_wire SEND header, which the node puts on every relayed datagram
RECV_OVERHEAD = 4 + 1 + 32       # relay_wire RECV header, which the server puts on what it delivers
IPV6_MIN_MTU = 1280              # the kernel refuses a smaller IPv6 route MTU
MIN_MTU = 576                    # below this an IPv4 route MTU is not worth setting


def relayed_mtu(iface_mtu: int) -> int:
    """The MTU of a route to a relayed peer: the interface's minus the SEND header."""
    return iface_mtu - SEND_OVERHEAD


def route_mtus(specs: Mapping, relayed: Iterable[bytes], iface_mtu: int) -> dict[str, int]:
    """{prefix: mtu} for every route of the `relayed` peers in `specs` (key -> PeerSpec): their mesh addresses
    and subnet routes (0.0.0.0/0 and ::/0, an exit node's, live in policy routing and are left out). A prefix
    whose reduced MTU the kernel would refuse (IPv6 under 1280) is left out too: it keeps the interface's."""
    mtu = relayed_mtu(iface_mtu)
    out: dict[str, int] = {}
    for key in relayed:
        spec = specs.get(key)
        if spec is None:
            continue
        for net in spec.addresses:
            if net.prefixlen == 0 or mtu < (IPV6_MIN_MTU if net.version == 6 else MIN_MTU):
                continue
            out[str(net)] = mtu
    return out


def exit_mtus(exit_key: bytes | None, relayed: Iterable[bytes], iface_mtu: int) -> dict[str, int]:
    """{default prefix: mtu} for the exit node in use (exit_key; None: none) while it is relayed, else {}. The
    IPv6 default only at 1280 or more (the kernel refuses less: it keeps the interface's)."""
    if exit_key is None or exit_key not in relayed:
        return {}
    mtu = relayed_mtu(iface_mtu)
    out = {"0.0.0.0/0": mtu} if mtu >= MIN_MTU else {}
    if mtu >= IPV6_MIN_MTU:
        out["::/0"] = mtu
    return out


def relayed_keys(specs: Mapping, endpoint_of, relay_type) -> frozenset:
    """The keys in `specs` whose endpoint (endpoint_of(key)) is a relay endpoint (relay_type) or not known yet:
    what a node sends them goes through the relay (a plain peer's too, until it reaches us directly)."""
    out = []
    for key in specs:
        ep = endpoint_of(key)
        if ep is None or isinstance(ep, relay_type):
            out.append(key)
    return frozenset(out)
