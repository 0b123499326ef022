"""Names for the mesh (issue 15, "MagicDNS"): what a node answers for NAME.<mesh domain>. Pure: `now` is an input;
the wire format is the shell's (meshwg.io.agent.dns_server, with dnslib, which imports socket).

    table = table_from(domain, welcome, peers)  # the node's directory: names, mesh addresses, plain peers
    resolver = Resolver(table)                  # resolver.table = new_table on every directory change
    src = resolver.admit(source_ip, now)        # None: outside the mesh (and loopback), or over its rate (counted)
    answer = resolver.decide(src, opcode=..., questions=..., labels=..., qtype=..., qclass=...)
        Answer(rcode, records, soa)   what to answer
        FORWARD                       a plain peer's query for a name outside the domain: relayed to an upstream

Authoritative for the domain and the reverse zones of the mesh prefixes only, and never recursive for nodes:
  A / AAAA     NAME.<domain> (any case) -> the node's mesh IPv4 / IPv6 (this node's own name too)
  PTR          <mesh address>.in-addr.arpa / ip6.arpa -> NAME.<domain>
  NXDOMAIN     unknown names under the domain, unknown addresses inside the mesh prefixes (with the zone's SOA,
               so resolvers cache the negative answer briefly)
  NOERROR      with no records: a known name asked for another type (MX, TXT ...), the domain itself
  REFUSED      anything else: this is no open resolver. A node's own resolver asks us only for the domain
               (systemd-resolved's per-link routing domain) or goes on to its next nameserver on REFUSED
               (glibc with resolv.conf).
A plain peer (a phone with a stock WireGuard app) is the exception: its config's `DNS =` line sends every query
to its target node while the tunnel is up, so the node forwards what lies outside the domain to its own upstream
nameservers (FORWARD), for those peers' mesh addresses only; without upstreams they get REFUSED too.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from dataclasses import dataclass, field

from meshwg.token_bucket import KeyedLimiter

DEFAULT_DOMAIN = "mesh.internal"   # .internal: reserved for private use (ICANN, 2024), never delegated
TTL = 60                           # names and addresses change rarely; a renamed node is seen within a minute
NEGATIVE_TTL = 10                  # the SOA minimum: a node that just joined resolves soon after
MAX_UDP_ANSWER = 512               # no EDNS: a larger answer is sent truncated (TC), the client retries over TCP
RATE = 50.0                        # queries a second from one source address...
BURST = 100.0                      # ...with this burst (a browser opening a page of mesh links)
MAX_SOURCES = 4096                 # rate buckets kept; a flood of sources cannot grow memory

# The wire's numbers (RFC 1035, 3596, 6895) the decisions speak in; the codec is the shell's (dnslib).
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 3, 4, 5
RCODE_NAMES = {NOERROR: "noerror", FORMERR: "formerr", NXDOMAIN: "nxdomain", NOTIMP: "notimp", REFUSED: "refused"}
T_A, T_SOA, T_PTR, T_AAAA, T_ANY = 1, 6, 12, 28, 255
CLASS_IN = 1

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_domain(text: str) -> str | None:
    """The mesh domain in canonical form (lower case, no trailing dot), None when `text` is not a DNS name of
    letters, digits and hyphens (labels of 1-63 characters, 253 in all). "none" is the caller's to handle."""
    if not isinstance(text, str):
        return None
    name = text.strip().lower().rstrip(".")
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(lab) for lab in labels) or labels[-1].isdigit():
        return None   # an all-numeric last label reads as an IP address to resolvers
    return name


def dns_domain_untrusted(value) -> str:
    """The welcome's "dns_domain" as a node takes it: the canonical domain, "" (names off) when absent or bad."""
    return (normalize_domain(value) or "") if isinstance(value, str) else ""


def is_label(name: str) -> bool:
    return isinstance(name, str) and bool(_LABEL.match(name))


