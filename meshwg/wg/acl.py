"""A peer's inbound packet filter (issue 13, /work/notes/acl-contract.md): its accept list compiled, plus the
flows this node opened towards it. Pure: no clock (`now` is passed in), no I/O.

The core (meshwg.wg.device) runs it on the inner packets of one peer that has an accept list:
  - inbound, after decryption and after cryptokey routing's source check (a forged inner source never gets
    here): `check_in` passes a packet its accept list admits (destination prefix, protocol, destination port) or
    that answers a flow we opened; otherwise it names the drop reason;
  - outbound (TUN -> core): `note_out` records the flows we open.
A peer without an accept list has no filter at all (no policy in force: everything passes, nothing is tracked).

Compiled, not interpreted: per destination address the rules reduce to one table {packet proto: True | (port
range starts, ends)} (True: every port), built once per address (the node's own addresses at compile time,
others on first sight, in a bounded cache) and rebuilt when the list changes. A packet then costs one struct
unpack, two dict lookups and, for a port list, one bisect.

State (what "a flow we opened" means; the tables hold only ours, refreshed by packets both ways):
  - TCP: our SYN without ACK opens it. A segment of a connection the peer opened never creates an entry, so when
    a policy change stops admitting the peer's side, that connection stops at its next segment.
    Known limit: a connection we opened before the peer had any policy (no filter, nothing tracked) is not in
    the table; its replies pass only while the rules admit them.
  - UDP and other protocols: our packet opens a flow when the rules would not admit its reverse (a packet that
    answers what the peer may send anyway needs no state, but is remembered, `theirs`, for the protocol's timeout
    after our last packet on it, at most MAX_FLOWS per peer). A flow in `theirs` never becomes one we opened: when
    a policy change stops admitting the peer's side, it stops though this node keeps sending on it (a QUIC
    server's retransmissions would otherwise keep a revoked client in). Known limit: it cannot tell who sent
    first, so a UDP flow we opened while the rules admitted its reverse stops too, as a TCP connection we opened
    before any policy does.
  - ICMP: our echo request opens (icmp, us, them, echo id); its echo reply passes. An ICMP error passes when
    the packet it quotes (one we sent) belongs to a flow we opened or is one the rules admit the reverse of.
  - timeouts as Linux conntrack's defaults, shorter for TCP (no FIN/RST tracking): TCP 2 h 4 min, UDP 120 s,
    ICMP 30 s, others 600 s; at most MAX_FLOWS entries per peer, the oldest evicted (counted).
  - a policy change (set_rules) keeps the table: every entry is a flow this node opened, and a flow the peer
    opened is admitted by the rules alone, so it stops at its next packet once they no longer allow it.
Fragments: a non-first fragment carries no ports; it passes (the receiving stack cannot reassemble it without
the first, which was filtered). IPv6 extension headers (hop-by-hop, routing, destination options, fragment)
are followed, up to 4. A source-routed packet (IPv4 LSRR/SSRR option, IPv6 routing header with segments left)
is dropped: the destination it is judged by is not where it ends (a forwarding node that honours the route would
take it on to a host the peer may not reach). An ICMP error passes only towards the source of the packet it
quotes.
Inside the mesh's prefixes (the welcome's, set_mesh_nets) only host entries admit: a network entry is a route the
peer may use (an exit node's 0.0.0.0/0, a LAN behind us), never our own mesh address or the mesh behind us.
"""

from __future__ import annotations

import bisect
import collections
import ipaddress
import struct

ANY, ICMP, TCP, UDP, ICMP6 = 0, 1, 6, 17, 58
RULE_PROTOS = (ANY, ICMP, TCP, UDP)
TCP_TIMEOUT, UDP_TIMEOUT, ICMP_TIMEOUT, OTHER_TIMEOUT = 7440.0, 120.0, 30.0, 600.0
_TIMEOUT = collections.defaultdict(lambda: OTHER_TIMEOUT, {TCP: TCP_TIMEOUT, UDP: UDP_TIMEOUT, ICMP: ICMP_TIMEOUT,
                                                           ICMP6: ICMP_TIMEOUT})
MAX_FLOWS = 4096            # flows we opened, per peer
MAX_DST_TABLES = 1024       # destination addresses with a compiled table, per peer (a full cache starts over)
SWEEP_INTERVAL = 1.0        # a full flow table is swept for expired entries at most this often
DROP_NOT_ALLOWED = "acl_not_allowed"    # neither admitted by the accept list nor a reply to our flow
DROP_MALFORMED = "acl_malformed"        # too short for the header the verdict needs

