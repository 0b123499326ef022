"""UDP shell: one non-blocking socket per address family (IPv4, and IPv6 with V6ONLY) on one port.

Addresses handed out are plain `(host, port)` tuples for both families, the endpoint form the core
uses. `rebind(port)` opens the new sockets before closing the old ones so a failed rebind leaves
the device as it was (wg-go does the same for `listen_port`).

Sticky source addresses. A host with several addresses (a static and a DHCP one, a floating IP,
IPv6 temporary and stable ones) must answer a peer from the address the peer wrote to: from another
one, the peer's NAT or firewall drops the answer, or the peer roams to it. The sockets ask for
IP_PKTINFO / IPV6_RECVPKTINFO, and `UdpBind.sources` maps each remote (host, port) to the local
address its last datagram arrived at: (local host, ifindex, (level, type, pktinfo)), the last item
ready for sendmsg. Sends to that endpoint carry it (`send_sticky`, and the compiled drain). When the
address is gone (removed: EINVAL, EADDRNOTAVAIL or ENETUNREACH on send) the entry is forgotten and
the datagram goes once more from the kernel's choice. The core keeps plain (host, port) endpoints.
The map is bounded (MAX_SOURCES, then cleared): spoofed sources cannot grow it, and a peer still
talking puts its entry back with its next datagram. Kernel WireGuard and wireguard-go take the source
from authenticated packets only; here the entry follows any datagram from the endpoint (the shell does
not know which ones the core accepted), so a forged datagram carrying a peer's own address and port,
sent to another of our addresses, moves our answers there until the peer's next datagram.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from meshwg.io.dataplane.fastio import fastio

SO_MARK = getattr(socket, "SO_MARK", 36)
# Linux UDP offloads (not named by Python 3.11's socket module). GSO: one sendmsg carries up to
# GSO_MAX_SEGMENTS equal-sized datagrams; GRO: one recvmsg returns several, with their size in a cmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000  # under the 65507-byte UDP payload limit of one (super) datagram
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo, the larger of the two
# Room for the GRO size, the pktinfo and other cmsgs the kernel may add (SO_RXQ_OVFL's drop count once
# the socket has dropped anything, as the socket filter does): with room for only one, the GRO size was
# cut off and a coalesced read taken for one huge datagram.
_GRO_CMSG_SPACE = 4 * socket.CMSG_SPACE(4) + _PKTINFO_SPACE
# Sticky source map entries at most (the compiled drain has the same bound, _fastio.MAX_SOURCES).
MAX_SOURCES = 4096
# Send errors that mean the remembered source address is gone: forget it, let the kernel choose.
SOURCE_GONE = (errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH)
# MESHWG_UDP_OFFLOAD=0 turns GSO and GRO off (diagnosis, or kernels that misbehave).
OFFLOAD = os.environ.get("MESHWG_UDP_OFFLOAD", "1") != "0"
# Big kernel buffers absorb bursts while the (single-threaded) driver is busy with the other direction.
BUFFER_BYTES = 4 * 1024 * 1024
RECV_SIZE = 65535
# getsockopt(SO_MEMINFO) -> u32[9]; the last is sk_drops: datagrams the kernel dropped for this socket
# (refused by its filter, or no room in the receive buffer).
SO_MEMINFO = 55
_SK_MEMINFO_DROPS = 8


def socket_drops(sock: socket.socket) -> int:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (_SK_MEMINFO_DROPS + 1))
    except OSError:
        return 0
    return int.from_bytes(raw[4 * _SK_MEMINFO_DROPS:4 * (_SK_MEMINFO_DROPS + 1)], sys.byteorder)


def _open_socket(family: int, port: int, fwmark: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_BYTES)
            try:
                # SO_*BUFFORCE ignores rmem_max/wmem_max; only root may use it.
                sock.setsockopt(socket.SOL_SOCKET, opt + 32, BUFFER_BYTES)
            except OSError:
                pass
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        if OFFLOAD:
            try:
                # Coalesced receive (kernel >= 5.0); recv_batch splits. Older kernels: plain datagrams.
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError:
                pass
        enable_pktinfo(sock)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _ipv6_available() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False


class UdpBind:
    """The device's UDP sockets. `sockets` lists the open ones (1 or 2)."""

    def __init__(self) -> None:
        self.v4: socket.socket | None = None
        self.v6: socket.socket | None = None
        self.port = 0
        self.fwmark = 0
        self._retired_drops = 0  # kernel drops of sockets replaced or closed
        # remote (host, port) -> (local host, ifindex, (level, type, pktinfo)): see the module docstring.
        # Kept across rebinds: the local addresses stay ours whichever port we listen on.
        self.sources: dict[tuple, tuple] = {}

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def open(self, port: int = 0, fwmark: int = 0, *, close_old: bool = True) -> None:
        """Bind both families to `port` (0 = any free port shared by both). Raises OSError(EADDRINUSE)
        and keeps the current sockets. With close_old=False the caller closes the previous sockets."""
        old = self.sockets
        if port and port == self.port and old:
            # Rebinding to our own port would collide with ourselves: close first.
            self._retire(old)
            for sock in old:
                sock.close()
            old = []
        v4, v6 = self._bind_pair(port, fwmark)
        self._retire(old)
        self.v4, self.v6 = v4, v6
        self.port = (v4 or v6).getsockname()[1]
        self.fwmark = fwmark
        if close_old:
            for sock in old:
                sock.close()

    def _bind_pair(self, port: int, fwmark: int):
        want_v6 = _ipv6_available()
        attempts = 10 if port == 0 else 1
        last: OSError | None = None
        for _ in range(attempts):
            v4 = _open_socket(socket.AF_INET, port, fwmark)
            if not want_v6:
                return v4, None
            try:
                v6 = _open_socket(socket.AF_INET6, v4.getsockname()[1], fwmark)
                return v4, v6
            except OSError as err:
                v4.close()
                last = err
                if err.errno != errno.EADDRINUSE:
                    raise
        assert last is not None
        raise last

    def _retire(self, sockets: list[socket.socket]) -> None:
        """Keep the kernel's drop counts of sockets about to be replaced or closed."""
        self._retired_drops += sum(socket_drops(sock) for sock in sockets)

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on our sockets (socket filter, full buffer), since the first open."""
        return self._retired_drops + sum(socket_drops(sock) for sock in self.sockets)

    def set_fwmark(self, fwmark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        self.fwmark = fwmark

    def socket_for(self, host: str) -> socket.socket | None:
        return self.v6 if ":" in host else self.v4

    def close(self) -> None:
        self._retire(self.sockets)
        for sock in self.sockets:
            sock.close()
        self.v4 = self.v6 = None


# ICMP errors surface as ECONNREFUSED etc. on the next recv; they are not ours to act on.
_PASSING_RECV_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE)


class RelayRoute:
    """The node relay's compiled path (meshwg/io/dataplane/_fastio.c, "The node's relay path"): the driver's
    batched send frames datagrams for relay endpoints with the SEND header in `headers`, and its batched
    receive splits the relay's RECV frames of transport data from peers in `endpoints`. The relay shell owns
    the three dicts and says where the relay is and until when its session holds (`set`)."""

    def __init__(self, endpoint_type: type, headers: dict, endpoints: dict, tx_counts: dict) -> None:
        self.capsule = fastio.node_relay_new(endpoint_type, headers, endpoints, tx_counts)
        self.addr: tuple | None = None

    def set(self, addr: tuple | None, until: float) -> None:
        """Frame sends to `addr` while the caller's clock is below `until`; None: off."""
        ok = fastio.node_relay_set(self.capsule, addr, until)
        self.addr = addr if ok else None

    def counters(self) -> dict:
        sent, received, errors, gso_refused = fastio.node_relay_counters(self.capsule)
        return {"send_udp_fast": sent, "recv_udp_fast": received, "drop_send_udp_fast_error": errors,
                "disable_relay_gso_size": gso_refused}


