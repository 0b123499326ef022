"""The join agent's decisions, sans-IO: the one peer directory and what follows from it. Pure: `now` is an input.

    actions = core.apply(inputs, now)    # the only entry point; the shell carries the actions out in
                                         # order, then flushes the driver once

The core owns the directory (key -> PeerInfo, folded from the control client's events), the PeerSpec of
each entry, the welcome, whether the control channel is up, PunchPolicy and CandidateReport, and drives
the MeshNode (pure too) directly: netmap, mesh prefixes, STUN servers, punches, local endpoints.
The trio shell (meshwg.io.agent.agent) only turns events into inputs and actions into I/O.

Inputs:  the control client's events (meshwg.control.events): Connected, Disconnected, DirectoryReset,
         PeerChanged, PeerRemoved, PunchNotice, PunchFailed, Removed, SealedMessage (not the agent's),
         SelfChanged (our name and tags: the welcome's, updated);
         CacheLoaded(welcome, peers, listen_port)  the cached netmap at start, before the server answers
         LocalAddresses(ips, port)                 the host's interface addresses, read now
         LocalEndpointsChanged (the node's event)  our reflexive addresses or NAT kind changed
         CandidatesAccepted(candidates)            a ReportCandidates went out on the connection
         Restun()                                  STUN again now (netcheck)
         Tick()                                    at next_deadline(now) (punch requests, a deferred cache write),
                                                   and when the node's paths or MTU changed (what runs after every
                                                   batch reads them); no sooner than TICK_INTERVAL after the last
         SetRouting(choice)                        what we advertise, which exit node we use, our port forward
                                                   (a RoutingChoice); check it first with routing_refused()
         UserPing(ref, peer, timeout)              `meshwg ping`: the peer by name, mesh IP or key, pinged on every
                                                   path (the node's UserPingDone(ref) event answers it)
         NatProbed(mapping, filtering, family)     the RFC 5780 probe's verdicts (IP version `family`): both
                                                   endpoint-independent (a full-cone NAT, or none) make our
                                                   reflexive address a "public" candidate unless the user gave
                                                   a port forward (routing.public_endpoint), which always is
Actions: SetAddresses(addresses)                   the interface's mesh addresses (CIDR)
         ConfigureRelay(server_key, udp, tcp)      the relay servers from the welcome
         RelayServerRestarted()                    the control channel came back: hello the relay now
         RequestPunch(key)                         ask the server to coordinate a punch with key
         RegisterCandidates(candidates)            what the client's next registration carries
         ReportCandidates(candidates)              send them on the live connection; CandidatesAccepted back
         WriteCache(welcome, peers, listen_port)   the netmap cache
         Stop(reason)                              this node's membership ended
         Log(level, message)                       level: "debug" | "info" | "warning"
         ReportRoutes(routes, exit_node)           send our advertisement (T_ROUTES): after every welcome and on
                                                   a change while connected
         Advertise(choice)                         the OS side of advertising: forwarding, masquerade
         UseExitNode(key, name)                    policy routing through that peer's 0.0.0.0/0, ::/0 (key None:
                                                   none in use, the rules removed)
         SetRouteMtus(mtus)                        ((prefix, mtu), ...): the routes of the peers reached through
                                                   the relay carry that MTU, every other route none
                                                   (meshwg.mesh.path_mtu); after a path, peer or MTU change
         SetExitMtus(mtus)                         ((default prefix, mtu), ...): the exit policy table's default
                                                   routes carry that MTU while the exit node in use is relayed,
                                                   none otherwise (empty); after a path, exit node or MTU change
         PingSent(ref, key, name, address, paths)  a UserPing went out on `paths` paths (address: the mesh IP)
         PingRefused(ref, reason)                  a UserPing that could not go (one line naming why)
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import ipaddress
import itertools
import math
from dataclasses import dataclass
from typing import Iterable

from meshwg.disco import netcheck as NC
from meshwg.disco import user_ping as UP
from meshwg.disco.paths import SESSION_ACTIVE_TIMEOUT
from meshwg.control.events import (Connected, DirectoryReset, Disconnected, PeerChanged, PeerInfo, PeerRemoved,
                                   PunchFailed, PunchNotice, Removed, SealedMessage, SelfChanged, Welcome)
from meshwg.control.events import RelayCredential
from meshwg.signaling.protocol import KIND_RELAY
from meshwg.mesh.punch_policy import MAX_CANDIDATES
from meshwg.mesh.netmap import PeerSpec
from meshwg.mesh.node import LocalEndpointsChanged, MeshNode, RelayEndpoint
from meshwg.mesh import path_mtu
from meshwg.mesh.local_candidates import outside_networks
from meshwg.mesh.peer_entry import (endpoint_ips, entry_policy, host_cidr, peer_routes, peer_spec, public_candidate_ips,
                                    resolve_routes)
from meshwg.mesh.routing import RoutingChoice, mesh_overlap, public_endpoint_addr
from meshwg.mesh.punch_policy import (PUNCH_WATCH_INTERVAL, CandidateReport, PathState, PunchPolicy, local_candidates,
                                      public_candidates)
from meshwg.disco.peer_paths import in_networks, parse_network

TICK_INTERVAL = PUNCH_WATCH_INTERVAL
CACHE_MIN_INTERVAL = 2.0    # a burst of directory changes is one cache write
DEFAULT_IFACE_MTU = 1420    # the mesh interface's MTU when the node's core does not say (meshwg.io.dataplane.tun)


# ---- inputs (besides the control events and the node's LocalEndpointsChanged) ---------------------
@dataclass(frozen=True)
class CacheLoaded:
    welcome: Welcome
    peers: tuple            # PeerInfo
    listen_port: int = 0    # the port the cache was written with


@dataclass(frozen=True)
class LocalAddresses:
    ips: tuple              # global unicast addresses of the host's interfaces
    port: int               # the shared UDP socket's port
    prefixes: tuple = ()    # the networks of those interfaces (CIDR texts): never routed into the mesh


@dataclass(frozen=True)
class SetRouting:
    choice: RoutingChoice


@dataclass(frozen=True)
class NatProbed:
    mapping: str            # meshwg.disco.netcheck verdicts
    filtering: str
    family: int = 4         # the IP version the probe ran on


@dataclass(frozen=True)
class CandidatesAccepted:
    candidates: tuple


@dataclass(frozen=True)
class Restun:
    pass


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class UserPing:
    ref: int                # the shell's, unique among its pings in flight
    peer: str               # a name, a mesh IP or a public key (base64)
    timeout: float          # seconds, (0, UP.MAX_TIMEOUT]


# ---- actions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SetAddresses:
    addresses: tuple


@dataclass(frozen=True)
class ConfigureRelay:
    server_key: bytes
    udp: tuple
    tcp: tuple
    relays: tuple = ()       # every relay with its region (issue 14.3; the welcome's RelayInfo), () for one relay
    cred: bytes = b""        # our relay credential


@dataclass(frozen=True)
class SetRelayCredential:
    """A fresh relay credential (the server renews it): the relay shell's next HELLOs carry it."""
    cred: bytes