_ALL = True                 # a destination whose table admits every packet (an any-protocol rule)
_MISS = object()
_bisect_right = bisect.bisect_right
_V4_IN = struct.Struct("!6xHxB6xI2xH")     # flags/fragment, proto, dst, dport of IPv4 without options
_ICMP_ERRORS_V4 = frozenset((3, 4, 5, 11, 12))
_ICMP_ERRORS_V6 = frozenset((1, 2, 3, 4))
_V6_EXT = frozenset((0, 43, 60))
_SOURCE_ROUTE_V4 = frozenset((0x83, 0x89))   # loose and strict source route options
_FRAG6 = 44


def normalize(rules) -> tuple:
    """An accept list as (proto, lo, hi, ip network) tuples; ValueError for anything else (the control client
    validates entries from the network first: this is the caller's contract)."""
    out = []
    for rule in rules:
        proto, lo, hi, cidr = rule
        if proto not in RULE_PROTOS or not (0 <= lo <= hi <= 65535) or isinstance(proto, bool):
            raise ValueError(f"bad accept rule {rule!r}")
        net = cidr if isinstance(cidr, (ipaddress.IPv4Network, ipaddress.IPv6Network)) else \
            ipaddress.ip_network(cidr, strict=False)
        out.append((int(proto), int(lo), int(hi), net))
    return tuple(out)


def _merge(ranges) -> tuple:
    merged: list = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple(tuple(r) for r in merged)


def _inside(net, version: int, addr: int) -> bool:
    return net.version == version and (addr & int(net.netmask)) == int(net.network_address)


def table_for(rules: tuple, version: int, addr: int, mesh_nets: tuple = ()):
    """The compiled table of one destination address (an int): _ALL, or {packet proto: True | (starts, ends)}.

    Inside the mesh's prefixes only host entries count: a network entry is a route the peer may use (an exit
    node's 0.0.0.0/0, a LAN), and must not open this node's own mesh address or the mesh behind it to a peer whose
    rules for us are narrower (the policy's own-address rules arrive as host entries)."""
    in_mesh = any(_inside(n, version, addr) for n in mesh_nets)
    ports: dict = {}
    for proto, lo, hi, net in rules:
        if not _inside(net, version, addr) or (in_mesh and net.prefixlen != net.max_prefixlen):
            continue
        if proto == ANY:
            return _ALL
        if proto == ICMP:
            ports[ICMP] = ports[ICMP6] = [(0, 65535)]
        else:
            ports.setdefault(proto, []).append((lo, hi))
    table = {}
    for proto, ranges in ports.items():
        merged = _merge(ranges)
        table[proto] = True if merged == ((0, 65535),) else (tuple(r[0] for r in merged), tuple(r[1] for r in merged))
    return table



def _admits(table: dict, proto: int, dport: int) -> bool:
    """Whether a destination's compiled rules admit `proto` to `dport`: True (every port) or sorted, merged
    (starts, ends) port ranges per protocol."""
    r = table.get(proto)
    if r is True:
        return True
    if r is None:
        return False
    i = _bisect_right(r[0], dport)
    return bool(i) and dport <= r[1][i - 1]

