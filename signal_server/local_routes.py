"""`serve` warns when the mesh prefix overlaps a route of the host (issue 15): the default 100.64.0.0/10 is also
Tailscale's, Headscale's and NetBird's, and a node on such a host would route mesh traffic into the other VPN.
Pure: the routes come in as text (`ip -j route show table all` or /proc/net/route); server.py reads them."""

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


def overlaps(routes, prefix) -> list[tuple[str, str]]:
    """The (route, interface) pairs among `routes` whose destination overlaps `prefix` (an ip_network), once each,
    default routes left out."""
    seen, out = set(), []
    for dst, dev in routes:
        if dst in _DEFAULTS:
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == prefix.version and net.overlaps(prefix) and (str(net), dev) not in seen:
            seen.add((str(net), dev))
            out.append((str(net), dev))
    return out


def warnings(routes, prefix) -> list[str]:
    return [f"the mesh prefix {prefix} overlaps the local route {dst} on {dev} (another VPN such as Tailscale, "
            f"Headscale or NetBird uses 100.64.0.0/10 too): nodes on this host may send mesh traffic there; choose "
            f"another with --prefix4/--prefix6 before nodes join" for dst, dev in overlaps(routes, prefix)]
