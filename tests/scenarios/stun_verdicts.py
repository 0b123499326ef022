"""What `stun` (stun-client) prints as its primary verdict for each lab NAT type (checked against coturn)."""

from scenarios.nat import NatType

STUN_CLASS = {
    NatType.NONE: "Open",
    NatType.FULL_CONE: "Independent Mapping, Independent Filter",
    NatType.RESTRICTED_CONE: "Independent Mapping, Address Dependent Filter",
    NatType.PORT_RESTRICTED: "Independent Mapping, Port Dependent Filter",
    NatType.SYMMETRIC: "Dependent Mapping",
    NatType.UDP_BLOCKED: "Blocked",
}