class PeerFilter:
    """One peer's compiled accept list and the flows this node opened towards it. `counters` (shared by the
    core's filters) counts flow table events: open_acl_flow, evict_acl_flow.

    A flow is a cell [last seen, outbound key, inbound key] in two dicts of its protocol group: `out` by the key of
    our packets, `inn` by the key of the peer's replies. A key is raw header bytes in the packet's own order
    (source, destination addresses, then source and destination ports, an ICMP echo's id, or for other protocols
    the protocol number first), so either direction takes one slice per packet (they hash far faster than tuples
    of address ints); the reversed key is built once, when the flow opens."""

    __slots__ = ("rules", "out", "inn", "theirs", "max_flows", "counters", "mesh_nets", "_dst", "_next_sweep")

    def __init__(self, rules, counters: collections.Counter | None = None, max_flows: int = MAX_FLOWS,
                 mesh_nets: tuple = ()):
        self.out: dict[int, dict] = {TCP: {}, UDP: {}, ICMP: {}, ANY: {}}   # ANY: every other protocol
        self.inn: dict[int, dict] = {TCP: {}, UDP: {}, ICMP: {}, ANY: {}}
        self.max_flows = max_flows
        self.counters = counters if counters is not None else collections.Counter()
        self._next_sweep = -1.0
        # UDP and other flows we answered while the rules admitted the peer's side: our key -> when we last sent.
        # Such a flow is the peer's: a policy change that stops admitting it must not make it ours (module doc).
        self.theirs: dict[bytes, float] = {}
        self.mesh_nets = tuple(mesh_nets)   # ip networks: only host entries admit addresses inside them
        self.set_rules(rules)

    @property
    def flow_count(self) -> int:
        return sum(len(t) for t in self.out.values())

    def set_rules(self, rules) -> None:
        """Compile a new accept list. The flow tables stay (see the module doc)."""
        self.rules = normalize(rules)
        self._dst: dict = {}
        for _, _, _, net in self.rules:
            if net.prefixlen == net.max_prefixlen:   # our own addresses: compiled now, not on first packet
                self._table(net.version, int(net.network_address))

    def set_mesh_nets(self, mesh_nets) -> None:
        """The mesh's prefixes changed (a welcome): recompile with them."""
        self.mesh_nets = tuple(mesh_nets)
        self.set_rules(self.rules)

    def _table(self, version: int, addr: int):
        tables = self._dst
        k = addr if version == 4 else (addr,)   # v6 keys boxed: never equal to a v4 int
        t = tables.get(k, _MISS)
        if t is _MISS:
            if len(tables) >= MAX_DST_TABLES:
                tables.clear()
            t = tables[k] = table_for(self.rules, version, addr, self.mesh_nets)
        return t

    def admits(self, version: int, dst: int, proto: int, port: int) -> bool:
        """Whether the accept list alone admits a packet to dst (int) with this protocol and destination port."""
        t = self._table(version, dst)
        return t is _ALL or _admits(t, proto, port)

    # ------------------------------------------------------------------ inbound

    def check_in(self, pkt: bytes, now: float) -> str | None:
        """None when the (length-trimmed, source-checked) inner packet passes, else the drop reason."""
        if pkt[0] == 0x45 and len(pkt) >= 24:   # IPv4 without options: the common case, inline
            frag, proto, dst, dport = _V4_IN.unpack_from(pkt)
            t = self._dst.get(dst, _MISS)
            if t is _MISS:
                t = self._table(4, dst)
            if t is _ALL or frag & 0x1FFF or _admits(t, proto, dport):   # a later fragment: no ports (module doc)
                return None
            if proto == TCP or proto == UDP:   # a reply to a flow we opened?
                cell = self.inn[proto].get(pkt[12:24])
                if cell is not None and now - cell[0] <= (TCP_TIMEOUT if proto == TCP else UDP_TIMEOUT):
                    cell[0] = now
                    return None
                return DROP_NOT_ALLOWED
            return self._reply_in(pkt, _parse(pkt), now)
        parsed = _parse(pkt)
        if parsed is None:
            return DROP_MALFORMED
        version, off, proto, _, dst, later_fragment = parsed
        if (off > 20 if version == 4 else pkt[6] != proto) and _source_routed(pkt, version, off):
            return DROP_NOT_ALLOWED
        t = self._table(version, dst)
        if t is _ALL or later_fragment:
            return None
        dport = 0
        if proto == TCP or proto == UDP:
            if len(pkt) < off + 4:
                return DROP_MALFORMED
            dport = (pkt[off + 2] << 8) | pkt[off + 3]
        if _admits(t, proto, dport):
            return None
        return self._reply_in(pkt, parsed, now)

    def _reply_in(self, pkt: bytes, parsed, now: float) -> str | None:
        """Not admitted by the rules: a reply to (or an ICMP error about) a flow we opened, or a drop."""
        version, off, proto, _, _, _ = parsed
        if proto == ICMP or proto == ICMP6:
            if len(pkt) < off + 8:
                return DROP_MALFORMED
            kind = pkt[off]
            if kind in (_ICMP_ERRORS_V4 if proto == ICMP else _ICMP_ERRORS_V6):
                ours = self._quotes_ours(pkt[off + 8:], version, parsed[4], now)
                return None if ours else DROP_NOT_ALLOWED
            if kind != (0 if proto == ICMP else 129):   # only an echo reply answers our echo request
                return DROP_NOT_ALLOWED
        key = _key(pkt, parsed)
        if key is None:
            return DROP_MALFORMED
        cell = self.inn[_group(proto)].get(key)
        if cell is None or now - cell[0] > _TIMEOUT[proto]:
            return DROP_NOT_ALLOWED
        cell[0] = now
        return None

    def _quotes_ours(self, quoted: bytes, version: int, dst: int, now: float) -> bool:
        """An ICMP error's quoted packet (one we sent to the peer): part of a flow we opened, or the answer side of
        one the rules admit. The error goes to that packet's source (`dst`, the error's destination), as conntrack
        requires: otherwise one known flow would carry errors (redirects too) to any host behind us."""
        parsed = _parse(quoted)
        if parsed is None or parsed[0] != version or parsed[3] != dst:
            return False
        _, off, proto, src, _, _ = parsed
        key = _key(quoted, parsed)
        if key is None:
            return False
        cell = self.out[_group(proto)].get(key)
        if cell is not None and now - cell[0] <= _TIMEOUT[proto]:
            return True
        sport = (quoted[off] << 8) | quoted[off + 1] if proto == TCP or proto == UDP else 0
        return self.admits(version, src, proto, sport)

    # ------------------------------------------------------------------ outbound

    def note_out(self, pkt: bytes, now: float) -> None:
        """A packet we send the peer: refresh its flow, or open one (module doc). Never drops anything."""
        if pkt[0] == 0x45 and len(pkt) >= 34 and pkt[9] == TCP and not pkt[6] & 0x1F and not pkt[7]:
            cell = self.out[TCP].get(pkt[12:24])   # IPv4 TCP without options, inline: one slice
            if cell is not None:
                cell[0] = now
            elif pkt[33] & 0x12 == 0x02:   # SYN without ACK: we open it
                self._open(pkt, _parse(pkt), now)
            return
        parsed = _parse(pkt)
        if parsed is None or parsed[5]:
            return   # not IP, or a later fragment (the first one carried the ports)
        version, off, proto, src, _, _ = parsed
        key = _key(pkt, parsed)
        if key is None:
            return
        cell = self.out[_group(proto)].get(key)
        if cell is not None:
            cell[0] = now
        elif proto == TCP:
            if len(pkt) >= off + 14 and pkt[off + 13] & 0x12 == 0x02:
                self._open(pkt, parsed, now)
        elif proto == ICMP or proto == ICMP6:
            if pkt[off] == (8 if proto == ICMP else 128):   # only echo requests open a flow
                self._open(pkt, parsed, now)
        else:
            sport = (pkt[off] << 8) | pkt[off + 1] if proto == UDP else 0
            seen = self.theirs.get(key)
            if self.admits(version, src, proto, sport):   # an answer the rules admit anyway needs no state
                self._answered(key, now)
            elif seen is not None and now - seen <= _TIMEOUT[proto]:
                self._answered(key, now)   # still the peer's while we keep sending on it
            else:
                self._open(pkt, parsed, now)

    def _answered(self, key: bytes, now: float) -> None:
        """Mark a flow whose peer side the rules admit as the peer's (the most recent last, bounded as flows)."""
        theirs = self.theirs
        if theirs.pop(key, None) is None and len(theirs) >= self.max_flows:
            del theirs[next(iter(theirs))]   # the one we answered longest ago
        theirs[key] = now

    def _open(self, pkt: bytes, parsed, now: float) -> None:
        group = _group(parsed[2])
        out, inn = self.out, self.inn
        if self.flow_count >= self.max_flows:
            if now >= self._next_sweep:
                self._next_sweep = now + SWEEP_INTERVAL
                for g, table in out.items():
                    limit = now - _TIMEOUT[g]
                    for cell in [c for c in table.values() if c[0] < limit]:
                        del table[cell[1]], inn[g][cell[2]]
            if self.flow_count >= self.max_flows:
                g = group if out[group] else max(out, key=lambda k: len(out[k]))
                cell = out[g][next(iter(out[g]))]   # the oldest opened
                del out[g][cell[1]], inn[g][cell[2]]
                self.counters["evict_acl_flow"] += 1
        cell = [now, _key(pkt, parsed), _reverse_key(pkt, parsed)]
        out[group][cell[1]] = inn[group][cell[2]] = cell
        self.counters["open_acl_flow"] += 1