@dataclass(frozen=True)
class RelayHome:
    """Input: our home relay is now the one at `addr` (host, port) (the relay shell's choice, issue 14.3): it is
    our "relay" candidate, where peers send us relayed traffic."""
    addr: tuple


@dataclass(frozen=True)
class RelayServerRestarted:
    pass


@dataclass(frozen=True)
class RequestPunch:
    key: bytes


@dataclass(frozen=True)
class RegisterCandidates:
    candidates: tuple


@dataclass(frozen=True)
class ReportCandidates:
    candidates: tuple


@dataclass(frozen=True)
class WriteCache:
    welcome: Welcome
    peers: tuple
    listen_port: int


@dataclass(frozen=True)
class Stop:
    reason: str | None   # None: a clean stop (the user left the mesh)


@dataclass(frozen=True)
class Log:
    level: str
    message: str


@dataclass(frozen=True)
class ReportRoutes:
    routes: tuple
    exit_node: bool


@dataclass(frozen=True)
class Advertise:
    choice: RoutingChoice


@dataclass(frozen=True)
class UseExitNode:
    key: bytes | None
    name: str | None


@dataclass(frozen=True)
class SetRouteMtus:
    mtus: tuple             # ((prefix text, mtu), ...) sorted: the whole wanted set, not a change


