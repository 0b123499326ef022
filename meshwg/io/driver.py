"""The driver: feeds the sans-IO WireGuard core from the TUN and UDP shells and flushes its outputs.

Hot path. Each direction is one trio task that drains a non-blocking fd in batches (`read_batch`
until BlockingIOError or `batch` packets), hands the whole batch to the core with one `now`, flushes
the core's outputs, and only then awaits readability (or, after a full batch, just yields). So trio
is paid once per batch, and the TUN->UDP and UDP->TUN directions (plus the timer and control tasks)
interleave at batch granularity. The core's timer is one deadline: a task sleeps until
`core.get_timer()` and is re-armed by `flush()` whenever the deadline moves earlier.
`core.get_timer()` is O(peers), so the hot loops do not call it: every deadline the data path can
create lies at least 1 s ahead (keepalive 10 s, rekey 5 s, persistent keepalive >= 1 s), so the
timer task simply never sleeps longer than TIMER_MAX_SLEEP and re-reads the deadline on waking.

Control code (the UAPI server, the mesh layer) mutates the core directly from another task of the
same trio run (no locks needed: trio is single-threaded), then calls `await driver.flush()` so new
datagrams go out and the timer is re-armed.

Hooks for the mesh layer (one UDP socket per family carries WireGuard, STUN and discovery):

* `driver.on_other_datagram = fn(data: bytes, addr: tuple)`: datagrams that are not WireGuard
  messages (first byte 1-4 followed by three zero bytes) go to `fn` instead of the core. With no
  hook every datagram goes to the core, which drops and counts what it cannot parse.
* `driver.send_raw(data, addr) -> bool`: send a non-WireGuard datagram (STUN, disco) from the same
  socket, so it uses the same NAT mapping. False if the socket buffer is full (dropped).
* `driver.endpoint_sender = fn(data: bytes, endpoint)`: core datagrams whose endpoint is not an
  `(ip, port)` tuple (e.g. a relay endpoint object) are passed to `fn`, which must not block
  (queue and send from its own task if needed). With no sender they are dropped and counted.
* `driver.on_event = fn(event)`: the core's events (HandshakeCompleted, ...) after each flush.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import trio

from meshwg.io.tun import Tun, TunClosed
from meshwg.io.udp import UdpBind, recv_batch

DEFAULT_BATCH = 64
TIMER_MAX_SLEEP = 1.0


def is_wireguard_datagram(data: bytes) -> bool:
    """WireGuard message types 1-4 carry three reserved zero bytes after the type."""
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\0\0\0"


class Driver:
    def __init__(self, core, tun: Tun, udp: UdpBind, *, clock: Callable[[], float] = time.monotonic,
                 batch: int = DEFAULT_BATCH):
        self.core = core
        self.tun = tun
        self.udp = udp
        self.clock = clock
        self.batch = batch
        self.on_other_datagram: Callable[[bytes, tuple], None] | None = None
        self.endpoint_sender: Callable[[bytes, object], None] | None = None
        self.on_event: Callable[[object], None] | None = None
        self.stats: Counter = Counter()
        self.stopped_reason: str | None = None
        self._timer_scope = trio.CancelScope()
        self._timer_deadline = math.inf
        self._udp_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or the TUN disappears. Does not close the shells (their owner does)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self._tun_loop)
                await nursery.start(self._udp_loops)
                task_status.started()
        finally:
            self._nursery = None

    def stop(self, reason: str = "stopped") -> None:
        if self.stopped_reason is None:
            self.stopped_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def rebind(self, port: int, fwmark: int | None = None) -> None:
        """Move the UDP sockets to `port` (0 = any). Raises OSError and keeps the old ones on failure."""
        fwmark = self.udp.fwmark if fwmark is None else fwmark
        if self.udp.sockets and port == self.udp.port:
            if fwmark != self.udp.fwmark:
                self.udp.set_fwmark(fwmark)
            return
        old = self.udp.sockets
        self.udp.open(port, fwmark, close_old=False)
        if self._udp_scope is not None:
            self._udp_scope.cancel()
        for sock in old:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        if self._nursery is not None:
            await self._nursery.start(self._udp_loops)

    # ---- output path -----------------------------------------------------------------------
    async def flush(self) -> None:
        """For control code: send/write everything the core produced; re-arm the timer if its
        deadline moved earlier."""
        await self._flush_io()
        if self.core.get_timer() < self._timer_deadline:
            self._timer_scope.cancel()

    async def _flush_io(self) -> None:
        core = self.core
        datagrams = core.datagrams_to_send()
        if datagrams:
            start = self._send_datagrams(datagrams, 0)
            while start < len(datagrams):
                # Socket buffer full: wait for room rather than drop (TCP inside would see loss).
                sock = self._socket_for(datagrams[start][1])
                await trio.lowlevel.wait_writable(sock)
                start = self._send_datagrams(datagrams, start)
        packets = core.tun_packets_to_write()
        if packets:
            try:
                self.tun.write_batch(packets)
            except TunClosed:
                self.stop("tun closed")
        events = core.pop_events()
        if events and self.on_event is not None:
            for event in events:
                self.on_event(event)

    def _socket_for(self, addr):
        return self.udp.v6 if ":" in addr[0] else self.udp.v4

    def _send_datagrams(self, datagrams: list, start: int) -> int:
        """Send from index `start`; return the index of the first datagram that would block."""
        v4, v6 = self.udp.v4, self.udp.v6
        for i in range(start, len(datagrams)):
            data, addr = datagrams[i]
            if type(addr) is tuple:
                sock = v6 if ":" in addr[0] else v4
                if sock is None:
                    self.stats["send_no_socket"] += 1
                    continue
                try:
                    sock.sendto(data, addr)
                except BlockingIOError:
                    return i
                except OSError:
                    # Unreachable network, firewall EPERM, ...: the packet is lost, as on a wire.
                    self.stats["send_error"] += 1
            elif self.endpoint_sender is not None:
                self.endpoint_sender(data, addr)
            else:
                self.stats["send_no_sender"] += 1
        return len(datagrams)

    def send_raw(self, data: bytes, addr: tuple) -> bool:
        """Send a non-WireGuard datagram from the shared socket. False if dropped."""
        sock = self._socket_for(addr)
        if sock is None:
            return False
        try:
            sock.sendto(data, addr)
            return True
        except OSError:
            self.stats["send_raw_error"] += 1
            return False

    # ---- input loops -----------------------------------------------------------------------
    async def _tun_loop(self) -> None:
        tun, core, batch, clock = self.tun, self.core, self.batch, self.clock
        send_ip_packet = core.send_ip_packet
        while True:
            try:
                packets = tun.read_batch(batch)
            except TunClosed:
                self.stop("tun closed")
                return
            if packets:
                now = clock()
                for pkt in packets:
                    send_ip_packet(pkt, now)
                await self._flush_io()
            if len(packets) < batch:
                await trio.lowlevel.wait_readable(tun.fd)
            else:
                await trio.lowlevel.checkpoint()

    async def _udp_loops(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._udp_scope = scope
            async with trio.open_nursery() as nursery:
                for sock in self.udp.sockets:
                    nursery.start_soon(self._udp_loop, sock)
                task_status.started()

    async def _udp_loop(self, sock) -> None:
        core, batch, clock = self.core, self.batch, self.clock
        receive = core.receive_datagram
        while True:
            datagrams = recv_batch(sock, batch)
            if datagrams:
                now = clock()
                other = self.on_other_datagram
                if other is None:
                    for data, addr in datagrams:
                        receive(data, addr, now)
                else:
                    for data, addr in datagrams:
                        if len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\0\0\0":
                            receive(data, addr, now)
                        else:
                            other(data, addr)
                await self._flush_io()
            if len(datagrams) < batch:
                await trio.lowlevel.wait_readable(sock)
            else:
                await trio.lowlevel.checkpoint()

    async def _timer_loop(self) -> None:
        core, clock = self.core, self.clock
        while True:
            deadline = core.get_timer()
            now = clock()
            fired = False
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._timer_deadline = deadline
                if deadline > now + TIMER_MAX_SLEEP:
                    await trio.sleep(TIMER_MAX_SLEEP)
                else:
                    await trio.sleep(max(0.0, deadline - now))
                    fired = True
            # Outside the scope: a re-arm must not interrupt a flush half-way.
            self._timer_deadline = -math.inf
            if fired:
                core.handle_timer(clock())
                await self._flush_io()
