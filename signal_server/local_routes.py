"""`serve` warns when the mesh prefix overlaps a route of the host (issue 15): the default 100.64.0.0/10 is also
Tailscale's, Headscale's and NetBird's, and a node on such a host would route mesh traffic into the other VPN.
Pure: the routes come in as text (`ip -j route show table all` or /proc/net/route); server.py reads them.

A meshwg node of this mesh running on the server's own host routes the mesh prefix into its interface: that route
is ours, not a clash. Its interface is recognised by the address on it: one this server assigned to a node
(`own_interfaces`); another VPN's interface, or another mesh's, does not carry our nodes' addresses (exact match,
not "inside the prefix", which NetBird's wt0 inside 100.64.0.0/10 would pass too)."""

from __future__ import annotations

import ipaddress
import json

_DEFAULTS = ("default", "0.0.0.0/0", "::/0")  # a default route overlaps everything and conflicts with nothing


def parse_ip_json(text: str) -> list[tuple[str, str]]:
    """(destination, interface) of each route in `ip -j route` output; anything unreadable is skipped."""
    try:
        routes = json.loads(text or "[]")
    except ValueError:
        return []
    out = []
    for r in routes if isinstance(routes, list) else []:
        if isinstance(r, dict) and isinstance(r.get("dst"), str):
            out.append((r["dst"], str(r.get("dev", "?"))))
    return out


def parse_proc_route(text: str) -> list[tuple[str, str]]:
    """(destination, interface) of each IPv4 route in /proc/net/route (little-endian hex fields)."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        try:
            dst = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
            mask = bin(int(f[7], 16)).count("1")
        except (IndexError, ValueError):
            continue
        out.append((f"{dst}/{mask}", f[0]))
    return out


def parse_ip_addresses(text: str) -> list[tuple[str, str]]:
    """(address, interface) of each address in `ip -j address show` output; anything unreadable is skipped."""
    try:
        links = json.loads(text or "[]")
    except ValueError:
        return []
    out = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict) or not isinstance(link.get("addr_info"), list):
            continue
        for a in link["addr_info"]:
            if isinstance(a, dict) and isinstance(a.get("local"), str):
                out.append((a["local"], str(link.get("ifname", "?"))))
    return out


def own_interfaces(addresses, node_addresses) -> frozenset:
    """The interfaces among `addresses` ((address, interface) pairs) that carry one of `node_addresses` (the mesh
    addresses this server assigned): a node of ours runs there."""
    mine = set()
    for ip in node_addresses:
        try:
            mine.add(ipaddress.ip_address(ip))
        except ValueError:
            continue
    out = set()
    for ip, dev in addresses:
        try:
            if ipaddress.ip_address(ip) in mine:
                out.add(dev)
        except ValueError:
            continue
    return frozenset(out)


def overlaps(routes, prefix, ours=frozenset()) -> list[tuple[str, str]]:
    """The (route, interface) pairs among `routes` whose destination overlaps `prefix` (an ip_network), once each,
    default routes and routes on `ours` (own_interfaces) left out."""
    seen, out = set(), []
    for dst, dev in routes:
        if dst in _DEFAULTS or dev in ours:
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == prefix.version and net.overlaps(prefix) and (str(net), dev) not in seen:
            seen.add((str(net), dev))
            out.append((str(net), dev))
    return out


def warnings(routes, prefix, ours=frozenset()) -> list[str]:
    return [f"the mesh prefix {prefix} overlaps the local route {dst} on {dev} (another VPN such as Tailscale, "
            f"Headscale or NetBird uses 100.64.0.0/10 too): nodes on this host may send mesh traffic there; choose "
            f"another with --prefix4/--prefix6 before nodes join" for dst, dev in overlaps(routes, prefix, ours)]
