"""What this node advertises and which peer it sends its internet traffic through (issue 12). Pure.

The user's choice (`meshwg join --advertise-routes ... --advertise-exit-node --exit-node NAME --snat-routes
--public-endpoint IP:PORT`, `meshwg set` at runtime) as one value, its text forms (the flags, the state directory's routing.json) and
the checks that give one-line errors naming the value. What peers' routes this node accepts is
meshwg.mesh.peer_entry's call; the OS side is meshwg.io.oscfg.subnet_routes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from meshwg.disco.peer_paths import valid_candidate
from meshwg.signaling.invite import join_hostport, split_hostport

MAX_ADVERTISED = 64      # the routes contract: a node advertises 64 prefixes at most


@dataclass(frozen=True)
class RoutingChoice:
    advertise: tuple = ()             # canonical CIDR texts this node offers to route for the mesh
    advertise_exit: bool = False      # offer to be an exit node (0.0.0.0/0, ::/0)
    exit_node: str | None = None      # the peer (by name) whose approved exit this node uses
    snat: bool = True                 # masquerade what the mesh sends through us (off: keep source addresses)
    # Where this node is reachable from anywhere with no punch: a port forward the user set up ("IP:PORT" to the
    # node's WireGuard port), reported as a "public" candidate (`plain add --direct` gives it to phones).
    public_endpoint: str | None = None

    @property
    def advertising(self) -> bool:
        """Forwarding (and masquerade) needed: we route for others."""
        return bool(self.advertise) or self.advertise_exit

    def to_json(self) -> dict:
        return {"advertise_routes": list(self.advertise), "advertise_exit_node": self.advertise_exit,
                "exit_node": self.exit_node, "snat_routes": self.snat, "public_endpoint": self.public_endpoint}

    def merged(self, **changes) -> "RoutingChoice":
        """This choice with the given fields replaced (None: keep)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def overridden(self, changes: dict) -> "RoutingChoice":
        """This choice with the flags given: None keeps a field, except the ones "none" clears (exit_node,
        public_endpoint), where a key present with None clears it."""
        return replace(self.merged(**changes), **{k: changes[k] for k in CLEARABLE if k in changes})


CLEARABLE = ("exit_node", "public_endpoint")   # RoutingChoice fields the flags set to None with "none"


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


def parse_public_endpoint(text: str) -> str | None:
    """"IP:PORT" ("[v6]:PORT" too) as canonical text, None for "none"/empty; ValueError naming the value for a host
    name (a candidate is an address: peers and phones are told it as it is), a bad port, or an address no peer
    could reach (loopback, unspecified, multicast)."""
    value = (text or "").strip()
    if value.lower() in ("", "none"):
        return None
    try:
        host, port = split_hostport(value)
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--public-endpoint: want IP:PORT (an address, not a name), not {text!r}") from None
    if not valid_candidate((str(ip), port)):
        raise ValueError(f"--public-endpoint {text!r}: not an address other hosts can reach")
    return join_hostport(str(ip), port)


def public_endpoint_addr(text: str | None) -> tuple[str, int] | None:
    """The (ip, port) of a parsed public endpoint (parse_public_endpoint's text), None for none."""
    if text is None:
        return None
    host, port = split_hostport(text)
    return str(ipaddress.ip_address(host)), port


def choice_from_json_untrusted(d) -> RoutingChoice:
    """The state file's choice; anything malformed counts as the default (nothing advertised, no exit node)."""
    if not isinstance(d, dict):
        return RoutingChoice()
    try:
        adv = tuple(parse_cidr(str(x)) for x in d.get("advertise_routes") or [])[:MAX_ADVERTISED]
        exit_node = d.get("exit_node")
        exit_node = parse_exit_node(exit_node) if isinstance(exit_node, str) else None
        public = d.get("public_endpoint")
        public = parse_public_endpoint(public) if isinstance(public, str) else None
        return RoutingChoice(adv, d.get("advertise_exit_node") is True, exit_node, d.get("snat_routes") is not False,
                             public)
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
