"""The signal server's session and registry core. Pure (sans-IO): it takes decoded control messages, session
starts and ends, rows the change feed named and the time, and returns effects for the shells to carry out.

It owns the peer directory's membership and liveness. The shells own the connections: `connected` is the
control listener's session table, read here only to know who can be reached now. Effects:
  Send(to, msg)     a control message for the session of `to` (dropped if it has none)
  Drop(key, reason) the node left the mesh ("removed"/"expired"): tell its session GONE and close it, and
                    the relay forgets the key
  Allow(key)        the relay may admit this key (a registered, live node)
  DIR_CHANGED       the directory changed: push it (coalesced) to every subscriber
  PLAIN_CHANGED     plain peers or the nodes they target changed: the relay's plain keys and the plain
                    ingress's targets follow (Directory.plain, Directory.plain_targets)
  AdvertiseRoutes(key, routes, exit_node)  store the node's new advertisement (store.advertise_routes with
                    self.policy.forbidden), then hand the result to routes_recorded
  Log(level, text)  a line for the operator (refused or pending routes, once per change)
  Leave(key)        the node asked to leave the mesh (`meshwg leave`): remove its row as `nodes remove` does, then
                    drop(key, "left"), whose GONE tells it the leave is done
A connected node whose own name or tags change (the feed's row) is sent T_SELF: its welcome told it the old ones
and `meshwg status` shows them (issue 13).
Under an access policy (set_policy, issue 13) the directory decides who sees whom; a punch or a sealed message
toward a peer the requester may not see is refused as if the peer did not exist.
Join rules are registry.decide_join's (applied inside the store's transaction), not this module's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container
from dataclasses import dataclass

import logging

from meshwg.signaling import protocol as P
from signal_server import routes as R
from signal_server.directory import PLAIN, Directory, Node
from signal_server.punch import PunchCoordinator

MAX_SEAL_BLOB = 16 * 1024


@dataclass(frozen=True)
class Send:
    to: bytes
    msg: dict


@dataclass(frozen=True)
class Drop:
    key: bytes
    reason: str


@dataclass(frozen=True)
class Allow:
    key: bytes


@dataclass(frozen=True)
class AdvertiseRoutes:
    key: bytes
    routes: tuple
    exit_node: bool


@dataclass(frozen=True)
class Leave:
    key: bytes


@dataclass(frozen=True)
class Log:
    level: int
    text: str


class _DirChanged:
    def __repr__(self) -> str:
        return "DIR_CHANGED"


DIR_CHANGED = _DirChanged()


class _PlainChanged:
    def __repr__(self) -> str:
        return "PLAIN_CHANGED"


PLAIN_CHANGED = _PlainChanged()


def node_from_row(row) -> Node:
    """A directory node for a store row (store_api.NodeRow)."""
    return Node(row.node_id, row.key, row.name, row.ipv4, row.ipv6, expires=row.expires, tag=row.tag,
                kind=row.kind, targets=frozenset(row.targets), tags=tuple(row.tags))


def _self_view(n) -> tuple:
    """What a node is told about itself that can change under it (a Node or a NodeRow): its name and tags."""
    return n.name, tuple(n.tags)


class ControlCore:
    def __init__(self, directory: Directory, connected: Container, counters: Counter | None = None,
                 punch: PunchCoordinator | None = None) -> None:
        self.directory = directory
        self.connected = connected
        self.counters = Counter() if counters is None else counters
        self.punch = punch or PunchCoordinator()
        # What no route may cover: the mesh prefixes, the server's own addresses (set_server_ips).
        self.policy = R.Policy.make(directory.mesh_nets)
        self._advertised: dict[bytes, tuple] = {}  # key -> the last advertisement sent to the store
        self._routes_of: dict[bytes, tuple] = {}  # key -> (its row's routes, is_exit), before the policy
        self._route_notes: dict[bytes, frozenset] = {}  # key -> what was last logged about its routes

    # --- candidates

    def reported(self, cands: list) -> list:
        """What a node may say about its own candidates (Directory.reported); the rest is counted."""
        kept, refused = self.directory.reported(cands)
        if refused:
            self.counters["control_candidates_refused"] += refused
        return kept

    def observed(self, events) -> list:
        """Relay sources (key, addr) become the nodes' "observed" candidates."""
        changed = False
        for key, obs in events:
            changed |= self.directory.set_observed(key, obs)  # False for a key no longer in the directory
        return [DIR_CHANGED] if changed else []

    # --- sessions

    def session_started(self, key: bytes, row) -> list:
        """A registered node's session begins (before its welcome): its node is in the directory."""
        node = self.directory.nodes.get(key)
        if node is not None:
            # The feed may have brought a newer row between the join's read and now: the welcome (of `row`) would
            # stay stale. Queued behind the welcome; a row newer than ours still to come sends its own update.
            return self._self_update(key, node, _self_view(row))
        self.directory.put(node_from_row(row))
        self._set_routes(key, row.routes, row.is_exit)
        return [Allow(key)] + self._plain_changed(row.kind)

    def session_ready(self, key: bytes, candidates: list) -> list:
        """Welcome and snapshot sent: the node is online with the candidates of its register."""
        self.directory.update(key, online=True, candidates=candidates)
        return [DIR_CHANGED]

    def session_ended(self, key: bytes) -> list:
        self.directory.unsubscribe(key)
        changed = self.directory.update(key, online=False, candidates=[], observed=[])
        return [DIR_CHANGED] if changed else []

    # --- messages on an open session

    def on_message(self, key: bytes, m: dict, now: float) -> list:
        self.counters["control_messages"] += 1
        handler = self._HANDLERS.get(m["type"])  # the codec guarantees a str type
        if handler is None:
            self.counters["control_unknown_type"] += 1
            return []
        return handler(self, key, m, now)

    def _on_heartbeat(self, key: bytes, m: dict, now: float) -> list:
        return [Send(key, {"type": P.T_HEARTBEAT_ACK, "seq": m.get("seq", 0)})]

    def _on_candidates(self, key: bytes, m: dict, now: float) -> list:
        cands = P.candidates_untrusted(m.get("candidates"))
        if cands is None:
            self.counters["control_bad_candidates"] += 1
            return []
        return [DIR_CHANGED] if self.directory.update(key, candidates=self.reported(cands)) else []

    def _on_punch_request(self, key: bytes, m: dict, now: float) -> list:
        peer = m.get("peer")
        if not isinstance(peer, bytes) or len(peer) != 32:
            self.counters["control_bad_punch"] += 1
            return []
        out, err = self.punch.plan(self.directory, key, peer, now)
        effects = []
        if err:
            self.counters[f"punch_{err}"] += 1
            effects.append(Send(key, {"type": "punch_fail", "peer": peer, "reason": err}))
        effects += [Send(to, msg) for to, msg in out]
        if out:
            self.counters["punches"] += 1
        return effects

    def _on_seal_send(self, key: bytes, m: dict, now: float) -> list:
        to, blob = m.get("to"), m.get("blob")
        if not isinstance(to, bytes) or not isinstance(blob, bytes) or len(blob) > MAX_SEAL_BLOB:
            self.counters["control_bad_sealed"] += 1
            return []
        peer = self.directory.nodes.get(to)
        # A hidden member and a key outside the mesh get the same answer: anything else would confirm to the
        # sender that a key it holds belongs to a member the policy hides from it.
        if peer is None or not self.directory.visible(key, peer):
            self.counters["sealed_denied" if peer is not None else "sealed_unknown_peer"] += 1
            return [Send(key, {"type": "seal_fail", "to": to, "reason": "unknown_peer"})]
        if to not in self.connected:
            self.counters["sealed_peer_offline"] += 1
            return [Send(key, {"type": "seal_fail", "to": to, "reason": "peer_offline"})]
        self.counters["sealed_forwarded"] += 1
        return [Send(to, {"type": P.T_SEALED, "from": key, "blob": blob})]

    def _on_routes(self, key: bytes, m: dict, now: float) -> list:
        parsed = P.routes_untrusted(m)
        if parsed is None:
            self.counters["control_bad_routes"] += 1
            return []
        sent = m.get("routes") or []
        if len(sent) > len(parsed[0]):
            self.counters["control_routes_dropped"] += len(sent) - len(parsed[0])  # junk, duplicates, over the cap
        if self._advertised.get(key) == parsed or key not in self.directory.nodes:
            return []  # said before (every reconnect repeats it): no write
        self._advertised[key] = parsed
        return [AdvertiseRoutes(key, *parsed)]

    def _on_leave(self, key: bytes, m: dict, now: float) -> list:
        if key not in self.directory.nodes:
            return []
        self.counters["control_leaves"] += 1
        return [Leave(key)]

    # A message type a node may send on an open session -> its handler; anything else is counted and dropped.
    _HANDLERS = {
        P.T_HEARTBEAT: _on_heartbeat,
        P.T_CANDIDATES: _on_candidates,
        P.T_PUNCH_REQUEST: _on_punch_request,
        P.T_SEAL_SEND: _on_seal_send,
        P.T_ROUTES: _on_routes,
        P.T_LEAVE: _on_leave,
    }

    # --- subnet routes and exit nodes

    def routes_recorded(self, key: bytes, row, plan, wall: float) -> list:
        """The store took the node's advertisement (store.advertise_routes): its row, and the routes.Plan for
        the log. Refused and pending routes are logged once per change of what there is to say."""
        if row is None:
            self._advertised.pop(key, None)
            return []
        effects = self.apply_row(key, row, wall)
        notes = frozenset([(p, r) for p, r in plan.refused] + [(p, None) for p in plan.pending])
        new = notes - self._route_notes.get(key, frozenset())
        self._route_notes[key] = notes
        for p in plan.auto_approved:
            effects.append(Log(logging.INFO, f"node {row.name}: route {p} approved by its invite"))
        for p, reason in sorted(new, key=lambda n: n[0]):
            if reason is None:
                effects.append(Log(logging.INFO, f"node {row.name} advertises {p}, pending approval "
                                                 f"(meshwg-signal routes approve {row.name} {p})"))
            else:
                self.counters["routes_refused"] += 1
                effects.append(Log(logging.WARNING, f"node {row.name}: route {p} refused: {reason}"))
        return effects

    def set_server_ips(self, ips) -> list:
        """The addresses the server is reached at changed: no route may contain one (every node's again)."""
        policy = R.Policy.make(self.directory.mesh_nets, ips)
        if policy == self.policy:
            return []
        self.policy = policy
        changed = False
        for key, (subnets, is_exit) in self._routes_of.items():
            changed |= self._set_routes(key, subnets, is_exit)
        return [DIR_CHANGED] if changed else []

    def _set_routes(self, key: bytes, subnets: tuple, is_exit: bool) -> bool:
        """The node's routes as its row has them; peers get those the policy allows. True when its entry changed."""
        if subnets or is_exit:
            self._routes_of[key] = (subnets, is_exit)
        else:
            self._routes_of.pop(key, None)
        shown, exit_ok = R.visible([*subnets, *([R.EXIT] if is_exit else [])], self.policy.forbidden)
        return self.directory.update(key, routes=shown, is_exit=exit_ok)

    # --- access control (issue 13)
    def reserved_names(self) -> frozenset:
        """Names the policy in force mentions: a joining node asking for one gets another (store.join), so the
        rights a rule grants by name never pass to whoever joins next under a removed node's name."""
        acl = self.directory.acl
        return acl.pf.names if acl is not None else frozenset()


    def set_policy(self, pf) -> list:
        """A policy (policy.PolicyFile, checked) in force, or None for none: entries follow within a flush."""
        self.directory.set_policy(pf)
        self.counters["policy_loads"] += 1
        return [DIR_CHANGED, PLAIN_CHANGED]

    # --- registry changes (the change feed, expiry)

    def _plain_changed(self, kind: str) -> list:
        """PLAIN_CHANGED when a plain peer, or a node while plain peers exist, came or went."""
        return [PLAIN_CHANGED] if kind == PLAIN or self.directory.plain else []

    def drop(self, key: bytes, reason: str) -> list:
        for table in (self._advertised, self._routes_of, self._route_notes):
            table.pop(key, None)
        node = self.directory.remove(key)
        kind = node.kind if node is not None else "node"
        self.counters[f"{'plain' if kind == PLAIN else 'nodes'}_{reason}"] += 1
        return [Drop(key, reason), DIR_CHANGED] + self._plain_changed(kind)

    def apply_row(self, key: bytes, row, wall: float) -> list:
        """The store's current row for `key` (None: gone), which the change feed said changed."""
        node = self.directory.nodes.get(key)
        if row is None or not row.live(wall):
            return self.drop(key, "removed" if row is None else "expired") if node is not None else []
        if node is not None and node.node_id != row.node_id:
            # Removed and joined again between two reads: the old node (and its session) is gone.
            return self.drop(key, "removed") + self.apply_row(key, row, wall)
        if node is None:
            self.directory.put(node_from_row(row))
            self._set_routes(key, row.routes, row.is_exit)
            # A plain peer never gets a relay session: nodes' frames to its key go to the plain port.
            return ([] if row.kind == PLAIN else [Allow(key)]) + [DIR_CHANGED] + self._plain_changed(row.kind)
        changed = self._set_routes(key, row.routes, row.is_exit)
        # Under a policy a node's name, tags or routes can move whom plain peers reach (the ingress's targets).
        plain = self._plain_changed(row.kind) if self.directory.acl is not None else []
        seen = _self_view(node)
        if self.directory.update(key, name=row.name, expires=row.expires, targets=frozenset(row.targets),
                                 tags=tuple(row.tags)):
            effects = [DIR_CHANGED] + (plain or ([PLAIN_CHANGED] if row.kind == PLAIN else []))
        else:
            effects = [DIR_CHANGED] + plain if changed else []
        return effects + self._self_update(key, node, seen)

    def _self_update(self, key: bytes, node: Node, seen: tuple) -> list:
        """T_SELF to the node's session when its own view (its directory node now) is not `seen`, what it was told."""
        view = _self_view(node)
        if view == seen or node.kind == PLAIN or key not in self.connected:
            return []  # a plain peer has no session; a node offline hears it in its next welcome
        self.counters["self_updates"] += 1
        return [Send(key, {"type": P.T_SELF, "name": view[0], "tags": list(view[1])})]

    def resync(self, rows, wall: float) -> list:
        """Every node row (at start, or after the feed was pruned past us): bring the directory in line."""
        by_key = {r.key: r for r in rows}
        effects = []
        for key in list(self.directory.nodes):
            if key not in by_key:
                effects += self.apply_row(key, None, wall)
        for key, row in by_key.items():
            effects += self.apply_row(key, row, wall)
        return effects

    def expire(self, wall: float) -> list:
        effects = []
        for key in self.directory.expired(wall):
            effects += self.drop(key, "expired")
        return effects