@dataclass(frozen=True)
class PingSent:
    ref: int
    key: bytes
    name: str
    address: str            # the peer's mesh IPv4 (else IPv6)
    paths: int              # how many paths were pinged (candidates + the relay)


@dataclass(frozen=True)
class PingRefused:
    ref: int
    reason: str


@dataclass(frozen=True)
class SetExitMtus:
    mtus: tuple             # (("0.0.0.0/0", mtu), ("::/0", mtu)) or fewer: the whole wanted set, not a change


def update_directory(peers: dict[bytes, PeerInfo], ev) -> bool:
    """Fold one control event into `peers` (key -> PeerInfo); True when an entry changed. A punch notice
    carries the freshest entry the server has; other events leave the directory alone."""
    if isinstance(ev, DirectoryReset):
        if ev.peers == peers:
            return False
        peers.clear()
        peers.update(ev.peers)
        return True
    if isinstance(ev, (PeerChanged, PunchNotice)):
        peer = _punch_entry(peers, ev.peer) if isinstance(ev, PunchNotice) else ev.peer
        if peers.get(peer.key) == peer:
            return False
        peers[peer.key] = peer
        return True
    if isinstance(ev, PeerRemoved):
        return peers.pop(ev.key, None) is not None
    return False


def _punch_entry(peers: dict[bytes, PeerInfo], p: PeerInfo) -> PeerInfo:
    """A punch notice's entry with the directory's access control (issue 13): the notice is about where the peer
    is, and the server packs it without "accept" (which would read as "no policy: accept all"). A peer the
    directory does not hold while a policy is in force (some entry has an accept list) may open nothing."""
    old = peers.get(p.key)
    if old is not None:
        return dataclasses.replace(p, accept=old.accept, tags=old.tags, accept_refused=old.accept_refused)
    if p.accept is None and any(q.accept is not None for q in peers.values()):
        return dataclasses.replace(p, accept=())
    return p


