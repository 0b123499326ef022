"""UDP shell: one non-blocking socket per address family (IPv4, and IPv6 with V6ONLY) on one port.

Addresses handed out are plain `(host, port)` tuples for both families, the endpoint form the core
uses. `rebind(port)` opens the new sockets before closing the old ones so a failed rebind leaves
the device as it was (wg-go does the same for `listen_port`).
"""

from __future__ import annotations

import errno
import socket

SO_MARK = getattr(socket, "SO_MARK", 36)
# Big kernel buffers absorb bursts while the (single-threaded) driver is busy with the other direction.
BUFFER_BYTES = 4 * 1024 * 1024
RECV_SIZE = 65535


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
        self.send_errors = 0

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def open(self, port: int = 0, fwmark: int = 0, *, close_old: bool = True) -> None:
        """Bind both families to `port` (0 = any free port shared by both). Raises OSError(EADDRINUSE)
        and keeps the current sockets. With close_old=False the caller closes the previous sockets."""
        old = self.sockets
        if port and port == self.port and old:
            # Rebinding to our own port would collide with ourselves: close first.
            for sock in old:
                sock.close()
            old = []
        v4, v6 = self._bind_pair(port, fwmark)
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

    def set_fwmark(self, fwmark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        self.fwmark = fwmark

    def socket_for(self, host: str) -> socket.socket | None:
        return self.v6 if ":" in host else self.v4

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.v4 = self.v6 = None


def recv_batch(sock: socket.socket, limit: int) -> list[tuple[bytes, tuple]]:
    """Up to `limit` datagrams as (data, (host, port)); empty when the socket would block."""
    out = []
    recvfrom = sock.recvfrom
    v6 = sock.family == socket.AF_INET6
    try:
        for _ in range(limit):
            data, addr = recvfrom(RECV_SIZE)
            out.append((data, (addr[0], addr[1]) if v6 else addr))
    except BlockingIOError:
        pass
    except OSError as err:
        # ICMP errors surface as ECONNREFUSED etc. on the next recv; they are not ours to act on.
        if err.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE):
            raise
    return out
