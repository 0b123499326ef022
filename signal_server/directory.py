"""The peer directory and per-subscriber incremental updates. Pure.

Every mutation marks the changed key dirty for each subscriber; a subscriber later takes its dirty set and
gets the *current* entry for each key (or a removal), so bursts of changes to one node coalesce into
one update. Entries are msgpack-packed once per change and shared by all recipients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshwg.control.protocol import pack_entry

MAX_CANDIDATES = 16


@dataclass
class Node:
    node_id: int
    key: bytes
    name: str
    ipv4: str
    ipv6: str
    expires: float | None = None
    tag: str = ""
    candidates: list = field(default_factory=list)  # reported by the node: [(ip, port, kind)]
    observed: list = field(default_factory=list)  # seen by the server: [(ip, port, "observed")]
    online: bool = False
    _packed: bytes | None = None

    def entry(self) -> dict:
        cands = [list(c) for c in self.candidates]
        seen = {(c[0], c[1]) for c in self.candidates}
        cands += [list(c) for c in self.observed if (c[0], c[1]) not in seen]
        return {
            "key": self.key,
            "id": self.node_id,
            "name": self.name,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "cand": cands[:MAX_CANDIDATES],
            "online": self.online,
        }

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack_entry(self.entry())
        return self._packed


class Directory:
    def __init__(self) -> None:
        self.nodes: dict[bytes, Node] = {}
        self._dirty: dict[bytes, set[bytes]] = {}  # subscriber key -> changed node keys

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
