"""A directory entry -> the PeerSpec the MeshNode gets, trusting the entry as little as possible. Pure.

Entries come from the signal server, or from the node's cache of what it once said; a compromised or
corrupted server, or a stale cache, must not be able to:
- route what is not the mesh's into the mesh. A peer address outside the mesh prefixes (the welcome's
  prefix4/prefix6), one of the control, STUN or relay servers' addresses, one of our own, or a loopback,
  multicast, unspecified or link-local one is dropped and counted. (Routing the server's address into
  the mesh cut every node off its server, and so from the entry that would have fixed it.)
- aim our probes anywhere. Candidates pass peer_paths.valid_candidate with the mesh prefixes blocked
  (no loopback, unspecified, multicast, broadcast, nor mesh addresses), the server's STUN and relay
  endpoints are no candidates, kinds come from a short list, and only the server's own observation
  ("observed") becomes a birthday target; a peer's "stun-eim"/"stun-edm" is a hint about its NAT only.
- route what it should not through a peer's subnet routes (issue 12). A route overlapping the mesh
  prefixes, containing a server's address, overlapping one of our own LAN prefixes (the networks on our
  non-mesh interfaces: routing our own LAN into the tunnel cuts this node off it) or special space
  (loopback, link-local, multicast), and a default route, is dropped and counted; of two peers' overlapping
  routes the first in a stable order (node id, key) is kept and the other counted. A route covering a public
  address where a peer's WireGuard is reached (a global candidate of any node's entry) or one of our own
  reflexive or public addresses is dropped and counted too: our WireGuard UDP to it would go into the tunnel
  (our sockets are marked out of it only while an exit node is in use). 0.0.0.0/0 and ::/0 go
  only to the exit node this node chose, and only while it is an approved exit node; the OS routes them by
  policy routing, which keeps the server's and the LAN's traffic out of the tunnel.
Server host names (an advertised DNS name) are not resolved here: only IP literals are excluded.
"""

from __future__ import annotations

import bisect
import collections
import functools
import ipaddress
from dataclasses import dataclass

from meshwg.signaling.invite import split_hostport
from meshwg.signaling.protocol import KIND_OBSERVED, KIND_RELAY, REPORTED_KINDS
from meshwg.disco.netcheck import EDM, EIM
from meshwg.disco.peer_paths import in_networks, parse_network, valid_candidate
from meshwg.mesh.netmap import PeerSpec


@dataclass(frozen=True)
class EntryPolicy:
    mesh_nets: tuple = ()                       # ip networks a peer's addresses must lie in
    server_ips: frozenset = frozenset()         # control, STUN and relay hosts: never routed into the mesh
    server_endpoints: frozenset = frozenset()   # STUN and relay (ip, port): never a candidate
    own_ips: frozenset = frozenset()            # our own mesh addresses
    lan_nets: tuple = ()                        # networks on our non-mesh interfaces: never routed into the mesh

    def address_refused(self, ip) -> str | None:
        """Why a peer's mesh address must not be routed to it (a drop counter name), else None."""
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local or ip.is_reserved:
            return "drop_peer_addr_special"
        if ip in self.server_ips:
            return "drop_peer_addr_server"
        if ip in self.own_ips:
            return "drop_peer_addr_own"
        if not in_networks(ip, self.mesh_nets):
            return "drop_peer_addr_outside_mesh"
        return None

    def route_refused(self, net) -> str | None:
        """Why a peer's subnet route must not be routed to it (a drop counter name), else None."""
        if net.prefixlen == 0:
            return "drop_peer_route_default"
        if any(_overlap(net, n) for n in _SPECIAL_NETS):
            return "drop_peer_route_special"
        if any(_overlap(net, n) for n in self.mesh_nets):
            return "drop_peer_route_mesh"
        if any(ip in net for ip in self.server_ips):
            return "drop_peer_route_server"
        if any(_overlap(net, n) for n in self.lan_nets):
            return "drop_peer_route_lan"
        return None

    def candidate_refused(self, addr: tuple, kind) -> str | None:
        """Why a peer's candidate must not be probed (a drop counter name), else None."""
        if not isinstance(kind, str) or (kind != KIND_OBSERVED and kind not in REPORTED_KINDS):
            return "drop_peer_candidate_kind"
        if not valid_candidate(addr, self.mesh_nets):
            return "drop_peer_candidate_addr"
        if (_ip(addr[0]), addr[1]) in self.server_endpoints:
            return "drop_peer_candidate_server"
        return None


