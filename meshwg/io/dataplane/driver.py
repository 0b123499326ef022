"""The driver: feeds the sans-IO WireGuard core from the TUN and UDP shells and flushes its outputs.

Hot path. One trio task moves both directions. It keeps a private epoll set of the TUN and UDP fds;
each round asks it which are ready (poll(0)), drains those in batches (up to `batch` packets per
fd), hands each batch to the core with one `now` and flushes the core's outputs. It yields after
about `batch` packets so control tasks stay responsive, and when nothing is ready it waits: for
trio, on the epoll set's fd (one wait for all fds), or, in the idle fast path with trio's real
clock, by blocking on our fds plus trio's own epoll fd once every other task is blocked, so a lone
packet (a ping) is handled straight from the kernel without a scheduler round trip first. The
syscalls and the transport AEAD run in compiled code where it was built (meshwg.hotpath).
Kernel offloads: transport datagrams to one endpoint with one size leave as one UDP GSO sendmsg,
and the sockets have UDP_GRO on (udp.recv_batch splits coalesced reads). Every datagram, WireGuard
or not, leaves from the local address its endpoint last wrote to (`udp.sources`, filled by the
drain; see meshwg.io.dataplane.udp, sticky source addresses). The core's timer is one
deadline: a task sleeps until
`core.get_timer()` and is re-armed by `flush()` whenever the deadline moves earlier.
`core.get_timer()` is O(peers), so the hot loop does not call it: every deadline the core's data path
can create lies at least 1 s ahead (keepalive 10 s, rekey 5 s, persistent keepalive >= 1 s), so while
packets flow the timer task never sleeps longer than TIMER_MAX_SLEEP and re-reads the deadline on waking.
When no packet was handled since it last read the deadline, it sleeps until the deadline itself (an idle
device is not woken every second, issue 15), and the next packet batch's flush_io() re-arms it in O(1).
A core that can create a nearer deadline from a packet (the mesh node: a handshake re-send deferred
to its 0.25 s rate floor) calls its `on_earlier_deadline` hook, which the driver sets when it starts
to re-arm the timer, in O(1). Per-packet callers outside the loop (the relay's TCP reader) use `flush_io()`.

What the driver calls on its core is one typed contract, meshwg.wg.driven.DrivenCore (docs/core-api.md,
"What the driver calls"): WireGuardCore and MeshNode implement every member, and the driver calls them
unconditionally, probing for nothing.

Control code (the UAPI server, the mesh layer) mutates the core directly from another task of the
same trio run (no locks needed: trio is single-threaded), then calls `await driver.flush()` so new
datagrams go out and the timer is re-armed.

Hooks for the mesh layer (one UDP socket per family carries WireGuard, STUN and discovery):

* A kernel filter on the sockets (meshwg.io.dataplane.socket_filter) drops what no hook or the core would
  accept, and WireGuard messages naming receiver indices the core never issued (`index_tag`).
* `driver.set_datagram_handlers({kind: fn(data: bytes, addr: tuple, now: float)})`, kinds from
  meshwg.mesh.demux: each datagram is classified once, by `demux.dispatch`, and goes to its kind's
  handler, which does not test the bytes for their kind again. WireGuard ones go to the core's
  `receive_wireguard` (unless a handler is given for demux.WIREGUARD); a kind with no handler is
  dropped and counted here (`drop_<kind>_datagram`). With no handlers at all (the plain device) every
  datagram goes to the core's `receive_datagram`, which drops and counts what it cannot parse.
* `driver.send_raw(data, addr) -> bool`: send a non-WireGuard datagram (STUN, disco) from the same
  socket, so it uses the same NAT mapping. False if the socket buffer is full (dropped).
* `driver.endpoint_sender = fn(data: bytes, endpoint)`: core datagrams whose endpoint is not an
  `(ip, port)` tuple (e.g. a relay endpoint object) are passed to `fn`, which must not block
  (queue and send from its own task if needed). With no sender they are dropped and counted.
* `driver.relay_route`: a meshwg.io.dataplane.udp.RelayRoute (the relay shell's) or None: datagrams to relay
  endpoints it has a header for leave framed from the compiled send, and the relay's RECV frames of transport
  data come out of the compiled drain as (inner datagram, the peer's endpoint), to the WireGuard handler
  with the direct datagrams of the same batch.
* `driver.watch_relay_tcp(fd, tail, on_frames, on_closed)`: the TCP relay's socket read by the data loop (with a
  relay_route), as the UDP sockets are: its RECVs of transport data from known peers split in C
  (fastio.node_relay_split_tcp) and handed to the WireGuard handler in one batch, no trio task hop; every other
  frame to `on_frames(frames, fast_count, now)` (the relay shell); EOF or an error to `on_closed(exc)` (the
  socket is unwatched first). `unwatch_relay_tcp()` before the socket closes.
* `driver.relay_tcp_writer`: the relay shell (or None): its `tcp_fast_target()` -> (fd, headers) or None says
  when relayed datagrams may leave as SEND frames written straight to the TCP relay's socket by the compiled send
  (fastio.node_relay_send_tcp, one writev a batch; only what it has a header for), `tcp_fast_sent(count, rest)`
  takes what went and what the kernel left (its backlog); the rest goes to `endpoint_sender` as before.
* `driver.on_event = fn(event)`: the core's events (HandshakeCompleted, ...) after each flush.
* `driver.clock`: the one clock of the device; the mesh shell reads it too (handlers get its `now`).
* `driver.counters`: meshwg.counters' convention (`drop_send_error`, `disable_gso`, ...).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable

import trio
import trio.testing

from meshwg import hotpath
from meshwg.io.dataplane import socket_filter
from meshwg.io.dataplane.fastio import fastio
from meshwg.io.dataplane.tun import Tun, TunClosed
from meshwg.io.dataplane.udp import OFFLOAD as udp_offload
from meshwg.io.dataplane.udp import (GSO_MAX_BYTES, GSO_MAX_SEGMENTS, SOL_UDP, UDP_SEGMENT, RelayRoute, UdpBind,
                                     recv_batch, send_sticky)
from meshwg.mesh import demux
from meshwg.wg.driven import DrivenCore

log = logging.getLogger(__name__)
DEFAULT_BATCH = 64
# A round that moved at most this many packets is a latency round (a ping, a keystroke), not bulk.
LATENCY_ROUND_MAX = 2
TIMER_MAX_SLEEP = 1.0
# Longest real-time block in the idle fast path (trio's deadlines cut it shorter; anything of trio's, a thread's
# result or a signal, wakes it through trio's epoll fd): a safety net only, long so an idle process sleeps.
IDLE_BLOCK_MAX = 30.0
# trio rounds any positive idle cushion up to a 1 ms epoll timeout, which would delay packets.
# (A task that calls wait_all_tasks_blocked() itself may then share our wake-up and wait until
# the next packet or deadline; tests should prefer real events.)
IDLE_CUSHION = 0.0
RELAY_TCP_READ = 65536  # one read of the TCP relay's stream per round (about 45 full-size frames)
_GSO_UNSUPPORTED = (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


class _TrioIdle:
    """What the idle fast path needs of the running trio: its epoll fd, whether any task or
    callback is waiting to run, and the time to its next deadline.

    Private trio details, read directly because trio.lowlevel.current_statistics() builds a record
    and walks every registered fd (3.5 us warm, far more cold), and the check runs on every idle
    transition, after a ping's answer went out but before the process sleeps, while a peer
    process woken on this CPU may be waiting for it. `probe()` returns None on anything unexpected
    and the driver falls back to plain `wait_readable`."""

    __slots__ = ("epoll_fd", "runq", "entry_queue", "deadlines", "clock")

    @classmethod
    def probe(cls) -> _TrioIdle | None:
        try:
            clock = trio.lowlevel.current_clock()
            if type(clock).__name__ != "SystemClock":
                return None  # a MockClock's virtual time cannot bound a real blocking poll
            from trio._core._run import GLOBAL_RUN_CONTEXT
            runner = GLOBAL_RUN_CONTEXT.runner
            idle = cls()
            idle.epoll_fd = runner.io_manager._epoll.fileno()
            idle.runq, idle.entry_queue, idle.deadlines, idle.clock = (
                runner.runq, runner.entry_queue, runner.deadlines, clock)
            idle.busy()
            idle.seconds_to_deadline()
            return idle
        except Exception:
            return None

    def busy(self) -> bool:
        return bool(self.runq) or self.entry_queue.size() > 0

    def seconds_to_deadline(self) -> float:
        return self.deadlines.next_deadline() - self.clock.current_time()


_warned_pure_python = False


def _warn_once_about_pure_python() -> None:
    global _warned_pure_python
    if not _warned_pure_python and (missing := hotpath.missing_compiled()):
        _warned_pure_python = True
        log.warning("hot path in pure Python (%s not in use; see setup.py): higher per-packet latency",
                    ", ".join(missing))


class Driver:
    def __init__(self, core: DrivenCore, tun: Tun, udp: UdpBind, *, clock: Callable[[], float] = time.monotonic,
                 batch: int = DEFAULT_BATCH, index_tag: int | None = None):
        """`core` is a WireGuardCore or what wraps one (the mesh node); `index_tag` is the core's, for
        the socket filter (None: every receiver index passes). The driver touches only the core's
        DrivenCore members, and only once it runs."""
        self.core = core
        self.index_tag = index_tag
        self.tun = tun
        self.udp = udp
        self.clock = clock
        self.batch = batch
        self._handlers: dict[str, Callable[[bytes, tuple, float], None]] = {}
        self._dispatch_table: dict | None = None  # kind -> handler, every kind; None: all to the core
        self._receive_wireguard: Callable | None = None  # the core's, bound once per run
        self.endpoint_sender: Callable[[bytes, object], None] | None = None
        self.relay_route: RelayRoute | None = None
        self.relay_tcp_writer = None  # the relay shell: see the module docstring
        self.on_event: Callable[[object], None] | None = None
        self.counters: Counter = Counter()
        self.stopped_reason: str | None = None
        self.stopped = trio.Event()  # set by stop(): the owner waits on it instead of polling
        self._timer_scope = trio.CancelScope()
        self._timer_deadline = math.inf
        self._timer_long = False  # the timer task sleeps past TIMER_MAX_SLEEP: the next packet re-arms it
        self._packets_since_arm = False  # flush_io() ran since the timer task last read the deadline
        self._nursery: trio.Nursery | None = None
        # The data path waits on one epoll set holding the TUN and the UDP sockets.
        self._epoll: select.epoll | None = None
        self._udp_by_fd: dict[int, tuple] = {}  # fd -> (socket, is_ipv6)
        # Same fds plus trio's own epoll fd: the idle fast path blocks on it directly.
        self._block_epoll: select.epoll | None = None
        self._trio_idle: _TrioIdle | None = None
        self.idle_fast_path = True
        self._gso_ok: dict[int, bool] = {}
        self._flush_waited = False
        self._relay_tcp: tuple | None = None  # (fd, on_frames, on_closed): see watch_relay_tcp
        self._relay_tcp_tail = b""  # the start of a frame the next read completes

    @property
    def stats(self) -> Counter:
        """Old name of `counters`."""
        return self.counters

    def set_datagram_handlers(self, handlers: dict[str, Callable[[bytes, tuple, float], None]]) -> None:
        """Route each kind of datagram (meshwg.mesh.demux's kinds) to its handler; see the module docstring."""
        unknown = set(handlers) - set(demux.KINDS)
        if unknown:
            raise ValueError(f"not datagram kinds: {sorted(unknown)}")
        self._handlers = dict(handlers)
        self._build_dispatch_table()

    def _build_dispatch_table(self) -> None:
        """The data loop's kind -> handler table; built when the loop starts (it binds the core's
        receive_wireguard once per run) and again when the handlers change while it runs."""
        if not self._handlers or self._receive_wireguard is None:
            self._dispatch_table = None
            return
        table = {kind: self._handlers.get(kind) or self._counting_drop(kind) for kind in demux.KINDS}
        if demux.WIREGUARD not in self._handlers:
            table[demux.WIREGUARD] = self._receive_wireguard
        self._dispatch_table = table

    def _counting_drop(self, kind: str) -> Callable[[bytes, tuple, float], None]:
        key = f"drop_{kind}_datagram"

        def drop(data: bytes, addr: tuple, now: float) -> None:
            self.counters[key] += 1
        return drop

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or the TUN disappears. Does not close the shells (their owner does)."""
        _warn_once_about_pure_python()
        self.core.on_earlier_deadline = self._deadline_moved
        self._epoll = select.epoll()
        self._trio_idle = _TrioIdle.probe() if self.idle_fast_path else None
        if self._trio_idle is not None:
            self._block_epoll = select.epoll()
            self._block_epoll.register(self._trio_idle.epoll_fd, select.EPOLLIN)
        try:
            for ep in (self._epoll, self._block_epoll):
                if ep is not None:
                    ep.register(self.tun.fd, select.EPOLLIN)
            self._udp_by_fd = {}
            self._watch_sockets()
            if self._relay_tcp is not None:
                self._register_relay_tcp(self._relay_tcp[0])
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer_loop)
                await nursery.start(self._data_loop)
                task_status.started()
        finally:
            self._nursery = None
            self._epoll.close()
            self._epoll = None
            if self._block_epoll is not None:
                self._block_epoll.close()
                self._block_epoll = None
            self._trio_idle = None

    def stop(self, reason: str = "stopped") -> None:
        if self.stopped_reason is None:
            self.stopped_reason = reason
        self.stopped.set()
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
        if self._epoll is not None:
            self._watch_sockets()
        for sock in old:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()

    # ---- output path -----------------------------------------------------------------------
    async def flush(self) -> None:
        """For control code: send/write everything the core produced; re-arm the timer if its
        deadline moved earlier."""
        await self._flush_out()
        if self.core.get_timer() < self._timer_deadline:
            self._timer_scope.cancel()

    def _deadline_moved(self, deadline: float) -> None:
        if deadline < self._timer_deadline:
            self._timer_scope.cancel()

    async def flush_io(self) -> None:
        """flush() without the timer re-arm (O(peers)): for per-packet callers, whose deadlines
        the timer task picks up on its own (see the module docstring): within TIMER_MAX_SLEEP, a timer
        sleeping longer (nothing flowed) re-armed here in O(1)."""
        self._packets_since_arm = True
        if self._timer_long:
            self._timer_long = False
            self._timer_scope.cancel()
        await self._flush_out()

    async def _flush_out(self) -> None:
        core = self.core
        datagrams = core.datagrams_to_send()
        if datagrams:
            start = self._send_datagrams(datagrams, 0)
            while start < len(datagrams):
                # Socket buffer full: wait for room rather than drop (TCP inside would see loss).
                sock = self._socket_for_dest(datagrams[start][1])
                self._flush_waited = True  # trio ran other tasks meanwhile (the data loop's idle path)
                try:
                    await trio.lowlevel.wait_writable(sock)
                except trio.ClosedResourceError:
                    pass  # rebind() replaced the socket: retry on the new one
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

    def _socket_for_dest(self, dest) -> socket.socket | None:
        """The socket a datagram for `dest` leaves from: a relay endpoint's, the relay's address family's."""
        if type(dest) is not tuple:
            route = self.relay_route
            dest = route.addr if route is not None and route.addr is not None else ("0.0.0.0", 0)
        return self.udp.socket_for(dest[0])

    def _send_datagrams(self, datagrams: list, start: int) -> int:
        """Send from index `start`; return the index of the first datagram that would block.

        Runs of datagrams to one endpoint with one size (the last may be shorter) go out as one
        UDP GSO sendmsg: the kernel cuts them apart, so a bulk batch costs one syscall, not 64.
        The compiled drain sends what it can; the rest (relay endpoints, scoped IPv6 hosts) and
        everything without it takes the Python path below."""
        if fastio is None:
            return self._send_datagrams_python(datagrams, start, len(datagrams))
        v4, v6 = self.udp.v4, self.udp.v6
        fd4 = v4.fileno() if v4 is not None else -1
        fd6 = v6.fileno() if v6 is not None else -1
        gso_ok = self._gso_ok
        sources = self.udp.sources
        n = len(datagrams)
        route = self.relay_route
        while True:
            if route is None:
                i, status, errors = fastio.send_datagrams(datagrams, start, fd4, fd6, gso_ok.get(fd4, False),
                                                          gso_ok.get(fd6, False), sources)
            else:
                i, status, errors = fastio.send_datagrams(datagrams, start, fd4, fd6, gso_ok.get(fd4, False),
                                                          gso_ok.get(fd6, False), sources, route.capsule,
                                                          self.clock())
            if errors:
                self.counters["drop_send_error"] += errors
            if status == fastio.SENT_ALL or status == fastio.WOULD_BLOCK:
                return i
            if status == fastio.GSO_REFUSED:  # datagrams[i - 1] went out alone
                self._gso_refused(fd6 if ":" in datagrams[i - 1][1][0] else fd4)
                start = i
                if start >= n:
                    return n
                continue
            # NEEDS_PYTHON: this datagram through the Python path, with the run of endpoint objects after it
            # (a relay's TCP transport: one call for the run, not one round trip through C per datagram).
            stop = i + 1
            while stop < n and type(datagrams[stop][1]) is not tuple:
                stop += 1
            if route is not None and self.relay_tcp_writer is not None and type(datagrams[i][1]) is not tuple:
                i = self._send_relay_tcp(datagrams, i, stop)
            done = self._send_datagrams_python(datagrams, i, stop) if i < stop else stop
            if done < stop:
                return done
            start = stop
            if start >= n:
                return n

    def _send_relay_tcp(self, datagrams: list, start: int, stop: int) -> int:
        """The run datagrams[start:stop] of endpoint objects: those the TCP relay client has headers for as SEND
        frames straight to its socket, when the relay shell says nothing else writes it now. Returns the index of
        the first datagram not taken (for the Python path)."""
        writer = self.relay_tcp_writer
        target = writer.tcp_fast_target()
        if target is None:
            return start
        i, rest = fastio.node_relay_send_tcp(self.relay_route.capsule, datagrams, start, stop, target[0], target[1])
        if i > start:
            writer.tcp_fast_sent(i - start, rest)
        return i

    def _gso_refused(self, fd: int) -> None:
        """This socket's path cannot segment (no checksum offload, route MTU below the size, ...):
        plain datagrams from now on."""
        self._gso_ok[fd] = False
        self.counters["disable_gso"] += 1

    def _send_datagrams_python(self, datagrams: list, start: int, stop: int) -> int:
        """_send_datagrams for datagrams[start:stop] in Python; returns the index that would block, or stop."""
        v4, v6 = self.udp.v4, self.udp.v6
        sources = self.udp.sources
        n = stop
        i = start
        while i < n:
            data, addr = datagrams[i]
            if type(addr) is not tuple:
                if self.endpoint_sender is not None:
                    self.endpoint_sender(data, addr)
                else:
                    self.counters["drop_send_no_sender"] += 1
                i += 1
                continue
            sock = v6 if ":" in addr[0] else v4
            if sock is None:
                self.counters["drop_send_no_socket"] += 1
                i += 1
                continue
            # Extend a GSO run of transport data (as _fastio.c does, and why): same endpoint, same
            # size; a shorter datagram ends it.
            size = len(data)
            j = i + 1
            if data[:1] == b"\x04" and self._gso_ok.get(sock.fileno()):
                total = size
                limit = min(n, i + GSO_MAX_SEGMENTS)
                while j < limit:
                    d, a = datagrams[j]
                    m = len(d)
                    if m > size or total + m > GSO_MAX_BYTES or d[:1] != b"\x04" or (a is not addr and a != addr):
                        break
                    total += m
                    j += 1
                    if m < size:
                        break
            try:
                if j - i == 1:
                    send_sticky(sock, [data], [], addr, sources)
                else:
                    send_sticky(sock, [d for d, _ in datagrams[i:j]],
                                [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))], addr, sources)
            except BlockingIOError:
                return i
            except OSError as err:
                if j - i > 1 and err.errno in _GSO_UNSUPPORTED:
                    # The path may not segment, or the destination is bad for any datagram (port 0):
                    # the first one alone tells which (as _fastio.c does).
                    try:
                        send_sticky(sock, [data], [], addr, sources)
                    except BlockingIOError:
                        return i
                    except OSError:
                        self.counters["drop_send_error"] += 1
                    else:
                        self._gso_refused(sock.fileno())
                    i += 1
                    continue
                # Unreachable network, firewall EPERM, ...: the packets are lost, as on a wire.
                self.counters["drop_send_error"] += j - i
            i = j
        return n

    def send_raw(self, data: bytes, addr: tuple) -> bool:
        """Send a non-WireGuard datagram from the shared socket (and from the local address `addr`
        last wrote to). False if dropped."""
        sock = self.udp.socket_for(addr[0])
        if sock is None:
            return False
        try:
            send_sticky(sock, [data], [], addr, self.udp.sources)
            return True
        except OSError:
            self.counters["drop_send_raw_error"] += 1
            return False

    # ---- the TCP relay's receive (issue 16) -----------------------------------------------------
    def watch_relay_tcp(self, fd: int, tail: bytes, on_frames, on_closed) -> bool:
        """Read the TCP relay's socket `fd` in the data loop (see the module docstring); `tail`: the start of a
        frame already read from it. False (nothing watched) without the compiled split or a relay_route."""
        if fastio is None or self.relay_route is None:
            return False
        self.unwatch_relay_tcp()
        self._relay_tcp, self._relay_tcp_tail = (fd, on_frames, on_closed), bytes(tail)
        self._register_relay_tcp(fd)
        return True

    def unwatch_relay_tcp(self, fd: int | None = None) -> None:
        """Stop reading the TCP relay's socket (`fd`'s only, if given: a later session's stays)."""
        if self._relay_tcp is None or (fd is not None and fd != self._relay_tcp[0]):
            return
        fd, self._relay_tcp, self._relay_tcp_tail = self._relay_tcp[0], None, b""
        for ep in (self._epoll, self._block_epoll):
            if ep is not None:
                try:
                    ep.unregister(fd)
                except (OSError, ValueError):
                    pass  # closed already

    def _register_relay_tcp(self, fd: int) -> None:
        for ep in (self._epoll, self._block_epoll):
            if ep is not None:
                ep.register(fd, select.EPOLLIN)

    async def _read_relay_tcp(self, fd: int, on_frames, on_closed) -> int:
        """One read of the TCP relay's stream: relayed transport data to the WireGuard handler in one batch,
        the other frames to the relay shell, then one flush. Returns the frames handled (1 for a partial one)."""
        try:
            data = os.read(fd, RELAY_TCP_READ)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.unwatch_relay_tcp()
            on_closed(exc)
            return 0
        if not data:
            self.unwatch_relay_tcp()
            on_closed(EOFError("relay closed the connection"))
            return 0
        if self._relay_tcp_tail:
            data = self._relay_tcp_tail + data
        datagrams, frames, used = fastio.node_relay_split_tcp(self.relay_route.capsule, data)
        self._relay_tcp_tail = data[used:]
        if not datagrams and not frames:
            return 1
        now = self.clock()
        if datagrams:
            table = self._dispatch_table
            if table is None:
                receive = self.core.receive_datagram
                for datagram, endpoint in datagrams:
                    receive(datagram, endpoint, now)
            else:
                demux.dispatch(datagrams, now, table)
        on_frames(frames, len(datagrams), now)
        await self.flush_io()
        return len(datagrams) + len(frames)

    # ---- input loop ------------------------------------------------------------------------
    def _watch_sockets(self) -> None:
        """(Re)register the UDP sockets in the data-path epoll set."""
        epolls = [ep for ep in (self._epoll, self._block_epoll) if ep is not None]
        for fd in self._udp_by_fd:
            for ep in epolls:
                try:
                    ep.unregister(fd)
                except OSError:
                    pass
        self._udp_by_fd = {s.fileno(): (s, s.family == socket.AF_INET6) for s in self.udp.sockets}
        if socket_filter.ENABLED:
            program = socket_filter.program(self.index_tag)
            for sock in self.udp.sockets:
                try:
                    socket_filter.attach(sock, program)
                except OSError:
                    self.counters["fail_socket_filter"] += 1  # junk then costs Python, nothing else
        self._gso_ok = {fd: udp_offload for fd in self._udp_by_fd}
        for fd in self._udp_by_fd:
            for ep in epolls:
                ep.register(fd, select.EPOLLIN)

    async def _data_loop(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Both directions in one task, driven by a private epoll set (TUN + UDP sockets).

        Each round asks the set which fds are ready (poll(0): one syscall, and no BlockingIOError
        raised for idle fds), drains those (up to `batch` packets each), and flushes after each.
        When nothing is ready the task awaits the set's fd: one trio wait for all fds. Re-polling
        right after a flush picks up what the kernel produced synchronously during a TUN write (a
        ping reply, TCP ACKs) without a scheduler round trip. After about `batch` packets the task
        yields so control tasks run."""
        tun, core, batch, clock = self.tun, self.core, self.batch, self.clock
        sched_yield = os.sched_yield
        send_ip_packet = core.send_ip_packet
        receive = core.receive_datagram
        self._receive_wireguard = core.receive_wireguard
        self._build_dispatch_table()
        dispatch = demux.dispatch
        epoll = self._epoll
        poll = epoll.poll
        ep_fd = epoll.fileno()
        tun_fd = tun.fd
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        wait_all_tasks_blocked = trio.testing.wait_all_tasks_blocked
        block_epoll = self._block_epoll
        trio_idle = self._trio_idle
        trio_fd = trio_idle.epoll_fd if trio_idle is not None else None
        sources = self.udp.sources  # the same dict for the UdpBind's life (rebinds keep it)
        task_status.started()
        since_yield = 0
        # fds that were ready in the previous round. An fd ready after an idle round gets one read
        # (latency regime: a lone ping); only an fd still ready in the next round is drained to
        # EAGAIN (bulk regime). The read that meets EAGAIN is one more syscall from the compiled
        # drain, and with the pure-Python one a raise: ~40 us of cold interpreter code right after
        # a wake-up (measured), a third of a ping hop.
        was_ready: set = set()
        # Whether trio ran other tasks since this task last blocked on its own (see the idle path).
        trio_ran = True
        while True:
            events = poll(0)
            if not events:
                since_yield = 0
                was_ready = set()
                if block_epoll is None:
                    await wait_readable(ep_fd)
                    trio_ran = True
                    continue
                # Idle fast path: once every other task is blocked, block on our fds and trio's own
                # epoll fd together, until trio's next deadline. A packet then wakes this task
                # straight from the kernel, and the trio round trip (~20 us) happens after its
                # answer went out instead of before. Anything of trio's (I/O, a thread's result, a
                # signal) wakes us too and the checkpoint lets trio handle it.
                # Block only when no other task can run. Tasks we woke are in trio's run queue
                # (busy()); tasks trio resumed together with us are in no queue we can inspect, and
                # blocking before they ran would stall them up to the next deadline. So after trio
                # ran anything, ask trio itself (wait_all_tasks_blocked: a round of cold interpreter
                # work, ~0.1 ms on a ping's path, hence not after every packet).
                if trio_ran or trio_idle.busy():
                    await wait_all_tasks_blocked(IDLE_CUSHION)
                    trio_ran = True
                    if trio_idle.busy():
                        await checkpoint()
                        continue
                trio_ran = False
                timeout = min(trio_idle.seconds_to_deadline(), IDLE_BLOCK_MAX)
                events = block_epoll.poll(timeout) if timeout > 0 else []
                trio_woke = not events
                for fd, _ in events:
                    if fd == trio_fd:
                        trio_woke = True
                if trio_woke:
                    await checkpoint()
                    trio_ran = True
                    continue
                # Only our fds woke us: handle them now, without a second poll.
            tun_ready = False
            got = 0
            ready_now = set()
            for fd, _ in events:
                ready_now.add(fd)
                if fd == tun_fd:
                    tun_ready = True
                    continue
                relay_tcp = self._relay_tcp
                if relay_tcp is not None and fd == relay_tcp[0]:
                    got += await self._read_relay_tcp(*relay_tcp)
                    continue
                entry = self._udp_by_fd.get(fd)
                if entry is None:
                    continue  # a socket rebind() just replaced
                try:
                    datagrams = recv_batch(entry[0], batch if fd in was_ready else 1, entry[1], sources,
                                           self.relay_route)
                except OSError:
                    if fd not in self._udp_by_fd:
                        continue
                    raise
                if datagrams:
                    got += len(datagrams)
                    now = clock()
                    table = self._dispatch_table
                    if table is None:
                        for data, addr in datagrams:
                            receive(data, addr, now)
                    else:
                        dispatch(datagrams, now, table)
                    await self.flush_io()
            if tun_ready:
                try:
                    packets = tun.read_batch(batch if tun_fd in was_ready else 1)
                except TunClosed:
                    self.stop("tun closed")
                    return
                if packets:
                    got += len(packets)
                    now = clock()
                    for pkt in packets:
                        send_ip_packet(pkt, now)
                    await self.flush_io()
            was_ready = ready_now
            if not got:
                # Ready but nothing to read (an error event consumed, a race): do not spin.
                since_yield = 0
                await wait_readable(ep_fd)
                trio_ran = True
                continue
            since_yield += got
            if got <= LATENCY_ROUND_MAX:
                # A lone packet just went out. Its receiver (an app reading the TUN, a peer device on
                # this host) was likely woken onto this CPU by the kernel's sync wake-up and would
                # wait for our bookkeeping and the next poll: let it run first. Measured: ping RTT
                # through two devices -10 to -20%; one syscall, never paid in bulk rounds.
                sched_yield()
            if since_yield >= batch:
                since_yield = 0
                await trio.lowlevel.checkpoint()
                trio_ran = True
            if self._flush_waited:
                self._flush_waited = False
                trio_ran = True

    async def _timer_loop(self) -> None:
        core, clock = self.core, self.clock
        while True:
            deadline = core.get_timer()
            now = clock()
            fired = False
            # Packets since the last read may have made deadlines nobody announced (module docstring): re-read
            # within TIMER_MAX_SLEEP. None: sleep to the deadline; flush_io() re-arms on the next packet.
            capped = self._packets_since_arm and deadline > now + TIMER_MAX_SLEEP
            self._packets_since_arm = False
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._timer_deadline = deadline
                self._timer_long = not capped and deadline > now + TIMER_MAX_SLEEP
                if capped:
                    await trio.sleep(TIMER_MAX_SLEEP)
                else:
                    await trio.sleep(max(0.0, deadline - now))
                    fired = True
            # Outside the scope: a re-arm must not interrupt a flush half-way.
            self._timer_deadline = -math.inf
            self._timer_long = False
            if fired:
                core.handle_timer(clock())
                await self._flush_out()
