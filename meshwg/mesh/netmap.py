"""Diff the directory's desired peer set against the current one. Pure.

Output operations say what to change in the WireGuard core (peers, AllowedIPs), in the discovery
state (candidates, NAT kind) and in the OS routing table (one route per allowed prefix).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerSpec:
    key: bytes
    name: str = ""
    addresses: tuple = ()          # ipaddress networks routed to the peer (its AllowedIPs)
    candidates: tuple = ()         # (ip, port) from the directory: local + STUN-reflexive
    observed: tuple = ()           # (ip, port) the server saw the peer's socket at
    nat: str | None = None         # "endpoint-independent" / "endpoint-dependent" / None
    plain: bool = False            # a stock WireGuard device, reached through the relay only: no discovery
    # What the peer may send us (issue 13): ((proto, lo, hi, cidr text), ...) sorted, compiled into its inbound
    # filter in the core (meshwg.wg.acl); None: no policy, everything passes; (): replies to our flows only.
    accept: tuple | None = None

    @staticmethod
    def make(key: bytes, name: str = "", addresses=(), candidates=(), observed=(), nat=None,
             plain: bool = False, accept=None) -> "PeerSpec":
        """Normalise user/directory input: networks parsed, tuples sorted and deduplicated. A plain peer has
        no candidates, observation or NAT kind: nothing of ours ever probes it."""
        nets = tuple(sorted({ipaddress.ip_network(a, strict=False) for a in addresses},
                            key=lambda n: (n.version, n)))
        rules = None if accept is None else tuple(sorted({tuple(r) for r in accept}))
        if plain:
            return PeerSpec(bytes(key), name, nets, plain=True, accept=rules)
        cands = tuple(dict.fromkeys(tuple(c) for c in candidates))
        obs = tuple(dict.fromkeys(tuple(c) for c in observed))
        return PeerSpec(bytes(key), name, nets, cands, obs, nat, accept=rules)


@dataclass(frozen=True)
class AddPeer:
    spec: PeerSpec


@dataclass(frozen=True)
class RemovePeer:
    key: bytes
    spec: PeerSpec


@dataclass(frozen=True)
class ChangePeer:
    old: PeerSpec
    new: PeerSpec
    fields: tuple                  # names of the changed fields


@dataclass
class RouteChanges:
    add: list = field(default_factory=list)
    remove: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


_FIELDS = ("name", "addresses", "candidates", "observed", "nat", "plain", "accept")


def diff(current: dict[bytes, PeerSpec], desired: dict[bytes, PeerSpec]) -> list:
    """Operations turning `current` into `desired`: removals first (a prefix moving between peers
    must leave its old owner before the new one takes it), then changes, then additions."""
    ops: list = []
    for key, spec in current.items():
        if key not in desired:
            ops.append(RemovePeer(key, spec))
    for key, new in desired.items():
        old = current.get(key)
        if old is not None and old != new:
            ops.append(ChangePeer(old, new, tuple(f for f in _FIELDS if getattr(old, f) != getattr(new, f))))
    for key, new in desired.items():
        if key not in current:
            ops.append(AddPeer(new))
    return ops


def routes(peers: dict[bytes, PeerSpec]) -> set:
    return {net for spec in peers.values() for net in spec.addresses}


def route_changes(current: dict[bytes, PeerSpec], desired: dict[bytes, PeerSpec]) -> RouteChanges:
    old, new = routes(current), routes(desired)
    key = lambda n: (n.version, n)  # noqa: E731
    return RouteChanges(add=sorted(new - old, key=key), remove=sorted(old - new, key=key))
