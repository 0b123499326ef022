"""Trio shell of the UDP listeners: the main ports (STUN + the UDP relay), the STUN-only alternate ports and the
plain-WireGuard port (phones with a stock WireGuard app, issue 12). Datagrams go to RelayCore and StunResponder;
this file reads and writes sockets, nothing else."""

from __future__ import annotations

import functools
import logging
import socket
import time

import trio

from meshwg.io.dataplane import udp
from meshwg.signaling import relay_wire as W
from signal_server import relay_fast
from signal_server.relay import ToPlain
from signal_server.stun_responder import WILDCARDS, StunResponder, StunSocket

log = logging.getLogger("signal")

FOLD_INTERVAL = 0.5  # seconds between folds of the compiled forwarder's counters (status, /metrics, tests); 2/s, not 20 (issue 15)


class RelayUdp:
    """The UDP sockets of `srv` (a SignalServer: relay core, counters, core for observed candidates)."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.counters = srv.counters
        self.socks: list[socket.socket] = []  # main ports: STUN + relay (relay dests index these)
        self.stun_socks: list[socket.socket] = []  # main then alternate ports, as the responder numbers them
        # Sockets on a wildcard address answer each node from the local address it wrote to (issue 17):
        # node (host, port) -> that address (meshwg.io.dataplane.udp, sticky source addresses).
        self.sources: dict[tuple, tuple] = {}
        self.sticky: set[socket.socket] = set()
        self.stun = StunResponder([])
        self.plain_sock: socket.socket | None = None
        # The compiled forwarder for the main ports (relay_fast), or None: every datagram through RelayCore.
        self.fast = relay_fast.FastRelay(srv.relay, self.socks, self.sources, self.sticky) \
            if relay_fast.available() else None

    def close(self) -> None:
        if self.fast is not None:
            self.fast.stop()  # the forwarding threads first: they use the sockets' descriptors
        for sock in self.stun_socks or self.socks:  # UDP sockets are ours; trio owns the TCP listeners
            sock.close()
        if self.plain_sock is not None:
            self.plain_sock.close()

    def bind_plain(self, nursery, addr) -> list:
        """The plain-WireGuard port (None: none); its bound address, as a list."""
        if addr is None:
            return []
        self.plain_sock = udp_socket(*addr)
        nursery.start_soon(self._recv_loop, 0, self.plain_sock, 512, 65535, self.on_plain)
        return [self.plain_sock.getsockname()[:2]]

    def on_plain(self, _idx: int, data: bytes, addr, now: float, _wall: float) -> None:
        for frame, dest in self.srv.relay.handle_plain_untrusted(data, addr, now):
            self.relay_send(frame, dest)

    def bind(self, nursery, addrs, alt_port) -> tuple[list, list]:
        """Binds the main ports and their alternates, starts their loops; (main, alternate) addresses."""
        for host, port in addrs:
            self.socks.append(udp_socket(host, port))
            nursery.start_soon(self._udp_loop, len(self.socks) - 1)
        if self.fast is not None and self.socks:
            nursery.start_soon(self._fold_loop)
        main = [s.getsockname()[:2] for s in self.socks]
        alts = self._bind_stun_alt(alt_port)
        self.stun_socks = self.socks + alts
        alt = [s.getsockname()[:2] for s in alts]
        self.stun = StunResponder([StunSocket(a, False) for a in main] + [StunSocket(a, True) for a in alt])
        for i in range(len(self.socks), len(self.stun_socks)):
            nursery.start_soon(self._stun_alt_loop, i)
        return main, alt

    def _bind_stun_alt(self, want) -> list[socket.socket]:
        """The alternate STUN port on every udp address: all or none, so that a client told an
        OTHER-ADDRESS can count on both changes (a missing socket would fake a filtering NAT)."""
        if want is None or not self.socks:
            return []
        socks: list[socket.socket] = []
        try:
            for sock in self.socks:
                host, port = sock.getsockname()[:2]
                alt = (port + 1 if port else 0) if want == "auto" else int(want)
                if alt > 65535:
                    raise OSError(f"no port above {port} for the alternate STUN port")
                socks.append(udp_socket(host, alt))
        except OSError as exc:
            for s in socks:
                s.close()
            if want != "auto":
                raise
            log.warning("no alternate STUN port (%s): NAT filtering tests (CHANGE-REQUEST) unavailable", exc)
            return []
        return socks

    async def _recv_loop(self, idx: int, sock, batch: int, bufsize: int, handle, after_batch=None) -> None:
        """Calls handle(idx, data, addr, now, wall) per datagram; the clocks are read once per batch.
        A wildcard socket (pktinfo on) remembers where each source wrote to, for send."""
        if udp.pktinfo_enabled(sock):
            self.sticky.add(sock)
            recvfrom = functools.partial(udp.recvfrom_sticky, sock, bufsize, self.sources)
        else:
            recvfrom = functools.partial(sock.recvfrom, bufsize)
        while True:
            await trio.lowlevel.wait_readable(sock)
            # Drain without paying the scheduler per datagram (README, "How it is built": hot path).
            now, wall = time.monotonic(), time.time()
            for _ in range(batch):
                try:
                    data, addr = recvfrom()
                except BlockingIOError:
                    break
                except OSError:
                    self.counters["udp_recv_errors"] += 1
                    continue
                handle(idx, data, addr[:2], now, wall)
            if after_batch is not None:
                after_batch()
            await trio.lowlevel.checkpoint()

    async def _udp_loop(self, idx: int) -> None:
        if self.fast is None:
            await self._recv_loop(idx, self.socks[idx], 512, 65535, self.on_udp, self.publish_observed)
        else:
            await self._fast_loop(idx, 512)

    async def _fast_loop(self, idx: int, batch: int) -> None:
        """The main port on the compiled forwarder: its worker thread forwards the SENDs of established
        sessions itself and leaves the rest here (woken through its eventfd), for on_udp with this batch's
        clocks. The table follows the core as it changes (relay_fast)."""
        sock, fast = self.socks[idx], self.fast
        if udp.pktinfo_enabled(sock):
            self.sticky.add(sock)
        worker = fast.start(sock)
        while True:
            await trio.lowlevel.wait_readable(worker.fd)
            rest = fast.take(worker, batch)
            if rest:
                now, wall = time.monotonic(), time.time()
                for data, addr in rest:
                    self.on_udp(idx, data, addr, now, wall)
                self.publish_observed()
            fast.fold_counters()
            await trio.lowlevel.checkpoint()

    async def _fold_loop(self) -> None:
        """The workers' counters into the core's, a few times a second (what they forward never wakes us)."""
        while True:
            await trio.sleep(FOLD_INTERVAL)
            self.fast.fold_counters()

    def fold_counters(self) -> None:
        """Now, for a reader of the counters (/metrics, status): the periodic fold may be up to FOLD_INTERVAL old."""
        if self.fast is not None:
            self.fast.fold_counters()

    async def _stun_alt_loop(self, idx: int) -> None:
        """An alternate STUN port: STUN only (the relay lives on the main ports)."""
        await self._recv_loop(idx, self.stun_socks[idx], 64, 2048,
                              lambda i, data, addr, now, _wall: self._on_stun(i, data, addr, now))

    def on_udp(self, idx: int, data: bytes, addr, now: float, wall: float) -> None:
        if W.is_relay_untrusted(data):
            for frame, dest in self.srv.relay.handle_untrusted(data, (idx, addr), now, wall, observed=addr):
                self.relay_send(frame, dest)
            return
        self._on_stun(idx, data, addr, now)

    def _on_stun(self, idx: int, data: bytes, addr, now: float) -> None:
        reply, counters = self.stun.handle_untrusted(idx, data, addr, now)
        for name in counters:
            self.counters[name] += 1
        if reply is not None:
            self._send(self.stun_socks[reply.sock], reply.data, addr)

    def publish_observed(self) -> None:
        """Relay sources seen in the batch become the nodes' "observed" candidates."""
        relay = self.srv.relay
        if relay.observed_events:
            self.srv.apply(self.srv.core.observed(relay.pop_observed()))

    def _send(self, sock, data: bytes, addr) -> None:
        try:
            udp.send_sticky(sock, [data], [], addr, self.sources if sock in self.sticky else None)
        except (BlockingIOError, OSError):
            self.counters["udp_send_errors"] += 1

    def relay_send_many(self, out: list) -> None:
        """(frame, destination) pairs, as relay_send takes them; the UDP ones in one batch per socket."""
        if self.fast is None or len(out) < 2:
            for frame, dest in out:
                self.relay_send(frame, dest)
            return
        by_sock: dict[int, list] = {}
        for frame, dest in out:
            if isinstance(dest, tuple):
                by_sock.setdefault(dest[0], []).append((frame, dest[1]))
            else:
                self.relay_send(frame, dest)
        for idx, items in by_sock.items():
            sock = self.socks[idx]
            for frame, addr in self.fast.send_batch(sock, items):
                self._send(sock, frame, addr)

    def relay_send(self, frame: bytes, dest) -> None:
        """A relay frame to its destination: (socket index, address) for UDP, a TCP connection's channel."""
        if isinstance(dest, tuple):
            idx, addr = dest
            self._send(self.socks[idx], frame, addr)
            return
        if isinstance(dest, ToPlain):
            if self.plain_sock is not None:
                self._send(self.plain_sock, frame, dest.addr)
            return
        try:
            dest.send_nowait(frame)
        except trio.WouldBlock:
            self.counters["relay_tcp_queue_full"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def udp_socket(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if host in WILDCARDS:
        udp.enable_pktinfo(sock)  # answer from the address each node wrote to (send)
    sock.bind((host, port))
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    return sock
