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

Access control (issue 13, /work/notes/acl-contract.md): with a policy (`set_policy`), subscriber R sees P's entry
only when P may reach R or R may reach P (signal_server/policy.py), and every entry R gets carries "accept": what P
may send to R, and "offers": what R may send to P (shown in R's `meshwg status`; P enforces it). Entries stay packed
once per change; the accept field is packed once per (recipient, template), the offers field once per (peer,
template), and both are spliced onto the shared entry. A policy change marks dirty only the (subscriber, peer) pairs whose view
changed, found per group of peers whose policy class did not change differently (not per pair of nodes).
A node's entry also carries its "tags" (omitted when none).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from itertools import islice

import msgpack

from meshwg.signaling.protocol import (DIR_CHUNK, KIND_OBSERVED, REPORTED_KINDS, T_DIR_FULL, bin_header,
                                       dir_update_body, pack, pack_entry)
from meshwg.disco.peer_paths import valid_candidate
from signal_server import policy as acl_policy

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
    tags: tuple = ()  # its tags (policy.py), shown in its entry
    _packed: bytes | None = None
    _cls: int = -1  # its policy class, valid while _gen is the directory's policy generation
    _gen: int = -1
    _accept: dict = field(default_factory=dict)  # as a recipient: template -> packed "accept" key and value
    _offers: dict = field(default_factory=dict)  # as a peer: template -> packed "offers" key and value

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
        if self.tags:
            e["tags"] = list(self.tags)
        if self.kind == PLAIN:
            e.update(cand=[], online=False, kind=PLAIN)  # reached through the relay's plain port, never directly
        return e

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack_entry(self.entry())
        return self._packed

    def with_accept(self, accept_field: bytes, offers_field: bytes = b"") -> bytes:
        """Its packed entry plus a packed "offers" and "accept" key and value: the shared bytes with two (one)
        more map items. The recipient's own accept field comes last: what precedes it is the same for every
        recipient of one class (Directory._run shares it)."""
        base, more = self.packed(), 1 + bool(offers_field)
        if _spliceable(base, more):  # splice instead of packing it again
            return bytes((base[0] + more,)) + base[1:] + offers_field + accept_field
        e = self.entry()
        e.update(msgpack.unpackb(bytes((0x80 + more,)) + offers_field + accept_field, raw=False))
        return pack_entry(e)


def _spliceable(packed: bytes, more: int) -> bool:
    """A packed entry is a fixmap with room for `more` items."""
    return 0x80 <= packed[0] and packed[0] + more <= 0x8F


# Fields a policy class or an accept list depends on: a change re-evaluates the node's views.
_ACL_FIELDS = frozenset({"name", "tags", "routes", "is_exit", "kind", "ipv4", "ipv6"})
_ADDR_FIELDS = frozenset({"ipv4", "ipv6"})
MAX_ACCEPT_CACHE = 4096  # packed accept fields kept per recipient
BULK = 64  # pending keys from which a take sends whole peer classes as shared runs (fewer: one entry at a time)
RUN_MIN = 8  # members a peer class needs to go out as a run (a smaller one costs more in runs than entry-wise)
MAX_RUN_BYTES = 64 << 20  # shared runs kept (one per recipient class, peer class and accept field length)
SEG_MAX = 64  # sealed change segments kept: a subscriber further behind gets the rest in its own pending set
SNAP_STALE = 512  # keys changed between two joiners from which the shared snapshot is built again, not patched


class _Segment:
    """The keys changed for every subscriber between two seals (the flusher's windows), in order, taken by each
    subscriber in DIR_CHUNK pieces whose update bodies are built once and shared (no policy, no plain peer)."""

    __slots__ = ("keys", "members", "bodies")

    def __init__(self, keys: tuple) -> None:
        self.keys = keys
        self.members = frozenset(keys)
        self.bodies: dict = {}  # piece index -> packed dir_update body


class Directory:
    def __init__(self, mesh_nets=()) -> None:
        self.nodes: dict[bytes, Node] = {}
        self._dirty: dict[bytes, set[bytes]] = {}  # subscriber key -> changed node keys
        self.plain: dict[bytes, Node] = {}  # the plain peers among `nodes`
        # The mesh prefixes (networks or their text): never a candidate, reported or observed.
        self.mesh_nets = tuple(ipaddress.ip_network(str(n), strict=False) for n in mesh_nets if n)
        self.acl: acl_policy.Acl | None = None  # None: no policy, everything allowed (and no "accept" field)
        self._gen = 0  # bumped with every policy: nodes' cached classes are of the policy they were computed for
        # Bumped with every change of an entry, of a class, or of the policy: the shared runs and the class groups
        # are of the stamp they were built at.
        self._stamp = 0
        self._groups: dict = {}  # peer class -> (keys in a fixed order, the same as a frozenset)
        self._groups_stamp = -1
        self._runs: dict = {}  # (recipient class, peer class, accept field length) -> packed entries less accept
        self._runs_bytes = 0
        self._runs_stamp = -1
        # Fan-out without a policy (issue 14): a change every subscriber may see is recorded once, in the open
        # segment, not in N pending sets; seal() closes it into a segment each subscriber walks with its cursor,
        # and each piece of a segment is packed once for all of them (the sessions only encrypt it). A joiner
        # gets a shared snapshot (built again after SNAP_STALE changes) and walks the segments since it.
        self._open: dict = {}  # keys changed for every subscriber since the last seal (an ordered set)
        self._segs: dict[int, _Segment] = {}
        self._seg_first = self._seg_next = 0  # ids of the oldest kept and the next sealed segment
        self._seg_keys = 0  # keys held in self._segs
        self._cursor: dict[bytes, list] = {}  # subscriber -> [segment id, piece index] it takes next
        self._snap: _Snapshot | None = None  # the shared snapshot (None: built again when asked)
        self._snap_dirty: set = set()  # keys changed since it was last brought up to date

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
        if old is not None and self.acl is not None:
            self._cls(old)
        self.nodes[node.key] = node
        self._set_plain(node)
        self._mark(node.key, node, old)
        if old is not None:
            self._recipient_changed(node, old, addrs=(old.ipv4, old.ipv6) != (node.ipv4, node.ipv6))

    def remove(self, key: bytes) -> Node | None:
        node = self.nodes.pop(key, None)
        if node is not None:
            self.plain.pop(key, None)
            self._mark(key, node)
            self._dirty.pop(key, None)
            self._cursor.pop(key, None)
        return node

    def update(self, key: bytes, **changes) -> bool:
        """Change fields of a node; marks dirty only when something really changed."""
        node = self.nodes.get(key)
        if node is None:
            return False
        # Who may see it can change only for a plain peer (or a node becoming one), or under a policy when what it
        # depends on changes: keep what it was.
        changed = [name for name, value in changes.items() if getattr(node, name) != value]
        acl_change = self.acl is not None and not _ACL_FIELDS.isdisjoint(changed)
        before = None
        if node.kind == PLAIN or "kind" in changes or acl_change:
            if self.acl is not None:
                self._cls(node)
            before = _visibility_copy(node)
        for name in changed:
            setattr(node, name, changes[name])
        if changed:
            node._packed = None
            if not _ACL_FIELDS.isdisjoint(changed):
                node._gen = -1  # its class is computed again when asked
                if not _ADDR_FIELDS.isdisjoint(changed):
                    node._accept, node._offers = {}, {}
            self._set_plain(node)
            self._mark(key, node, before)
            if acl_change:
                self._recipient_changed(node, before, addrs=not _ADDR_FIELDS.isdisjoint(changed))
        return bool(changed)

    def _set_plain(self, node: Node) -> None:
        if node.kind == PLAIN:
            self.plain[node.key] = node
        else:
            self.plain.pop(node.key, None)

    def visible(self, sub: bytes, node: Node) -> bool:
        """Whether subscriber `sub` may see `node`'s entry: every node's, a plain peer's only as its target; under a
        policy only when one of the two may reach the other."""
        me = self.nodes.get(sub)
        if node.kind == PLAIN and not (me is not None and me.kind != PLAIN and me.node_id in node.targets):
            return False
        if self.acl is None:
            return True
        return me is not None and self.acl.view(self._cls(me), self._cls(node)).visible

    # --- access control (issue 13)

    def _cls(self, node: Node) -> int:
        if node._gen != self._gen:
            node._cls = self.acl.class_of(acl_policy.member_of(node))
            node._gen = self._gen
        return node._cls

    def member(self, key: bytes) -> acl_policy.Member | None:
        node = self.nodes.get(key)
        return None if node is None else acl_policy.member_of(node)

    def _state(self, acl, me_cls: int, node_cls: int):
        """What a subscriber is told of a peer (visibility passed already for plain peers): None (hidden), True (no
        policy: all of it) or the accept and offers templates."""
        if acl is None:
            return True
        v = acl.view(me_cls, node_cls)
        return (v.template, acl.view(node_cls, me_cls).template) if v.visible else None

    def set_policy(self, pf) -> None:
        """Put a policy (policy.PolicyFile, checked by the caller) in force, or none (None): every subscriber gets
        the entries whose visibility or accept list changed for it, and the removal of those it may no longer see."""
        old_acl, new_acl = self.acl, (acl_policy.Acl(pf) if pf is not None else None)
        old_cls = {k: self._cls(n) for k, n in self.nodes.items()} if old_acl is not None else {}
        self.acl, self._gen, self._stamp = new_acl, self._gen + 1, self._stamp + 1
        self._snap = None
        new_cls = {k: self._cls(n) for k, n in self.nodes.items()} if new_acl is not None else {}
        groups: dict = {}  # peers whose class moved alike (a plain peer alone: its targets matter too)
        for k, n in self.nodes.items():
            g = (old_cls.get(k, -1), new_cls.get(k, -1), k if n.kind == PLAIN else None)
            groups.setdefault(g, []).append(k)
        for sub, dirty in self._dirty.items():
            me = self.nodes.get(sub)
            if me is None:
                continue
            mo, mn = old_cls.get(sub, -1), new_cls.get(sub, -1)
            for (po, pn, plain), keys in groups.items():
                if plain is not None and not (me.kind != PLAIN and me.node_id in self.nodes[plain].targets):
                    continue
                if self._state(old_acl, mo, po) != self._state(new_acl, mn, pn):
                    dirty.update(keys)
            dirty.discard(sub)

    def _recipient_changed(self, node: Node, before: Node, addrs: bool) -> None:
        """`node` (a subscriber, under a policy) changed what its views depend on: it gets the peers whose view
        changed (all it sees when its addresses changed: every accept list names them)."""
        dirty = self._dirty.get(node.key)
        if dirty is None or self.acl is None:
            return
        old, new = self._cls(before), self._cls(node)
        if old == new and not addrs:
            return
        for k, p in self.nodes.items():
            if k == node.key:
                continue
            if p.kind == PLAIN and not (node.kind != PLAIN and node.node_id in p.targets):
                continue
            pc = self._cls(p)
            if addrs or self._state(self.acl, old, pc) != self._state(self.acl, new, pc):
                dirty.add(k)

    def entry_for(self, sub: bytes, node: Node) -> bytes:
        """`node`'s packed entry as subscriber `sub` gets it (visible to it): with "accept" and "offers" under a
        policy."""
        if self.acl is None:
            return node.packed()
        me = self.nodes[sub]
        mc, pc = self._cls(me), self._cls(node)
        return node.with_accept(self._accept_field(me, self.acl.view(mc, pc).template),
                                self._offers_field(node, self.acl.view(pc, mc).template))

    # --- a pending update in bounded pieces, peer classes as shared runs

    def take_pending_packed(self, sub: bytes, limit: int) -> tuple[list[bytes], int, list[bytes]] | None:
        """Part of what take_pending would return, ready for protocol.dir_update_body: (upserts packed as msgpack bin
        objects, in pieces to be concatenated; how many; removed keys), at most `limit` keys; None when nothing is
        pending.

        The keys taken leave the pending set and their entries are built now, so a caller that sends each piece
        before taking the next holds one piece in memory, and a key that changes meanwhile is pending again.
        Under a policy, a peer class whose (remaining) members are all pending goes out as a run shared by every
        recipient of one class: their entries less the recipient's accept field, which is woven in by a join."""
        if sub in self._dirty:
            self._drain_segments(sub)
        return self._take_own(sub, limit)

    def _take_own(self, sub: bytes, limit: int) -> tuple[list[bytes], int, list[bytes]] | None:
        dirty = self._dirty.get(sub)
        if not dirty:
            return None
        parts: list[bytes] = []
        rems: list[bytes] = []
        taken = 0
        if self.acl is not None and len(dirty) >= BULK and sub in self.nodes and sub not in dirty:
            taken = self._take_runs(sub, dirty, limit, parts, rems)
        count = taken - len(rems)
        if taken < limit and dirty:
            keys = list(islice(dirty, limit - taken))
            dirty.difference_update(keys)
            ups, more = self._entries(sub, keys)
            for e in ups:
                parts += (bin_header(len(e)), e)
            count += len(ups)
            rems += more
        return parts, count, rems

    def _take_runs(self, sub: bytes, dirty: set, limit: int, parts: list, rems: list) -> int:
        """Whole runs (or their pending tails) of the peer classes, while `limit` allows: the entries of those `sub`
        sees, the removal of those it does not; the keys taken leave `dirty`. A class whose pending members are not
        a tail of its run is left to the entry-wise path."""
        me = self.nodes[sub]
        mc, view, count = self._cls(me), self.acl.view, 0
        for pc, (keys, members) in self._class_groups().items():
            if count >= limit:
                break
            skip = keys.index(sub) if sub in members else -1  # never its own entry
            if skip >= 0:
                keys = keys[:skip] + keys[skip + 1:]
            if not keys or keys[-1] not in dirty:  # nothing pending, or not a tail: cheap to tell
                continue
            start = _pending_tail(keys, dirty)
            if start and not dirty.issuperset(keys[start:]):
                continue
            end = min(len(keys), start + limit - count)
            v = view(mc, pc)
            if v.visible:
                acc = self._accept_field(me, v.template)
                pieces = self._run(mc, pc, view(pc, mc).template, len(acc))
                if skip >= 0:
                    pieces = pieces[:skip] + pieces[skip + 1:]
                parts += (acc.join(pieces[start:end]), acc)
            else:
                rems += keys[start:end]
            dirty.difference_update(keys[start:end])
            count += end - start
        return count

    def _class_groups(self) -> dict:
        """Peer class -> (keys, frozenset of them): the nodes (no plain peer) whose entry a run can hold, for the
        classes of RUN_MIN members or more."""
        if self._groups_stamp != self._stamp:
            groups: dict = {}
            for k, n in self.nodes.items():
                if n.kind != PLAIN and _spliceable(n.packed(), 2):
                    groups.setdefault(self._cls(n), []).append(k)
            self._groups = {c: (tuple(ks), frozenset(ks)) for c, ks in groups.items() if len(ks) >= RUN_MIN}
            self._groups_stamp = self._stamp
        return self._groups

    def _run(self, mc: int, pc: int, offers_template: tuple, acc_len: int) -> list[bytes]:
        """For recipients of class `mc` whose accept field has `acc_len` bytes: each peer's entry as with_accept
        packs it, with its bin header, less the accept field (the same bytes for all of them)."""
        if self._runs_stamp != self._stamp:
            self._runs, self._runs_bytes, self._runs_stamp = {}, 0, self._stamp
        pieces = self._runs.get((mc, pc, acc_len))
        if pieces is None:
            pieces = []
            for k in self._groups[pc][0]:
                n = self.nodes[k]
                base = n.packed()
                body = bytes((base[0] + 2,)) + base[1:] + self._offers_field(n, offers_template)
                pieces.append(bin_header(len(body) + acc_len) + body)
            size = sum(map(len, pieces))
            if self._runs_bytes + size > MAX_RUN_BYTES:
                self._runs, self._runs_bytes = {}, 0
            self._runs[(mc, pc, acc_len)] = pieces
            self._runs_bytes += size
        return pieces

    def _accept_field(self, me: Node, template: tuple) -> bytes:
        field = me._accept.get(template)
        if field is None:
            if len(me._accept) >= MAX_ACCEPT_CACHE:
                me._accept.clear()
            field = msgpack.packb("accept") + msgpack.packb(acl_policy.expand(template, (f"{me.ipv4}/32", f"{me.ipv6}/128")))
            me._accept[template] = field
        return field

    def _offers_field(self, peer: Node, template: tuple) -> bytes:
        """What the recipient may send `peer` (the reverse view's template, filled in with the peer's addresses),
        packed once per (peer, template): shared by every recipient of one class."""
        field = peer._offers.get(template)
        if field is None:
            if len(peer._offers) >= MAX_ACCEPT_CACHE:
                peer._offers.clear()
            field = msgpack.packb("offers") + msgpack.packb(
                acl_policy.expand(template, (f"{peer.ipv4}/32", f"{peer.ipv6}/128")))
            peer._offers[template] = field
        return field

    def _entries_under_policy(self, sub: bytes, keys) -> tuple[list[bytes], list[bytes]]:
        """(entries, removals) of `keys` for `sub` under the policy: one view per peer class, not per peer (a
        policy change sends a subscriber hundreds of entries of a few classes)."""
        me = self.nodes[sub]
        mc, gen, view = self._cls(me), self._gen, self.acl.view
        per_class: dict = {}
        ups, rems = [], []
        for k in keys:
            n = self.nodes.get(k)
            if n is None or k == sub or (n.kind == PLAIN and not (me.kind != PLAIN and me.node_id in n.targets)):
                rems.append(k)
                continue
            pc = n._cls if n._gen == gen else self._cls(n)
            got = per_class.get(pc)
            if got is None:
                v = view(mc, pc)
                got = per_class[pc] = (self._accept_field(me, v.template), view(pc, mc).template) if v.visible else ()
            if got:
                ups.append(n.with_accept(got[0], self._offers_field(n, got[1])))
            else:
                rems.append(k)
        return ups, rems

    def _mark(self, key: bytes, *states: Node | None) -> None:
        """Dirty for each subscriber that may see one of the node's states (before or after the change): it
        gets the entry, or its removal, and no one else hears of it."""
        states = [n for n in states if n is not None]
        self._stamp += 1
        if self.acl is None and all(n.kind != PLAIN for n in states):
            self._open[key] = None  # every subscriber may see it: once, not once per subscriber
            if self._snap is not None:
                self._snap_dirty.add(key)
                if len(self._snap_dirty) > SNAP_STALE:  # cheaper built again than patched
                    self._snap, self._snap_dirty = None, set()
            return
        self._snap = None  # a shared snapshot would miss what only some subscribers were told
        for sub, dirty in self._dirty.items():
            if sub != key and any(self.visible(sub, n) for n in states):
                dirty.add(key)

    # --- subscribers

    def subscribe(self, sub: bytes) -> list[bytes]:
        """Start tracking changes for sub; returns the full snapshot (packed entries, sub excluded)."""
        self.seal()  # what changed before is in the snapshot
        self._start(sub)
        return self._snapshot_entries(sub)

    def _start(self, sub: bytes) -> None:
        self._dirty[sub] = set()
        self._cursor[sub] = [self._seg_next, 0]

    def _snapshot_entries(self, sub: bytes) -> list[bytes]:
        if self.acl is not None and sub in self.nodes:
            return self._entries_under_policy(sub, [k for k in self.nodes if k != sub])[0]
        return [self.entry_for(sub, n) for k, n in self.nodes.items() if k != sub and self.visible(sub, n)]

    def subscribe_bodies(self, sub: bytes) -> list[bytes]:
        """subscribe() as the packed T_DIR_FULL message bodies to send in order. Without a policy or plain peers
        they are the shared snapshot's (the joiner's own entry left out): kept current by packing again only the
        pieces whose keys changed since the last joiner, not every entry for every joiner."""
        self._start(sub)
        if self.acl is not None or self.plain:
            entries = self._snapshot_entries(sub)
            chunks = [entries[i: i + DIR_CHUNK] for i in range(0, len(entries), DIR_CHUNK)] or [[]]
            return [_full_body(c, i == 0, i == len(chunks) - 1) for i, c in enumerate(chunks)]
        snap = self._shared_snapshot()
        i = snap.where.get(sub)
        if i is None:
            return list(snap.bodies)
        mine = _full_body([self.nodes[k].packed() for k in snap.pieces[i] if k != sub], i == 0,
                          i == len(snap.bodies) - 1)
        return snap.bodies[:i] + [mine] + snap.bodies[i + 1:]

    def _shared_snapshot(self) -> "_Snapshot":
        snap = self._snap
        if snap is None:
            snap = self._snap = _Snapshot(self.nodes)  # no plain peer among them (the caller checked)
        else:
            snap.refresh(self.nodes, self._snap_dirty)
        self._snap_dirty = set()
        return snap

    def unsubscribe(self, sub: bytes) -> None:
        self._dirty.pop(sub, None)
        self._cursor.pop(sub, None)

    def has_pending(self, sub: bytes, sealed: bool = False) -> bool:
        """Whether `sub` has changes to take; `sealed`: only those take_pending_body gives now (not the open
        segment's, which the next seal hands out)."""
        if self._dirty.get(sub):
            return True
        cur = self._cursor.get(sub)
        return cur is not None and (cur[0] < self._seg_next or (not sealed and any(k != sub for k in self._open)))

    # --- the shared segments

    def seal(self) -> None:
        """Close the changes since the last seal into a segment (the flusher does, once per window)."""
        if not self._open:
            return
        keys, self._open = tuple(self._open), {}
        self._segs[self._seg_next] = _Segment(keys)
        self._seg_next += 1
        self._seg_keys += len(keys)
        low = min([c[0] for c in self._cursor.values()], default=self._seg_next)
        while self._seg_first < low:
            self._drop_segment()
        while len(self._segs) > SEG_MAX or self._seg_keys > max(4096, 4 * len(self.nodes)):
            self._drop_segment()  # a subscriber that far behind gets the rest in its own pending set

    def _drop_segment(self) -> None:
        sid = self._seg_first
        seg = self._segs.pop(sid)
        self._seg_first += 1
        self._seg_keys -= len(seg.keys)
        for sub, cur in self._cursor.items():
            if cur[0] == sid:
                dirty = self._dirty[sub]
                dirty.update(seg.keys[cur[1] * DIR_CHUNK:])
                dirty.discard(sub)
                cur[0], cur[1] = sid + 1, 0

    def _drain_segments(self, sub: bytes) -> None:
        """The sealed and open changes `sub` has not taken go into its own pending set."""
        self.seal()
        cur, dirty = self._cursor.get(sub), self._dirty[sub]
        if cur is None:
            return
        for sid in range(cur[0], self._seg_next):
            dirty.update(self._segs[sid].keys[cur[1] * DIR_CHUNK if sid == cur[0] else 0:])
        cur[0], cur[1] = self._seg_next, 0
        dirty.discard(sub)

    def take_pending_body(self, sub: bytes, limit: int = DIR_CHUNK) -> bytes | None:
        """The next T_DIR_UPDATE body for `sub` (None: nothing pending): the next piece of the sealed segments
        (the bytes every subscriber gets, packed once), then its own pending set (at most `limit` keys)."""
        if sub not in self._dirty:
            return None
        body = self._take_segment(sub)
        if body is not None:
            return body
        got = self._take_own(sub, limit)
        return None if got is None else dir_update_body(*got)

    def _take_segment(self, sub: bytes) -> bytes | None:
        cur = self._cursor[sub]
        while cur[0] < self._seg_next:
            seg, i = self._segs[cur[0]], cur[1]
            keys = seg.keys[i * DIR_CHUNK: (i + 1) * DIR_CHUNK]
            if not keys:
                cur[0], cur[1] = cur[0] + 1, 0
                continue
            cur[1] += 1
            if sub in seg.members and sub in keys:  # never its own entry: its own bytes
                body = self._body_for(sub, [k for k in keys if k != sub])
            elif self.acl is not None:
                body = self._body_for(sub, keys)
            else:
                body = seg.bodies.get(i)
                if body is None:
                    body = _shared_body(self.nodes, keys)
                    if body is None:  # a plain peer now among them: its targets alone may see it
                        body = self._body_for(sub, keys)
                    else:
                        seg.bodies[i] = body
            if body is not None:
                return body
        return None

    def _body_for(self, sub: bytes, keys) -> bytes | None:
        ups, rems = self._entries(sub, keys)
        if not ups and not rems:
            return None
        parts = []
        for e in ups:
            parts += (bin_header(len(e)), e)
        return dir_update_body(parts, len(ups), rems)

    def take_pending(self, sub: bytes) -> tuple[list[bytes], list[bytes]]:
        """(packed upserts, removed keys) accumulated since the last take."""
        dirty = self._dirty.get(sub)
        if dirty is None:
            return [], []
        self._drain_segments(sub)
        if not dirty:
            return [], []
        self._dirty[sub] = set()
        return self._entries(sub, dirty)

    def _entries(self, sub: bytes, keys) -> tuple[list[bytes], list[bytes]]:
        """(packed upserts, removed keys) of `keys` for `sub`, one entry at a time."""
        if self.acl is not None and sub in self.nodes:
            return self._entries_under_policy(sub, keys)
        ups, rems = [], []
        for k in keys:
            n = self.nodes.get(k)
            if n is None or not self.visible(sub, n):  # marked only for those that saw it: a removal for them
                rems.append(k)
            else:
                ups.append(self.entry_for(sub, n))
        return ups, rems

    def plain_targets(self) -> set[bytes]:
        """The keys of the nodes at least one plain peer may reach (the plain ingress's mac1 targets): one of its
        targets, and under a policy one it may reach."""
        ids: dict[int, list] = {}
        for p in self.plain.values():
            for i in p.targets:
                ids.setdefault(i, []).append(p)
        if not ids:
            return set()
        out = set()
        for k, n in self.nodes.items():
            if n.kind == PLAIN or n.node_id not in ids:
                continue
            if self.acl is None or any(self.acl.view(self._cls(n), self._cls(p)).peer_to_me for p in ids[n.node_id]):
                out.add(k)
        return out

    def expired(self, wall: float) -> list[bytes]:
        return [k for k, n in self.nodes.items() if n.expires is not None and n.expires <= wall]


class _Snapshot:
    """Every node's entry as T_DIR_FULL bodies of DIR_CHUNK keys (no policy, no plain peer), shared by joiners."""

    def __init__(self, nodes: dict) -> None:
        keys = list(nodes)
        self.pieces = [keys[i: i + DIR_CHUNK] for i in range(0, len(keys), DIR_CHUNK)] or [[]]
        self.where = {k: i for i, ks in enumerate(self.pieces) for k in ks}
        self.bodies = [b""] * len(self.pieces)
        self._pack(nodes, range(len(self.pieces)))

    def refresh(self, nodes: dict, changed) -> None:
        """Pack again the pieces of the keys changed (gone ones leave their piece, new ones join the last)."""
        stale = set()
        for k in changed:
            i = self.where.get(k)
            if i is not None:
                stale.add(i)
                if k not in nodes:
                    self.pieces[i].remove(k)
                    del self.where[k]
            elif k in nodes:
                if len(self.pieces[-1]) >= DIR_CHUNK:
                    stale.add(len(self.pieces) - 1)  # no longer the last
                    self.pieces.append([])
                    self.bodies.append(b"")
                i = self.where[k] = len(self.pieces) - 1
                self.pieces[i].append(k)
                stale.add(i)
        self._pack(nodes, stale)

    def _pack(self, nodes: dict, which) -> None:
        last = len(self.pieces) - 1
        for i in which:
            self.bodies[i] = _full_body([nodes[k].packed() for k in self.pieces[i]], i == 0, i == last)


def _full_body(entries: list, first: bool, last: bool) -> bytes:
    return pack({"type": T_DIR_FULL, "peers": entries, "first": first, "last": last})


def _shared_body(nodes: dict, keys) -> bytes | None:
    """The update body of `keys` as every subscriber gets it (no policy): entries, removals of those gone; None
    when one is a plain peer."""
    parts, rems, count = [], [], 0
    for k in keys:
        n = nodes.get(k)
        if n is None:
            rems.append(k)
        elif n.kind == PLAIN:
            return None
        else:
            e = n.packed()
            parts += (bin_header(len(e)), e)
            count += 1
    return dir_update_body(parts, count, rems)


def _pending_tail(keys: tuple, dirty: set) -> int:
    """Where the pending tail of `keys` starts if the pending ones are a tail (binary search: the caller checks)."""
    lo, hi = 0, len(keys) - 1  # keys[hi] is pending
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid] in dirty:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _visibility_copy(node: Node) -> Node:
    """What decides who may see the node (its class cached under the current policy)."""
    return Node(node.node_id, node.key, node.name, node.ipv4, node.ipv6, kind=node.kind, targets=node.targets,
                routes=node.routes, is_exit=node.is_exit, tags=node.tags, _cls=node._cls, _gen=node._gen)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
