"""The peer directory and per-subscriber incremental updates. Pure.

Every mutation marks the changed key dirty for each subscriber; a subscriber later takes its dirty set and
gets the *current* entry for each key (or a removal), so bursts of changes to one node coalesce into
one update. Entries are msgpack-packed once per change and shared by all recipients.

Candidates: what a node reports about itself keeps only the kinds of P.REPORTED_KINDS and addresses a
peer could be reached at (no loopback, unspecified, multicast, broadcast, nor the mesh's own prefixes);
"observed" is set here alone, from where the server saw the node's relay traffic, and keeps its slot in
the entry however many candidates the node reports. Every node filters entries again (meshwg/mesh/peer_entry).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshwg.signaling.protocol import KIND_OBSERVED, REPORTED_KINDS, pack_entry
from meshwg.disco.peer_paths import valid_candidate

MAX_CANDIDATES = 16  # per entry, the server's observation included (nodes refuse longer lists)


@dataclass
class Node:
    node_id: int
    key: bytes
    name: str
    ipv4: str
    ipv6: str
    expires: float | None = None
    tag: str = ""
    candidates: list = field(default_factory=list)  # reported by the node: [(ip, port, kind)], filtered
    observed: list = field(default_factory=list)  # seen by the server: [(ip, port, "observed")]
    online: bool = False
    _packed: bytes | None = None

    def entry(self) -> dict:
        # The server's observation first, in a slot the node's own candidates cannot push out. A reported
        # candidate at the same address stays too: its kind may carry the node's NAT hint ("stun-edm").
        obs = [list(c) for c in self.observed[:1]]
        cands = obs + [list(c) for c in self.candidates[: MAX_CANDIDATES - len(obs)]]
        return {
            "key": self.key,
            "id": self.node_id,
            "name": self.name,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "cand": cands,
            "online": self.online,
        }

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack_entry(self.entry())
        return self._packed


class Directory:
    def __init__(self, mesh_nets=()) -> None:
        self.nodes: dict[bytes, Node] = {}
        self._dirty: dict[bytes, set[bytes]] = {}  # subscriber key -> changed node keys
        # The mesh prefixes (networks or their text): never a candidate, reported or observed.
        self.mesh_nets = tuple(ipaddress.ip_network(str(n), strict=False) for n in mesh_nets if n)

    # --- candidates

    def reported(self, cands) -> tuple[list, int]:
        """(what a node may say about itself, how many of `cands` it may not): a kind from
        protocol.REPORTED_KINDS ("observed" is ours alone) at an address a peer could reach."""
        kept = [c for c in cands if c[2] in REPORTED_KINDS and valid_candidate((c[0], c[1]), self.mesh_nets)]
        return kept[:MAX_CANDIDATES], len(cands) - len(kept)

    def set_observed(self, key: bytes, addr: tuple) -> bool:
        """Where the server saw the node's relay traffic come from; True when the entry changed. Loopback
        stays (a node on the server's own host, as in the tests): every other host's nodes drop it."""
        addr = (addr[0], addr[1])  # an IPv6 socket address has flowinfo and scope too
        if not (valid_candidate(addr, self.mesh_nets) or _is_loopback(addr[0])):
            return False
        return self.update(key, observed=[(addr[0], addr[1], KIND_OBSERVED)])

    # --- membership

    def put(self, node: Node) -> None:
        """Insert or replace a node (same key keeps its live state if the caller copied it)."""
        node._packed = None
        self.nodes[node.key] = node
        self._mark(node.key)

    def remove(self, key: bytes) -> Node | None:
        node = self.nodes.pop(key, None)
        if node is not None:
            self._mark(key)
            self._dirty.pop(key, None)
        return node

    def update(self, key: bytes, **changes) -> bool:
        """Change fields of a node; marks dirty only when something really changed."""
        node = self.nodes.get(key)
        if node is None:
            return False
        changed = False
        for name, value in changes.items():
            if getattr(node, name) != value:
                setattr(node, name, value)
                changed = True
        if changed:
            node._packed = None
            self._mark(key)
        return changed

    def _mark(self, key: bytes) -> None:
        for sub, dirty in self._dirty.items():
            if sub != key:
                dirty.add(key)

    # --- subscribers

    def subscribe(self, sub: bytes) -> list[bytes]:
        """Start tracking changes for sub; returns the full snapshot (packed entries, sub excluded)."""
        self._dirty[sub] = set()
        return [n.packed() for k, n in self.nodes.items() if k != sub]

    def unsubscribe(self, sub: bytes) -> None:
        self._dirty.pop(sub, None)

    def has_pending(self, sub: bytes) -> bool:
        return bool(self._dirty.get(sub))

    def take_pending(self, sub: bytes) -> tuple[list[bytes], list[bytes]]:
        """(packed upserts, removed keys) accumulated since the last take."""
        dirty = self._dirty.get(sub)
        if not dirty:
            return [], []
        self._dirty[sub] = set()
        ups, rems = [], []
        for k in dirty:
            n = self.nodes.get(k)
            if n is None:
                rems.append(k)
            else:
                ups.append(n.packed())
        return ups, rems

    def expired(self, wall: float) -> list[bytes]:
        return [k for k, n in self.nodes.items() if n.expires is not None and n.expires <= wall]


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
