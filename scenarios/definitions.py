"""Scenario definitions: who sits behind which NAT, and which path each pair should end up on.

A scenario is plain data. Routers are listed outermost first (a router may sit behind an earlier one:
double NAT). Every node runs `meshwg join`; the signal server runs on a public host named "signal".
Expected paths ("direct", "relay", or "either" where both are fine) come from `expected_path` (what punched
through in this lab) unless a scenario overrides a pair.
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


@dataclass(frozen=True)
class NodeSpec:
    name: str
    behind: str | None             # router name; None = a public address on the internet
    role: str = ""                 # for the printout ("home server", "phone", ...)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    routers: tuple[RouterSpec, ...]
    nodes: tuple[NodeSpec, ...]
    expect: dict[frozenset[str], str] = field(default_factory=dict)   # pair -> "direct" | "relay" | "either"
    matrix: bool = False           # print a NAT-type matrix instead of (as well as) the pair table

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
        return list(itertools.combinations(self.nodes, 2))

    def expected(self, a: NodeSpec, b: NodeSpec) -> str:
        key = frozenset((a.name, b.name))
        if key in self.expect:
            return self.expect[key]
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
    description="A home server, a laptop in a cafe and a phone on a mobile network, meshed through a "
                "self-hosted signal server.",
    routers=(
        RouterSpec("home-router", N.PORT_RESTRICTED),
        RouterSpec("cafe-nat", N.RESTRICTED_CONE),
        RouterSpec("carrier-nat", N.SYMMETRIC, cgn=True),
    ),
    nodes=(
        NodeSpec("home", "home-router", "home server"),
        NodeSpec("laptop", "cafe-nat", "laptop in a cafe"),
        NodeSpec("phone", "carrier-nat", "phone on mobile data"),
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