_SPECIAL_NETS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128",
    "::ffff:0:0/96", "fe80::/10", "ff00::/8"))
DEFAULT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _overlap(a, b) -> bool:
    return a.version == b.version and a.overlaps(b)


def _ip(host):
    """An IP address object for an IP literal ("[v6]" and "%scope" forms too), else None (a name)."""
    if not isinstance(host, str):
        return None
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def host_cidr(addr) -> str | None:
    """A mesh address ("100.64.0.3" or "100.64.0.3/10") as a host route ("100.64.0.3/32"); None if empty
    or not an address."""
    ip = _ip(addr.split("/")[0]) if isinstance(addr, str) and addr else None
    return None if ip is None else f"{ip}/{ip.max_prefixlen}"


@functools.lru_cache(maxsize=8)
def entry_policy(welcome, control_addrs: tuple = (), lan: tuple = ()) -> EntryPolicy:
    """The policy for a welcome (prefixes, our addresses, STUN and relay servers, regional relays), the invite's control
    addresses ("host:port") and our LAN prefixes (CIDR texts of our non-mesh interfaces' networks).
    No welcome yet: nothing is routed (there is no mesh prefix to trust)."""
    if welcome is None:
        return EntryPolicy()
    lan_nets = tuple(n for n in map(parse_network, lan) if n is not None)
    nets = tuple(n for n in map(parse_network, (welcome.prefix4, welcome.prefix6)) if n is not None)
    endpoints = set()
    # Every regional relay too (issue 14.3): our relay traffic to any of them must not be routed into the mesh.
    regional = [a for r in welcome.relays for a in (*r.udp, *r.tcp)]
    for host, port in (*welcome.stun, *welcome.relay_udp, *welcome.relay_tcp, *regional):
        if _ip(host) is not None:
            endpoints.add((_ip(host), port))
    server_ips = {ip for ip, _ in endpoints}
    for a in control_addrs:
        try:
            ip = _ip(split_hostport(a)[0])
        except (ValueError, TypeError):
            continue
        if ip is not None:
            server_ips.add(ip)
    own = {_ip(a.split("/")[0]) for a in (welcome.ipv4, welcome.ipv6) if isinstance(a, str) and a}
    return EntryPolicy(nets, frozenset(server_ips), frozenset(endpoints), frozenset(own - {None}), lan_nets)


def peer_spec(p, policy: EntryPolicy, drops: collections.Counter | None = None, routes=None,
              exit_node: bool = False) -> PeerSpec:
    """Directory entry (PeerInfo: key, name, ipv4, ipv6, candidates, kind, routes, exit_node) -> PeerSpec for
    the MeshNode. What the policy refuses is left out and counted in `drops` (counter name -> count). A plain
    peer's addresses follow the same rules; it has no candidates (any the entry names are ignored and counted).
    routes: the peer's subnet routes after every check (resolve_routes); None: peer_routes(p) alone (no other
    peer to overlap). exit_node: this node chose this peer as its exit node; 0.0.0.0/0 and ::/0 are added only
    if the entry says it is an approved exit node too."""
    if drops is None:
        drops = collections.Counter()
    addrs = _addresses(p, policy, drops)
    accept = getattr(p, "accept", None)   # what the peer may send us (issue 13); None: no policy
    if getattr(p, "accept_refused", 0):
        drops["drop_peer_accept_rule"] += p.accept_refused
    if p.kind == "plain":
        if p.candidates:
            drops["drop_peer_candidate_plain"] += len(p.candidates)
        if routes is None:
            peer_routes(p, policy, drops)   # counted: a plain peer routes nothing
        return PeerSpec.make(p.key, p.name, addrs, plain=True, accept=accept)
    addrs += peer_routes(p, policy, drops) if routes is None else list(routes)
    if exit_node and p.exit_node:
        addrs += DEFAULT_ROUTES
    cands, observed, nat = _candidates(p, policy, drops)
    # One observation: the server sets one, and a birthday attempt aims at one address.
    return PeerSpec.make(p.key, p.name, addrs, cands, observed[:1], nat, accept=accept)