@dataclass
class NameTable:
    """What the node answers: names (lower case, without the domain) -> addresses, and the reverse."""
    domain: str = ""                                    # "" : names off, everything REFUSED
    names: dict = field(default_factory=dict)           # label -> (ipv4 texts, ipv6 texts)
    reverse: dict = field(default_factory=dict)         # ip_address -> label
    prefixes: tuple = ()                                # ip_network: the mesh prefixes (reverse zones we own)
    plain: frozenset = frozenset()                      # ip_address of plain peers: their queries may be forwarded

    def add(self, name: str, ipv4: str, ipv6: str, plain: bool = False) -> bool:
        """One node's entry; False (nothing added) for a name that is no DNS label or is taken already."""
        name = (name or "").lower()
        if not is_label(name) or name in self.names:
            return False
        v4, v6 = _ips(ipv4, 4), _ips(ipv6, 6)
        self.names[name] = (tuple(map(str, v4)), tuple(map(str, v6)))
        for ip in (*v4, *v6):
            self.reverse.setdefault(ip, name)
        if plain:
            self.plain = self.plain | frozenset((*v4, *v6))
        return True


def _ips(text: str, version: int) -> tuple:
    try:
        ip = ipaddress.ip_address(text)
    except (ValueError, TypeError):
        return ()
    return (ip,) if ip.version == version else ()


def table_from(domain: str, welcome, peers) -> NameTable:
    """The table of a node's directory: its own name first (never shadowed by an entry), then the peers (PeerInfo)
    in node id order, so a duplicate name (the server keeps them unique) resolves the same on every node."""
    table = NameTable(domain=domain)
    if not domain or welcome is None:
        return NameTable()
    nets = []
    for p in (welcome.prefix4, welcome.prefix6):
        try:
            nets.append(ipaddress.ip_network(p, strict=False))
        except (ValueError, TypeError):
            pass
    table.prefixes = tuple(nets)
    table.add(welcome.name, welcome.ipv4, welcome.ipv6)
    for p in sorted(peers, key=lambda p: (p.node_id, p.key)):
        table.add(p.name, p.ipv4, p.ipv6, plain=p.kind == "plain")
    return table


def upstreams_from_resolv_conf(text: str, exclude=()) -> tuple[str, ...]:
    """The nameserver addresses of a resolv.conf text (at most 3, as glibc reads), without `exclude` (our own
    mesh addresses: forwarding to ourselves would loop)."""
    skip = {str(x) for x in exclude}
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = str(ipaddress.ip_address(parts[1].split("%")[0]))
            except ValueError:
                continue
            if ip not in skip and ip not in out:
                out.append(ip)
    return tuple(out[:3])


def _reverse_ip(labels: tuple[bytes, ...]):
    """The address a reverse name (lower-case labels, without the trailing arpa zone) stands for; None if partial."""
    try:
        if labels[-2:] == (b"in-addr", b"arpa") and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(x.decode() for x in reversed(labels[:4])))
        if labels[-2:] == (b"ip6", b"arpa") and len(labels) == 34:
            nibbles = "".join(x.decode() for x in reversed(labels[:32]))
            return ipaddress.IPv6Address(int(nibbles, 16)) if all(len(x) == 1 for x in labels[:32]) else None
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _reverse_zone(labels: tuple[bytes, ...]) -> bool:
    return labels[-2:] in ((b"in-addr", b"arpa"), (b"ip6", b"arpa"))


@dataclass(frozen=True)
class Answer:
    """What to answer: an rcode, records ((qtype, value text), ...) for the question's name, and whether the
    domain's SOA goes in the authority section (negative answers, so they are cached for NEGATIVE_TTL)."""
    rcode: int
    records: tuple = ()
    soa: bool = False


FORWARD = "forward"   # decide(): relay the query as it came to an upstream nameserver (a plain peer's)


