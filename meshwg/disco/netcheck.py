"""Classify the NAT from STUN results (RFC 4787 terms). Pure: the shell runs the probes.

Mapping: compare the reflexive address one local socket gets from servers at different IPs (and,
when available, the same IP on another port). Same everywhere -> endpoint-independent; differs by IP ->
address-dependent; differs by port of the same IP -> address-and-port-dependent ("symmetric").
Filtering (RFC 5780 CHANGE-REQUEST tests, optional): a reply from another IP+port arrives ->
endpoint-independent; only from another port of the same IP -> address-dependent; neither ->
address-and-port-dependent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EIM = "endpoint-independent"
ADM = "address-dependent"
APDM = "address-and-port-dependent"
UNKNOWN = "unknown"
NO_UDP = "no-udp"


@dataclass(frozen=True)
class StunResult:
    server: tuple                # (ip, port) probed
    mapped: tuple | None         # reflexive (ip, port) seen by that server; None = no answer
    local_port: int | None = None


@dataclass(frozen=True)
class FilteringTests:
    change_ip_and_port: bool | None = None   # RFC 5780 test II answered
    change_port: bool | None = None          # RFC 5780 test III answered


@dataclass
class NetcheckReport:
    udp: bool
    mapping: str
    filtering: str
    reflexive: list = field(default_factory=list)   # distinct reflexive addresses, in probe order
    preserves_port: bool | None = None
    hard: bool = False                               # mapping varies by destination ("symmetric")

    def summary(self) -> str:
        if not self.udp:
            return "UDP blocked: relay only"
        refl = ", ".join(f"{ip}:{port}" for ip, port in self.reflexive) or "-"
        return f"mapping {self.mapping}, filtering {self.filtering}, reflexive {refl}"

    @property
    def mapping_kind(self) -> str | None:
        """The coarse kind the path logic uses: 'endpoint-independent' / 'endpoint-dependent'."""
        if self.mapping == EIM:
            return "endpoint-independent"
        if self.mapping in (ADM, APDM):
            return "endpoint-dependent"
        return None


def classify(results: list[StunResult], filtering: FilteringTests | None = None) -> NetcheckReport:
    answered = [r for r in results if r.mapped is not None]
    if not answered:
        return NetcheckReport(udp=False, mapping=NO_UDP if results else UNKNOWN, filtering=UNKNOWN)
    reflexive: list = []
    for r in answered:
        if r.mapped not in reflexive:
            reflexive.append(r.mapped)
    mapping = _mapping(answered)
    preserves = None
    with_port = [r for r in answered if r.local_port is not None]
    if with_port:
        preserves = all(r.mapped[1] == r.local_port for r in with_port)
    return NetcheckReport(udp=True, mapping=mapping, filtering=_filtering(filtering),
                          reflexive=reflexive, preserves_port=preserves,
                          hard=mapping in (ADM, APDM))


def _mapping(answered: list[StunResult]) -> str:
    by_ip: dict[str, set] = {}
    for r in answered:
        by_ip.setdefault(r.server[0], set()).add(r.mapped)
    port_dependent = any(len(m) > 1 for m in by_ip.values())
    if port_dependent:
        return APDM
    if len(by_ip) < 2:
        return UNKNOWN   # one server IP with one port cannot tell
    distinct = {next(iter(m)) for m in by_ip.values()}
    if len(distinct) == 1:
        return EIM
    # Different per IP; without a same-IP/other-port probe we cannot tell ADM from APDM:
    # both defeat simple punching, call it the stricter one only when the ports were probed.
    multi_port_ips = [ip for ip in by_ip if len({r.server for r in answered if r.server[0] == ip}) > 1]
    return ADM if multi_port_ips else APDM


def _filtering(f: FilteringTests | None) -> str:
    if f is None:
        return UNKNOWN
    if f.change_ip_and_port:
        return EIM
    if f.change_port:
        return ADM
    if f.change_ip_and_port is False and f.change_port is False:
        return APDM
    return UNKNOWN