def peer_routes(p, policy: EntryPolicy, drops: collections.Counter) -> tuple:
    """A node's approved subnet routes that the policy allows (ip networks, entry order). A plain peer routes
    nothing: its routes are ignored and counted."""
    routes = getattr(p, "routes", ()) or ()
    if p.kind == "plain":
        if routes:
            drops["drop_peer_route_plain"] += len(routes)
        return ()
    if not policy.mesh_nets:
        return ()   # no welcome yet: nothing is routed (as for addresses)
    out = []
    for text in routes:
        net = parse_network(text) if isinstance(text, str) else None
        if net is None or str(net) != text:
            drops["drop_peer_route_invalid"] += 1
            continue
        reason = policy.route_refused(net)
        if reason:
            drops[reason] += 1
        elif net not in out:
            out.append(net)
    return tuple(out)


def public_candidate_ips(p) -> frozenset:
    """The global addresses among a node's entry's candidates, whatever their kind: where its WireGuard is
    reached, so no subnet route may cover them. Private ones (a peer's LAN address inside the LAN it
    advertises) are left out. A plain peer's candidates are never probed: none."""
    if getattr(p, "kind", None) == "plain":
        return frozenset()
    out = set()
    for c in getattr(p, "candidates", None) or ():
        ip = _ip(c[0]) if isinstance(c, (tuple, list)) and c else None
        if ip is not None and ip.is_global:
            out.add(ip)
    return frozenset(out)


def endpoint_ips(endpoints) -> frozenset:
    """The addresses of (host, port) endpoints that are IP literals."""
    return frozenset(ip for ip in (_ip(e[0]) for e in endpoints) if ip is not None)


class _Covered:
    """Whether a network holds one of some addresses: sorted integers per IP version, one bisect per network."""

    def __init__(self, ips) -> None:
        self._ints = {4: [], 6: []}
        for ip in ips:
            self._ints[ip.version].append(int(ip))
        for v in self._ints.values():
            v.sort()

    def __call__(self, net) -> bool:
        ints = self._ints[net.version]
        i = bisect.bisect_left(ints, int(net.network_address))
        return i < len(ints) and ints[i] <= int(net.broadcast_address)


def resolve_routes(candidates, drops: collections.Counter, protected=()) -> dict:
    """Overlapping routes of different peers: the first in the given order keeps its route, a later one
    overlapping any kept route is dropped and counted. candidates: [(key, routes)] in a stable order (the
    agent sorts by node id, then key); returns key -> the routes kept (peers with none left out).
    protected: addresses no route may cover (peers' public candidates, our reflexive ones): such a route is
    dropped and counted first, so it takes nothing from a later peer's route."""
    covered = _Covered(protected)
    kept: dict = {}
    taken: list = []
    for key, routes in candidates:
        mine = []
        for net in routes:
            if covered(net):
                drops["drop_peer_route_candidate"] += 1
                continue
            if any(_overlap(net, t) for t in taken):
                drops["drop_peer_route_overlap"] += 1
                continue
            mine.append(net)
        taken += mine
        if mine:
            kept[key] = tuple(mine)
    return kept


def _addresses(p, policy: EntryPolicy, drops: collections.Counter) -> list:
    """The entry's mesh addresses as host routes, those the policy allows."""
    addrs = []
    for a in (p.ipv4, p.ipv6):
        cidr = host_cidr(a)
        if cidr is None:
            if a:
                drops["drop_peer_addr_invalid"] += 1
            continue
        reason = policy.address_refused(_ip(cidr.split("/")[0]))
        if reason:
            drops[reason] += 1
        else:
            addrs.append(cidr)
    return addrs


def _candidates(p, policy: EntryPolicy, drops: collections.Counter) -> tuple:
    """(candidates, observed, nat hint) of a node's entry, those the policy allows."""
    cands, observed, nat = [], [], None
    for c in p.candidates:
        if not isinstance(c, (tuple, list)) or len(c) not in (2, 3):
            drops["drop_peer_candidate_addr"] += 1
            continue
        ip, port, kind = (tuple(c) + ("local",))[:3]
        if kind == KIND_RELAY:
            continue  # the peer's home relay (issue 14.3): where the relay shell sends, never a path to probe
        reason = policy.candidate_refused((ip, port), kind)
        if reason:
            drops[reason] += 1
            continue
        # Only the server's own observation is the peer's public mapping for birthday punching; a
        # STUN-reflexive address is the peer's word, probed like any other candidate.
        (observed if kind == KIND_OBSERVED else cands).append((ip, port))
        if kind == "stun-edm":
            nat = EDM
        elif kind == "stun-eim" and nat is None:
            nat = EIM
    return cands, observed, nat