def new_relay_route(endpoint_type: type, headers: dict, endpoints: dict, tx_counts: dict) -> RelayRoute | None:
    """A RelayRoute, or None without the compiled drain (the relay shell's Python path then does it all)."""
    return None if fastio is None else RelayRoute(endpoint_type, headers, endpoints, tx_counts)


def recv_batch(sock: socket.socket, limit: int, v6: bool | None = None,
               sources: dict | None = None, relay: RelayRoute | None = None) -> list[tuple[bytes, tuple]]:
    """Up to `limit` datagrams as (data, (host, port)); empty when the socket would block. On a socket
    with UDP_GRO on, a coalesced read is split back into its datagrams (equal-sized segments, the last
    one possibly shorter). A link-local IPv6 source keeps its scope in the host ("fe80::1%eth0"), the
    form sendto needs to answer it. An error after some datagrams were read returns those (the error
    comes back on the next call). `v6` saves the (slow, enum-building) `sock.family` lookup.
    With `sources` (UdpBind.sources), each source's entry becomes the local address it wrote to.
    With a `relay` route, the relay's RECV frames of transport data come as (inner datagram, endpoint)."""
    if fastio is not None:
        if relay is not None:
            return fastio.recv_datagrams(sock.fileno(), limit, sources, relay.capsule)
        return fastio.recv_datagrams(sock.fileno(), limit, sources)
    out: list[tuple[bytes, tuple]] = []
    recvmsg = sock.recvmsg
    if v6 is None:
        v6 = sock.family == socket.AF_INET6
    try:
        while len(out) < limit:
            data, anc, _flags, addr = recvmsg(RECV_SIZE, _GRO_CMSG_SPACE)
            if v6:
                addr = (f"{addr[0]}%{socket.if_indextoname(addr[3])}" if addr[3] else addr[0], addr[1])
            size = 0
            for level, kind, raw in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    size = int.from_bytes(raw[:4], sys.byteorder)
                elif sources is not None:
                    remember_source(sources, addr, level, kind, raw)
            if 0 < size < len(data):
                out += [(data[i:i + size], addr) for i in range(0, len(data), size)]
            else:
                out.append((data, addr))
    except BlockingIOError:
        pass
    except OSError as err:
        if err.errno not in _PASSING_RECV_ERRORS and not out:
            raise
    return out