class AgentCore:
    def __init__(self, node: MeshNode, control_addrs: tuple = ()) -> None:
        self.node = node
        self.control_addrs = tuple(control_addrs)   # the invite's "host:port": never routed into the mesh
        self.peers: dict[bytes, PeerInfo] = {}
        self.specs: dict[bytes, PeerSpec] = {}      # peer_spec() of each entry, kept in step with peers
        self.welcome: Welcome | None = None
        self.connected = False
        self.punch = PunchPolicy()
        self.report = CandidateReport()
        self.port: int | None = None
        self._registered: list | None = None       # the candidates the client registers with
        self._cache_dirty = False
        self._cache_port: int | None = None         # the listen port the cache holds
        self._cache_next = -math.inf                # no cache write before then
        self.routing = RoutingChoice()              # what we advertise, which exit node we use
        self.lan: tuple = ()                        # our non-mesh interfaces' networks (LocalAddresses)
        self._local_ips: tuple = ()                 # the last LocalAddresses' ips, before the mesh filter
        self._accepted: dict[bytes, tuple] = {}     # each peer's routes the entry policy allows
        self._kept: dict[bytes, tuple] = {}         # ... after overlaps between peers (resolve_routes)
        # Public addresses no route may cover (WireGuard's UDP to them would go into the tunnel): each entry's
        # global candidates, counted across entries so one event updates the set in O(its candidates), and ours.
        self._cand_ips: dict[bytes, frozenset] = {}
        self._cand_count: collections.Counter = collections.Counter()
        self._own_public: frozenset = frozenset()   # our reflexive and public addresses
        self.exit_key: bytes | None = None          # the exit node in use (chosen, present, approved)
        self.open_family: int | None = None         # netcheck saw no filtering on this IP version (NatProbed)
        self.route_mtus: dict[str, int] = {}        # the relayed peers' routes and their MTU (SetRouteMtus)
        self._mtu_inputs: tuple = ()                # (node specs, relayed keys, interface MTU) they follow from
        self.exit_mtus: dict[str, int] = {}         # the exit policy table's default routes' MTU (SetExitMtus)
        self._handlers = {
            Connected: self._connected, Disconnected: self._disconnected, DirectoryReset: self._reset,
            PeerChanged: self._peer_changed, PeerRemoved: self._peer_removed, PunchNotice: self._punch_notice,
            PunchFailed: self._punch_failed, Removed: self._removed, SealedMessage: _ignore,
            CacheLoaded: self._cache_loaded, LocalAddresses: self._local_addresses,
            LocalEndpointsChanged: _ignore,  # the candidates are looked at after every batch
            CandidatesAccepted: self._candidates_accepted, Restun: self._restun, Tick: self._tick,
            SetRouting: self._set_routing, NatProbed: self._nat_probed, SelfChanged: self._self_changed,
            UserPing: self._user_ping,
        }
        self._handlers.update({RelayCredential: self._relay_cred, RelayHome: self._relay_home})
        self.relay_home: tuple | None = None        # our home relay's (host, port) (RelayHome), in our candidates

    def apply(self, inputs: Iterable, now: float) -> list:
        """Take a batch of inputs at `now`; the actions for the shell, in order."""
        out: list = []
        for inp in inputs:
            handler = self._handlers.get(type(inp))
            if handler is None:
                raise TypeError(f"not an agent core input: {inp!r}")
            handler(inp, now, out)
        self._own_addresses(now)
        self._candidates(out)
        self._path_mtus(out)
        self._cache(now, out)
        return out

    def online(self, key: bytes) -> bool:
        peer = self.peers.get(key)
        return peer is not None and peer.online

    def _plain(self, key: bytes) -> bool:
        spec = self.specs.get(key)
        return spec is not None and spec.plain

    # ---- the control channel -------------------------------------------------------------------
    def _connected(self, ev: Connected, now: float, out: list) -> None:
        reconnected = self.welcome is not None and not self.connected
        self.connected = True
        self.report.connection_changed()
        self._set_welcome(ev.welcome, now, out, from_server=True)
        # Every welcome: the server keeps no advertisement across our connections (nor its own restarts).
        out.append(ReportRoutes(self.routing.advertise, self.routing.advertise_exit))
        if reconnected:
            out.append(Log("info", "control connection back"))
            # The server (and its relay) may have restarted: without a fresh hello the relay drops
            # what peers send us until the periodic hello, up to HELLO_INTERVAL later.
            out.append(RelayServerRestarted())

    def _disconnected(self, ev: Disconnected, now: float, out: list) -> None:
        self.connected = False
        out.append(Log("warning", f"control connection lost ({ev.reason}); tunnels keep running, reconnecting"))

    def _self_changed(self, ev: SelfChanged, now: float, out: list) -> None:
        """Our name or tags changed on the server: what status shows (and the cache keeps); nothing else moves."""
        w = self.welcome
        if w is None or (w.name, w.tags) == (ev.name, ev.tags):
            return
        self.welcome = dataclasses.replace(w, name=ev.name, tags=ev.tags)
        self._cache_dirty = True
        out.append(Log("info", f"this node is now {ev.name}, tags {','.join(ev.tags) or '(none)'}"))

    def _removed(self, ev: Removed, now: float, out: list) -> None:
        # "left": the user's own `meshwg leave` (protocol.GONE_LEFT), a clean stop, not a failure.
        out.append(Stop(None if ev.reason == "left" else f"this node was removed from the mesh ({ev.reason})"))

    def _set_welcome(self, w: Welcome, now: float, out: list, from_server: bool) -> None:
        if w == self.welcome:
            return
        self.welcome = w
        self.node.set_mesh_prefixes((w.prefix4, w.prefix6))   # no disco probe goes into the mesh
        self._set_local_endpoints(now)                         # nor is any of our candidates there
        addrs = tuple(a for a in (host_cidr(w.ipv4), host_cidr(w.ipv6)) if a)
        out.append(SetAddresses(addrs))
        if tuple(w.stun) != self.node.stun_servers:
            self.node.set_stun_servers(w.stun, now)
        out.append(ConfigureRelay(w.server_key, w.relay_udp, w.relay_tcp, w.relays, w.relay_cred))
        if from_server:
            out.append(Log("info", f"joined as {w.name}: {', '.join(addrs)}"))
            self._cache_dirty = True

    # ---- the directory -------------------------------------------------------------------------
    def _reset(self, ev: DirectoryReset, now: float, out: list) -> None:
        self._cache_dirty |= update_directory(self.peers, ev)
        self._hand_to_node(None, now, out)   # even unchanged: the welcome (the entry policy) may be new

    def _peer_changed(self, ev: PeerChanged, now: float, out: list) -> None:
        p = ev.peer
        old = self.peers.get(p.key)
        if update_directory(self.peers, ev):
            self._cache_dirty = True
            self._hand_to_node(p.key, now, out)
        self.punch.peer_changed(p.key, p.online, p.candidates, None if old is None else (old.online, old.candidates))

    def _peer_removed(self, ev: PeerRemoved, now: float, out: list) -> None:
        if update_directory(self.peers, ev):
            self._cache_dirty = True
            self._hand_to_node(ev.key, now, out)
        self.punch.peer_removed(ev.key)

    def _punch_notice(self, ev: PunchNotice, now: float, out: list) -> None:
        if update_directory(self.peers, ev):   # the freshest candidates first, then the punch uses them
            self._cache_dirty = True
            self._hand_to_node(ev.peer.key, now, out)
        self.node.punch(ev.peer.key, now)
        self.punch.punched(ev.peer.key, now)

    def _punch_failed(self, ev: PunchFailed, now: float, out: list) -> None:
        out.append(Log("debug", f"punch to {ev.key[:4].hex()} failed: {ev.reason}"))

    def _cache_loaded(self, ev: CacheLoaded, now: float, out: list) -> None:
        out.append(Log("info", f"bringing up {len(ev.peers)} cached peers while the server answers"))
        self._set_welcome(ev.welcome, now, out, from_server=False)
        self.peers = {p.key: p for p in ev.peers}
        self._cache_port = ev.listen_port
        self._hand_to_node(None, now, out)

    def _hand_to_node(self, changed: bytes | None, now: float, out: list | None = None) -> None:
        """The directory to the node. `changed`: the one key just set or removed, so only its spec is
        rebuilt (one event must not cost O(peers) spec parsing), and the specs of peers whose routes or
        exit role it changed; None: every spec is rebuilt."""
        # Cached entries too: nothing outside the mesh prefixes, nor a server's address, is routed.
        policy = entry_policy(self.welcome, self.control_addrs, self.lan)
        drops = self.node.counters
        if changed is None:
            dirty = set(self.peers) | set(self.specs)
            self._accepted = {k: r for k, p in self.peers.items() if (r := peer_routes(p, policy, drops))}
            routes_moved = True
        else:
            dirty = {changed}
            before = self._accepted.pop(changed, ())
            if changed in self.peers and (r := peer_routes(self.peers[changed], policy, drops)):
                self._accepted[changed] = r
            routes_moved = before != self._accepted.get(changed, ())
        addrs_moved = self._index_candidates(changed)
        if routes_moved or (addrs_moved and self._accepted):
            dirty |= self._resolve(drops)
        dirty |= self._update_exit(changed, out)
        if changed is None:
            self.specs = {}   # rebuilt in the directory's order
        for k in (self.peers if changed is None else dirty):
            if k in self.peers:
                self.specs[k] = peer_spec(self.peers[k], policy, drops, self._kept.get(k, ()), k == self.exit_key)
            else:
                self.specs.pop(k, None)
        self.node.apply_netmap(self.specs, now)

    def _index_candidates(self, changed: bytes | None) -> bool:
        """Count the entries' public candidate addresses again (changed: only that key's entry); True when the
        set of addresses changed (an address came or went), which is when routes must be checked again."""
        if changed is None:
            self._cand_ips = {k: ips for k, p in self.peers.items() if (ips := public_candidate_ips(p))}
            count = collections.Counter(ip for ips in self._cand_ips.values() for ip in ips)
            moved = count.keys() != self._cand_count.keys()
            self._cand_count = count
            return moved
        old = self._cand_ips.pop(changed, frozenset())
        p = self.peers.get(changed)
        new = public_candidate_ips(p) if p is not None else frozenset()
        if new:
            self._cand_ips[changed] = new
        moved = False
        for ip in old - new:
            self._cand_count[ip] -= 1
            if self._cand_count[ip] <= 0:
                del self._cand_count[ip]
                moved = True
        for ip in new - old:
            moved |= ip not in self._cand_count
            self._cand_count[ip] += 1
        return moved

    def _resolve(self, drops) -> set:
        """Every accepted route checked against the others and the protected addresses; the keys whose kept
        routes changed."""
        order = sorted(self._accepted, key=lambda k: (self.peers[k].node_id, k))
        kept = resolve_routes([(k, self._accepted[k]) for k in order], drops,
                              itertools.chain(self._cand_count, self._own_public))
        dirty = {k for k in set(kept) | set(self._kept) if kept.get(k) != self._kept.get(k)}
        self._kept = kept
        return dirty

    def _own_addresses(self, now: float) -> None:
        """Our reflexive and public addresses (after every batch: STUN and netcheck move them): a change checks
        the routes again."""
        own = endpoint_ips((*self.node.reflexive, *self.public_endpoints()))
        if own == self._own_public:
            return
        self._own_public = own
        if self._accepted:
            self._respec(self._resolve(self.node.counters), now)

    def _respec(self, keys, now: float) -> None:
        """Rebuild the specs of `keys` (present peers) and hand the netmap to the node, if any."""
        if not keys:
            return
        policy = entry_policy(self.welcome, self.control_addrs, self.lan)
        for k in keys:
            if k in self.peers:
                self.specs[k] = peer_spec(self.peers[k], policy, self.node.counters, self._kept.get(k, ()),
                                          k == self.exit_key)
        self.node.apply_netmap(self.specs, now)

    def _update_exit(self, changed: bytes | None, out: list | None) -> set:
        """Follow the exit node in use (the chosen name, present as an approved exit node); the keys whose
        spec that changes. Looks the name up only when it can have moved (not O(peers) per event)."""
        name, old = self.routing.exit_node, self.exit_key
        if name is None:
            new = None
        elif changed is None or changed == old or (changed in self.peers and self.peers[changed].name == name):
            new = next((k for k, p in self.peers.items() if p.name == name and p.exit_node and p.kind == "node"),
                       None)
        else:
            new = old
        if new == old:
            return set()
        self.exit_key = new
        if out is not None:
            out.append(UseExitNode(new, name if new is not None else None))
            out.append(Log("info", f"exit node {name}: in use" if new is not None else
                           f"exit node {name or self._exit_name(old)}: not in use"))
        return {k for k in (old, new) if k is not None}

    def _exit_name(self, key) -> str:
        p = self.peers.get(key)
        return p.name if p else "(gone)"

    # ---- subnet routes and exit nodes ------------------------------------------------------------
    def routing_refused(self, choice: RoutingChoice) -> str | None:
        """A one-line reason a SetRouting must not be applied (naming the value), else None."""
        w = self.welcome
        if w is not None:
            err = mesh_overlap(choice.advertise, (w.prefix4, w.prefix6))
            if err:
                return err
            public = public_endpoint_addr(choice.public_endpoint)
            nets = [n for n in map(parse_network, (w.prefix4, w.prefix6)) if n is not None]
            if public is not None and in_networks(ipaddress.ip_address(public[0]), nets):
                return f"public endpoint {choice.public_endpoint} is a mesh address (give the port forward's address)"
        name = choice.exit_node
        if name is not None and name != self.routing.exit_node:
            if w is not None and name == w.name:
                return f"exit node {name!r} is this node"
            if not any(p.name == name for p in self.peers.values()):
                return f"no peer named {name!r}"
        return None

    def _set_routing(self, ev: SetRouting, now: float, out: list) -> None:
        old, new = self.routing, ev.choice
        if new == old:
            return
        self.routing = new
        if (new.advertise, new.advertise_exit, new.snat) != (old.advertise, old.advertise_exit, old.snat):
            out.append(Advertise(new))
        if (new.advertise, new.advertise_exit) != (old.advertise, old.advertise_exit) and self.connected:
            out.append(ReportRoutes(new.advertise, new.advertise_exit))
        if new.exit_node != old.exit_node:
            self._update_exit_by_name(now, out)

    def _update_exit_by_name(self, now: float, out: list) -> None:
        self._respec(self._update_exit(None, out), now)

    # ---- our own endpoints ---------------------------------------------------------------------
    def _local_addresses(self, ev: LocalAddresses, now: float, out: list) -> None:
        self.port = ev.port
        if tuple(ev.prefixes) != self.lan:
            self.lan = tuple(ev.prefixes)   # our LAN changed: which peers' routes may be routed here too
            if self._accepted or any(p.routes for p in self.peers.values()):
                self._hand_to_node(None, now, out)
        self._local_ips = tuple(ev.ips)
        before = self.node.iface_endpoints
        self._set_local_endpoints(now)
        # Before a welcome names STUN servers there is nothing to ask again.
        if self.node.iface_endpoints != before and self.node.stun_servers:
            out.append(Log("info", "local addresses changed: re-STUN"))
            self.node.restun(now)

    def _set_local_endpoints(self, now: float) -> None:
        # Never an address inside the mesh (another agent's interface on this host): peers would take it for
        # a direct path to us. Again on a welcome: the first read comes before the mesh prefixes are known.
        ips = outside_networks(self._local_ips, self.node.mesh_nets)
        if self.port is not None:
            self.node.set_local_endpoints([(ip, self.port) for ip in ips], now)

    def _restun(self, ev: Restun, now: float, out: list) -> None:
        self.node.restun(now)

    def _candidates_accepted(self, ev: CandidatesAccepted, now: float, out: list) -> None:
        self.report.accepted(list(ev.candidates))

    def _nat_probed(self, ev: NatProbed, now: float, out: list) -> None:
        is_open = ev.mapping == NC.EIM and ev.filtering == NC.EIM
        family = ev.family if is_open else None
        if family != self.open_family:
            self.open_family = family
            out.append(Log("info", f"netcheck: no NAT filtering on IPv{family}: our reflexive address is a public "
                                   "candidate" if is_open else
                                   f"netcheck: mapping {ev.mapping}, filtering {ev.filtering}: no public candidate"))

    def public_endpoints(self) -> list[tuple[str, int]]:
        """Where we tell the server we are reachable with no punch (the "public" candidates)."""
        return public_candidates(public_endpoint_addr(self.routing.public_endpoint), self.open_family,
                                 self.node.reflexive)

    def _relay_cred(self, ev: RelayCredential, now: float, out: list) -> None:
        out.append(SetRelayCredential(ev.cred))

    def _relay_home(self, ev: RelayHome, now: float, out: list) -> None:
        self.relay_home = tuple(ev.addr)

    def _candidates(self, out: list) -> None:
        node = self.node
        cands = local_candidates(node.reflexive, node.iface_endpoints, node.local_nat, self.public_endpoints())
        if self.relay_home is not None and self.welcome is not None and self.welcome.relays:
            # First: a long list is cut at its end (the server's and peers' 16), and peers must not lose this one.
            cands = ([(str(self.relay_home[0]), int(self.relay_home[1]), KIND_RELAY)] + cands)[:MAX_CANDIDATES]
        if cands != self._registered:   # a reconnect registers with the newest
            self._registered = cands
            out.append(RegisterCandidates(tuple(cands)))
        if self.report.due(cands, self.connected):
            self.report.sent(cands)
            out.append(ReportCandidates(tuple(cands)))

    # ---- the relayed peers' route MTU ----------------------------------------------------------
    def _path_mtus(self, out: list) -> None:
        """SetRouteMtus when the relayed peers, their routes or the interface MTU changed. After every batch (a
        Tick when the node's paths change among them): the node switches paths between batches, and this reads its
        paths in O(peers), no more than the tick's punch check does; the routes are rebuilt only on a change."""
        node = self.node
        specs = node.specs   # replaced (never mutated) by apply_netmap: the same object, the same routes
        relayed = path_mtu.relayed_keys(specs, node.endpoint_of, RelayEndpoint)
        inputs = (specs, relayed, getattr(node.core, "mtu", None) or DEFAULT_IFACE_MTU)
        self._exit_mtus(relayed, inputs[2], out)
        old = self._mtu_inputs
        if old and old[0] is inputs[0] and old[1:] == inputs[1:]:
            return
        self._mtu_inputs = inputs
        mtus = path_mtu.route_mtus(*inputs)
        if mtus != self.route_mtus:
            self.route_mtus = mtus
            out.append(SetRouteMtus(tuple(sorted(mtus.items()))))

    def _exit_mtus(self, relayed: frozenset, iface_mtu: int, out: list) -> None:
        """SetExitMtus when the exit node in use, its path or the interface MTU changed: internet traffic through a
        relayed exit node is relayed too. After the batch's UseExitNode, so the shell has the table by then."""
        mtus = path_mtu.exit_mtus(self.exit_key, relayed, iface_mtu)
        if mtus != self.exit_mtus:
            self.exit_mtus = mtus
            out.append(SetExitMtus(tuple(sorted(mtus.items()))))

    # ---- `meshwg ping` -------------------------------------------------------------------------
    def find_peer(self, text: str) -> bytes | None:
        """The key of the peer named `text`, or holding mesh address `text`, or whose public key (base64) it is."""
        for k, p in self.peers.items():
            if p.name == text:
                return k
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            ip = None
        if ip is not None:
            return next((k for k, p in self.peers.items() if ip in (_ip_or_none(p.ipv4), _ip_or_none(p.ipv6))), None)
        try:
            key = base64.b64decode(text, validate=True)
        except ValueError:
            return None
        return key if key in self.peers else None

    def _user_ping(self, ev: UserPing, now: float, out: list) -> None:
        reason = self._ping_refused(ev)
        if reason is not None:
            out.append(PingRefused(ev.ref, reason))
            return
        key = self.find_peer(ev.peer)
        p = self.peers[key]
        n = self.node.user_ping(ev.ref, key, now, ev.timeout)
        out.append(PingSent(ev.ref, key, p.name, p.ipv4 or p.ipv6, n))

    def _ping_refused(self, ev: UserPing) -> str | None:
        if not (0 < ev.timeout <= UP.MAX_TIMEOUT):   # NaN too
            return f"timeout must be above 0 and at most {UP.MAX_TIMEOUT:g} s"
        key = self.find_peer(ev.peer)
        if key is None:
            if self.welcome is not None and ev.peer in (self.welcome.name, self.welcome.ipv4, self.welcome.ipv6):
                return f"{ev.peer} is this node"
            return f"no peer named or addressed {ev.peer!r}"
        name = self.peers[key].name
        if self._plain(key):
            return f"{name} is a plain WireGuard peer: it answers no disco ping"
        if key not in self.node.paths:
            return f"{name} is not a mesh peer of this node yet"
        if self.node.user_pings.full():
            return f"too many pings in flight (at most {self.node.user_pings.max_outstanding}): try again"
        return None

    # ---- timed duties --------------------------------------------------------------------------
    def next_deadline(self, now: float) -> float:
        """When a Tick is next due (math.inf: none until an input; `now` or earlier: at once). The punch policy's
        deadline and a deferred cache write's; the rest runs after every batch anyway (issue 15: an idle node
        sleeps instead of ticking every TICK_INTERVAL)."""
        t = self.punch.next_deadline(now, self.connected, self._path_states(now), self.online)
        if self.welcome is not None and (self._cache_dirty or self.port not in (None, self._cache_port)):
            t = min(t, self._cache_next)
        return t

    def _path_states(self, now: float) -> dict:
        # Plain peers are reached through the relay only: never a punch (the node keeps no paths for them; they
        # are left out here too, whatever it holds).
        return {k: PathState(pp.active(now), pp.direct(now), pp.last_activity + SESSION_ACTIVE_TIMEOUT)
                for k, pp in self.node.paths.items() if not self._plain(k)}

    def _tick(self, ev: Tick, now: float, out: list) -> None:
        for key in self.punch.tick(now, self.connected, self._path_states(now), self.online):
            out.append(RequestPunch(key))

    def _cache(self, now: float, out: list) -> None:
        """Write the cache after a change (the port the socket got is one), at most every CACHE_MIN_INTERVAL."""
        if self.welcome is None or now < self._cache_next:
            return
        if not self._cache_dirty and self.port in (None, self._cache_port):
            return
        port = self.port or 0
        out.append(WriteCache(self.welcome, tuple(self.peers.values()), port))
        self._cache_dirty, self._cache_port, self._cache_next = False, port, now + CACHE_MIN_INTERVAL


def _ignore(ev, now: float, out: list) -> None:
    pass


def _ip_or_none(text: str):
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None
