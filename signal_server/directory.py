"""The peer directory and per-subscriber incremental updates. Pure.

Every mutation marks the changed key dirty for each subscriber; a subscriber later takes its dirty set and
gets the *current* entry for each key (or a removal), so bursts of changes to one node coalesce into
one update. Entries are msgpack-packed once per change and shared by all recipients.

Candidates: what a node reports about itself keeps only the kinds of P.REPORTED_KINDS and addresses a
peer could be reached at (no loopback, unspecified, multicast, broadcast, nor the mesh's own prefixes);
"observed" is set here alone, from where the server saw the node's relay traffic, and keeps its slot in
the entry however many candidates the node reports. Every node filters entries again (meshwg/mesh/peer_entry).

A node's entry carries its approved, advertised subnet routes ("routes": [cidr...], omitted when none) and
"exit": true when it is an approved exit node (issue 12; signal_server/routes.py decides what is approved).

Plain WireGuard peers (kind "plain", issue 12) are entries too, visible only to their target nodes (`visible`):
no other subscriber is ever sent their key, in a snapshot, an update or a removal. Their entry says
`"kind": "plain"`, has no candidates and is never online; they subscribe to nothing (they have no session).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshwg.signaling.protocol import KIND_OBSERVED, REPORTED_KINDS, pack_entry
from meshwg.disco.peer_paths import valid_candidate

MAX_CANDIDATES = 16  # per entry, the server's observation included (nodes refuse longer lists)
PLAIN = "plain"  # Node.kind of a plain WireGuard peer (store_api.PLAIN)


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
    kind: str = "node"  # or PLAIN
    targets: frozenset = frozenset()  # a plain peer's: the node ids that may see it
    routes: tuple = ()  # its approved, advertised subnet routes (canonical CIDR text, sorted)
    is_exit: bool = False  # an approved exit node that advertises itself as one
    _packed: bytes | None = None

    def entry(self) -> dict:
        # The server's observation first, in a slot the node's own candidates cannot push out. A reported
        # candidate at the same address stays too: its kind may carry the node's NAT hint ("stun-edm").
        obs = [list(c) for c in self.observed[:1]]
        cands = obs + [list(c) for c in self.candidates[: MAX_CANDIDATES - len(obs)]]
        e = {
            "key": self.key,
            "id": self.node_id,
            "name": self.name,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "cand": cands,
            "online": self.online,
        }
        if self.routes:  # omitted when none: old clients ignore unknown fields, new ones read absent as none
            e["routes"] = list(self.routes)
        if self.is_exit:
            e["exit"] = True
        if self.kind == PLAIN:
            e.update(cand=[], online=False, kind=PLAIN)  # reached through the relay's plain port, never directly
        return e

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack_entry(self.entry())
        return self._packed


class Directory:
    def __init__(self, mesh_nets=()) -> None:
        self.nodes: dict[bytes, Node] = {}
        self._dirty: dict[bytes, set[bytes]] = {}  # subscriber key -> changed node keys
        self.plain: dict[bytes, Node] = {}  # the plain peers among `nodes`
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
        old = self.nodes.get(node.key)
        self.nodes[node.key] = node
        self._set_plain(node)
        self._mark(node.key, node, old)

    def remove(self, key: bytes) -> Node | None:
        node = self.nodes.pop(key, None)
        if node is not None:
            self.plain.pop(key, None)
            self._mark(key, node)
            self._dirty.pop(key, None)
        return node

    def update(self, key: bytes, **changes) -> bool:
        """Change fields of a node; marks dirty only when something really changed."""
        node = self.nodes.get(key)
        if node is None:
            return False
        # Who may see it can change only for a plain peer (or a node becoming one): keep what it was.
        before = _visibility_copy(node) if node.kind == PLAIN or "kind" in changes else None
        changed = False
        for name, value in changes.items():
            if getattr(node, name) != value:
                setattr(node, name, value)
                changed = True
        if changed:
            node._packed = None
            self._set_plain(node)
            self._mark(key, node, before)
        return changed

    def _set_plain(self, node: Node) -> None:
        if node.kind == PLAIN:
            self.plain[node.key] = node
        else:
            self.plain.pop(node.key, None)

    def visible(self, sub: bytes, node: Node) -> bool:
        """Whether subscriber `sub` may see `node`'s entry: every node's, a plain peer's only as its target."""
        if node.kind != PLAIN:
            return True
        me = self.nodes.get(sub)
        return me is not None and me.kind != PLAIN and me.node_id in node.targets

    def _mark(self, key: bytes, *states: Node | None) -> None:
        """Dirty for each subscriber that may see one of the node's states (before or after the change): it
        gets the entry, or its removal, and no one else hears of it."""
        states = [n for n in states if n is not None]
        for sub, dirty in self._dirty.items():
            if sub != key and any(self.visible(sub, n) for n in states):
                dirty.add(key)

    # --- subscribers

    def subscribe(self, sub: bytes) -> list[bytes]:
        """Start tracking changes for sub; returns the full snapshot (packed entries, sub excluded)."""
        self._dirty[sub] = set()
        return [n.packed() for k, n in self.nodes.items() if k != sub and self.visible(sub, n)]

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
            if n is None or not self.visible(sub, n):  # marked only for those that saw it: a removal for them
                rems.append(k)
            else:
                ups.append(n.packed())
        return ups, rems

    def plain_targets(self) -> set[bytes]:
        """The keys of the nodes at least one plain peer may reach (the plain ingress's mac1 targets)."""
        ids = set()
        for p in self.plain.values():
            ids |= p.targets
        return {k for k, n in self.nodes.items() if n.kind != PLAIN and n.node_id in ids} if ids else set()

    def expired(self, wall: float) -> list[bytes]:
        return [k for k, n in self.nodes.items() if n.expires is not None and n.expires <= wall]


def _visibility_copy(node: Node) -> Node:
    return Node(node.node_id, node.key, node.name, node.ipv4, node.ipv6, kind=node.kind, targets=node.targets)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
