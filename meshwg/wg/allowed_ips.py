"""Cryptokey routing: longest-prefix match of IPv4/IPv6 addresses to peers (WireGuard whitepaper §2).

One dict per prefix length, probed from the longest length present; the result per address is cached (the
cache is cleared on every change), so the per-packet cost is one slice and one dict lookup.
"""

from __future__ import annotations

import ipaddress
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MISS = object()
_CACHE_MAX = 16384


class _Family:
    __slots__ = ("bits", "tables", "lengths", "cache")

    def __init__(self, bits: int):
        self.bits = bits
        self.tables: dict[int, dict[int, Any]] = {}  # prefix length -> {network int: peer}
        self.lengths: list[int] = []  # prefix lengths present, longest first
        self.cache: dict[bytes, Any] = {}

    def lookup_slow(self, key: bytes) -> Any:
        addr = int.from_bytes(key, "big")
        bits = self.bits
        for length in self.lengths:
            peer = self.tables[length].get(addr >> (bits - length) << (bits - length))
            if peer is not None:
                return peer
        return None

    def lookup(self, key: bytes) -> Any:
        cache = self.cache
        peer = cache.get(key, _MISS)
        if peer is _MISS:
            peer = self.lookup_slow(key)
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[key] = peer
        return peer


class AllowedIPs:
    def __init__(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._by_peer: dict[Any, dict[Network, None]] = {}  # insertion-ordered sets

    @staticmethod
    def _normalize(network: Network | str) -> Network:
        # Host bits are masked off, as wireguard-go does.
        return ipaddress.ip_network(network, strict=False)

    def _family(self, network: Network) -> _Family:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: Network | str, peer: Any) -> None:
        """Map `network` to `peer`, taking it away from any other peer."""
        net = self._normalize(network)
        fam = self._family(net)
        table = fam.tables.get(net.prefixlen)
        if table is None:
            table = fam.tables[net.prefixlen] = {}
            fam.lengths = sorted(fam.tables, reverse=True)
        key = int(net.network_address)
        old = table.get(key)
        if old is not None and old is not peer:
            self._by_peer[old].pop(net, None)
        table[key] = peer
        self._by_peer.setdefault(peer, {})[net] = None
        fam.cache.clear()

    def remove(self, network: Network | str, peer: Any = None) -> bool:
        """Remove `network` (only if it belongs to `peer`, when given)."""
        net = self._normalize(network)
        fam = self._family(net)
        table = fam.tables.get(net.prefixlen)
        key = int(net.network_address)
        if table is None or key not in table or (peer is not None and table[key] is not peer):
            return False
        owner = table.pop(key)
        self._by_peer[owner].pop(net, None)
        if not table:
            del fam.tables[net.prefixlen]
            fam.lengths = sorted(fam.tables, reverse=True)
        fam.cache.clear()
        return True

    def remove_peer(self, peer: Any) -> None:
        for net in list(self._by_peer.get(peer, ())):
            self.remove(net, peer)
        self._by_peer.pop(peer, None)

    def networks_of(self, peer: Any) -> list[Network]:
        return list(self._by_peer.get(peer, ()))

    @property
    def v4_cache(self) -> dict[bytes, Any]:
        """The IPv4 lookup cache, {4 address bytes: peer or None}: a hit is the answer, a miss means
        ask lookup_v4. Cleared in place (never replaced) on every change."""
        return self._v4.cache

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | str) -> Any:
        addr = ipaddress.ip_address(address)
        return (self._v4 if addr.version == 4 else self._v6).lookup(addr.packed)

    def lookup_v4(self, key: bytes) -> Any:
        """Peer for 4 raw address bytes (e.g. a slice of a packet header)."""
        return self._v4.lookup(key)

    def lookup_v6(self, key: bytes) -> Any:
        """Peer for 16 raw address bytes."""
        return self._v6.lookup(key)

    def lookup_dst(self, packet: bytes) -> Any:
        """Peer for an IP packet's destination (the send path); None if unrouted or not IP."""
        version = packet[0] >> 4 if packet else 0
        if version == 4:
            if len(packet) >= 20:
                return self._v4.lookup(packet[16:20])
        elif version == 6:
            if len(packet) >= 40:
                return self._v6.lookup(packet[24:40])
        return None
