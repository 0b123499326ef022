"""Scenario definitions: who sits behind which NAT, and which path each pair should end up on.

A scenario is plain data. Routers are listed outermost first (a router may sit behind an earlier one:
double NAT). The signal server runs on a public host named "signal". A device is one of three kinds:
  meshwg  runs `meshwg join` (it may advertise its router's LAN; the runner approves the route);
  plain   what a phone with the official WireGuard app runs: stock `wg-quick` + `wireguard-go`, configured with
          nothing but the config read back from the QR code `meshwg-signal plain add` wrote;
  lan     a device on a router's LAN that runs no VPN (a NAS), reached through an approved subnet route.
Every two meshwg nodes are a pair; a plain device pairs with each node it may reach and with the LAN devices
behind those that advertise their LAN. Expected paths ("direct", "relay", or "either" where both are fine)
come from `expected_path` (what punched through in this lab) unless a scenario overrides a pair; a plain
device's traffic always goes through the server's relay.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from scenarios.nat import NatType

N = NatType


@dataclass(frozen=True)
class RouterSpec:
    name: str
    nat: NatType
    behind: str | None = None      # another router's name (double NAT); None = on the internet
    cgn: bool = False              # carrier-grade: its inside network is 100.64.x.0/24
    hairpin: bool = False


MESHWG, PLAIN, LAN = "meshwg", "plain", "lan"
KINDS = (MESHWG, PLAIN, LAN)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    behind: str | None             # router name; None = a public address on the internet
    role: str = ""                 # for the printout ("home server", "phone", ...)
    kind: str = MESHWG             # MESHWG, PLAIN or LAN (module docstring)
    to: tuple[str, ...] = ()       # PLAIN: the meshwg nodes it may reach (`plain add --to`)
    advertise_lan: bool = False    # MESHWG: `--advertise-routes` its router's LAN /24


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    routers: tuple[RouterSpec, ...]
    nodes: tuple[NodeSpec, ...]
    expect: dict[frozenset[str], str] = field(default_factory=dict)   # pair -> "direct" | "relay" | "either"
    matrix: bool = False           # print a NAT-type matrix instead of (as well as) the pair table

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"scenario {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the definition, one line each (empty when it is fine)."""
        routers = {r.name for r in self.routers}
        meshwg = {n.name for n in self.mesh_nodes()}
        names = [n.name for n in self.nodes]
        out = [f"two devices named {x!r}" for x in sorted({x for x in names if names.count(x) > 1})]
        for n in self.nodes:
            if n.kind not in KINDS:
                out.append(f"{n.name}: unknown kind {n.kind!r} (one of {', '.join(KINDS)})")
            if n.behind is not None and n.behind not in routers:
                out.append(f"{n.name}: behind unknown router {n.behind!r}")
            if n.kind == PLAIN and not n.to:
                out.append(f"{n.name}: a plain device needs the nodes it may reach (to=...)")
            out += [f"{n.name}: may reach only meshwg nodes, not {t!r}" for t in n.to if t not in meshwg]
            if n.to and n.kind != PLAIN:
                out.append(f"{n.name}: only a plain device has nodes to reach (to=...)")
            if n.advertise_lan and (n.kind != MESHWG or n.behind is None):
                out.append(f"{n.name}: only a meshwg node behind a router advertises its LAN")
            if n.kind == LAN and n.behind is None:
                out.append(f"{n.name}: a LAN device sits behind a router")
        return out

    def mesh_nodes(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.kind == MESHWG]

    def plain_nodes(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.kind == PLAIN]

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def lan_gateway(self, lan: NodeSpec) -> NodeSpec | None:
        """The meshwg node that advertises the LAN `lan` sits on (None: no route reaches it)."""
        return next((n for n in self.mesh_nodes() if n.advertise_lan and n.behind == lan.behind), None)

    def reachable(self, plain: NodeSpec) -> list[NodeSpec]:
        """What a plain device reaches: its nodes, then the LAN devices behind those that advertise their LAN."""
        lans = [n for n in self.nodes if n.kind == LAN
                and (gw := self.lan_gateway(n)) is not None and gw.name in plain.to]
        return [self.node(t) for t in plain.to] + lans

    def carrier(self, plain: NodeSpec, other: NodeSpec) -> NodeSpec:
        """The meshwg node at the far end of a plain device's tunnel to `other`: `other`, or its LAN's gateway."""
        return self.lan_gateway(other) if other.kind == LAN else other

    def router(self, name: str) -> RouterSpec:
        return next(r for r in self.routers if r.name == name)

    def effective_nat(self, node: NodeSpec) -> NatType:
        """The NAT behaviour a node's traffic sees from outside: the most restrictive on its way out."""
        nats, router = [], node.behind
        while router is not None:
            spec = self.router(router)
            nats.append(spec.nat)
            router = spec.behind
        return max(nats, key=_RESTRICTIVENESS.index, default=NatType.NONE)

    def same_lan(self, a: NodeSpec, b: NodeSpec) -> bool:
        return a.behind is not None and a.behind == b.behind

    def pairs(self) -> list[tuple[NodeSpec, NodeSpec]]:
        """Every two meshwg nodes, then each plain device with what it reaches."""
        mesh = list(itertools.combinations(self.mesh_nodes(), 2))
        return mesh + [(p, other) for p in self.plain_nodes() for other in self.reachable(p)]

    def expected(self, a: NodeSpec, b: NodeSpec) -> str:
        key = frozenset((a.name, b.name))
        if key in self.expect:
            return self.expect[key]
        if PLAIN in (a.kind, b.kind):
            return "relay"     # a stock WireGuard device speaks only to the Endpoint in its config: the relay
        if self.same_lan(a, b):
            return "direct"
        return expected_path(self.effective_nat(a), self.effective_nat(b))