# ---- sticky source addresses (see the module docstring) ----------------------------------------

def enable_pktinfo(sock: socket.socket) -> None:
    """Ask the kernel for the local address every datagram arrives at (IP_PKTINFO / IPV6_RECVPKTINFO)."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    except OSError:
        pass  # then no entries: the kernel chooses every source, as before


def pktinfo_enabled(sock: socket.socket) -> bool:
    try:
        if sock.family == socket.AF_INET6:
            return bool(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO))
        return bool(sock.getsockopt(socket.IPPROTO_IP, IP_PKTINFO))
    except OSError:
        return False


# Entries by the pktinfo they came from: one object per local address, so the steady state of
# remember_source is a lookup and an identity check (and the map holds few distinct values).
_SOURCE_VALUES: dict[bytes, tuple] = {}
_SOURCE_VALUES_MAX = 256


def _source_value(level: int, kind: int, raw: bytes) -> tuple | None:
    value = _SOURCE_VALUES.get(raw)
    if value is not None:
        return value
    if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(raw) >= 12:
        # struct in_pktinfo {ifindex, spec_dst, addr}: send from the address alone (spec_dst). A forced
        # interface would bypass the routing table (source-based policy routing included); kernel
        # WireGuard sends from the address alone too (as _fastio.c does).
        ifindex, local = int.from_bytes(raw[:4], sys.byteorder), raw[4:8]
        value = (socket.inet_ntop(socket.AF_INET, local), ifindex,
                 (socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + local + bytes(4)))
    elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(raw) >= 20:
        # struct in6_pktinfo {addr, ifindex}: the interface only where it is the address's scope.
        local, ifindex = raw[:16], int.from_bytes(raw[16:20], sys.byteorder)
        link_local = local[0] == 0xFE and local[1] & 0xC0 == 0x80
        value = (socket.inet_ntop(socket.AF_INET6, local), ifindex,
                 (socket.IPPROTO_IPV6, IPV6_PKTINFO, local + (raw[16:20] if link_local else bytes(4))))
    else:
        return None
    if len(_SOURCE_VALUES) >= _SOURCE_VALUES_MAX:
        _SOURCE_VALUES.clear()
    _SOURCE_VALUES[bytes(raw)] = value
    return value


def remember_source(sources: dict, addr: tuple, level: int, kind: int, raw: bytes) -> None:
    """sources[addr] = the local address a datagram from `addr` arrived at (from its pktinfo cmsg)."""
    value = _source_value(level, kind, raw)
    if value is None or sources.get(addr) is value:
        return
    if addr not in sources and len(sources) >= MAX_SOURCES:
        sources.clear()  # bounded: peers still talking put theirs back with their next datagram
    sources[addr] = value


def send_sticky(sock: socket.socket, buffers: list, cmsgs: list, addr: tuple, sources: dict | None) -> None:
    """sock.sendmsg(buffers, cmsgs, 0, addr), from the local address `addr` last wrote to when
    `sources` has one. If that address is gone, forget it and send once more from the kernel's choice.
    Raises what sendmsg raises (BlockingIOError included)."""
    source = sources.get(addr) if sources else None
    if source is not None:
        try:
            sock.sendmsg(buffers, [*cmsgs, source[2]], 0, addr)
            return
        except OSError as err:
            if err.errno not in SOURCE_GONE:
                raise
            if sources.get(addr) is source:
                del sources[addr]
    if len(buffers) == 1 and not cmsgs:
        sock.sendto(buffers[0], addr)
    else:
        sock.sendmsg(buffers, cmsgs, 0, addr)


def recvfrom_sticky(sock: socket.socket, bufsize: int, sources: dict) -> tuple[bytes, tuple]:
    """sock.recvfrom for a socket with pktinfo on (enable_pktinfo): also remembers, in `sources`, the
    local address the datagram arrived at, under its (host, port)."""
    data, anc, _flags, addr = sock.recvmsg(bufsize, _PKTINFO_SPACE)
    addr = addr[:2]
    for level, kind, raw in anc:
        remember_source(sources, addr, level, kind, raw)
    return data, addr