def _source_routed(pkt: bytes, version: int, off: int) -> bool:
    """Whether the packet names further hops (IPv4 LSRR/SSRR, an IPv6 routing header with segments left): the
    destination we judge is then not its last (a forwarding node with accept_source_route or seg6 on follows it)."""
    if version == 4:
        i = 20
        while i < off:
            kind = pkt[i]
            if kind == 0:   # end of options
                return False
            if kind == 1:   # no-op
                i += 1
                continue
            if kind in _SOURCE_ROUTE_V4:
                return True
            if i + 1 >= off or pkt[i + 1] < 2:
                return True   # an option whose length cannot be read: cannot be judged either
            i += pkt[i + 1]
        return False
    nh, i = pkt[6], 40
    while i < off and (nh in _V6_EXT or nh == _FRAG6):
        if nh == 43 and pkt[i + 3]:   # _parse read these headers: they are in the packet
            return True
        nh, i = pkt[i], i + (8 if nh == _FRAG6 else (pkt[i + 1] + 1) * 8)
    return False


def _group(proto: int) -> int:
    return proto if proto == TCP or proto == UDP or proto == ICMP else ICMP if proto == ICMP6 else ANY


def _key(pkt: bytes, parsed) -> bytes | None:
    """A packet's flow key in its own direction (PeerFilter's layout); None when too short."""
    version, off, proto, _, _, _ = parsed
    addrs = pkt[12:20] if version == 4 else pkt[8:40]
    if proto == TCP or proto == UDP:
        return addrs + pkt[off:off + 4] if len(pkt) >= off + 4 else None
    if proto == ICMP or proto == ICMP6:
        return addrs + pkt[off + 4:off + 6] if len(pkt) >= off + 8 else None
    return bytes((proto,)) + addrs