# Every NAT type, least restrictive first (also the order of the matrix scenario's nodes).
_RESTRICTIVENESS = [N.NONE, N.FULL_CONE, N.RESTRICTED_CONE, N.PORT_RESTRICTED, N.SYMMETRIC, N.UDP_BLOCKED]


def expected_path(a: NatType, b: NatType) -> str:
    """Direct or relay for two nodes on different networks (measured in this lab: any two cones punch)."""
    if N.UDP_BLOCKED in (a, b):
        return "relay"
    if N.SYMMETRIC in (a, b):
        other = b if a is N.SYMMETRIC else a
        # A symmetric side can reach a public node, or a cone that answers its observed source; against
        # a port-restricted cone only the bounded birthday-paradox probes can get through.
        if other in (N.NONE, N.FULL_CONE, N.RESTRICTED_CONE):
            return "direct"
        return "either" if other is N.PORT_RESTRICTED else "relay"
    return "direct"


PHONE_TO_HOME = Scenario(
    name="phone-to-home",
    description="A home server (and a NAS on its LAN), a laptop in a cafe, a phone on a mobile network running "
                "meshwg and one running the official WireGuard app, meshed through a self-hosted signal server.",
    routers=(
        RouterSpec("home-router", N.PORT_RESTRICTED),
        RouterSpec("cafe-nat", N.RESTRICTED_CONE),
        RouterSpec("carrier-nat", N.SYMMETRIC, cgn=True),
    ),
    nodes=(
        NodeSpec("home", "home-router", "home server, advertises its LAN", advertise_lan=True),
        NodeSpec("laptop", "cafe-nat", "laptop in a cafe"),
        NodeSpec("phone", "carrier-nat", "phone on mobile data, runs meshwg"),
        NodeSpec("phone-app", "carrier-nat", "phone with the official WireGuard app: stock wg-quick + wireguard-go",
                 kind=PLAIN, to=("home",)),
        NodeSpec("nas", "home-router", "NAS on home's LAN, runs no meshwg", kind=LAN),
    ),
)

NAT_MATRIX = Scenario(
    name="matrix",
    description="One node behind each NAT type (plus a public one and a double NAT); every pair, as a matrix.",
    routers=tuple(RouterSpec(f"{t.value}-nat", t) for t in _RESTRICTIVENESS if t is not N.NONE)
    + (RouterSpec("cgn", N.SYMMETRIC, cgn=True), RouterSpec("home-behind-cgn", N.PORT_RESTRICTED, behind="cgn")),
    nodes=tuple(NodeSpec(t.value, None if t is N.NONE else f"{t.value}-nat") for t in _RESTRICTIVENESS)
    + (NodeSpec("double-nat", "home-behind-cgn"),),
    matrix=True,
)


def _pair_scenario(name: str, a: NatType, b: NatType, description: str) -> Scenario:
    return Scenario(
        name=name,
        description=description,
        routers=(RouterSpec("nat-a", a), RouterSpec("nat-b", b)),
        nodes=(NodeSpec("a", "nat-a"), NodeSpec("b", "nat-b")),
    )


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    PHONE_TO_HOME,
    NAT_MATRIX,
    _pair_scenario("pr-pr", N.PORT_RESTRICTED, N.PORT_RESTRICTED,
                   "Two nodes behind port-restricted cone NATs (the Linux default): direct."),
    _pair_scenario("sym-sym", N.SYMMETRIC, N.SYMMETRIC, "Two nodes behind symmetric NATs: relay."),
    _pair_scenario("pr-sym", N.PORT_RESTRICTED, N.SYMMETRIC,
                   "Port-restricted cone <-> symmetric: relay unless the birthday-paradox probes hit."),
    _pair_scenario("udpblocked-pr", N.UDP_BLOCKED, N.PORT_RESTRICTED,
                   "A node whose firewall blocks all UDP <-> a port-restricted node: relay over TCP."),
    Scenario(
        name="lan-peers",
        description="Two nodes behind the same NAT (they must find each other over the LAN) and one outside.",
        routers=(RouterSpec("office", N.PORT_RESTRICTED, hairpin=True), RouterSpec("home-router", N.PORT_RESTRICTED)),
        nodes=(NodeSpec("desk-1", "office"), NodeSpec("desk-2", "office"), NodeSpec("home", "home-router")),
    ),
]}
