"""What this node advertises and which peer it sends its internet traffic through (issue 12). Pure.

The user's choice (`meshwg join --advertise-routes ... --advertise-exit-node --exit-node NAME --snat-routes`,
`meshwg set` at runtime) as one value, its text forms (the flags, the state directory's routing.json) and
the checks that give one-line errors naming the value. What peers' routes this node accepts is
meshwg.mesh.peer_entry's call; the OS side is meshwg.io.oscfg.subnet_routes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

MAX_ADVERTISED = 64      # the routes contract: a node advertises 64 prefixes at most


@dataclass(frozen=True)
class RoutingChoice:
    advertise: tuple = ()             # canonical CIDR texts this node offers to route for the mesh
    advertise_exit: bool = False      # offer to be an exit node (0.0.0.0/0, ::/0)
    exit_node: str | None = None      # the peer (by name) whose approved exit this node uses
    snat: bool = True                 # masquerade what the mesh sends through us (off: keep source addresses)

    @property
    def advertising(self) -> bool:
        """Forwarding (and masquerade) needed: we route for others."""
        return bool(self.advertise) or self.advertise_exit

    def to_json(self) -> dict:
        return {"advertise_routes": list(self.advertise), "advertise_exit_node": self.advertise_exit,
                "exit_node": self.exit_node, "snat_routes": self.snat}

    def merged(self, **changes) -> "RoutingChoice":
        """This choice with the given fields replaced (None: keep)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_advertised(text: str) -> tuple:
    """"CIDR[,CIDR...]" (empty or "none": nothing) -> canonical texts; ValueError naming the bad value."""
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        return ()
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        out.append(parse_cidr(item))
    if len(out) > MAX_ADVERTISED:
        raise ValueError(f"too many routes ({len(out)}; at most {MAX_ADVERTISED})")
    return tuple(dict.fromkeys(out))


def parse_cidr(item: str) -> str:
    """One prefix as canonical text; ValueError naming it (not a prefix, no length, host bits, a default route)."""
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(f"bad CIDR {item!r}") from None
    if "/" not in item:
        raise ValueError(f"bad CIDR {item!r} (give the prefix length)")
    if net.network_address != ipaddress.ip_address(item.split("/")[0]):
        raise ValueError(f"bad CIDR {item!r} (host bits set: did you mean {net}?)")
    if net.prefixlen == 0:
        raise ValueError(f"bad CIDR {item!r} (a default route: use --advertise-exit-node)")
    return str(net)


def parse_on_off(text: str, what: str) -> bool:
    value = (text or "").strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"{what}: want on or off, not {text!r}")


def parse_exit_node(text: str) -> str | None:
    """A peer name, or None for "none"/empty (no exit node)."""
    name = (text or "").strip()
    if name.lower() in ("", "none"):
        return None
    if len(name) > 63 or any(c.isspace() for c in name):
        raise ValueError(f"bad node name {text!r}")
    return name


def choice_from_json_untrusted(d) -> RoutingChoice:
    """The state file's choice; anything malformed counts as the default (nothing advertised, no exit node)."""
    if not isinstance(d, dict):
        return RoutingChoice()
    try:
        adv = tuple(parse_cidr(str(x)) for x in d.get("advertise_routes") or [])[:MAX_ADVERTISED]
        exit_node = d.get("exit_node")
        exit_node = parse_exit_node(exit_node) if isinstance(exit_node, str) else None
        return RoutingChoice(adv, d.get("advertise_exit_node") is True, exit_node, d.get("snat_routes") is not False)
    except (ValueError, TypeError):
        return RoutingChoice()


def mesh_overlap(routes, prefixes) -> str | None:
    """The first advertised route overlapping a mesh prefix, as an error line; else None."""
    nets = []
    for p in prefixes:
        try:
            nets.append(ipaddress.ip_network(p, strict=False))
        except (ValueError, TypeError):
            continue
    for r in routes:
        net = ipaddress.ip_network(r)
        for m in nets:
            if net.version == m.version and net.overlaps(m):
                return f"route {r} overlaps the mesh prefix {m}"
    return None


def network_text(cidr: str) -> str | None:
    """"192.168.1.5/24" -> "192.168.1.0/24"; None if not an address with a prefix length."""
    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError:
        return None