class Resolver:
    """The decisions; the shell (meshwg.io.agent.dns_server) parses and builds the wire format around them."""

    def __init__(self, table: NameTable | None = None, *, forward: bool = True, rate: float = RATE,
                 burst: float = BURST) -> None:
        self.table = table or NameTable()
        self.forward = forward      # False: no upstream to forward to (plain peers get REFUSED too)
        self.limiter = KeyedLimiter(rate, burst, MAX_SOURCES)
        self.counters: collections.Counter = collections.Counter()

    def admit(self, source, now: float):
        """The source's address (ip_address) when it may ask now, else None (counted)."""
        try:
            src = ipaddress.ip_address(source)
        except ValueError:
            self.counters["dns_drop_source"] += 1
            return None
        if not self.inside(src):   # before the buckets: an outside flood charges (and fills) nothing
            self.counters["dns_drop_outside"] += 1
            return None
        if not self.limiter.allow(src, now):
            self.counters["dns_drop_rate"] += 1
            return None
        return src

    def inside(self, src) -> bool:
        """Whether `src` (ip_address) may ask at all: a mesh address, or this host (loopback). Bound to the mesh
        address is not enough: Linux delivers a LAN host's packet routed to it through our LAN address (weak host
        model), and an answer to a spoofed outside source would make the node a reflector."""
        return src.is_loopback or any(src in n for n in self.table.prefixes)

    def decide(self, src, *, opcode: int, questions: int, labels: tuple, qtype: int, qclass: int):
        """An Answer, or FORWARD, for a parsed query (labels: the question name's, as bytes, any case)."""
        self.counters["dns_queries"] += 1
        out = self._decide(src, opcode, questions, tuple(x.lower() for x in labels), qtype, qclass)
        self.counters["dns_forwarded" if out == FORWARD else f"dns_rcode_{RCODE_NAMES.get(out.rcode, 'other')}"] += 1
        return out

    def _decide(self, src, opcode: int, questions: int, labels: tuple, qtype: int, qclass: int):
        if opcode != 0:
            return Answer(NOTIMP)
        if questions != 1:
            return Answer(FORMERR)
        t = self.table
        dom = tuple(t.domain.encode().split(b".")) if t.domain else None
        if qclass != CLASS_IN:   # CHAOS version.bind and the like are nobody's business
            return Answer(REFUSED)
        if dom and labels[-len(dom):] == dom:
            return self._name(qtype, labels[: -len(dom)])
        if dom and _reverse_zone(labels):
            answer = self._reverse(qtype, labels)
            if answer is not None:
                return answer
        if self.forward and src in t.plain:
            return FORWARD
        return Answer(REFUSED)

    def _name(self, qtype: int, rel: tuple) -> Answer:
        if not rel:                       # the domain itself: it exists, with no address of its own
            return Answer(NOERROR, ((T_SOA, ""),)) if qtype == T_SOA else Answer(NOERROR, soa=True)
        entry = self.table.names.get(rel[0].decode("ascii", "replace")) if len(rel) == 1 else None
        if entry is None:
            return Answer(NXDOMAIN, soa=True)
        v4, v6 = entry
        records = tuple((T_A, ip) for ip in v4 if qtype in (T_A, T_ANY)) + \
            tuple((T_AAAA, ip) for ip in v6 if qtype in (T_AAAA, T_ANY))
        return Answer(NOERROR, records, soa=not records)

    def _reverse(self, qtype: int, labels: tuple) -> Answer | None:
        """The answer for a reverse name inside the mesh prefixes; None when the name is not ours to answer."""
        ip = _reverse_ip(labels)
        t = self.table
        if ip is None or not any(ip in n for n in t.prefixes):
            return None
        name = t.reverse.get(ip)
        if name is None:
            return Answer(NXDOMAIN, soa=True)
        if qtype in (T_PTR, T_ANY):
            return Answer(NOERROR, ((T_PTR, f"{name}.{t.domain}."),))
        return Answer(NOERROR, soa=True)


