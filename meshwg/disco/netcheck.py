"""Classify the NAT from STUN results (RFC 4787 terms). Pure: the shell runs the probes.

Mapping: compare the reflexive address one local socket gets from servers at different IPs (and,
when available, the same IP on another port). Same everywhere -> endpoint-independent; differs by IP ->
address-dependent; differs by port of the same IP -> address-and-port-dependent ("symmetric").
Filtering (RFC 5780 CHANGE-REQUEST tests, optional): a reply from another IP+port arrives ->
endpoint-independent; only from another port of the same IP -> address-dependent; neither ->
address-and-port-dependent.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from meshwg.disco import stun

EIM = "endpoint-independent"
EDM = "endpoint-dependent"       # ADM or APDM: the coarse kind the path logic uses (mapping_kind)
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
        return summary_text(self.udp, self.mapping, self.filtering, [_hostport(a) for a in self.reflexive])

    @property
    def mapping_kind(self) -> str | None:
        """The coarse kind the path logic uses: EIM / EDM."""
        if self.mapping == EIM:
            return EIM
        if self.mapping in (ADM, APDM):
            return EDM
        return None


def _hostport(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


def summary_text(udp: bool, mapping: str, filtering: str, reflexive: list[str], *, ipv6: dict | None = None,
                 port_mapping: list[str] | None = None) -> str:
    """The one-line verdict of a netcheck report, from the fields its text prints (so they cannot disagree)."""
    out = (f"mapping {mapping}, filtering {filtering}, reflexive {', '.join(reflexive) or '-'}" if udp
           else "UDP blocked: relay only")
    if ipv6 is not None:
        out += f"; IPv6 {ipv6_verdict(ipv6)}"
    if port_mapping is not None:
        out += f"; port mapping {', '.join(port_mapping) or 'none'}"
    return out


def summarize(report: dict) -> str:
    """summary_text of a finished `meshwg netcheck` report (its JSON fields, after every probe merged in)."""
    pm = report.get("port_mapping")
    text = summary_text(bool(report.get("udp")), report.get("mapping", UNKNOWN), report.get("filtering", UNKNOWN),
                        list(report.get("reflexive") or []), ipv6=report.get("ipv6"),
                        port_mapping=None if pm is None else list(pm.get("protocols") or []))
    return text if report.get("agent", True) else "no agent running: " + text


def ipv6_verdict(ipv6: dict) -> str:
    """"yes" (a STUN answer over IPv6), else why not: the words `meshwg netcheck` prints after "IPv6:"."""
    if ipv6.get("udp"):
        return "yes"
    if not ipv6.get("addresses"):
        return "no (no global IPv6 address)"
    if ipv6.get("server") is None:
        return "unknown (no IPv6 server address)"
    return f"no (no STUN answer from {ipv6['server']})"


def global_ipv6_untrusted(if_inet6: str) -> list[str]:
    """Usable global IPv6 addresses from /proc/net/if_inet6's text: global scope, not a ULA, not
    tentative or failed duplicate address detection."""
    out = []
    for line in if_inet6.splitlines():
        f = line.split()
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(f[0]))
            scope, flags = int(f[3], 16), int(f[4], 16)
        except (ValueError, IndexError):
            continue
        if scope == 0 and ip.is_global and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            out.append(str(ip))
    return out


IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40   # linux/if_addr.h


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
    if f.change_port is False:
        return APDM   # even the same IP on another port is filtered
    return UNKNOWN


# --- RFC 5780 behaviour discovery against one server with an alternate address, sans-IO.

MAP_SOCK, FILTER_SOCK = 0, 1   # the probe's two local sockets (the shell owns them)


@dataclass
class ProbeTest:
    name: str
    sock: int                    # MAP_SOCK or FILTER_SOCK
    dest: tuple                  # (ip, port) the request goes to
    change: int                  # CHANGE-REQUEST flags
    txid: bytes
    started: float
    deadline: float
    next_send: float
    sent: int = 0
    answer: stun.BindingResponse | None = None
    source: tuple | None = None  # where the answer came from
    rtt: float | None = None
    wrong_source: bool = False   # answered, but not from the place the change asked for
    expired: bool = False        # no answer by the deadline

    @property
    def answered(self) -> bool:
        return self.answer is not None and not self.wrong_source


class NatProbe:
    """Mapping and filtering of the NAT in front of us, from one STUN server with OTHER-ADDRESS.

    Mapping (MAP socket): Binding to the server, then to its other IP on the same port and to its
    other IP and port (RFC 5780 4.3). Filtering (FILTER socket): a plain Binding plus change-IP+port and
    change-port requests, all sent to the server's main address only: had this socket ever sent to the
    other address, the NAT would let that address in and the test would read "open" (4.4).
    A filtering verdict needs the server to name an OTHER-ADDRESS (it can honour changes) and the
    plain request on the FILTER socket to be answered (else a lost packet would read "filtered").

    Inputs: receive_datagram(sock, data, src, now), handle_timer(now). Outputs: datagrams_to_send()
    -> [(sock, bytes, dest)], get_timer(), done, report().
    """

    def __init__(self, server, now: float, random_bytes, *, timeout: float = 1.0, retransmit: float = 0.25,
                 extra_servers=(), local_port: int | None = None) -> None:
        self.server = (str(server[0]), int(server[1]))
        self.timeout, self.retransmit = timeout, retransmit
        self.local_port = local_port
        self._rand = random_bytes
        self.tests: list[ProbeTest] = []
        self.other: tuple | None = None
        self.drops = 0
        self._out: list = []
        self._add("map", MAP_SOCK, self.server, 0, now)
        for i, extra in enumerate(dict.fromkeys(tuple(e) for e in extra_servers)):
            if extra != self.server:
                self._add(f"map_extra{i}", MAP_SOCK, extra, 0, now)
        self._add("filter", FILTER_SOCK, self.server, 0, now)
        self._add("filter_change_ip_port", FILTER_SOCK, self.server, stun.CHANGE_IP | stun.CHANGE_PORT, now)
        self._add("filter_change_port", FILTER_SOCK, self.server, stun.CHANGE_PORT, now)
        self.handle_timer(now)

    def _add(self, name, sock, dest, change, now) -> None:
        self.tests.append(ProbeTest(name, sock, (str(dest[0]), int(dest[1])), change, self._rand(12), now,
                                    now + self.timeout, now))

    def test(self, name: str) -> ProbeTest | None:
        return next((t for t in self.tests if t.name == name), None)

    # --- inputs

    def receive_datagram(self, sock: int, data: bytes, src, now: float) -> None:
        resp = stun.parse_binding_response_full_untrusted(data)
        t = None if resp is None else next(
            (t for t in self.tests if t.txid == resp.txid and t.sock == sock and t.answer is None and not t.expired),
            None)
        if t is None:
            self.drops += 1   # junk, a late duplicate, or not ours
            return
        t.answer, t.source, t.rtt = resp, (str(src[0]), int(src[1])), now - t.started
        if t.change:
            # A server that ignores CHANGE-REQUEST answers from where we sent: that proves nothing.
            t.wrong_source = ((t.change & stun.CHANGE_IP and t.source[0] == t.dest[0])
                              or (t.change & stun.CHANGE_PORT and t.source[1] == t.dest[1]))
        if t.name in ("map", "filter") and self.other is None and resp.other_address is not None:
            # Whichever answer names the other address first (the filter socket's may win the race),
            # the mapping tests towards it go out from the mapping socket.
            self.other = resp.other_address
            self._start_mapping_tests(now)

    def _start_mapping_tests(self, now: float) -> None:
        ip = self.other[0]
        if ip == self.server[0]:
            return  # an "other address" on our own IP cannot test mapping by IP
        have = {t.dest for t in self.tests if t.sock == MAP_SOCK}
        for name, dest in (("map_other_ip", (ip, self.server[1])), ("map_other_ip_port", self.other)):
            if dest not in have:
                have.add(dest)
                self._add(name, MAP_SOCK, dest, 0, now)
        self.handle_timer(now)

    def handle_timer(self, now: float) -> None:
        for t in self.tests:
            if t.answer is not None or t.expired:
                continue
            if now >= t.deadline:
                t.expired = True
            elif now >= t.next_send:
                self._out.append((t.sock, stun.build_binding_request(t.txid, change=t.change), t.dest))
                t.sent += 1
                t.next_send = now + self.retransmit

    # --- outputs

    def datagrams_to_send(self) -> list:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float:
        pending = [min(t.next_send, t.deadline) for t in self.tests if t.answer is None and not t.expired]
        return min(pending, default=math.inf)

    @property
    def done(self) -> bool:
        """Every test answered or timed out."""
        return all(t.answer is not None or t.expired for t in self.tests)

    def filtering_tests(self) -> FilteringTests | None:
        f = self.test("filter")
        if self.other is None or f is None or not f.answered:
            return None
        ip_port, port = self.test("filter_change_ip_port"), self.test("filter_change_port")
        return FilteringTests(None if ip_port.wrong_source else ip_port.answered,
                              None if port.wrong_source else port.answered)

    def mapping_results(self) -> list[StunResult]:
        return [StunResult(t.dest, t.answer.mapped if t.answer else None, self.local_port)
                for t in self.tests if t.sock == MAP_SOCK]

    def report(self) -> NetcheckReport:
        return classify(self.mapping_results(), self.filtering_tests())
