"""UDP shell: one non-blocking socket per address family (IPv4, and IPv6 with V6ONLY) on one port.

Addresses handed out are plain `(host, port)` tuples for both families, the endpoint form the core
uses. `rebind(port)` opens the new sockets before closing the old ones so a failed rebind leaves
the device as it was (wg-go does the same for `listen_port`).
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from meshwg.io.fastio import fastio

SO_MARK = getattr(socket, "SO_MARK", 36)
# Linux UDP offloads (not named by Python 3.11's socket module). GSO: one sendmsg carries up to
# GSO_MAX_SEGMENTS equal-sized datagrams; GRO: one recvmsg returns several, with their size in a cmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000  # under the 65507-byte UDP payload limit of one (super) datagram
# Room for the GRO size and other cmsgs the kernel may add (SO_RXQ_OVFL's drop count once the socket
# has dropped anything, as the socket filter does): with room for only one, the GRO size was cut off
# and a coalesced read taken for one huge datagram.
_GRO_CMSG_SPACE = 4 * socket.CMSG_SPACE(4)
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


def recv_batch(sock: socket.socket, limit: int, v6: bool | None = None) -> list[tuple[bytes, tuple]]:
    """Up to `limit` datagrams as (data, (host, port)); empty when the socket would block. On a socket
    with UDP_GRO on, a coalesced read is split back into its datagrams (equal-sized segments, the last
    one possibly shorter). A link-local IPv6 source keeps its scope in the host ("fe80::1%eth0"), the
    form sendto needs to answer it. An error after some datagrams were read returns those (the error
    comes back on the next call). `v6` saves the (slow, enum-building) `sock.family` lookup."""
    if fastio is not None:
        return fastio.recv_datagrams(sock.fileno(), limit)
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
