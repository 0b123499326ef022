"""Which of the routes a device wants are missing from the kernel, and which are someone else's.

Pure: the shell dumps the kernel's routes (meshwg.io.oscfg.rtnl) and adds what `plan` says. A prefix
routed through another interface is reported, never taken over: another agent, NetworkManager or
the admin put it there, and fighting over it would flap both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAIN_TABLE = 254  # RT_TABLE_MAIN: where the device's routes live (`ip route add ... dev IFACE`)


@dataclass(frozen=True)
class KernelRoute:
    prefix: str                   # normalised network, "10.0.0.0/24"; a default route is "0.0.0.0/0"
    devs: frozenset = frozenset()  # outgoing interfaces (ifindex); empty for blackhole/unreachable
    table: int = MAIN_TABLE
    mtu: int = 0                  # the route's `mtu` metric (0: none, the interface's)


@dataclass(frozen=True)
class RoutePlan:
    add: tuple = ()               # wanted prefixes nobody routes: add them through our device
    conflicts: tuple = ()         # (prefix, KernelRoute) routed elsewhere: leave alone, warn
    retune: tuple = ()            # (prefix, mtu) of our routes whose MTU is not the wanted one (0: none)


def normalise(prefix) -> str:
    return str(ipaddress.ip_network(str(prefix), strict=False))


def plan(wanted: Iterable, found: Iterable[KernelRoute], dev: int, table: int = MAIN_TABLE,
         mtus: Mapping[str, int] | None = None) -> RoutePlan:
    """wanted: prefixes (strings or networks) to route through `dev`; found: the kernel's routes.
    Only exact-prefix routes in `table` matter: a broader or narrower one never hides ours.
    mtus: the MTU each wanted prefix's route carries (normalised prefix -> mtu; absent: none, the interface's,
    meshwg.mesh.path_mtu); None: MTUs are not looked at."""
    by_prefix: dict[str, list[KernelRoute]] = {}
    for route in found:
        if route.table == table:
            by_prefix.setdefault(route.prefix, []).append(route)
    add, conflicts, retune = [], [], []
    for prefix in sorted({normalise(p) for p in wanted}):
        routes = by_prefix.get(prefix, [])
        ours = [r for r in routes if dev in r.devs]
        if ours:
            if mtus is not None and ours[0].mtu != mtus.get(prefix, 0):
                retune.append((prefix, mtus.get(prefix, 0)))
            continue
        if routes:
            conflicts.append((prefix, routes[0]))
        else:
            add.append(prefix)
    return RoutePlan(tuple(add), tuple(conflicts), tuple(retune))
