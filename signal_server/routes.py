"""Subnet routes and exit nodes (issue 12): which advertised routes may be approved, and what a node's new
advertisement means for its stored routes. Pure: the store reads the rows, asks here, then writes.

A node advertises prefixes (protocol.T_ROUTES, canonical CIDR text) and whether it offers itself as an exit
node (stored as the prefix EXIT). Each (node, prefix) has a decision: None (pending: the administrator has
not decided), True (approved) or False (rejected). A decision outlives the advertisement, so a route the node
advertises again later is approved again only if it was approved before; an undecided route the node stops
advertising is forgotten. Peers see a route only while it is both advertised and approved.

Never approved, whoever asks: a default route (that is an exit node's job), a prefix covering or inside the
mesh's own prefixes, one containing an address the server is reached at (nodes would send their control, STUN
and relay traffic into the tunnel), loopback, link-local, multicast and other special ranges; nor a prefix
overlapping another node's approved route (packets for it would have two next hops).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

EXIT = "exit"  # the stored "prefix" of an exit node's advertisement

# Ranges no route may touch: packets to them never belong in a tunnel.
SPECIAL = tuple((ipaddress.ip_network(n), what) for n, what in (
    ("0.0.0.0/8", "'this network'"), ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"), ("255.255.255.255/32", "broadcast"), ("::/128", "unspecified"),
    ("::1/128", "loopback"), ("::ffff:0:0/96", "IPv4-mapped"), ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
))


def parse_route(text: str) -> str:
    """A route as an administrator typed it: canonical CIDR text, or EXIT. ValueError (one line) otherwise."""
    if text.strip().lower() == EXIT:
        return EXIT
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError:
        pass
    try:
        near = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR {text!r} (examples: 192.168.1.0/24, fd12::/64, or 'exit')") from None
    raise ValueError(f"bad CIDR {text!r}: host bits are set (did you mean {near}?)")


@dataclass(frozen=True)
class Policy:
    """What no route may cover: the mesh prefixes and the server's own addresses (networks / addresses or text)."""

    mesh_nets: tuple = ()
    server_ips: tuple = ()

    @classmethod
    def make(cls, mesh_nets: Iterable = (), server_ips: Iterable = ()) -> Policy:
        nets = tuple(ipaddress.ip_network(str(n), strict=False) for n in mesh_nets if n)
        ips = []
        for ip in server_ips:
            try:
                addr = ipaddress.ip_address(str(ip).split("%")[0])
            except ValueError:
                continue  # a host name: not an address a prefix can contain
            if addr.is_unspecified:
                continue  # a wildcard bind, not an address
            ips.append(addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr)
        return cls(nets, tuple(sorted(set(ips), key=lambda a: (a.version, a))))

    def forbidden(self, prefix: str) -> str | None:
        """Why `prefix` (canonical CIDR text, or EXIT) may never be approved; None when it may be."""
        if prefix == EXIT:
            return None
        try:
            net = ipaddress.ip_network(prefix, strict=True)
        except ValueError:
            return "not a CIDR prefix"
        if net.prefixlen == 0:
            return "a default route (advertise an exit node instead)"
        for mesh in self.mesh_nets:
            if net.version == mesh.version and net.overlaps(mesh):
                how = "covers" if mesh.subnet_of(net) else "is inside" if net.subnet_of(mesh) else "overlaps"
                return f"{how} the mesh prefix {mesh}"
        for ip in self.server_ips:
            if ip in net:
                return f"contains the server's address {ip}"
        for special, what in SPECIAL:
            if net.version == special.version and net.overlaps(special):
                return f"overlaps {special} ({what})"
        return None


def overlap(prefix: str, others: Iterable[tuple[str, str]]) -> str | None:
    """Why `prefix` cannot be approved next to the other nodes' approved (name, prefix) routes; None if it can.
    Exit nodes never overlap: any number of nodes may be one."""
    if prefix == EXIT:
        return None
    net = ipaddress.ip_network(prefix)
    for name, other in others:
        if other == EXIT:
            continue
        o = ipaddress.ip_network(other)
        if o.version == net.version and o.overlaps(net):
            return f"overlaps {name}'s approved route {other}"
    return None


def auto_covers(prefix: str, auto: Iterable[str]) -> bool:
    """Whether an invite's auto-approve list approves `prefix`: EXIT by EXIT, a prefix by one it lies in."""
    if prefix == EXIT:
        return EXIT in auto
    net = ipaddress.ip_network(prefix)
    for a in auto:
        if a == EXIT:
            continue
        an = ipaddress.ip_network(a)
        if an.version == net.version and net.subnet_of(an):
            return True
    return False


@dataclass(frozen=True)
class Plan:
    """A node's routes after an advertisement: rows {prefix: (advertised, decision)} to keep (the others go),
    and for the log: refused (prefix, reason) pairs, the pending prefixes and the ones auto-approved now."""

    rows: dict
    refused: tuple = ()
    pending: tuple = ()
    auto_approved: tuple = ()


def plan_advertisement(prefixes: Iterable[str], exit_node: bool, current: Mapping[str, bool | None],
                       auto: Iterable[str] | None, others: list[tuple[str, str]],
                       forbidden: Callable[[str], str | None]) -> Plan:
    """The node's routes once it advertises `prefixes` (+ EXIT when exit_node). current: its stored decisions
    {prefix: None | True | False}; auto: its invite's auto-approve list (None: none); others: the other
    nodes' approved (name, prefix) routes; forbidden: Policy.forbidden."""
    wanted = dict.fromkeys([*prefixes, *([EXIT] if exit_node else [])])
    auto = tuple(auto or ())
    rows, refused, pending, approved_now = {}, [], [], []
    for p in wanted:
        decision = current.get(p)
        reason = forbidden(p)
        if decision is None and reason is None and auto_covers(p, auto):
            reason = overlap(p, others)
            if reason is None:
                decision = True
                approved_now.append(p)
        if reason is not None and decision is not False:
            refused.append((p, reason))  # also an approved one that is forbidden now: peers will not get it
        elif decision is None:
            pending.append(p)
        rows[p] = (True, decision)
    for p, decision in current.items():
        if p not in wanted and decision is not None:
            rows[p] = (False, decision)  # the decision waits for the route to come back
    return Plan(rows, tuple(refused), tuple(pending), tuple(approved_now))


def visible(routes: Iterable[str], forbidden: Callable[[str], str | None]) -> tuple[tuple[str, ...], bool]:
    """(subnet routes, is an exit node) peers may see of a node's advertised and approved routes."""
    ok = [p for p in routes if forbidden(p) is None]
    return tuple(sorted((p for p in ok if p != EXIT), key=_order)), EXIT in ok


def _order(prefix: str):
    net = ipaddress.ip_network(prefix)
    return net.version, net.network_address, net.prefixlen


def state_text(advertised: bool, decision: bool | None) -> str:
    """A route's state for `routes list`."""
    word = "pending" if decision is None else "approved" if decision else "rejected"
    return word if advertised else f"{word} (not advertised)"