def _reverse_key(pkt: bytes, parsed) -> bytes:
    """The key its reply will have (addresses and ports swapped; the same echo id). `pkt` passed _key."""
    version, off, proto, _, _, _ = parsed
    a, n = (12, 4) if version == 4 else (8, 16)
    addrs = pkt[a + n:a + 2 * n] + pkt[a:a + n]
    if proto == TCP or proto == UDP:
        return addrs + pkt[off + 2:off + 4] + pkt[off:off + 2]
    if proto == ICMP or proto == ICMP6:
        return addrs + pkt[off + 4:off + 6]
    return bytes((proto,)) + addrs


def _parse(pkt: bytes):
    """(version, L4 offset, proto, src int, dst int, later fragment) of an IP packet; None when too short or
    not IP. Length fields are not read: an ICMP error quotes a packet cut short."""
    n = len(pkt)
    if n < 1:
        return None
    version = pkt[0] >> 4
    if version == 4:
        off = (pkt[0] & 15) << 2
        if off < 20 or n < off:
            return None
        frag = ((pkt[6] & 0x1F) << 8) | pkt[7]
        return 4, off, pkt[9], int.from_bytes(pkt[12:16], "big"), int.from_bytes(pkt[16:20], "big"), frag != 0
    if version != 6 or n < 40:
        return None
    nh, off, later = pkt[6], 40, False
    for _ in range(4):
        if nh in _V6_EXT:
            if n < off + 8:
                return None
            nh, off = pkt[off], off + (pkt[off + 1] + 1) * 8
        elif nh == _FRAG6:
            if n < off + 8:
                return None
            later = (((pkt[off + 2] << 8) | pkt[off + 3]) >> 3) != 0
            nh, off = pkt[off], off + 8
        else:
            break
    if nh in _V6_EXT or nh == _FRAG6 or n < off:
        return None
    return 6, off, nh, int.from_bytes(pkt[8:24], "big"), int.from_bytes(pkt[24:40], "big"), later


# ---------------------------------------------------------------------- the status line

def summary(rules) -> str:
    """One short line of what an accept list admits: "all" (an any-protocol rule), "replies only" (none), else
    e.g. "tcp/22,443,8000-8100 udp/53 icmp", with " to CIDR,..." for destinations other than host addresses
    (subnet routes). None (no policy) is "all (no policy)"."""
    if rules is None:
        return "all (no policy)"
    rules = normalize(rules)
    if not rules:
        return "replies only"
    parts: list[str] = []
    if any(p == ANY for p, _, _, _ in rules):
        parts.append("all")
    ports: dict = {}
    for proto, lo, hi, _ in rules:
        if proto in (TCP, UDP):
            ports.setdefault(proto, []).append((lo, hi))
    for proto, name in ((TCP, "tcp"), (UDP, "udp")):
        if proto in ports:
            merged = _merge(ports[proto])
            text = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merged)
            parts.append(name if merged == ((0, 65535),) else f"{name}/{text}")
    if any(p == ICMP for p, _, _, _ in rules):
        parts.append("icmp")
    nets = sorted({str(n) for _, _, _, n in rules if n.prefixlen != n.max_prefixlen})
    return " ".join(parts) + (f" (to {','.join(nets)} too)" if nets else "")
